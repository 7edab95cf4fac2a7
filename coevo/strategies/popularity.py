"""Popularity: rank items by how often they occur in the cloud's pooled cloud-period data.

Device: nothing. Cloud: counts items. Wire: each request sends the candidate ids up and the
scores down (the reference row every recommender must beat).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from coevo.strategies.base import Strategy
from coevo.types import CloudState, DeviceState, Payload


class PopularityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["popularity"] = "popularity"


class Popularity(Strategy):
    name = "popularity"
    serving = "cloud"
    local_period = None
    Config = PopularityConfig

    def init(self, rng: torch.Generator) -> CloudState:
        split = self.task.split
        items = split.items[self.task.rows("cloud")]
        return CloudState({"counts": torch.bincount(items, minlength=split.num_items).float()})

    def request(self, history: torch.Tensor, candidates: torch.Tensor) -> Payload:
        return Payload({"candidates": candidates.int()})

    def score(
        self,
        cloud: CloudState,
        device_state: DeviceState,
        history: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        return cloud["counts"][candidates]
