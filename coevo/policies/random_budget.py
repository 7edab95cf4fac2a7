"""Random at a budget: each session, a device asks the cloud with probability ``budget``.

The random-request baseline of IntellectReq (Lv et al., WWW 2024): the same communication
frequency as a learned policy, without its choice of when. Device: one seeded draw per
session (a hash of seed, device and session, so batches decide as single devices do).
Cloud: answers each request. Wire: the history up and fresh parameters down, per request.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from coevo.policies.base import Actions, Policy, Requests, counted, uniform_draws
from coevo.types import DeviceState


class RandomBudgetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["random"] = "random"
    # Share of sessions with a request: the communication frequency bought.
    budget: float = Field(0.2, ge=0.0, le=1.0)
    # Seed of the draws; the same seed repeats the same decisions.
    seed: int = Field(0, ge=0, le=2**31 - 1)


class RandomBudget(Policy):
    name = "random"
    Config = RandomBudgetConfig

    def decide(self, requests: Requests, device_state: DeviceState) -> Actions:
        draws = uniform_draws(self.config.seed, requests.devices, requests.session)
        request = draws < self.config.budget
        return Actions(request, 1.0 - draws, counted(device_state, request))
