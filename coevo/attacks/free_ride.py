"""Free-riding: the device takes the model and contributes nothing, but still reports.

Lin et al., "Free-riders in Federated Learning: Attacks and Defenses", 2019. Device: skips
training and sends the uplink an untrained device would send: the received model (for
strategies that send updates, an exact zero update), while claiming its row count.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

from coevo.attacks.base import Attack
from coevo.strategies.base import DeviceBatch


class FreeRideConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["free_ride"] = "free_ride"


class FreeRide(Attack):
    name = "free_ride"
    Config: ClassVar[type[BaseModel]] = FreeRideConfig
    poisons_data = True

    def poison(self, batch: DeviceBatch, key: torch.Tensor) -> DeviceBatch:
        # Every step masked out: local training leaves the received weights as they are.
        return replace(batch, mask=torch.zeros_like(batch.mask))
