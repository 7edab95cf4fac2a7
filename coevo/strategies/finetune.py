"""Cloud + local fine-tune: the cloud-pretrained device model adapted on each device.

Yosinski et al., "How transferable are features in deep neural networks?" (NeurIPS 2014) for
fine-tuning; the L2 variant regularises towards the global weights as in Ditto (Li et al.,
ICML 2021). Cloud: pretrains the small device model on pooled cloud-period data. Device:
downloads it once, fine-tunes all of it (``full``) or only its head (``head``) on its private
device-period rows. Wire: the model down; nothing up.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from coevo.strategies.base import DeviceBatch, Strategy, score_per_device, seeded_model
from coevo.strategies.cloud_only import CentralTraining, validation_hr10
from coevo.strategies.local_training import LocalTraining, personal_finetune
from coevo.tasks.recommendation import RecommendationTask, state_of
from coevo.tasks.train import fit
from coevo.types import CloudState, DeviceState, Metrics, Payload


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["finetune"] = "finetune"
    # full: every weight adapts (most capacity, most overfitting); head: only the user head.
    mode: Literal["full", "head"] = "full"
    # Pull towards the global weights; 0 is plain fine-tuning.
    l2: float = Field(0.0, ge=0)
    pretrain: CentralTraining = CentralTraining()
    local: LocalTraining = LocalTraining()


class Finetune(Strategy):
    name = "finetune"
    Config = FinetuneConfig

    def __init__(self, task: RecommendationTask, config: FinetuneConfig | None = None) -> None:
        super().__init__(task, config or self.Config())
        self.model = task.device_model()
        names = [name for name, _ in self.model.named_parameters()]
        self.personal = (
            names if self.config.mode == "full" else [n for n in names if n.startswith("head.")]
        )

    def init(self, rng: torch.Generator) -> CloudState:
        model = seeded_model(self.task.device_model, rng)
        rows = self.task.rows("cloud")
        fit_config = self.config.pretrain.fit_config(self.task.shapes.cloud_history)
        fit(model, self.task.split, rows, fit_config, rng, validate=validation_hr10(self.task))
        return CloudState(state_of(model))

    def init_devices(self, cloud: CloudState, num_devices: int) -> DeviceState:
        return DeviceState(
            {k: cloud[k].expand(num_devices, *cloud[k].shape).clone() for k in self.personal}
        )

    def downlink(self, cloud: CloudState, round: int) -> Payload:
        return Payload(tensors=dict(cloud.tensors))

    def local(
        self, payload: Payload, device_state: DeviceState, batch: DeviceBatch
    ) -> tuple[Payload, DeviceState, Metrics]:
        return personal_finetune(
            self.model,
            dict(payload.tensors),
            self.personal,
            batch,
            self.config.local,
            loss=self.task.batch_loss,
            l2=self.config.l2,
        )

    def device_flops_per_example(self) -> tuple[float, float]:
        """Full fine-tuning: the task's estimate. Head only: the backward pass reaches the user
        vector through the catalogue's scores (one product with the item matrix) and the head's
        weights, and stops there."""
        forward, backward = super().device_flops_per_example()
        if self.config.mode == "full":
            return forward, backward
        dim, items = self.task.shapes.device_dim, self.task.num_items
        return forward, float(2 * items * dim + 2 * dim * dim + dim)

    def score(
        self,
        cloud: CloudState,
        device_state: DeviceState,
        history: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        shared = {k: v for k, v in cloud.tensors.items() if k not in device_state}
        return score_per_device(self.model, shared, device_state.tensors, history, candidates)
