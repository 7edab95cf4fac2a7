"""FedYogi: Yogi on the cloud over FedAvg's averaged update.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Yogi: Zaheer et al., NeurIPS
2018). The second moment moves additively by ``sign(v - delta^2)``, so it grows slower than
Adam's when updates are sparse. Devices and wire as FedAvg.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel

from coevo.strategies.fedopt import ServerOptimizer, ServerOptimizerSettings


class FedYogiConfig(ServerOptimizerSettings):
    name: Literal["fedyogi"] = "fedyogi"


class FedYogi(ServerOptimizer):
    name = "fedyogi"
    Config: ClassVar[type[BaseModel]] = FedYogiConfig

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        squared = delta**2
        return v - (1 - self.config.beta2) * squared * torch.sign(v - squared)
