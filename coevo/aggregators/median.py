"""Coordinate-wise median: each coordinate of the update is the median over the devices.

Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
ICML 2018. Cloud: per coordinate, the middle value of the sorted device values (the mean of
the two middle ones for an even count); weights are ignored, so that a device cannot buy
influence with a large row count. While fewer than half of the devices are corrupted, every
coordinate stays within the range of the honest values.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

from coevo.aggregators.base import Aggregator, AggregatorState


class MedianConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["median"] = "median"


class Median(Aggregator):
    name = "median"
    Config: ClassVar[type[BaseModel]] = MedianConfig

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, state: AggregatorState
    ) -> tuple[torch.Tensor, AggregatorState]:
        ordered = torch.sort(updates, dim=0).values
        count = len(updates)
        low, high = ordered[(count - 1) // 2], ordered[count // 2]
        return low + (high - low) / 2, state
