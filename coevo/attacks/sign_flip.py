"""Sign flip: the device sends its honest update negated (optionally scaled).

Damaskinos et al., "Asynchronous Byzantine Machine Learning (the case of SGD)", ICML 2018;
Li et al., "RSA: Byzantine-Robust Stochastic Aggregation Methods", AAAI 2019. Device: trains
honestly, then sends ``-factor * update``, pulling the model back along the honest direction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from coevo.attacks.base import Attack, Tensors


class SignFlipConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["sign_flip"] = "sign_flip"
    # Length of the flipped update relative to the honest one: larger pulls harder and
    # stands out more to norm-based defences.
    factor: float = Field(1.0, gt=0)


class SignFlip(Attack):
    name = "sign_flip"
    Config: ClassVar[type[BaseModel]] = SignFlipConfig

    def tamper(
        self, update: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], key
    ) -> Tensors:
        return {k: -self.config.factor * v for k, v in update.items()}
