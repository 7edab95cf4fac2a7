"""The Aggregator contract: many devices' updates in, one update out, robustly.

An aggregator sees the cohort's uplinks as one matrix ``[num_uplinks, dim]`` (every tensor of
a device's payload flattened and concatenated, so that distances and norms are over the whole
update) with the devices' weights (their training-row counts), and returns one vector
``[dim]``. Aggregators that remember something between rounds (an adaptive clipping norm,
the previous aggregate) keep it in a small state of named tensors, which the ``Robust``
strategy wrapper stores in the cloud state.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from pydantic import BaseModel

AggregatorState = dict[str, torch.Tensor]


class Aggregator(ABC):
    """Combines stacked updates into one; subclasses set ``name``, ``Config``, ``aggregate``.

    Example:
        >>> class First(Aggregator):
        ...     name = "first"
        ...     Config = BaseModel
        ...     def aggregate(self, updates, weights, state):
        ...         return updates[0], state
        >>> First().aggregate(torch.eye(2), torch.ones(2), {})[0]
        tensor([1., 0.])
    """

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]

    def __init__(self, config: BaseModel | Mapping[str, Any] | None = None) -> None:
        if config is None or isinstance(config, Mapping):
            config = self.Config.model_validate(dict(config or {}))
        self.config: Any = config

    def init_state(self, dim: int) -> AggregatorState:
        """State before the first round, for updates of ``dim`` entries (default: none)."""
        return {}

    @abstractmethod
    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, state: AggregatorState
    ) -> tuple[torch.Tensor, AggregatorState]:
        """One vector ``[dim]`` from ``updates [num_uplinks, dim]``, and the next state.

        The result must not depend on the order of the rows (devices arrive in any order).
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


def weighted_mean(updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i x_i / sum_i w_i`` (weights need not be normalised)."""
    share = weights.to(updates.dtype) / weights.sum().clamp(min=1e-12).to(updates.dtype)
    return share @ updates


def clip_rows(vectors: torch.Tensor, max_norm: torch.Tensor | float) -> torch.Tensor:
    """Each row scaled down to Euclidean norm at most ``max_norm`` (rows within it untouched)."""
    norms = torch.linalg.vector_norm(vectors.double(), dim=1, keepdim=True)
    limit = torch.as_tensor(max_norm, dtype=torch.float64)
    # Norms in float64 and a small margin keep the clipped norm within the limit after rounding.
    scale = torch.where(norms > limit, limit * (1 - 1e-6) / norms.clamp(min=1e-300), 1.0)
    return (vectors.double() * scale).to(vectors.dtype)


def byzantine_count(num_uplinks: int, share: float) -> int:
    """How many of ``num_uplinks`` an aggregator assumes may be malicious (``floor``)."""
    return math.floor(share * num_uplinks + 1e-9)


def flatten(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Stacked tensors ``{name: [n, ...]}`` as one float32 matrix ``[n, dim]`` (name order)."""
    if not tensors:
        raise ValueError("uplinks: nothing to aggregate (the payload has no tensors)")
    counts = {len(t) for t in tensors.values()}
    if len(counts) != 1:
        raise ValueError(f"uplinks: tensors stack different device counts {sorted(counts)}")
    return torch.cat([t.reshape(len(t), -1).float() for t in tensors.values()], dim=1)


def unflatten(vector: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split ``vector [dim]`` back into ``like``'s names, per-device shapes and dtypes."""
    out, start = {}, 0
    for name, stacked in like.items():
        shape = stacked.shape[1:]
        size = math.prod(shape)
        piece = vector[start : start + size].reshape(shape)
        if not stacked.is_floating_point():
            piece = piece.round()
        out[name] = piece.to(stacked.dtype)
        start += size
    return out
