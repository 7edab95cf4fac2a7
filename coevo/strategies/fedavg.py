"""FedAvg: devices train the shared model locally; the cloud averages their updates.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017. Device: starts from the global weights, trains on its device-period rows, sends
the change of the shared weights (its private parameters, by default the user head, stay in
device state and never travel). Cloud: moves the global weights by the row-weighted mean
update (times ``server_lr``). Wire: shared weights down, their update up.

Server optimisers (FedAvgM, FedAdam, FedYogi, FedAdagrad) override ``server_update`` only.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from coevo.strategies.base import DeviceBatch, Strategy, score_per_device, seeded_model
from coevo.strategies.local_training import LocalTraining, local_train
from coevo.tasks.recommendation import RecommendationTask, state_of
from coevo.types import CloudState, DeviceState, Metrics, Payload


class FederatedSettings(BaseModel):
    """Settings every FedAvg-family strategy shares; each adds its ``name`` and own knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Communication rounds: quality against bytes and wall time.
    rounds: int = Field(20, ge=1, le=100_000)
    # Step on the averaged update; 1.0 is plain FedAvg.
    server_lr: float = Field(1.0, gt=0)
    # Parameter-name prefixes kept on the device (personal); [] makes every weight shared.
    private: tuple[str, ...] = ("head.",)
    local: LocalTraining = LocalTraining(epochs=1, lr=0.5, optimizer="sgd")


class FedAvgConfig(FederatedSettings):
    name: Literal["fedavg"] = "fedavg"


class FedAvg(Strategy):
    name = "fedavg"
    Config: ClassVar[type[BaseModel]] = FedAvgConfig

    def __init__(self, task: RecommendationTask, config: BaseModel | None = None) -> None:
        super().__init__(task, config or self.Config())
        self.model = task.device_model()
        names = [name for name, _ in self.model.named_parameters()]
        prefixes = tuple(self.config.private)
        self.private = [n for n in names if prefixes and n.startswith(prefixes)]
        self.shared = [n for n in names if n not in self.private]

    def init(self, rng: torch.Generator) -> CloudState:
        weights = state_of(seeded_model(self.task.device_model, rng))
        return CloudState(weights)

    def init_devices(self, cloud: CloudState, num_devices: int) -> DeviceState:
        return DeviceState(
            {k: cloud[k].expand(num_devices, *cloud[k].shape).clone() for k in self.private}
        )

    def downlink(self, cloud: CloudState, round: int) -> Payload:
        return Payload({k: cloud[k] for k in self.shared})

    def local_extras(self, payload: Payload, device_state: DeviceState) -> dict[str, Any]:
        """Extra ``local_train`` arguments (FedProx's anchor, SCAFFOLD's correction)."""
        return {}

    def local(
        self, payload: Payload, device_state: DeviceState, batch: DeviceBatch
    ) -> tuple[Payload, DeviceState, Metrics]:
        params = {**payload.tensors, **{k: device_state[k] for k in self.private}}
        local = self.config.local
        trained, loss = local_train(
            self.model,
            params,
            list(params),
            batch,
            local.lr,
            loss=self.task.batch_loss,
            optimizer=local.optimizer,
            as_update=self.shared,
            **self.local_extras(payload, device_state),
        )
        update = {k: trained[k] for k in self.shared}
        personal = {k: trained[k] for k in self.private}
        return Payload(update), DeviceState(personal), {"loss": loss}

    def merge(self, cloud: CloudState, uplinks: Payload, weights: torch.Tensor) -> CloudState:
        share = weights / weights.sum().clamp(min=1e-12)
        delta = {k: torch.tensordot(share, uplinks.tensors[k], dims=1) for k in self.shared}
        return self.server_update(cloud, delta)

    def server_update(self, cloud: CloudState, delta: dict[str, torch.Tensor]) -> CloudState:
        """Apply the averaged update ``delta`` (the negative pseudo-gradient)."""
        lr = self.config.server_lr
        return cloud.with_tensors(**{k: cloud[k] + lr * d for k, d in delta.items()})

    def score(
        self,
        cloud: CloudState,
        device_state: DeviceState,
        history: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        shared = {k: cloud[k] for k in self.shared}
        personal = {k: device_state[k] for k in self.private}
        return score_per_device(self.model, shared, personal, history, candidates)
