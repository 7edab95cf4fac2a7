"""FedRep: a federated shared representation, a personal head trained first each round.

Collins, Hassani, Mokhtari, Shakkottai, "Exploiting Shared Representations for Personalized
Federated Learning", ICML 2021. Cloud: pretrains the device model on pooled cloud-period data,
then averages the devices' body updates. Device: each round first trains its private head for
``local.epochs`` epochs with the body frozen, then the body for ``body_epochs`` epochs with
the new head frozen. Wire: the body down, its update up; the head never crosses.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, Field, model_validator

from coevo.strategies.base import DeviceBatch
from coevo.strategies.fedavg import FedAvg
from coevo.strategies.fedper import (
    PersonalHeadSettings,
    check_private,
    initial_weights,
    pretraining,
)
from coevo.strategies.local_training import LocalTraining, local_train
from coevo.tasks.recommendation import RecommendationTask
from coevo.types import CloudState, DeviceState, Metrics, Payload


class FedRepConfig(PersonalHeadSettings):
    name: Literal["fedrep"] = "fedrep"
    # Head epochs per round are local.epochs (the paper: many); the body's are these (few).
    body_epochs: int = Field(1, ge=1, le=1000)
    local: LocalTraining = LocalTraining(epochs=5, lr=1e-3)

    @model_validator(mode="after")
    def _body_within_local(self) -> FedRepConfig:
        if self.body_epochs > self.local.epochs:
            raise ValueError(
                f"body_epochs ({self.body_epochs}) must not exceed local.epochs "
                f"({self.local.epochs}): the body trains on the first epochs of the round's batch"
            )
        return self


def first_epochs(batch: DeviceBatch, epochs: int, keep: int) -> DeviceBatch:
    """The batch masked down to its first ``keep`` of ``epochs`` epochs (vmappable).

    A device's real steps come first and every epoch has the same number of them.
    """
    real_steps = (batch.mask.sum(1) > 0).float().sum()
    step = torch.arange(batch.num_steps, dtype=torch.float32)
    kept = (step < real_steps * keep / epochs).float()
    return replace(batch, mask=batch.mask * kept[:, None])


class FedRep(FedAvg):
    name = "fedrep"
    Config: ClassVar[type[BaseModel]] = FedRepConfig

    def __init__(self, task: RecommendationTask, config: BaseModel | None = None) -> None:
        super().__init__(task, config)
        check_private(self)

    def init(self, rng: torch.Generator) -> CloudState:
        return CloudState(initial_weights(self.task, pretraining(self.config), rng))

    def local(
        self, payload: Payload, device_state: DeviceState, batch: DeviceBatch
    ) -> tuple[Payload, DeviceState, Metrics]:
        local = self.config.local
        params = {**payload.tensors, **{k: device_state[k] for k in self.private}}
        options = {"loss": self.task.batch_loss, "optimizer": local.optimizer}
        with_head, _ = local_train(self.model, params, self.private, batch, local.lr, **options)
        body_batch = first_epochs(batch, local.epochs, self.config.body_epochs)
        trained, loss = local_train(
            self.model, with_head, self.shared, body_batch, local.lr, **options
        )
        update = {k: trained[k] - payload.tensors[k] for k in self.shared}
        personal = {k: trained[k] for k in self.private}
        return Payload(update), DeviceState(personal), {"loss": loss}
