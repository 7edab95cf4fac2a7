"""Ditto: a global model by FedAvg plus a personal model per device, pulled towards it.

Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through Personalization",
ICML 2021. Cloud: pretrains the device model on pooled cloud-period data, then runs FedAvg on
the global weights ``w``. Device: trains a copy of ``w`` for the global update, and its own
personal model ``v`` (kept in device state) on the same rows with the proximal term
``lam / 2 * ||v - w||^2`` towards the downloaded ``w``; recommendations use ``v``. Wire: ``w``
down, its update up; ``v`` never leaves the device.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, Field

from coevo.strategies.base import DeviceBatch, score_per_device
from coevo.strategies.fedavg import FedAvg
from coevo.strategies.fedper import (
    PersonalisedSettings,
    check_private,
    initial_weights,
    pretraining,
)
from coevo.strategies.local_training import local_train
from coevo.tasks.recommendation import RecommendationTask
from coevo.types import CloudState, DeviceState, Metrics, Payload

PERSONAL = "personal/"


class DittoConfig(PersonalisedSettings):
    name: Literal["ditto"] = "ditto"
    # Ditto federates the whole global model; prefixes here stay on the device as in FedAvg.
    private: tuple[str, ...] = ()
    # Pull of the personal model towards the global one: 0 is local training alone, large
    # values make it the global model (the paper tunes it in 0.01 ... 2).
    lam: float = Field(0.1, ge=0)
    # Personal solver: the paper uses SGD; Adam is steadier on sparse item tables.
    personal_lr: float = Field(1e-3, gt=0, le=10.0)
    personal_optimizer: Literal["adam", "sgd"] = "adam"


class Ditto(FedAvg):
    name = "ditto"
    Config: ClassVar[type[BaseModel]] = DittoConfig

    def __init__(self, task: RecommendationTask, config: BaseModel | None = None) -> None:
        super().__init__(task, config)
        check_private(self)
        self.names = [name for name, _ in self.model.named_parameters()]

    def init(self, rng: torch.Generator) -> CloudState:
        return CloudState(initial_weights(self.task, pretraining(self.config), rng))

    def init_devices(self, cloud: CloudState, num_devices: int) -> DeviceState:
        devices = super().init_devices(cloud, num_devices)
        personal = {
            PERSONAL + k: cloud[k].expand(num_devices, *cloud[k].shape).clone() for k in self.names
        }
        return devices.with_tensors(**personal)

    def local(
        self, payload: Payload, device_state: DeviceState, batch: DeviceBatch
    ) -> tuple[Payload, DeviceState, Metrics]:
        uplink, private, metrics = super().local(payload, device_state, batch)
        # The global weights as downloaded (plus this device's private part, if any).
        anchor = {**payload.tensors, **{k: device_state[k] for k in self.private}}
        personal = {k: device_state[PERSONAL + k] for k in self.names}
        trained, personal_loss = local_train(
            self.model,
            personal,
            self.names,
            batch,
            self.config.personal_lr,
            loss=self.task.batch_loss,
            anchor=anchor,
            l2=self.config.lam,
            optimizer=self.config.personal_optimizer,
        )
        state = {**private.tensors, **{PERSONAL + k: trained[k] for k in self.names}}
        return uplink, DeviceState(state), {**metrics, "personal_loss": personal_loss}

    def score(
        self,
        cloud: CloudState,
        device_state: DeviceState,
        history: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        personal = {k: device_state[PERSONAL + k] for k in self.names}
        return score_per_device(self.model, {}, personal, history, candidates)
