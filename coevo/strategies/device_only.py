"""Device-only: each device trains the small model from scratch on its own data, alone.

Device: trains on its cloud- and device-period rows. Cloud: nothing. Wire: nothing (the
reference for what a device achieves without any collaboration).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from coevo.strategies.base import DeviceBatch, Strategy, score_per_device, seeded_model
from coevo.strategies.local_training import LocalTraining, local_train
from coevo.tasks.recommendation import RecommendationTask, state_of
from coevo.types import CloudState, DeviceState, Metrics, Payload


class DeviceOnlyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["device_only"] = "device_only"
    local: LocalTraining = LocalTraining(epochs=20, lr=3e-3)


class DeviceOnly(Strategy):
    name = "device_only"
    local_period = "cloud+device"
    Config = DeviceOnlyConfig

    def __init__(self, task: RecommendationTask, config: DeviceOnlyConfig | None = None) -> None:
        super().__init__(task, config or self.Config())
        self.model = task.device_model()

    def init(self, rng: torch.Generator) -> CloudState:
        # The common random initialisation every device starts from; it never crosses the wire
        # (devices can derive it from a published seed).
        return CloudState(state_of(seeded_model(self.task.device_model, rng)))

    def init_devices(self, cloud: CloudState, num_devices: int) -> DeviceState:
        return DeviceState(
            {k: v.expand(num_devices, *v.shape).clone() for k, v in cloud.tensors.items()}
        )

    def local(
        self, payload: Payload, device_state: DeviceState, batch: DeviceBatch
    ) -> tuple[Payload, DeviceState, Metrics]:
        params = dict(device_state.tensors)
        trained, loss = local_train(
            self.model, params, list(params), batch, self.config.local.lr, loss=self.task.batch_loss
        )
        return Payload(), DeviceState(trained), {"loss": loss}

    def score(
        self,
        cloud: CloudState,
        device_state: DeviceState,
        history: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        return score_per_device(self.model, {}, device_state.tensors, history, candidates)
