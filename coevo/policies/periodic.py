"""Periodic: the device asks the cloud once its parameters are ``every`` sessions old.

A fixed-schedule refresh, the usual production baseline for model updates (the "uniform
request insertion" that AdaRequest, Qian et al., KDD 2022, improves on). Device: counts
sessions since its parameters were generated. Cloud: answers each request. Wire: the history
up and fresh parameters down, every ``every`` sessions.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from coevo.policies.base import Actions, Policy, Requests, counted
from coevo.types import DeviceState


class PeriodicConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["periodic"] = "periodic"
    # Sessions between requests: 1 is "always" except at the very start; larger saves traffic.
    every: int = Field(2, ge=1, le=1_000_000)


class Periodic(Policy):
    name = "periodic"
    Config = PeriodicConfig

    def decide(self, requests: Requests, device_state: DeviceState) -> Actions:
        age = requests.features["age"]
        request = age >= self.config.every
        return Actions(request, age / self.config.every, counted(device_state, request))
