"""FedPer: federated base layers, a personalisation head that never leaves the device.

Arivazhagan, Aggarwal, Singh, Choudhary, "Federated Learning with Personalization Layers",
arXiv 1912.00818 (2019). Cloud: pretrains the device model on pooled cloud-period data (as
cloud + fine-tune does), then averages the devices' updates of the shared body. Device: trains
body and head together on its device-period rows; the head (parameter names under
``private``, by default the user head) stays in device state. Wire: the body down, its update
up; the head never crosses, in either direction.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, Field, field_validator

from coevo.strategies.base import seeded_model
from coevo.strategies.cloud_only import CentralTraining, validation_hr10
from coevo.strategies.fedavg import FedAvg, FederatedSettings
from coevo.strategies.local_training import LocalTraining
from coevo.tasks.recommendation import RecommendationTask, state_of
from coevo.tasks.train import fit
from coevo.types import CloudState


class PersonalisedSettings(FederatedSettings):
    """Federated settings plus the cloud pretraining that personalisation strategies start from."""

    # Start from the device model pretrained on cloud-period data (False: random weights).
    pretrained: bool = True
    pretrain: CentralTraining = CentralTraining()
    # Adam from pretrained weights: SGD at FedAvg's 0.5 would wreck them in one round.
    local: LocalTraining = LocalTraining(epochs=1, lr=1e-3)
    # Fewer rounds than FedAvg's default: training starts from a pretrained model.
    rounds: int = Field(10, ge=1, le=100_000)


class PersonalHeadSettings(PersonalisedSettings):
    """Personalised settings whose ``private`` layers must not be empty (FedPer, FedRep)."""

    # The personal layers; at least one prefix, else FedPer is FedAvg.
    private: tuple[str, ...] = ("head.",)

    @field_validator("private")
    @classmethod
    def _some_private(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("needs at least one parameter-name prefix kept on the device")
        return value


class FedPerConfig(PersonalHeadSettings):
    name: Literal["fedper"] = "fedper"


def initial_weights(
    task: RecommendationTask, pretrain: CentralTraining | None, rng: torch.Generator
) -> dict[str, torch.Tensor]:
    """The device model's starting weights: pretrained on cloud-period data, or random."""
    model = seeded_model(task.device_model, rng)
    if pretrain is not None:
        rows = task.rows("cloud")
        fit_config = pretrain.fit_config(task.shapes.cloud_history)
        fit(model, task.split, rows, fit_config, rng, validate=validation_hr10(task))
    return state_of(model)


def pretraining(settings: PersonalisedSettings) -> CentralTraining | None:
    """The pretraining the settings ask for, or None for a random start."""
    return settings.pretrain if settings.pretrained else None


def check_private(strategy: FedAvg) -> None:
    """A clear error when a ``private`` prefix names no parameter of the device model."""
    names = [name for name, _ in strategy.model.named_parameters()]
    for prefix in strategy.config.private:
        if not any(name.startswith(prefix) for name in names):
            raise ValueError(
                f"{strategy.name}: private prefix {prefix!r} matches no device-model parameter "
                f"(parameters: {', '.join(names)})"
            )


class FedPer(FedAvg):
    name = "fedper"
    Config: ClassVar[type[BaseModel]] = FedPerConfig

    def __init__(self, task: RecommendationTask, config: BaseModel | None = None) -> None:
        super().__init__(task, config)
        check_private(self)

    def init(self, rng: torch.Generator) -> CloudState:
        return CloudState(initial_weights(self.task, pretraining(self.config), rng))
