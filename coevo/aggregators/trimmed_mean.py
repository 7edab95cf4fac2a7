"""Coordinate-wise trimmed mean: per coordinate, drop the largest and smallest values, average.

Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
ICML 2018. Cloud: per coordinate, sort the device values, drop ``floor(trim * n)`` from each
end and take the plain mean of the rest (weights are ignored). While at most that many devices
are corrupted, every coordinate stays within the range of the honest values.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from coevo.aggregators.base import Aggregator, AggregatorState, byzantine_count


class TrimmedMeanConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["trimmed_mean"] = "trimmed_mean"
    # Share of devices dropped at EACH end per coordinate: more tolerates more attackers and
    # throws away more honest signal.
    trim: float = Field(0.2, ge=0.0, lt=0.5)


class TrimmedMean(Aggregator):
    name = "trimmed_mean"
    Config: ClassVar[type[BaseModel]] = TrimmedMeanConfig

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, state: AggregatorState
    ) -> tuple[torch.Tensor, AggregatorState]:
        count = len(updates)
        cut = byzantine_count(count, self.config.trim)
        ordered = torch.sort(updates, dim=0).values
        return ordered[cut : count - cut].mean(dim=0), state
