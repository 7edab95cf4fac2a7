"""FedAdam: Adam on the cloud over FedAvg's averaged update.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021. Devices and wire as FedAvg; the
cloud keeps Adam's moments (without bias correction, as in the paper).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel

from coevo.strategies.fedopt import ServerOptimizer, ServerOptimizerSettings


class FedAdamConfig(ServerOptimizerSettings):
    name: Literal["fedadam"] = "fedadam"


class FedAdam(ServerOptimizer):
    name = "fedadam"
    Config: ClassVar[type[BaseModel]] = FedAdamConfig

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.config.beta2 * v + (1 - self.config.beta2) * delta**2
