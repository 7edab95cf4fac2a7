"""A user's own strategy in one file: devices train only a private head of a shared model.

Run it from a config after importing this module, or directly:

    python examples/head_only.py
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from coevo.strategies import STRATEGIES, Strategy
from coevo.strategies.base import DeviceBatch, score_per_device
from coevo.strategies.local_training import LocalTraining, local_train
from coevo.tasks.recommendation import RecommendationTask
from coevo.types import CloudState, DeviceState, Metrics, Payload

PERSONAL = ("head.weight", "head.bias")


class HeadOnlyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["my_head_only"] = "my_head_only"
    local: LocalTraining = LocalTraining()


@STRATEGIES.register("my_head_only")
class HeadOnly(Strategy):
    """Every device trains only the head of a shared, randomly initialised device model."""

    name = "my_head_only"
    Config = HeadOnlyConfig

    def __init__(self, task: RecommendationTask, config: HeadOnlyConfig | None = None) -> None:
        super().__init__(task, config or HeadOnlyConfig())
        self.model = task.device_model()

    def init(self, rng: torch.Generator) -> CloudState:
        return CloudState({k: p.detach() for k, p in self.model.named_parameters()})

    def init_devices(self, cloud: CloudState, num_devices: int) -> DeviceState:
        return DeviceState(
            {k: cloud[k].expand(num_devices, *cloud[k].shape).clone() for k in PERSONAL}
        )

    def downlink(self, cloud: CloudState, round: int) -> Payload:
        return Payload(dict(cloud.tensors))

    def local(
        self, payload: Payload, device_state: DeviceState, batch: DeviceBatch
    ) -> tuple[Payload, DeviceState, Metrics]:
        params = {**payload.tensors, **device_state.tensors}
        trained, loss = local_train(
            self.model, params, PERSONAL, batch, self.config.local.lr, loss=self.task.batch_loss
        )
        return Payload(), DeviceState({k: trained[k] for k in PERSONAL}), {"loss": loss}

    def score(
        self,
        cloud: CloudState,
        device_state: DeviceState,
        history: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        shared = {k: v for k, v in cloud.tensors.items() if k not in device_state}
        return score_per_device(self.model, shared, device_state.tensors, history, candidates)


if __name__ == "__main__":
    from coevo.sim import simulate
    from coevo.testing import tiny_task

    task = tiny_task()
    strategy = HeadOnly(task)
    result = simulate(strategy, torch.Generator().manual_seed(0))
    print("personal heads:", tuple(result.devices["head.weight"].shape))
