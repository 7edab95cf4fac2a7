"""FedBuff: asynchronous federated learning with a buffer of K updates.

Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022.
Device: as FedAvg, starting from whichever model version was current when it started. Cloud:
a fixed number of devices train concurrently; every K arrivals the cloud merges the buffered
updates, each down-weighted by its staleness ``s(tau) = 1 / (1 + tau) ** exponent`` (tau =
model versions since the device started), and a new device starts in each freed slot. Wire:
as FedAvg. The Simulator's asynchronous driver runs it (``asynchronous = True``).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, Field

from coevo.strategies.fedavg import FedAvg, FederatedSettings


class FedBuffConfig(FederatedSettings):
    name: Literal["fedbuff"] = "fedbuff"
    # Updates merged at once: small K adapts fast but is noisy; rounds count merges.
    buffer_size: int = Field(10, ge=1, le=1_000_000)
    # Devices training at the same time: more keeps the cloud busy, but updates get staler.
    concurrency: int = Field(30, ge=1, le=10_000_000)
    # Staleness discount exponent (the paper uses 1/sqrt(1 + tau), i.e. 0.5).
    staleness_exponent: float = Field(0.5, ge=0)


class FedBuff(FedAvg):
    name = "fedbuff"
    Config: ClassVar[type[BaseModel]] = FedBuffConfig
    asynchronous: ClassVar[bool] = True

    def staleness_weight(self, staleness: torch.Tensor) -> torch.Tensor:
        return (1.0 + staleness.double()) ** -self.config.staleness_exponent
