"""MPDA: on-device training augmented with similar users' samples that the cloud retrieves.

Yan, Niu, Gu, Wu, Tang, Hua, Lyu, Chen, "On-Device Learning with Cloud-Coordinated Data
Augmentation for Extreme Model Personalization in Recommender Systems" (MPDA, KDD 2022; CoDA,
arXiv 2201.10382). Cloud: pretrains the device model on pooled cloud-period data and indexes
every user by the mean item vector of their cloud-period items, keeping each user's most recent
cloud-period rows as the retrievable pool. Device: sends up the normalised mean item vector of
its own device-period rows (``dim`` floats; no item id or raw row leaves the device), receives
the pooled rows of the ``neighbours`` most similar *other* users, and fine-tunes on its own
rows with ``per_step`` retrieved examples mixed into every step at weight ``retrieved_weight``.
Wire: the model down; per round, the query up and the retrieved samples (item ids of each
sample's history and target, the dominant cost) down; nothing else up.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from coevo.strategies.base import DeviceBatch, Strategy, score_per_device
from coevo.strategies.cloud_only import CentralTraining
from coevo.strategies.fedper import initial_weights
from coevo.strategies.local_training import LocalTraining, personal_finetune
from coevo.tasks.recommendation import RecommendationTask
from coevo.types import CloudState, DeviceState, Metrics, Payload

INDEX = "index/"
RETRIEVED = "retrieved/"


class MpdaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["mpda"] = "mpda"
    # Similar users retrieved per device: more covers more taste, and dilutes it.
    neighbours: int = Field(10, ge=1, le=10_000)
    # Each neighbour's most recent cloud-period rows sent down: bytes against variety.
    samples_per_neighbour: int = Field(10, ge=1, le=10_000)
    # Retrieved examples added to every local step (0 turns MPDA into plain fine-tuning).
    per_step: int = Field(8, ge=0, le=4096)
    # Weight of a retrieved example against one of the device's own (which weigh 1).
    retrieved_weight: float = Field(0.5, ge=0.0, le=1.0)
    # full: every weight adapts; head: only the user head.
    mode: Literal["full", "head"] = "full"
    # Pull towards the shipped weights; 0 is plain fine-tuning.
    l2: float = Field(0.0, ge=0)
    rounds: int = Field(1, ge=1, le=100_000)
    pretrain: CentralTraining = CentralTraining()
    local: LocalTraining = LocalTraining()


def recent_pool(task: RecommendationTask, size: int) -> torch.Tensor:
    """Each device's last ``size`` cloud-period rows, ``[num_devices, size]``, -1 padded."""
    rows, offsets = task.device_rows("cloud")
    index = offsets[1:, None] - size + torch.arange(size)
    valid = index >= offsets[:-1, None]
    return torch.where(valid, rows[index.clamp(min=0)], -1)


def item_vectors(
    weights: dict[str, torch.Tensor], features: torch.Tensor | None, items: torch.Tensor
) -> torch.Tensor:
    """The device model's item vectors (id embedding plus projected content features)."""
    vectors = weights["item_embedding.weight"][items]
    if features is not None and "feature_projection.weight" in weights:
        vectors = vectors + features[items] @ weights["feature_projection.weight"].T
    return vectors


class Mpda(Strategy):
    name = "mpda"
    Config: ClassVar[type[BaseModel]] = MpdaConfig
    exchanges = True

    def __init__(self, task: RecommendationTask, config: MpdaConfig | None = None) -> None:
        super().__init__(task, config or MpdaConfig())
        if task.num_devices < 2:
            raise ValueError("mpda needs at least two devices: it retrieves other users' rows")
        self.model = task.device_model()
        self.names = [name for name, _ in self.model.named_parameters()]
        self.personal = (
            self.names
            if self.config.mode == "full"
            else [n for n in self.names if n.startswith("head.")]
        )
        self.features = getattr(self.model, "item_features", None)
        self.id_dtype = torch.int16 if task.num_items < 2**15 else torch.int32

    def init(self, rng: torch.Generator) -> CloudState:
        weights = initial_weights(self.task, self.config.pretrain, rng)
        rows, _ = self.task.device_rows("cloud")
        owner = self.task.split.device_of_row[rows]
        with torch.no_grad():
            vectors = item_vectors(weights, self.features, self.task.split.items[rows])
        sums = torch.zeros(self.task.num_devices, vectors.shape[1]).index_add_(0, owner, vectors)
        profiles = F.normalize(sums, dim=1)
        pool = recent_pool(self.task, self.config.samples_per_neighbour)
        return CloudState({**weights, INDEX + "profiles": profiles, INDEX + "rows": pool})

    def init_devices(self, cloud: CloudState, num_devices: int) -> DeviceState:
        return DeviceState(
            {k: cloud[k].expand(num_devices, *cloud[k].shape).clone() for k in self.personal}
        )

    def downlink(self, cloud: CloudState, round: int) -> Payload:
        return Payload({k: cloud[k] for k in self.names})

    def query(self, payload: Payload, device_state: DeviceState, batch: DeviceBatch) -> Payload:
        weights = dict(payload.tensors)
        vectors = item_vectors(weights, self.features, batch.inputs["target"])
        mean = (vectors * batch.mask[..., None]).sum((0, 1)) / batch.mask.sum().clamp(min=1.0)
        return Payload({"profile": F.normalize(mean, dim=0)})

    def retrieve(self, cloud: CloudState, devices: torch.Tensor, queries: Payload) -> torch.Tensor:
        """Rows sent to each device, ``[len(devices), neighbours * samples]``, -1 padded.

        Only other users' cloud-period rows: a device's own profile is never a neighbour.
        """
        similarity = queries.tensors["profile"] @ cloud[INDEX + "profiles"].T
        own = F.one_hot(devices, self.task.num_devices).bool()
        similarity = similarity.masked_fill(own, -torch.inf)
        count = min(self.config.neighbours, self.task.num_devices - 1)
        neighbours = similarity.topk(count, dim=1).indices
        return cloud[INDEX + "rows"][neighbours].flatten(1)

    def answer(self, cloud: CloudState, devices: torch.Tensor, queries: Payload) -> Payload:
        rows = self.retrieve(cloud, devices, queries)
        examples = self.task.gather(rows.clamp(min=0))
        pad = self.task.num_items
        valid = rows >= 0
        history = torch.where(valid[..., None], examples["history"], pad)
        target = torch.where(valid, examples["target"], pad)
        return Payload(
            {
                RETRIEVED + "history": history.to(self.id_dtype),
                RETRIEVED + "target": target.to(self.id_dtype),
            }
        )

    def augmented(self, device_state: DeviceState, batch: DeviceBatch) -> DeviceBatch:
        """The batch with ``per_step`` retrieved examples appended to every step (cyclically)."""
        per_step = self.config.per_step
        if per_step == 0:
            return batch
        history = device_state[RETRIEVED + "history"].long()
        target = device_state[RETRIEVED + "target"].long()
        step = torch.arange(batch.num_steps)[:, None] * per_step + torch.arange(per_step)
        pick = step % len(target)
        active = (batch.mask.sum(1, keepdim=True) > 0).float()
        weight = (target[pick] < self.task.num_items).float() * self.config.retrieved_weight
        inputs = {
            "history": torch.cat([batch.inputs["history"], history[pick]], dim=1),
            "target": torch.cat([batch.inputs["target"], target[pick]], dim=1),
        }
        return replace(batch, inputs=inputs, mask=torch.cat([batch.mask, weight * active], 1))

    def local(
        self, payload: Payload, device_state: DeviceState, batch: DeviceBatch
    ) -> tuple[Payload, DeviceState, Metrics]:
        return personal_finetune(
            self.model,
            dict(payload.tensors),
            self.personal,
            self.augmented(device_state, batch),
            self.config.local,
            loss=self.task.batch_loss,
            l2=self.config.l2,
        )

    def score(
        self,
        cloud: CloudState,
        device_state: DeviceState,
        history: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        shared = {k: cloud[k] for k in self.names if k not in self.personal}
        personal = {k: device_state[k] for k in self.personal}
        return score_per_device(self.model, shared, personal, history, candidates)
