"""Always: the device asks the cloud before every session (EC-CDR's request-every-time).

The reference of request policies: DUET-style device–cloud recommendation (Lv et al., WWW 2023)
regenerates the device's parameters for every instance. Device: requests every session. Cloud:
answers each. Wire: the history up and fresh parameters down, every session.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from coevo.policies.base import Actions, Policy, Requests, counted
from coevo.types import DeviceState


class AlwaysConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["always"] = "always"


class Always(Policy):
    name = "always"
    Config = AlwaysConfig

    def decide(self, requests: Requests, device_state: DeviceState) -> Actions:
        request = torch.ones(len(requests), dtype=torch.bool)
        return Actions(request, torch.ones(len(requests)), counted(device_state, request))
