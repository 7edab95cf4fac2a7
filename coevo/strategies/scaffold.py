"""SCAFFOLD: control variates correct each device's drift from the global update direction.

Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
ICML 2020 (option II control update). Device: trains with gradients corrected by
``c - c_i`` using plain SGD, then sets ``c_i+ = c_i - c + (x - y) / (K * lr)``; ``c_i`` lives in
device state. Cloud: moves ``x`` by the mean model update and ``c`` by ``|S|/N`` times the mean
control update. Wire: ``x`` and ``c`` down; the model and control updates up (twice FedAvg).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel

from coevo.strategies.base import DeviceBatch
from coevo.strategies.fedavg import FedAvg, FederatedSettings
from coevo.strategies.local_training import LocalTraining, local_train
from coevo.types import CloudState, DeviceState, Metrics, Payload


class ScaffoldConfig(FederatedSettings):
    name: Literal["scaffold"] = "scaffold"
    local: LocalTraining = LocalTraining(epochs=1, lr=0.5, optimizer="sgd")


class Scaffold(FedAvg):
    name = "scaffold"
    Config: ClassVar[type[BaseModel]] = ScaffoldConfig

    def init(self, rng: torch.Generator) -> CloudState:
        cloud = super().init(rng)
        return cloud.with_tensors(**{f"c/{k}": torch.zeros_like(cloud[k]) for k in self.shared})

    def init_devices(self, cloud: CloudState, num_devices: int) -> DeviceState:
        devices = super().init_devices(cloud, num_devices)
        controls = {f"c/{k}": torch.zeros(num_devices, *cloud[k].shape) for k in self.shared}
        return devices.with_tensors(**controls)

    def downlink(self, cloud: CloudState, round: int) -> Payload:
        return Payload(
            {k: cloud[k] for k in self.shared} | {f"c/{k}": cloud[f"c/{k}"] for k in self.shared}
        )

    def local(
        self, payload: Payload, device_state: DeviceState, batch: DeviceBatch
    ) -> tuple[Payload, DeviceState, Metrics]:
        if self.config.local.optimizer != "sgd":
            raise ValueError(
                "scaffold: local.optimizer must be 'sgd' (its control update assumes SGD)"
            )
        x = {k: payload.tensors[k] for k in self.shared}
        params = {**x, **{k: device_state[k] for k in self.private}}
        correction = {k: payload.tensors[f"c/{k}"] - device_state[f"c/{k}"] for k in self.shared}
        correction |= {k: torch.zeros_like(device_state[k]) for k in self.private}
        lr = self.config.local.lr
        trained, loss = local_train(
            self.model,
            params,
            list(params),
            batch,
            lr,
            loss=self.task.batch_loss,
            correction=correction,
            optimizer="sgd",
        )
        steps = (batch.mask.sum(1) > 0).sum().clamp(min=1)
        update, new_state = {}, {k: trained[k] for k in self.private}
        for k in self.shared:
            control = (
                device_state[f"c/{k}"]
                - payload.tensors[f"c/{k}"]
                + (x[k] - trained[k]) / (steps * lr)
            )
            update[k] = trained[k] - x[k]
            update[f"c/{k}"] = control - device_state[f"c/{k}"]
            new_state[f"c/{k}"] = control
        return Payload(update), DeviceState(new_state), {"loss": loss}

    def merge(self, cloud: CloudState, uplinks: Payload, weights: torch.Tensor) -> CloudState:
        moved = super().merge(cloud, uplinks, weights)
        share = len(weights) / self.task.num_devices
        controls = {
            f"c/{k}": cloud[f"c/{k}"] + share * uplinks.tensors[f"c/{k}"].mean(0)
            for k in self.shared
        }
        return moved.with_tensors(**controls)
