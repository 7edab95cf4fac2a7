"""DUET: a cloud hypernetwork generates the device model's dynamic layers; no on-device tuning.

Lv et al., "DUET: A Tuning-Free Device-Cloud Collaborative Parameters Generation Framework for
Efficient Device Model Generalization", WWW 2023 (official code: HelloZicky/DUET).

Cloud: pretrains the small device model on pooled cloud-period data (the universal backbone),
then trains a parameter generator on the same data: a GRU over a user's recent item sequence
gives a condition vector ``z``; each dynamic layer's weights are ``W = W0 + reshape(z A)`` and
bias ``b = b0 + z B`` (``W0``, ``b0`` start from the pretrained layer). Every cloud-period
position is one example: its prefix generates the layers that must score the next item.
The dynamic layers are the device model's user tower and head; the rest is static.

Device: downloads the static weights once; for a request it uploads its last
``sequence_len`` item ids (int32, no embeddings) and receives the generated tower and head
weights (float32, ``2 * (dim * dim + dim)`` numbers), then scores candidates with forward
passes only. It never computes a gradient: zero backward FLOPs.

Wire, per request: item ids up (``request``), generated weights down (``response``); no
gradients and no training traffic. The strategy has no training rounds.
"""

from __future__ import annotations

import copy
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call

from coevo.strategies.base import Strategy, seeded_model
from coevo.strategies.cloud_only import CentralTraining, validation_hr10
from coevo.tasks.models import DeviceModel, cross_entropy_all_items, flops_per_request
from coevo.tasks.recommendation import RecommendationTask, state_of
from coevo.tasks.train import fit
from coevo.types import CloudState, DeviceState, Payload

DYNAMIC_LAYERS = ("tower", "head")
"""The device model's layers whose weights the cloud generates per request."""


class GeneratorTraining(BaseModel):
    """Cloud training of the parameter generator, early-stopped on validation HR@10."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Passes over the cloud-period positions; patience stops earlier.
    epochs: int = Field(20, ge=1, le=1000)
    # Adam step size of the generator.
    lr: float = Field(1e-3, gt=0, le=1.0)
    # Positions per step.
    batch_size: int = Field(256, ge=1, le=65536)
    # Evaluations without improvement before stopping.
    patience: int = Field(2, ge=1)


class DuetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["duet"] = "duet"
    # Size of the condition vector z; larger generates richer layers, costs more cloud compute.
    condition_dim: int = Field(32, ge=1, le=1024)
    # Item ids a request uploads (the sequence the layers are generated from).
    sequence_len: int = Field(20, ge=1, le=1000)
    # True: the backbone's static weights keep training with the generator (the device then
    # downloads those); False: they stay as pretrained.
    joint: bool = False
    pretrain: CentralTraining = CentralTraining()
    generator: GeneratorTraining = GeneratorTraining()


class GeneratedLinear(nn.Module):
    """One generated layer: ``W = W0 + reshape(z A)``, ``b = b0 + z B``, per sequence."""

    def __init__(self, layer: nn.Linear, condition_dim: int) -> None:
        super().__init__()
        out_dim, in_dim = layer.weight.shape
        self.base_weight = nn.Parameter(layer.weight.detach().clone())
        self.base_bias = nn.Parameter(layer.bias.detach().clone())
        self.weight_map = nn.Parameter(0.01 * torch.randn(condition_dim, out_dim * in_dim))
        self.bias_map = nn.Parameter(0.01 * torch.randn(condition_dim, out_dim))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights ``[batch, out, in]``, biases ``[batch, out]`` for conditions ``[batch, c]``."""
        weight = self.base_weight + (z @ self.weight_map).view(-1, *self.base_weight.shape)
        return weight, self.base_bias + z @ self.bias_map


class DuetNetwork(nn.Module):
    """The static device backbone plus the cloud's parameter generator.

    ``forward`` is what a request costs end to end: ``generate`` runs in the cloud on the
    uploaded sequence, ``score_with`` on the device with the generated layers.
    """

    def __init__(self, backbone: DeviceModel, condition_dim: int, sequence_len: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.sequence_len = sequence_len
        dim = backbone.item_embedding.embedding_dim
        self.encoder = nn.GRU(dim, condition_dim, batch_first=True)
        self.condition = nn.Sequential(
            nn.Linear(condition_dim, condition_dim),
            nn.Tanh(),
            nn.Linear(condition_dim, condition_dim),
        )
        self.layers = nn.ModuleDict(
            {
                name: GeneratedLinear(getattr(backbone, name), condition_dim)
                for name in DYNAMIC_LAYERS
            }
        )

    def generate(self, sequence: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dynamic-layer weights ``{"tower.weight": [batch, d, d], ...}`` from item ids."""
        sequence = sequence[..., -self.sequence_len :]
        mask = (sequence != self.backbone.num_items).unsqueeze(-1).float()
        _, hidden = self.encoder(self.backbone.item_vectors(sequence) * mask)
        z = self.condition(hidden[-1])
        out = {}
        for name, layer in self.layers.items():
            out[f"{name}.weight"], out[f"{name}.bias"] = layer(z)
        return out

    def user_vector(self, history: torch.Tensor, dynamic: dict[str, torch.Tensor]) -> torch.Tensor:
        """The backbone's user vector with the generated tower and head, ``[batch, dim]``."""
        backbone = self.backbone
        history = history[..., -backbone.history_len :]
        mask = (history != backbone.num_items).unsqueeze(-1).float()
        pooled = (backbone.item_vectors(history) * mask).sum(-2) / mask.sum(-2).clamp(min=1.0)
        tower = torch.einsum("boi,bi->bo", dynamic["tower.weight"], pooled) + dynamic["tower.bias"]
        hidden = pooled + torch.tanh(tower)
        return torch.einsum("boi,bi->bo", dynamic["head.weight"], hidden) + dynamic["head.bias"]

    def score_with(
        self,
        dynamic: dict[str, torch.Tensor],
        history: torch.Tensor,
        candidates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Device-side scores with given dynamic layers (every item when no candidates)."""
        backbone = self.backbone
        user = self.user_vector(history, dynamic)
        if candidates is None:
            items = torch.arange(backbone.num_items, device=history.device)
            return user @ backbone.item_vectors(items).T + backbone.item_bias[: backbone.num_items]
        scores = (backbone.item_vectors(candidates) * user.unsqueeze(-2)).sum(-1)
        return scores + backbone.item_bias[candidates]

    def forward(
        self, history: torch.Tensor, candidates: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.score_with(self.generate(history), history, candidates)


def train_generator(
    net: DuetNetwork,
    task: RecommendationTask,
    settings: GeneratorTraining,
    rng: torch.Generator,
    *,
    joint: bool = False,
) -> float:
    """Fit the generator on every cloud-period position (prefix -> layers -> next item).

    Keeps the weights of the best validation HR@10 and returns the mean training loss of
    the first epoch minus that of the last (positive when the generator learned).
    """
    split = task.split
    rows = task.rows("cloud")
    length = max(task.shapes.device_history, net.sequence_len)
    inputs, targets = split.history(rows, length), split.items[rows]
    for name, parameter in net.backbone.named_parameters():
        parameter.requires_grad_(joint and name.split(".")[0] not in DYNAMIC_LAYERS)
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=settings.lr)
    validate = validation_hr10(task)
    best, best_state, stale = -float("inf"), copy.deepcopy(net.state_dict()), 0
    losses = []
    for _ in range(settings.epochs):
        order = torch.randperm(len(rows), generator=rng)
        total = 0.0
        for start in range(0, len(order), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            loss = cross_entropy_all_items(net(inputs[batch]), targets[batch]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        losses.append(total / len(rows))
        with torch.no_grad():
            score = validate(net)
        if score > best:
            best, best_state, stale = score, copy.deepcopy(net.state_dict()), 0
        else:
            stale += 1
            if stale >= settings.patience:
                break
    net.load_state_dict(best_state)
    for parameter in net.parameters():
        parameter.requires_grad_(True)
    return losses[0] - losses[-1]


class _Method(nn.Module):
    """Routes ``forward`` to one method of ``net``, so ``functional_call`` can run it."""

    def __init__(self, net: nn.Module, method: str) -> None:
        super().__init__()
        self.net = net
        self.method = method

    def forward(self, *inputs: object) -> object:
        return getattr(self.net, self.method)(*inputs)


def _prefixed(cloud: CloudState) -> dict[str, torch.Tensor]:
    return {f"net.{name}": tensor for name, tensor in cloud.tensors.items()}


class Duet(Strategy):
    name = "duet"
    local_period = None
    note = "tuning-free: the device runs forward passes only"
    asks_cloud = True
    Config: ClassVar[type[BaseModel]] = DuetConfig

    def __init__(self, task: RecommendationTask, config: DuetConfig | None = None) -> None:
        super().__init__(task, config or self.Config())
        self.net = self._network(task.device_model())
        self.net.eval()
        self._generate = _Method(self.net, "generate")
        self._score_with = _Method(self.net, "score_with")
        dynamic = tuple(f"{layer}." for layer in DYNAMIC_LAYERS)
        self.static = [
            f"backbone.{n}"
            for n, _ in self.net.backbone.named_parameters()
            if not n.startswith(dynamic)
        ]

    def _network(self, backbone: DeviceModel) -> DuetNetwork:
        return DuetNetwork(backbone, self.config.condition_dim, self.config.sequence_len)

    def init(self, rng: torch.Generator) -> CloudState:
        backbone = seeded_model(self.task.device_model, rng)
        rows = self.task.rows("cloud")
        fit_config = self.config.pretrain.fit_config(self.task.shapes.cloud_history)
        fit(backbone, self.task.split, rows, fit_config, rng, validate=validation_hr10(self.task))
        net = seeded_model(lambda: self._network(backbone), rng)
        train_generator(net, self.task, self.config.generator, rng, joint=self.config.joint)
        return CloudState(state_of(net))

    def static_weights(self, cloud: CloudState) -> Payload:
        """What a device downloads once: the backbone without its dynamic layers."""
        return Payload({name: cloud[name] for name in self.static})

    def generate(self, cloud: CloudState, sequence: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cloud side of a request: dynamic layers ``[batch, ...]`` from item ids ``[batch, L]``."""
        with torch.no_grad():
            return functional_call(self._generate, _prefixed(cloud), (sequence,))

    def score_with(
        self,
        cloud: CloudState,
        dynamic: dict[str, torch.Tensor],
        history: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        """Device side: scores with the static weights and (possibly stale) dynamic layers."""
        with torch.no_grad():
            return functional_call(
                self._score_with, _prefixed(cloud), (dynamic, history, candidates)
            )

    def request(self, history: torch.Tensor, candidates: torch.Tensor) -> Payload:
        """The device uploads its last ``sequence_len`` item ids (int32), not the candidates."""
        return Payload({"sequence": history[-self.config.sequence_len :].int()})

    def response(self, candidates: torch.Tensor) -> Payload:
        """The generated dynamic layers (float32), the same shapes for every request."""
        layers = {n: p for n, p in self.net.backbone.named_parameters()}
        return Payload(
            {
                f"{layer}.{kind}": torch.zeros(layers[f"{layer}.{kind}"].shape)
                for layer in DYNAMIC_LAYERS
                for kind in ("weight", "bias")
            }
        )

    def device_flops(self) -> dict[str, float]:
        """On-device FLOPs per prediction (100 candidates): forward only, no backward."""
        forward = flops_per_request(self.task.device_model(), self.task.shapes.device_history)
        return {"forward": float(forward), "backward": 0.0}

    def score(
        self,
        cloud: CloudState,
        device_state: DeviceState,
        history: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        return self.score_with(cloud, self.generate(cloud, history), history, candidates)
