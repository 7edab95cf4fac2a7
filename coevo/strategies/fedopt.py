"""Server optimisers for FedAvg's averaged update: the shared base of FedAvgM, FedAdam, ...

Reddi et al., "Adaptive Federated Optimization", ICLR 2021: the mean device update is a
pseudo-gradient; the cloud feeds it to an optimiser whose moments live in CloudState
(``m/NAME``, ``v/NAME``). Devices and wire are exactly FedAvg's.
"""

from __future__ import annotations

import torch
from pydantic import Field

from coevo.strategies.fedavg import FedAvg, FederatedSettings
from coevo.types import CloudState


class ServerOptimizerSettings(FederatedSettings):
    # Cloud step size on the pseudo-gradient (Reddi et al. tune it in 10^[-3, 1]).
    server_lr: float = Field(0.1, gt=0)
    # First-moment decay (momentum).
    beta1: float = Field(0.9, ge=0, lt=1)
    # Second-moment decay.
    beta2: float = Field(0.99, ge=0, lt=1)
    # Adaptivity floor: larger tau behaves more like plain momentum.
    tau: float = Field(1e-3, gt=0)


class ServerOptimizer(FedAvg):
    """FedAvg whose cloud keeps optimiser moments; subclasses define ``second_moment``."""

    def init(self, rng: torch.Generator) -> CloudState:
        cloud = super().init(rng)
        zeros = {f"{p}/{k}": torch.zeros_like(cloud[k]) for k in self.shared for p in "mv"}
        return cloud.with_tensors(**zeros)

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def server_update(self, cloud: CloudState, delta: dict[str, torch.Tensor]) -> CloudState:
        c = self.config
        out: dict[str, torch.Tensor] = {}
        for k, d in delta.items():
            m = c.beta1 * cloud[f"m/{k}"] + (1 - c.beta1) * d
            v = self.second_moment(cloud[f"v/{k}"], d)
            out[k] = cloud[k] + c.server_lr * m / (v.sqrt() + c.tau)
            out[f"m/{k}"], out[f"v/{k}"] = m, v
        return cloud.with_tensors(**out)
