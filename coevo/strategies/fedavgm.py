"""FedAvgM: server momentum over FedAvg's averaged update.

Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", 2019. The cloud keeps a momentum buffer (``m/NAME``) in CloudState.
Devices and wire as FedAvg.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, Field

from coevo.strategies.fedavg import FedAvg, FederatedSettings
from coevo.types import CloudState


class FedAvgMConfig(FederatedSettings):
    name: Literal["fedavgm"] = "fedavgm"
    # Momentum of the cloud's update: smooths noisy cohorts, overshoots when high.
    momentum: float = Field(0.9, ge=0, lt=1)


class FedAvgM(FedAvg):
    name = "fedavgm"
    Config: ClassVar[type[BaseModel]] = FedAvgMConfig

    def init(self, rng: torch.Generator) -> CloudState:
        cloud = super().init(rng)
        return cloud.with_tensors(**{f"m/{k}": torch.zeros_like(cloud[k]) for k in self.shared})

    def server_update(self, cloud: CloudState, delta: dict[str, torch.Tensor]) -> CloudState:
        out: dict[str, torch.Tensor] = {}
        for k, d in delta.items():
            m = self.config.momentum * cloud[f"m/{k}"] + d
            out[k], out[f"m/{k}"] = cloud[k] + self.config.server_lr * m, m
        return cloud.with_tensors(**out)
