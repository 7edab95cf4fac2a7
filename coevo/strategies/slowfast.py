"""Slow-fast learning (MC²-SF): a slow cloud model and a fast on-device re-ranker.

Chen, Yao, Wang, Jia, Han, Zhang, Yang, "Mobile-Cloud Collaborative Recommendation via
Slow-Fast Learning" (MC²-SF, arXiv 2109.12314). Cloud (slow): the large sequential model,
trained on pooled cloud-period logs, answers each page request with a score and an interest
representation per candidate. Device (fast): re-ranks the page at every interaction from
in-session feedback, the similarity of each candidate's representation to the items just
clicked (the last one, and a recency-decayed window), weighted by a few per-device gates;
a click changes the next ranking at once, without backpropagation. Between rounds each device
tunes its gates with a few tiny steps on its own clicks and sends them up as the summary of
its feedback; the cloud averages them into the prior that new devices start from.

Wire: per page, the history up and, down, the slow scores (float32) and the candidates'
representations (float16); per round, the catalogue's representations and the gate prior
down, and each device's gates up.

Deviation from the paper: the summaries train the cloud's prior of the fast gates, not the
slow encoder itself (the slow model is trained once on cloud-period data).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call

from coevo.strategies.base import DeviceBatch, Strategy, score_shared, seeded_model
from coevo.strategies.cloud_only import CentralTraining, validation_hr10
from coevo.strategies.local_training import LocalTraining, local_train
from coevo.tasks.models import CloudModel
from coevo.tasks.recommendation import RecommendationTask, state_of
from coevo.tasks.train import fit
from coevo.types import CloudState, DeviceState, Metrics, Payload

SLOW_PREFIX = "slow."
NUM_GATES = 2


class SlowFastConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["slowfast"] = "slowfast"
    # Weight of the fast re-ranker against the slow scores: 0 is cloud-only. 3 was best on
    # MovieLens-100K validation NDCG@10 among 0, 0.5, 1, 2, 3, 5, 8 (seed 0).
    fast_weight: float = Field(3.0, ge=0.0, le=100.0)
    # Recent clicks the fast model reads: a longer window is steadier, a shorter one reacts.
    window: int = Field(10, ge=1, le=1000)
    # Per-click decay of a click's weight in the window: low trusts the latest click most.
    decay: float = Field(0.8, gt=0.0, le=1.0)
    # Initial gates (last click, decayed window) of every device before any feedback.
    prior: tuple[float, float] = (1.0, 1.0)
    # Rounds of gate tuning on the device and averaging in the cloud.
    rounds: int = Field(1, ge=1, le=10_000)
    train: CentralTraining = CentralTraining()
    local: LocalTraining = LocalTraining(epochs=1, lr=0.05, batch_size=16)


def fast_scores(
    representations: torch.Tensor,
    recency: torch.Tensor,
    gates: torch.Tensor,
    history: torch.Tensor,
    candidates: torch.Tensor,
) -> torch.Tensor:
    """Gated similarities of each candidate to the latest clicks, ``[batch, num_candidates]``.

    Args:
        representations: unit-norm ``[num_items + 1, dim]``, the padding row zero.
        recency: ``[window]`` weights of the clicks in the window, oldest first.
        gates: ``[2]`` or ``[batch, 2]``: weight of the last click and of the window.
        history: ``[batch, length]`` item ids, the latest last, left-padded.
        candidates: ``[batch, num_candidates]``.
    """
    num_items = len(representations) - 1
    recent = history[..., -len(recency) :]
    weights = recency[-recent.shape[-1] :] * (recent != num_items).float()
    # Each recent click against the whole catalogue, then read at the candidates: no
    # [batch, candidates, dim] temporary when the candidates are the whole catalogue.
    similarity = representations[recent] @ representations[:num_items].T
    similarity = similarity.gather(2, candidates.unsqueeze(1).expand(-1, recent.shape[1], -1))
    window = (similarity * weights.unsqueeze(-1)).sum(1)
    window = window / weights.sum(1, keepdim=True).clamp(min=1e-6)
    gates = gates.expand(len(history), NUM_GATES)
    return gates[:, :1] * similarity[:, -1] + gates[:, 1:] * window


class FastReranker(nn.Module):
    """The fast on-device model: ``fast_scores`` with its gates as the only parameter.

    ``representations`` are the cloud's interest representations, ``recency`` the decayed
    weights of the last ``window`` clicks; both are inputs, not trained.
    """

    representations: torch.Tensor
    recency: torch.Tensor

    def __init__(self, num_items: int, dim: int, window: int, decay: float) -> None:
        super().__init__()
        self.register_buffer("representations", torch.zeros(num_items + 1, dim))
        self.register_buffer("recency", decay ** torch.arange(window - 1, -1, -1).float())
        self.gates = nn.Parameter(torch.zeros(NUM_GATES))

    def forward(self, history: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return fast_scores(self.representations, self.recency, self.gates, history, candidates)


def interest_representations(slow: Mapping[str, torch.Tensor], model: CloudModel) -> torch.Tensor:
    """Unit-norm item vectors of the slow model, with a zero padding row ``[num_items + 1, d]``."""
    # CloudModel.item_vectors with the given weights: id embedding plus projected features.
    vectors = slow["item_embedding.weight"][: model.num_items]
    if model.feature_projection is not None:
        features = model.item_features[: model.num_items]
        vectors = vectors + features @ slow["feature_projection.weight"].T
    unit = F.normalize(vectors, dim=-1)
    return torch.cat([unit, torch.zeros(1, unit.shape[1])])


class SlowFast(Strategy):
    name = "slowfast"
    serving = "cloud"
    Config: ClassVar[type[BaseModel]] = SlowFastConfig

    def __init__(self, task: RecommendationTask, config: SlowFastConfig | None = None) -> None:
        super().__init__(task, config or self.Config())
        self.slow_model = task.cloud_model().eval()
        self.fast_model = FastReranker(
            task.num_items, task.shapes.cloud_dim, self.config.window, self.config.decay
        )

    def _slow(self, cloud: CloudState) -> dict[str, torch.Tensor]:
        tensors = cloud.tensors.items()
        return {k.removeprefix(SLOW_PREFIX): v for k, v in tensors if k.startswith(SLOW_PREFIX)}

    def init(self, rng: torch.Generator) -> CloudState:
        model = seeded_model(self.task.cloud_model, rng)
        fit_config = self.config.train.fit_config(self.task.shapes.cloud_history)
        rows = self.task.rows("cloud")
        fit(model, self.task.split, rows, fit_config, rng, validate=validation_hr10(self.task))
        slow = {SLOW_PREFIX + k: v for k, v in state_of(model).items()}
        return CloudState({**slow, "gates": torch.tensor(self.config.prior, dtype=torch.float32)})

    def init_devices(self, cloud: CloudState, num_devices: int) -> DeviceState:
        return DeviceState({"gates": cloud["gates"].expand(num_devices, NUM_GATES).clone()})

    def downlink(self, cloud: CloudState, round: int) -> Payload:
        representations = interest_representations(self._slow(cloud), self.slow_model)
        return Payload({"representations": representations.half(), "gates": cloud["gates"]})

    def _fast_loss(
        self,
        model: nn.Module,
        params: Mapping[str, torch.Tensor],
        inputs: Mapping[str, torch.Tensor],
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Softmax over the step's clicked items (in-batch negatives) of the fast scores."""
        target = inputs["target"]
        candidates = target.expand(len(target), len(target))
        logits = functional_call(model, dict(params), (inputs["history"], candidates))
        logits = logits.masked_fill(mask[None, :] == 0, -1e9)
        loss = F.cross_entropy(logits, torch.arange(len(target)), reduction="none") * mask
        return loss.sum() / mask.sum().clamp(min=1.0)

    def local(
        self, payload: Payload, device_state: DeviceState, batch: DeviceBatch
    ) -> tuple[Payload, DeviceState, Metrics]:
        params = {
            "representations": payload.tensors["representations"].float(),
            "recency": self.fast_model.recency,
            "gates": device_state["gates"],
        }
        trained, loss = local_train(
            self.fast_model,
            params,
            ["gates"],
            batch,
            self.config.local.lr,
            loss=self._fast_loss,
            optimizer=self.config.local.optimizer,
        )
        gates = trained["gates"]
        return Payload({"gates": gates}), DeviceState({"gates": gates}), {"loss": loss}

    def device_flops_per_example(self) -> tuple[float, float]:
        """A gate-tuning example: forward, its step's clicked items (the in-batch candidates)
        against the window of recent clicks; backward, the softmax and the gates only (the
        representations are inputs, not trained)."""
        dim, window = self.task.shapes.cloud_dim, self.config.window
        batch = self.config.local.batch_size
        forward = 2.0 * window * dim * batch + 4.0 * window * batch
        backward = (3.0 + 2.0 * NUM_GATES) * batch
        return forward, backward

    def merge(self, cloud: CloudState, uplinks: Payload, weights: torch.Tensor) -> CloudState:
        share = weights / weights.sum().clamp(min=1e-12)
        return cloud.with_tensors(gates=(uplinks.tensors["gates"] * share[:, None]).sum(0))

    def response(self, candidates: torch.Tensor) -> Payload:
        """A page: slow scores and float16 interest representations of the candidates."""
        dim = self.task.shapes.cloud_dim
        return Payload(
            {
                "scores": torch.zeros(len(candidates)),
                "representations": torch.zeros(len(candidates), dim, dtype=torch.float16),
            }
        )

    def score(
        self,
        cloud: CloudState,
        device_state: DeviceState,
        history: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        slow = self._slow(cloud)
        slow_scores = score_shared(self.slow_model, slow, history, candidates)
        # As the page carries them: float16 on the wire.
        representations = interest_representations(slow, self.slow_model).half().float()
        # A device without feedback yet (cold start) uses the cloud's prior gates.
        gates = cloud["gates"]
        if "gates" in device_state:
            gates = device_state["gates"]
        recency = self.fast_model.recency
        fast = fast_scores(representations, recency, gates, history, candidates)
        return slow_scores + self.config.fast_weight * fast
