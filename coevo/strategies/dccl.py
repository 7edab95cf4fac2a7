"""DCCL: MetaPatch on the device, MoMoDistill in the cloud.

Yao et al., "Device-Cloud Collaborative Learning for Recommendation", KDD 2021. As in the paper,
the device runs the cloud model's architecture with the cloud's weights ``W_f`` frozen, and
personalises it with a patch whose parameters are a linear map of a tiny per-device vector:
the patch is a scale-and-shift of the user state (Mudrakarta et al., "K for the price of 1",
ICLR 2019), ``h' = h * (1 + s) + t`` with ``[s, t] = Theta @ phi``; ``Theta`` is shared and
frozen on the device, the metapatch ``phi`` (``metapatch_dim`` numbers) is its own.

Device: downloads ``W_f``, ``Theta`` and the auxiliary encoder ``g``; starts its metapatch
from ``g`` (the mean over its histories of ``g(user state)``) when it has none, then trains
only the metapatch, with ``iterations`` full-batch Adam steps on its device-period rows (the
backbone runs forward only, once per example; gradients flow through the patch and the item
scores alone). A device that never trained (cold start) serves with ``g`` of the request's
user state.

Cloud: pretrains ``W_f`` on pooled cloud-period data, then ``Theta`` and ``g`` on the same
data with ``W_f`` frozen (``g`` of each position's user state patches the prediction of the
next item). MoMoDistill, after each round: every reporting device's personal model
``f_n = f(.; W_f, Theta, phi_n)`` is rebuilt from its uploaded metapatch and run on that
user's cloud-period sequences (which the cloud already holds); step 1 fine-tunes ``W_f`` with
``CE(y, f) + beta * KL(f_n || f)``; step 2, with the new ``W_f`` frozen, re-learns ``Theta``
and ``g`` so that ``f(.; W_f, Theta, g(.))`` matches ``f_n`` (KL). The two steps stay
separate, as in the paper.

Wire: down, per round, ``W_f``, ``Theta`` and ``g`` (float32); up, per round, the metapatch
(float32 ``[metapatch_dim]``) and the device's id (int64); no raw data, no gradients.
Devices serve with the weights they last downloaded (kept in the cloud state as ``held.*``:
exact under full participation, where every device holds the same version).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from coevo.strategies.base import DeviceBatch, Strategy, seeded_model
from coevo.strategies.cloud_only import CentralTraining, validation_hr10
from coevo.strategies.local_training import LocalTraining, local_train
from coevo.tasks.models import CloudModel, cross_entropy_all_items, flops_per_request
from coevo.tasks.protocol import P1Split
from coevo.tasks.recommendation import RecommendationTask, state_of
from coevo.tasks.train import fit
from coevo.types import CloudState, DeviceState, Metrics, Payload

HELD = "held."
"""Prefix of the weights devices currently hold (the last downlink), in the cloud state."""
ADAM_EPS = 1e-6
"""Adam's epsilon in MoMoDistill: weights without a real gradient (the attention's key bias)
see only rounding noise, which a smaller epsilon would turn into full-size steps."""


class PatchTraining(BaseModel):
    """Cloud training of ``Theta`` and ``g`` on cloud-period data, before the first round."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Passes over the cloud-period windows; patience stops earlier.
    epochs: int = Field(10, ge=1, le=1000)
    # Adam step size.
    lr: float = Field(2e-3, gt=0, le=1.0)
    # Windows per step.
    batch_size: int = Field(64, ge=1, le=65536)
    # Evaluations (one per epoch) without improvement before stopping.
    patience: int = Field(2, ge=1)


class DistillSettings(BaseModel):
    """MoMoDistill, run by the cloud after each round on the reporters' cloud-period data."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Passes of step 1 (the cloud model W_f); 0 skips it.
    model_epochs: int = Field(1, ge=0, le=100)
    # Passes of step 2 (Theta and the encoder g); 0 skips it.
    patch_epochs: int = Field(2, ge=0, le=100)
    # Adam step size of step 1: small, W_f is already trained.
    model_lr: float = Field(2e-4, gt=0, le=1.0)
    # Adam step size of step 2.
    patch_lr: float = Field(1e-3, gt=0, le=1.0)
    # Weight of KL(f_n || f) against the cross-entropy on the cloud's own labels.
    beta: float = Field(1.0, ge=0)
    # Windows per step.
    batch_size: int = Field(64, ge=1, le=65536)


class DcclConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["dccl"] = "dccl"
    # Device-cloud iterations: metapatch training, then MoMoDistill.
    rounds: int = Field(1, ge=1, le=1000)
    # Numbers a device trains and uploads; more personalises further and overfits sooner.
    metapatch_dim: int = Field(8, ge=1, le=4096)
    # Pull of the metapatch towards where it started (the encoder's guess); 0 is none.
    l2: float = Field(0.0, ge=0)
    pretrain: CentralTraining = CentralTraining()
    patch: PatchTraining = PatchTraining()
    # Full-batch Adam steps on the device's rows: every device, light or heavy, takes the
    # same number, so heavy users do not overfit by sheer step count.
    iterations: int = Field(20, ge=1, le=10_000)
    # ``epochs`` copies of the rows make the full batch (1 is enough); ``lr`` is Adam's step:
    # 0.05 was best on MovieLens-100K validation HR@10 among 0.005, 0.02, 0.05, 0.1 and 0.2
    # (seed 0); larger steps overfit the metapatch to the device's few rows.
    local: LocalTraining = LocalTraining(epochs=1, lr=5e-2)
    distill: DistillSettings = DistillSettings()


def apply_patch(state: torch.Tensor, metapatch: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The patched user state ``h * (1 + s) + t`` with ``[s, t] = theta @ metapatch``.

    ``state [..., dim]``, ``metapatch [..., k]`` (broadcast against ``state``), ``theta
    [2 * dim, k]``. A zero metapatch leaves the state unchanged.
    """
    scale, shift = (metapatch @ theta.T).chunk(2, dim=-1)
    return state * (1 + scale) + shift


class PatchedModel(nn.Module):
    """The cloud model ``W_f``, the patch generator ``Theta`` and the auxiliary encoder ``g``."""

    def __init__(self, backbone: CloudModel, metapatch_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        dim = backbone.item_embedding.embedding_dim
        self.theta = nn.Parameter(torch.randn(2 * dim, metapatch_dim) / (4 * dim**0.5))
        self.encoder = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, metapatch_dim))

    def user_state(self, history: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's user state after the last item, ``[batch, dim]``."""
        return self.backbone.encode(history)[:, -1]

    def catalogue(self) -> torch.Tensor:
        """Vectors of every real item, ``[num_items, dim]``."""
        backbone = self.backbone
        return backbone.item_vectors(torch.arange(backbone.num_items))

    def forward(
        self,
        history: torch.Tensor,
        candidates: torch.Tensor,
        metapatch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Patched scores of ``candidates``; the encoder's metapatch when none is given."""
        state = self.user_state(history)
        patch = self.encoder(state) if metapatch is None else metapatch
        user = apply_patch(state, patch, self.theta)
        return (self.backbone.item_vectors(candidates) * user.unsqueeze(-2)).sum(-1)


class _Method(nn.Module):
    """Routes ``forward`` to one method of ``net``, so ``functional_call`` can run it."""

    def __init__(self, net: nn.Module, method: str) -> None:
        super().__init__()
        self.net = net
        self.method = method

    def forward(self, *inputs: object) -> torch.Tensor:
        return getattr(self.net, self.method)(*inputs)


def _patch_loss(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    inputs: Mapping[str, torch.Tensor],
    mask: torch.Tensor,
) -> torch.Tensor:
    """Softmax cross-entropy of the patched scores over the catalogue (a device's step)."""
    user = apply_patch(inputs["state"], params["metapatch"], params["theta"])
    logits = user @ params["catalogue"].T
    loss = cross_entropy_all_items(logits, inputs["target"]) * mask
    return loss.sum() / mask.sum().clamp(min=1.0)


def cloud_windows(
    split: P1Split, devices: torch.Tensor, window: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cloud-period windows of ``devices``: ``(inputs, targets, owner)``, ``[W, window]``.

    As ``coevo.tasks.train.windows``: windows end at each device's last cloud-period row and
    step back by ``window``; a target whose input is padding is padding too.
    """
    rows = split.rows("cloud")
    rows = rows[torch.isin(split.device_of_row[rows], devices)]
    owner = split.device_of_row[rows]
    last = torch.zeros(split.num_devices, dtype=torch.long).scatter_reduce(
        0, owner, rows, reduce="amax", include_self=False
    )
    ends = rows[(last[owner] - rows) % window == 0]
    inputs = split.history(ends, window)
    targets = split.history(ends + 1, window)
    targets = torch.where(inputs == split.num_items, split.num_items, targets)
    return inputs, targets, split.device_of_row[ends]


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(teacher) || softmax(student))`` per row, over the last dimension."""
    target = F.log_softmax(teacher, -1)
    return (target.exp() * (target - F.log_softmax(student, -1))).sum(-1)


class Dccl(Strategy):
    name = "dccl"
    Config: ClassVar[type[BaseModel]] = DcclConfig

    def __init__(self, task: RecommendationTask, config: DcclConfig | None = None) -> None:
        super().__init__(task, config or self.Config())
        self.net = self._network(task.cloud_model())
        self.net.eval()
        self.names = [name for name, _ in self.net.named_parameters()]
        self._state = _Method(self.net, "user_state")
        self._catalogue = _Method(self.net, "catalogue")

    def _network(self, backbone: CloudModel) -> PatchedModel:
        return PatchedModel(backbone, self.config.metapatch_dim)

    # -- cloud -------------------------------------------------------------------------------

    def init(self, rng: torch.Generator) -> CloudState:
        backbone = self.pretrain_backbone(rng)
        net = seeded_model(lambda: self._network(backbone), rng)
        self.pretrain_patch(net, rng)
        weights = state_of(net)
        seed = torch.randint(0, 2**62, (), generator=rng)
        return CloudState(
            {**weights, **{HELD + k: v.clone() for k, v in weights.items()}, "seed": seed}
        )

    def pretrain_backbone(self, rng: torch.Generator) -> CloudModel:
        """``W_f``: the cloud model fitted on pooled cloud-period data (as cloud-only)."""
        backbone = seeded_model(self.task.cloud_model, rng)
        fit_config = self.config.pretrain.fit_config(self.task.shapes.cloud_history)
        rows = self.task.rows("cloud")
        fit(backbone, self.task.split, rows, fit_config, rng, validate=validation_hr10(self.task))
        return backbone

    def pretrain_patch(self, net: PatchedModel, rng: torch.Generator) -> list[float]:
        """Fit ``Theta`` and ``g`` on every cloud-period position, ``W_f`` frozen.

        Keeps the weights of the best validation HR@10 (cold-start serving, through ``g``);
        returns the mean training loss of each epoch.
        """
        settings, split = self.config.patch, self.task.split
        inputs, targets, _ = cloud_windows(
            split, torch.arange(split.num_devices), self.task.shapes.cloud_history
        )
        net.eval()
        with torch.no_grad():
            states = _in_chunks(net.backbone.encode, inputs)
            catalogue = net.catalogue()
        trainable = [net.theta, *net.encoder.parameters()]
        optimizer = torch.optim.Adam(trainable, lr=settings.lr)
        validate = validation_hr10(self.task)
        best, best_state, stale, losses = -float("inf"), _copy(trainable), 0, []
        for _ in range(settings.epochs):
            order = torch.randperm(len(inputs), generator=rng)
            total, count = 0.0, 0
            for start in range(0, len(order), settings.batch_size):
                batch = order[start : start + settings.batch_size]
                state, target = states[batch], targets[batch]
                user = apply_patch(state, net.encoder(state), net.theta)
                rows = cross_entropy_all_items((user @ catalogue.T).flatten(0, 1), target.flatten())
                valid = (target < split.num_items).sum()
                loss = rows.sum() / valid.clamp(min=1)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total, count = total + float(rows.detach().sum()), count + int(valid)
            losses.append(total / max(count, 1))
            with torch.no_grad():
                score = validate(net)
            if score > best:
                best, best_state, stale = score, _copy(trainable), 0
            else:
                stale += 1
                if stale >= settings.patience:
                    break
        with torch.no_grad():
            for parameter, saved in zip(trainable, best_state, strict=True):
                parameter.copy_(saved)
        return losses

    def downlink(self, cloud: CloudState, round: int) -> Payload:
        return Payload({name: cloud[name] for name in self.names})

    def merge(self, cloud: CloudState, uplinks: Payload, weights: torch.Tensor) -> CloudState:
        """MoMoDistill from the reporters' metapatches; devices keep the version they hold."""
        old = {name: cloud[name] for name in self.names}
        net = self._network(self.task.cloud_model())
        net.load_state_dict(old, strict=False)
        net.eval()
        seed = int(cloud["seed"])
        generator = torch.Generator().manual_seed(seed)
        inputs, targets, owner = cloud_windows(
            self.task.split, uplinks.tensors["device"], self.task.shapes.cloud_history
        )
        table = torch.zeros(self.task.num_devices, self.config.metapatch_dim)
        table[uplinks.tensors["device"]] = uplinks.tensors["metapatch"]
        with torch.no_grad():
            states = _in_chunks(net.backbone.encode, inputs)
            teacher_users = apply_patch(states, table[owner][:, None], net.theta)
            teacher_items = net.catalogue()
        self._distill_model(net, inputs, targets, teacher_users, teacher_items, generator)
        self._distill_patch(net, inputs, teacher_users, teacher_items, generator)
        new = state_of(net)
        held = {HELD + k: v.clone() for k, v in old.items()}
        return CloudState({**new, **held, "seed": cloud["seed"] + 1})

    def _distill_model(
        self,
        net: PatchedModel,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        teacher_users: torch.Tensor,
        teacher_items: torch.Tensor,
        generator: torch.Generator,
    ) -> None:
        """Step 1: ``W_f`` learns the labels and the personal models' predictions."""
        settings, num_items = self.config.distill, self.task.num_items
        optimizer = torch.optim.Adam(net.backbone.parameters(), lr=settings.model_lr, eps=ADAM_EPS)
        for _ in range(settings.model_epochs):
            order = torch.randperm(len(inputs), generator=generator)
            for start in range(0, len(order), settings.batch_size):
                batch = order[start : start + settings.batch_size]
                target = targets[batch]
                valid = (target < num_items).float()
                logits = net.backbone.sequence_logits(inputs[batch])
                teacher = teacher_users[batch] @ teacher_items.T
                ce = cross_entropy_all_items(logits.flatten(0, 1), target.flatten())
                kl = _kl(teacher, logits).flatten() * valid.flatten()
                loss = (ce + settings.beta * kl).sum() / valid.sum().clamp(min=1.0)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

    def _distill_patch(
        self,
        net: PatchedModel,
        inputs: torch.Tensor,
        teacher_users: torch.Tensor,
        teacher_items: torch.Tensor,
        generator: torch.Generator,
    ) -> None:
        """Step 2: ``Theta`` and ``g`` learn to reproduce the personal models, ``W_f`` frozen."""
        settings, num_items = self.config.distill, self.task.num_items
        with torch.no_grad():
            states = _in_chunks(net.backbone.encode, inputs)
            catalogue = net.catalogue()
        trainable = [net.theta, *net.encoder.parameters()]
        optimizer = torch.optim.Adam(trainable, lr=settings.patch_lr, eps=ADAM_EPS)
        for _ in range(settings.patch_epochs):
            order = torch.randperm(len(inputs), generator=generator)
            for start in range(0, len(order), settings.batch_size):
                batch = order[start : start + settings.batch_size]
                valid = (inputs[batch] != num_items).float()
                state = states[batch]
                user = apply_patch(state, net.encoder(state), net.theta)
                teacher = teacher_users[batch] @ teacher_items.T
                kl = _kl(teacher, user @ catalogue.T) * valid
                loss = kl.sum() / valid.sum().clamp(min=1.0)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

    # -- device ------------------------------------------------------------------------------

    def init_devices(self, cloud: CloudState, num_devices: int) -> DeviceState:
        return DeviceState(
            {
                "metapatch": torch.zeros(num_devices, self.config.metapatch_dim),
                "trained": torch.zeros(num_devices),
                "device": torch.arange(num_devices),
            }
        )

    def local(
        self, payload: Payload, device_state: DeviceState, batch: DeviceBatch
    ) -> tuple[Payload, DeviceState, Metrics]:
        weights = dict(payload.tensors)
        history = batch.inputs["history"]
        with sdpa_kernel(SDPBackend.MATH):
            # The frozen backbone runs forward once per example; only the patch trains.
            states = functional_call(self._state, _routed(weights), (history.flatten(0, 1),))
        states = states.view(*history.shape[:2], -1)
        catalogue = functional_call(self._catalogue, _routed(weights), ())
        guess = functional_call(self.net.encoder, _strip(weights, "encoder."), (states,))
        mask = batch.mask
        guess = (guess * mask[..., None]).sum((0, 1)) / mask.sum().clamp(min=1.0)
        trained = device_state["trained"]
        start = trained * device_state["metapatch"] + (1 - trained) * guess
        params = {"metapatch": start, "theta": weights["theta"], "catalogue": catalogue}
        # Every iteration is one step on all of the device's rows at once.
        steps = self.config.iterations
        flat = {"state": states.flatten(0, 1), "target": batch.inputs["target"].flatten()}
        patch_batch = DeviceBatch(
            {k: v.expand(steps, *v.shape) for k, v in flat.items()},
            mask.flatten().expand(steps, -1),
        )
        local = self.config.local
        new, loss = local_train(
            self.net,
            params,
            ["metapatch"],
            patch_batch,
            local.lr,
            loss=_patch_loss,
            anchor={"metapatch": start},
            l2=self.config.l2,
            optimizer=local.optimizer,
        )
        metapatch = new["metapatch"]
        uplink = Payload({"metapatch": metapatch, "device": device_state["device"]})
        state = DeviceState(
            {
                "metapatch": metapatch,
                "trained": torch.ones_like(trained),
                "device": device_state["device"],
            }
        )
        return uplink, state, {"loss": loss}

    def score(
        self,
        cloud: CloudState,
        device_state: DeviceState,
        history: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        """Devices that trained use their metapatch on the weights they hold; the others
        (cold start) download the current weights and use the encoder's metapatch."""
        held = {name: cloud[HELD + name] for name in self.names}
        current = {name: cloud[name] for name in self.names}
        with torch.no_grad():
            personal = functional_call(
                self.net, held, (history, candidates, device_state["metapatch"])
            )
            cold = functional_call(self.net, current, (history, candidates))
        trained = device_state["trained"][:, None] > 0
        return torch.where(trained, personal, cold)

    def device_flops_per_example(self) -> tuple[float, float]:
        """A training example's forward (the frozen model's prediction) and its backward."""
        flops = self.device_flops()
        return flops["forward"], flops["backward_per_example"]

    def device_flops(self) -> dict[str, float]:
        """On-device FLOPs: a prediction (100 candidates), and a training example's backward
        (through the patch and the catalogue scores only: the backbone is frozen)."""
        shapes = self.task.shapes
        forward = flops_per_request(self.task.cloud_model(), shapes.cloud_history)
        dim, k = shapes.cloud_dim, self.config.metapatch_dim
        backward = 2 * dim * self.task.num_items + 4 * 2 * dim * k
        return {"forward": float(forward), "backward_per_example": float(backward)}


def _routed(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"net.{name}": tensor for name, tensor in weights.items()}


def _strip(weights: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}


def _copy(parameters: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in parameters]


def _in_chunks(
    encode: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, size: int = 512
) -> torch.Tensor:
    return torch.cat([encode(inputs[i : i + size]) for i in range(0, len(inputs), size)])
