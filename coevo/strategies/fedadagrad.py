"""FedAdagrad: Adagrad on the cloud over FedAvg's averaged update.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021. The second moment accumulates
every squared update. Devices and wire as FedAvg.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel

from coevo.strategies.fedopt import ServerOptimizer, ServerOptimizerSettings


class FedAdagradConfig(ServerOptimizerSettings):
    name: Literal["fedadagrad"] = "fedadagrad"


class FedAdagrad(ServerOptimizer):
    name = "fedadagrad"
    Config: ClassVar[type[BaseModel]] = FedAdagradConfig

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return v + delta**2
