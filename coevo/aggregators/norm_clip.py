"""Norm clipping, fixed or adaptive: bound each device's influence, then average.

Fixed: Sun et al., "Can You Really Backdoor Federated Learning?", 2019 (norm bounding).
Adaptive: Andrew et al., "Differentially Private Learning with Adaptive Clipping", NeurIPS
2021 (geometric tracking of a norm quantile). Cloud: every update is scaled down to norm at
most ``C``, then the weighted mean is taken. The adaptive bound starts at the ``quantile`` of
the first cohort's norms and then moves by ``C <- C * exp(-lr * (share_within_C - quantile))``
each round, so that about ``quantile`` of the updates stay unclipped.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from coevo.aggregators.base import Aggregator, AggregatorState, clip_rows, weighted_mean


class NormClipConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["norm_clip"] = "norm_clip"
    # Largest update norm that counts in full: lower bounds attackers harder and slows
    # honest learning once honest updates are clipped too.
    max_norm: float = Field(1.0, gt=0)


class AdaptiveClipConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["adaptive_clip"] = "adaptive_clip"
    # Share of updates meant to stay unclipped; the median keeps attackers (under half)
    # from raising the bound.
    quantile: float = Field(0.5, gt=0.0, lt=1.0)
    # Geometric step of the bound per round: faster tracking against steadier bounds.
    lr: float = Field(0.2, gt=0.0, le=10.0)


class NormClip(Aggregator):
    name = "norm_clip"
    Config: ClassVar[type[BaseModel]] = NormClipConfig

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, state: AggregatorState
    ) -> tuple[torch.Tensor, AggregatorState]:
        return weighted_mean(clip_rows(updates, self.config.max_norm), weights), state


def norm_quantile(norms: torch.Tensor, quantile: float) -> torch.Tensor:
    """The order statistic at ``quantile`` (lower one; no interpolation, no size limit)."""
    ordered = torch.sort(norms).values
    return ordered[min(len(norms) - 1, math.floor(quantile * len(norms)))]


class AdaptiveClip(Aggregator):
    name = "adaptive_clip"
    Config: ClassVar[type[BaseModel]] = AdaptiveClipConfig

    def init_state(self, dim: int) -> AggregatorState:
        return {"clip_norm": torch.tensor(math.nan, dtype=torch.float64)}

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, state: AggregatorState
    ) -> tuple[torch.Tensor, AggregatorState]:
        norms = torch.linalg.vector_norm(updates.double(), dim=1)
        bound = state["clip_norm"]
        if bool(torch.isnan(bound)):
            bound = norm_quantile(norms, self.config.quantile)
        merged = weighted_mean(clip_rows(updates, bound), weights)
        within = (norms <= bound).double().mean()
        step = torch.exp(-self.config.lr * (within - self.config.quantile))
        return merged, {"clip_norm": bound * step}
