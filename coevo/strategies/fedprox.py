"""FedProx: FedAvg with a proximal term that keeps local models near the global one.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020. Device: minimises
its loss plus ``mu / 2 * ||w - w_global||^2``, which limits client drift on non-IID data.
Cloud and wire: as FedAvg.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field

from coevo.strategies.fedavg import FedAvg, FederatedSettings
from coevo.types import DeviceState, Payload


class FedProxConfig(FederatedSettings):
    name: Literal["fedprox"] = "fedprox"
    # Proximal weight: 0 is FedAvg; larger resists drift but slows local progress.
    mu: float = Field(0.01, ge=0)


class FedProx(FedAvg):
    name = "fedprox"
    Config: ClassVar[type[BaseModel]] = FedProxConfig

    def local_extras(self, payload: Payload, device_state: DeviceState) -> dict[str, Any]:
        return {"anchor": dict(payload.tensors), "l2": self.config.mu}
