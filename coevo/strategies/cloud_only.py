"""Cloud-only: the large cloud model trained on pooled cloud-period data serves every device.

Kang & McAuley, "Self-Attentive Sequential Recommendation" (ICDM 2018) is the model. Device:
sends each request's recent history up. Cloud: trains once, scores requests. Wire: history
ids up, candidate scores down, per request; no training traffic.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from coevo.strategies.base import Strategy, score_shared, seeded_model
from coevo.tasks.protocol import Period
from coevo.tasks.recommendation import RecommendationTask, state_of
from coevo.tasks.train import FitConfig, fit
from coevo.types import CloudState, DeviceState


class CentralTraining(BaseModel):
    """Centralised training in the cloud, early-stopped on validation HR@10."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # More epochs fit better until validation stops improving; patience bounds the waste.
    epochs: int = Field(40, ge=1, le=1000)
    # Adam step size; larger trains faster but less stably.
    lr: float = Field(2e-3, gt=0, le=1.0)
    # Windows per optimiser step; larger is faster per epoch on CPU, noisier per step when small.
    batch_size: int = Field(64, ge=1, le=65536)
    # L2 penalty through Adam; regularises the item table of sparse datasets.
    weight_decay: float = Field(0.0, ge=0)
    # Evaluations without improvement before stopping.
    patience: int = Field(4, ge=1)
    # Epochs between validation checks; more often costs evaluation time.
    eval_every: int = Field(2, ge=1)

    def fit_config(self, window: int) -> FitConfig:
        return FitConfig(
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            weight_decay=self.weight_decay,
            window=window,
            patience=self.patience,
            eval_every=self.eval_every,
        )


class CloudOnlyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["cloud_only"] = "cloud_only"
    train: CentralTraining = CentralTraining()


def validation_hr10(task: RecommendationTask):
    """A validation callback for ``fit``: HR@10 on the validation candidates (no full ranking)."""

    def validate(model: torch.nn.Module) -> float:
        def scorer(devices, history, candidates):
            return model(history, candidates)

        return task.evaluate(scorer, "val", full_ranking=False)[1]["hr@10"]

    return validate


class CloudOnly(Strategy):
    name = "cloud_only"
    serving = "cloud"
    local_period = None
    Config: ClassVar[type[BaseModel]] = CloudOnlyConfig
    train_period: ClassVar[Period] = "cloud"

    def __init__(self, task: RecommendationTask, config: CloudOnlyConfig | None = None) -> None:
        super().__init__(task, config or self.Config())
        self.model = task.cloud_model().eval()

    def init(self, rng: torch.Generator) -> CloudState:
        model = seeded_model(self.task.cloud_model, rng)
        rows = self.task.rows(self.train_period)
        fit_config = self.config.train.fit_config(self.task.shapes.cloud_history)
        fit(model, self.task.split, rows, fit_config, rng, validate=validation_hr10(self.task))
        return CloudState(state_of(model))

    def score(
        self,
        cloud: CloudState,
        device_state: DeviceState,
        history: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        return score_shared(self.model, cloud.tensors, history, candidates)
