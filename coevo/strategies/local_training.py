"""Settings of on-device training, shared by every strategy that trains on the device."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class LocalTraining(BaseModel):
    """How a device trains in one round."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Passes over the device's rows per round; more adapts further and overfits sooner.
    epochs: int = Field(5, ge=1, le=1000)
    # Adam step size on the device.
    lr: float = Field(1e-3, gt=0, le=10.0)
    # Examples per step; small devices have few rows, so small batches give more steps.
    batch_size: int = Field(16, ge=1, le=4096)
    # adam adapts per weight (robust to lr); sgd is what federated analyses assume.
    optimizer: Literal["adam", "sgd"] = "adam"
