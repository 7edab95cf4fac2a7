"""Never: the device keeps the parameters it was given at the start (on-device inference only).

The lower reference of request policies (a static on-device model, as in EdgeRec-style
serving). Device: never asks. Cloud: nothing after the initial download. Wire: none.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from coevo.policies.base import Actions, Policy, Requests, counted
from coevo.types import DeviceState


class NeverConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["never"] = "never"


class Never(Policy):
    name = "never"
    Config = NeverConfig

    def decide(self, requests: Requests, device_state: DeviceState) -> Actions:
        request = torch.zeros(len(requests), dtype=torch.bool)
        return Actions(request, torch.zeros(len(requests)), counted(device_state, request))
