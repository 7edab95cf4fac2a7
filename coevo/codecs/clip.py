"""L2 norm clipping of a device's whole update, the first step of user-level DP-FedAvg.

On the device every floating tensor of the update is scaled by one common factor so that their
joint L2 norm is at most ``max_norm``; the cloud receives the clipped tensors as they are.
Clipping bounds what one device can move the sum by, which is what differential privacy's
noise is calibrated to and what norm-based robust aggregation relies on.

Reference:
    McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent Language
    Models", ICLR 2018 (per-user clipping of the model update).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from coevo.codecs.base import Codec, Tensors

_SHRINK = 1.0 - 2.0**-20
"""A clipped update is scaled to ``max_norm·(1 - 2^-20)``: float32 rounding of the scaled
values then cannot carry its norm above ``max_norm``."""


def update_norm(tensors: Mapping[str, Tensor]) -> Tensor:
    """The joint L2 norm of the floating tensors of ``tensors``, in float64 (0-d)."""
    floating = [t for t in tensors.values() if t.is_floating_point()]
    if not floating:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack([t.double().square().sum() for t in floating]).sum().sqrt()


def clip_factor(norm: Tensor, max_norm: float) -> Tensor:
    """The factor that brings an update of L2 norm ``norm`` within ``max_norm`` (1 if it is)."""
    if math.isinf(max_norm):
        return torch.ones_like(norm)
    scaled = max_norm * _SHRINK / norm.clamp(min=torch.finfo(norm.dtype).tiny)
    return torch.where(norm > max_norm * _SHRINK, scaled, torch.ones_like(norm))


def clip_update(tensors: Mapping[str, Tensor], max_norm: float) -> Tensors:
    """``tensors`` with every floating tensor scaled by one factor: joint L2 norm ≤ ``max_norm``.

    Integer tensors (indices of a sparsifier) pass through. Pure and vmappable: the factor is a
    tensor, never a Python branch on values.
    """
    factor = clip_factor(update_norm(tensors), max_norm)
    return {
        name: (t * factor.to(t.dtype)) if t.is_floating_point() else t
        for name, t in tensors.items()
    }


@dataclass(frozen=True)
class ClipNorm(Codec):
    """Clips one device's update to joint L2 norm ``max_norm``; the wire is the clipped update.

    Every floating tensor is scaled by the same factor ``min(1, max_norm / ||update||)`` (the
    norm taken over all floating tensors together, in float64), so the direction of the update
    is kept. Clipping costs no bytes: names, shapes and dtypes do not change.

        >>> import torch
        >>> codec = ClipNorm(1.0)
        >>> wire, _ = codec.encode({"w": torch.tensor([3.0, 4.0])}, {})
        >>> [round(v, 4) for v in wire["w"].tolist()]
        [0.6, 0.8]

    Bound, per element: ``|x|·(1 - factor)`` plus one rounding of ``|x|``.

    Args:
        max_norm: the clipping bound C, positive; ``math.inf`` clips nothing.

    Raises:
        ValueError: when ``max_norm`` is not positive.
    """

    max_norm: float

    name: ClassVar[str] = "clip"

    def __post_init__(self) -> None:
        if not self.max_norm > 0:
            raise ValueError(f"ClipNorm.max_norm must be positive, got {self.max_norm!r}")

    def encode(
        self, tensors: Mapping[str, Tensor], state: Mapping[str, Tensor]
    ) -> tuple[Tensors, Tensors]:
        return clip_update(tensors, self.max_norm), {}

    def decode(self, wire: Mapping[str, Tensor], template: Mapping[str, Tensor]) -> Tensors:
        return {name: wire[name] for name in template}

    def bound(self, tensors: Mapping[str, Tensor]) -> Tensors:
        factor = clip_factor(update_norm(tensors), self.max_norm)
        bounds: Tensors = {}
        for name, tensor in tensors.items():
            if not tensor.is_floating_point():
                bounds[name] = torch.zeros(tensor.shape)
                continue
            magnitude = tensor.abs().double()
            rounding = magnitude * torch.finfo(tensor.dtype).eps
            bounds[name] = magnitude * (1.0 - factor) + rounding
        return bounds
