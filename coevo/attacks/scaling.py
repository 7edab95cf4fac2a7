"""Scaled update (model replacement): the device boosts its update so that it dominates.

Bagdasaryan et al., "How To Backdoor Federated Learning", AISTATS 2020. Device: trains
honestly, then sends ``factor * update``; with ``factor`` about the cohort size over the server
step, a single device replaces the global model with its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from coevo.attacks.base import Attack, Tensors


class ScalingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["scaling"] = "scaling"
    # Boost of the update: the cohort size replaces the model; smaller is stealthier.
    factor: float = Field(10.0, gt=0)


class Scaling(Attack):
    name = "scaling"
    Config: ClassVar[type[BaseModel]] = ScalingConfig

    def tamper(
        self, update: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], key
    ) -> Tensors:
        return {k: self.config.factor * v for k, v in update.items()}
