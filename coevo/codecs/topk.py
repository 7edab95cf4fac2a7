"""Top-k sparsification with error feedback.

On the device each floating tensor, plus what earlier rounds left unsent, is cut to its k
largest-magnitude entries, and the rest is kept as the next round's residual; in the cloud the
kept entries are scattered back into zeros.

References:
    Stich, Cordonnier and Jaggi, "Sparsified SGD with Memory", NeurIPS 2018.
    Lin, Han, Mao, Wang and Dally, "Deep Gradient Compression", ICLR 2018.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from coevo.codecs.base import Codec, Tensors, put_unique, wire_key


@dataclass(frozen=True)
class TopK(Codec):
    """Sends the ``k = max(1, ceil(fraction · numel))`` largest-magnitude entries per tensor.

    Each floating tensor ``w`` is sent as ``w::values`` (``w``'s dtype, ``[k]``) and
    ``w::indices`` (int32 ``[k]``, positions in the flattened tensor); integer tensors pass
    through. ``k`` depends only on shapes, so wire shapes are static under ``torch.func.vmap``.

    With ``error_feedback`` the device adds its residual (everything not yet sent) to the
    tensor before choosing, and keeps what it did not send as the new residual, under the
    tensor's own name (a missing residual counts as zero). Nothing is then lost, only delayed:
    the sum of decoded updates trails the sum of true updates by the residual alone, which
    stays bounded (Stich et al. 2018, Lin et al. 2018). Without it, the unsent entries are
    dropped and the state stays empty.

    Ties in magnitude are broken by ``torch.topk``, the same way for the same inputs.

    Args:
        fraction: share of each tensor's entries sent, in (0, 1].
        error_feedback: carry the unsent remainder into the next round.

    Raises:
        ValueError: when ``fraction`` is outside (0, 1].
    """

    fraction: float
    error_feedback: bool = True

    name: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"TopK.fraction must be in (0, 1], got {self.fraction!r}")

    def num_kept(self, numel: int) -> int:
        """How many of a tensor's ``numel`` entries are sent: ``max(1, ceil(fraction·numel))``."""
        # Rounding first keeps float noise from adding an entry: 0.07 · 100 is 7.000000000000001.
        return min(numel, max(1, math.ceil(round(self.fraction * numel, 9))))

    def init_state(self, template: Mapping[str, Tensor]) -> Tensors:
        if not self.error_feedback:
            return {}
        return {
            name: torch.zeros_like(tensor)
            for name, tensor in template.items()
            if tensor.is_floating_point()
        }

    def encode(
        self, tensors: Mapping[str, Tensor], state: Mapping[str, Tensor]
    ) -> tuple[Tensors, Tensors]:
        wire: Tensors = {}
        residuals: Tensors = {}
        for name, tensor in tensors.items():
            if not tensor.is_floating_point():
                put_unique(wire, name, tensor)
                continue
            corrected = tensor + state[name] if self.error_feedback and name in state else tensor
            flat = corrected.reshape(-1)
            indices = flat.abs().topk(self.num_kept(flat.numel())).indices
            values = flat.gather(0, indices)
            put_unique(wire, wire_key(name, "values"), values)
            put_unique(wire, wire_key(name, "indices"), indices.to(torch.int32))
            if self.error_feedback:
                # Zeroing the sent entries, rather than subtracting them, keeps the rest exact.
                unsent = flat.scatter(0, indices, torch.zeros_like(values))
                residuals[name] = unsent.reshape(tensor.shape)
        return wire, residuals

    def decode(self, wire: Mapping[str, Tensor], template: Mapping[str, Tensor]) -> Tensors:
        tensors: Tensors = {}
        for name, like in template.items():
            if not like.is_floating_point():
                tensors[name] = wire[name]
                continue
            values = wire[wire_key(name, "values")]
            indices = wire[wire_key(name, "indices")].to(torch.int64)
            dense = values.new_zeros(like.numel(), dtype=like.dtype)
            tensors[name] = dense.scatter(0, indices, values.to(like.dtype)).reshape(like.shape)
        return tensors
