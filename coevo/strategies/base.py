"""The Strategy contract: four pure verbs named after the round phases, plus serving.

A strategy states an algorithm only. The Simulator (and later the Service) selects devices,
builds their batches, moves payloads, counts bytes and records metrics; the strategy never
loops over devices, logs, or touches sockets or clocks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from pydantic import BaseModel
from torch import nn
from torch.func import functional_call, grad, vmap

from coevo.tasks.protocol import Period
from coevo.tasks.recommendation import RecommendationTask
from coevo.types import CloudState, DeviceState, Metrics, Payload

Params = dict[str, torch.Tensor]


LossFn = Callable[
    [nn.Module, Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor
]
"""``loss(model, params, inputs, mask)``: mean loss over the real examples of one step."""


@dataclass(frozen=True)
class DeviceBatch:
    """One device's training examples for a round, already cut into optimiser steps.

    Attributes:
        inputs: the task's named example tensors, each ``[steps, batch, ...]`` (for
            recommendation: ``history [steps, batch, length]`` and ``target [steps, batch]``).
        mask: float32 ``[steps, batch]``: 1 for a real example, 0 for padding.
    """

    inputs: Mapping[str, torch.Tensor]
    mask: torch.Tensor

    @property
    def num_steps(self) -> int:
        return self.mask.shape[0]

    @property
    def num_examples(self) -> torch.Tensor:
        return self.mask.sum()


class Strategy(ABC):
    """One way for devices and the cloud to collaborate, as pure phase verbs.

    Subclasses set ``name``, override ``init`` and ``score``, and, when devices do local work,
    ``downlink``, ``local`` and ``merge``. ``local`` handles ONE device and must be a pure
    function of its tensor inputs, so that a simulator can ``vmap`` it over a cohort.

    Example:
        >>> class Constant(Strategy):
        ...     name = "constant"
        ...     local_period = None
        ...     def init(self, rng):
        ...         return CloudState({"bias": torch.zeros(self.task.num_items)})
        ...     def score(self, cloud, device_state, history, candidates):
        ...         return cloud["bias"][candidates]
    """

    name: ClassVar[str]
    serving: ClassVar[str] = "device"
    """``"device"``: the device scores its own requests; ``"cloud"``: each request is sent up."""
    local_period: ClassVar[Period | None] = "device"
    """Rows a device trains on in ``local``; ``None`` when devices do no training."""
    note: ClassVar[str] = ""
    Config: ClassVar[type[BaseModel]]
    """The pydantic model of this strategy's settings (``name`` plus its knobs)."""

    def __init__(self, task: RecommendationTask, config: Any = None) -> None:
        self.task = task
        self.config = config

    @property
    def rounds(self) -> int:
        """Training rounds with device participation (0: the cloud alone trains)."""
        return 0 if self.local_period is None else int(getattr(self.config, "rounds", 1))

    @abstractmethod
    def init(self, rng: torch.Generator) -> CloudState:
        """Initial cloud state (may include centralised training on cloud-period data)."""

    def init_devices(self, cloud: CloudState, num_devices: int) -> DeviceState:
        """Stacked initial private state ``[num_devices, ...]`` of every device.

        The tensors must be fresh (not views of the cloud state): the simulator writes each
        round's new rows into them in place.
        """
        return DeviceState()

    def downlink(self, cloud: CloudState, round: int) -> Payload:
        """What the cloud sends every selected device at the start of ``round``."""
        return Payload()

    def local(
        self, payload: Payload, device_state: DeviceState, batch: DeviceBatch
    ) -> tuple[Payload, DeviceState, Metrics]:
        """One device's work for a round: ``(uplink, new private state, metrics)``."""
        raise NotImplementedError(f"strategy {self.name!r} does no on-device training")

    def merge(self, cloud: CloudState, uplinks: Payload, weights: torch.Tensor) -> CloudState:
        """Next cloud state from the devices' uplinks.

        ``uplinks`` holds every uplink tensor stacked over the devices that reported,
        ``[num_uplinks, ...]``, in the order of ``weights`` (their training-row counts).
        """
        return cloud

    def request(self, history: torch.Tensor, candidates: torch.Tensor) -> Payload:
        """What one inference request sends to the cloud when ``serving == "cloud"``."""
        return Payload({"history": history.int(), "candidates": candidates.int()})

    def response(self, candidates: torch.Tensor) -> Payload:
        """What the cloud answers to one request: a score per candidate."""
        return Payload({"scores": torch.zeros(len(candidates))})

    @abstractmethod
    def score(
        self,
        cloud: CloudState,
        device_state: DeviceState,
        history: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        """Scores ``[block, num_candidates]`` for a block of devices (state stacked for it)."""


def local_train(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    trainable: Sequence[str],
    batch: DeviceBatch,
    lr: float,
    *,
    loss: LossFn,
    anchor: Mapping[str, torch.Tensor] | None = None,
    l2: float = 0.0,
    correction: Mapping[str, torch.Tensor] | None = None,
    optimizer: str = "adam",
    betas: tuple[float, float] = (0.9, 0.999),
) -> tuple[Params, torch.Tensor]:
    """Adam or plain SGD on ``trainable`` params over every step of ``batch``; pure, vmappable.

    Steps whose mask is all padding leave the parameters and the optimiser moments unchanged,
    so devices padded to a common step count train exactly as if alone. With ``anchor``, the
    loss adds ``l2 / 2 * ||w - anchor||^2`` over the anchored names (regularised fine-tuning,
    FedProx's proximal term). ``correction`` is added to every gradient (SCAFFOLD's ``c - c_i``).

    Returns the new parameters (all of them) and the mean training loss over real examples.
    """
    frozen = {k: v for k, v in params.items() if k not in trainable}
    weights = {k: params[k] for k in trainable}

    def loss_fn(w: Params, inputs: Mapping[str, torch.Tensor], mask: torch.Tensor):
        value = loss(model, {**frozen, **w}, inputs, mask)
        reported = value.detach()
        if anchor is not None and l2 > 0:
            pulled = [k for k in w if k in anchor]
            value = value + 0.5 * l2 * sum(((w[k] - anchor[k]) ** 2).sum() for k in pulled)
        return value, reported

    first = {k: torch.zeros_like(v) for k, v in weights.items()}
    second = {k: torch.zeros_like(v) for k, v in weights.items()}
    step_count = torch.zeros(())
    total = torch.zeros(())
    for step in range(batch.num_steps):
        mask = batch.mask[step]
        active = (mask.sum() > 0).float()
        inputs = {k: v[step] for k, v in batch.inputs.items()}
        grads, step_loss = grad(loss_fn, has_aux=True)(weights, inputs, mask)
        total = total + step_loss * mask.sum()
        step_count = step_count + active
        t = step_count.clamp(min=1.0)
        if correction is not None:
            grads = {k: g + correction[k] for k, g in grads.items()}
        if optimizer == "sgd":
            weights = {k: weights[k] - active * lr * grads[k] for k in weights}
            continue
        for k in weights:
            first[k] = first[k] + active * (1 - betas[0]) * (grads[k] - first[k])
            second[k] = second[k] + active * (1 - betas[1]) * (grads[k] ** 2 - second[k])
            update = (first[k] / (1 - betas[0] ** t)) / (
                (second[k] / (1 - betas[1] ** t)).sqrt() + 1e-8
            )
            weights[k] = weights[k] - active * lr * update
    mean_loss = total / batch.mask.sum().clamp(min=1.0)
    return {**frozen, **weights}, mean_loss


def score_shared(model: nn.Module, params: Mapping[str, torch.Tensor], history, candidates):
    """Scores with one set of weights for every device of the block."""
    return functional_call(model, {**params, **dict(model.named_buffers())}, (history, candidates))


def score_per_device(
    model: nn.Module,
    shared: Mapping[str, torch.Tensor],
    stacked: Mapping[str, torch.Tensor],
    history: torch.Tensor,
    candidates: torch.Tensor,
) -> torch.Tensor:
    """Scores with each device's own weights, vectorised over the block.

    ``stacked`` holds the per-device tensors ``[block, ...]``; ``shared`` the rest, common to all.
    """
    buffers = dict(model.named_buffers())

    def one(params: Params, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**shared, **params, **buffers}, (h[None], c[None]))[0]

    return vmap(one)(dict(stacked), history, candidates)


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def seeded_model(build: Callable[[], ModuleT], rng: torch.Generator) -> ModuleT:
    """Build a module whose initial weights are drawn from ``rng`` (the global RNG is untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
        return build()
