"""Quantisation codecs: fewer bits per value, same number of values.

On the device each floating tensor is cast (``Float16``) or scaled and rounded to int8
(``Int8``); in the cloud it is cast or rescaled back. Integer tensors pass through untouched,
so these codecs can follow a sparsifier in a ``Chain`` without mangling its indices.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from coevo.codecs.base import Codec, Tensors, put_unique, wire_key

FP16_MAX = torch.finfo(torch.float16).max
INT8_LEVELS = 127
"""Symmetric int8 uses -127..127, so that +x and -x quantise to opposite codes."""
SUBNORMAL_SCALE_SLACK = 2.0**-142
"""A scale below float32's normal range (max|x| < 1.5e-36) is rounded to a multiple of 2^-149;
times at most 127 codes, that costs under 2^-142 of absolute error."""


def _work_dtype(tensor: Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs, so that bounds are not rounded coarser than x."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _rounding_back(tensor: Tensor) -> Tensor:
    """The error of one rounding of ``|tensor|`` to its own dtype, in the working dtype."""
    return tensor.abs().to(_work_dtype(tensor)) * torch.finfo(tensor.dtype).eps


@dataclass(frozen=True)
class Float16(Codec):
    """Casts floating tensors to float16 on the wire: half the bytes of float32.

    Values beyond float16's range (±65504) saturate to ±65504 instead of becoming infinite,
    because one infinity would poison every average it enters.

    Bound, per element: ``|x|·2^-11 + 2^-25`` inside float16's range (half a unit in the last of
    11 significant bits, plus half the smallest subnormal step), ``|x| - 65504`` beyond it; plus
    ``|x|·eps(dtype)`` for rounding back to the tensor's dtype, which only bfloat16 needs.
    """

    name: ClassVar[str] = "fp16"

    def encode(
        self, tensors: Mapping[str, Tensor], state: Mapping[str, Tensor]
    ) -> tuple[Tensors, Tensors]:
        wire: Tensors = {}
        for name, tensor in tensors.items():
            # Cast first, then clamp in float16: bfloat16 cannot represent 65504 itself.
            wire[name] = (
                tensor.to(torch.float16).clamp(-FP16_MAX, FP16_MAX)
                if tensor.is_floating_point()
                else tensor
            )
        return wire, {}

    def decode(self, wire: Mapping[str, Tensor], template: Mapping[str, Tensor]) -> Tensors:
        return {
            name: wire[name].to(like.dtype) if like.is_floating_point() else wire[name]
            for name, like in template.items()
        }

    def bound(self, tensors: Mapping[str, Tensor]) -> Tensors:
        bounds: Tensors = {}
        for name, tensor in tensors.items():
            if not tensor.is_floating_point():
                bounds[name] = torch.zeros(tensor.shape)
                continue
            magnitude = tensor.abs().to(_work_dtype(tensor))
            in_range = magnitude * 2.0**-11 + 2.0**-25
            # One step up, as the subtraction may round below the true excess over 65504.
            saturated = torch.nextafter(magnitude - FP16_MAX, magnitude.new_tensor(torch.inf))
            cast_error = torch.where(magnitude <= FP16_MAX, in_range, saturated)
            bounds[name] = cast_error + _rounding_back(tensor)
        return bounds


@dataclass(frozen=True)
class Int8(Codec):
    """Symmetric int8 quantisation: ``q = round(x / scale)``, ``scale = max|x| / 127``.

    Each floating tensor ``w`` is sent as ``w::q`` (int8, ``w``'s shape) and ``w::scale``
    (float32): one scale per tensor, or with ``per_channel`` one per output channel (dim 0) for
    tensors of two or more dims, which keeps a small-range channel from being rounded to zero
    by a large-range one. Scalars and 1-D tensors always get one scale. An all-zero tensor or
    channel gets scale 0 and decodes to exact zeros.

    Bound, per element: ``scale / 2``, widened by ``scale·2^-15`` for float32 arithmetic, by
    ``2^-142`` for a subnormal scale and by ``|x|·eps(dtype)`` for rounding back to the tensor's
    dtype.

    Args:
        per_channel: one scale per slice along dim 0 instead of one per tensor.
    """

    per_channel: bool = False

    name: ClassVar[str] = "int8"

    def _channelwise(self, ndim: int) -> bool:
        return self.per_channel and ndim >= 2

    def scale(self, tensor: Tensor) -> Tensor:
        """The float32 scale ``encode`` sends for ``tensor``: 0-d, or ``[channels]``."""
        magnitude = tensor.abs().to(torch.float32)
        if self._channelwise(tensor.ndim):
            return magnitude.amax(dim=tuple(range(1, tensor.ndim))) / INT8_LEVELS
        return magnitude.amax() / INT8_LEVELS

    def _broadcast(self, scale: Tensor, ndim: int) -> Tensor:
        if self._channelwise(ndim):
            return scale.reshape(scale.shape + (1,) * (ndim - 1))
        return scale

    def encode(
        self, tensors: Mapping[str, Tensor], state: Mapping[str, Tensor]
    ) -> tuple[Tensors, Tensors]:
        wire: Tensors = {}
        for name, tensor in tensors.items():
            if not tensor.is_floating_point():
                put_unique(wire, name, tensor)
                continue
            scale = self.scale(tensor)
            # A zero scale only occurs for all-zero values, whose codes are 0 whatever we divide by.
            divisor = self._broadcast(
                torch.where(scale > 0, scale, torch.ones_like(scale)), tensor.ndim
            )
            codes = torch.round(tensor.to(torch.float32) / divisor).clamp(-INT8_LEVELS, INT8_LEVELS)
            put_unique(wire, wire_key(name, "q"), codes.to(torch.int8))
            put_unique(wire, wire_key(name, "scale"), scale)
        return wire, {}

    def decode(self, wire: Mapping[str, Tensor], template: Mapping[str, Tensor]) -> Tensors:
        tensors: Tensors = {}
        for name, like in template.items():
            if not like.is_floating_point():
                tensors[name] = wire[name]
                continue
            codes = wire[wire_key(name, "q")].to(torch.float32)
            scale = self._broadcast(wire[wire_key(name, "scale")], like.ndim)
            tensors[name] = (codes * scale).to(like.dtype)
        return tensors

    def bound(self, tensors: Mapping[str, Tensor]) -> Tensors:
        bounds: Tensors = {}
        for name, tensor in tensors.items():
            if not tensor.is_floating_point():
                bounds[name] = torch.zeros(tensor.shape)
                continue
            scale = self._broadcast(self.scale(tensor), tensor.ndim).to(_work_dtype(tensor))
            half_step = scale * (0.5 + 2.0**-15) + SUBNORMAL_SCALE_SLACK
            bounds[name] = half_step.expand(tensor.shape) + _rounding_back(tensor)
        return bounds
