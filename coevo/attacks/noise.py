"""Gaussian noise: the device sends random noise instead of (or on top of) its update.

Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
NeurIPS 2017 (the Gaussian Byzantine worker). Device: sends ``N(0, sigma^2)`` per entry of
each floating-point uplink tensor, fresh each round, or adds it to the honest update.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from coevo.attacks.base import Attack, Tensors, normal


class NoiseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["noise"] = "noise"
    # Standard deviation of the noise per entry: larger does more damage and is easier to spot.
    sigma: float = Field(0.1, gt=0)
    # Add the noise to the honest update instead of sending noise alone.
    additive: bool = False


class Noise(Attack):
    name = "noise"
    Config: ClassVar[type[BaseModel]] = NoiseConfig

    def tamper(
        self, update: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], key
    ) -> Tensors:
        out = {}
        for salt, (name, value) in enumerate(update.items()):
            if not value.is_floating_point():
                out[name] = value
                continue
            noise = (self.config.sigma * normal(key, value.shape, salt)).to(value.dtype)
            out[name] = value + noise if self.config.additive else noise
        return out
