"""The Strategy contract: four pure verbs named after the round phases, plus serving.

A strategy states an algorithm only. The Simulator (and later the Service) selects devices,
builds their batches, moves payloads, counts bytes and records metrics; the strategy never
loops over devices, logs, or touches sockets or clocks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from pydantic import BaseModel
from torch import nn
from torch.func import functional_call, vmap

from coevo.tasks.protocol import Period
from coevo.tasks.recommendation import RecommendationTask
from coevo.types import CloudState, DeviceState, Metrics, Payload

Params = dict[str, torch.Tensor]


LossFn = Callable[
    [nn.Module, Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor
]
"""``loss(model, params, inputs, mask)``: mean loss over the real examples of one step.

A loss object with ``stacked = True`` also takes every param, input and mask with a leading
device axis and returns one loss per device; local training then steps whole blocks of
devices with one forward and backward pass
(`coevo.strategies.local_training.TrainStep.stacked`).
"""


@dataclass(frozen=True)
class DeviceBatch:
    """One device's training examples for a round, already cut into optimiser steps.

    Attributes:
        inputs: the task's named example tensors, each ``[steps, batch, ...]`` (for
            recommendation: ``history [steps, batch, length]`` and ``target [steps, batch]``).
        mask: float32 ``[steps, batch]``: 1 for a real example, 0 for padding.
        tables: sparse tables, ``{parameter name: input name}``, for a task that declares
            ``sparse_inputs``: the parameter (an embedding table) is read by the loss only
            through row lookups by that input. `local_train` then trains only the rows the
            batch touches, which gives the same result as training the whole table.
        rows: per sparse input, ``[touched]`` ids of the table rows the batch touches, padded
            with -1.
        local: per sparse input, ``[steps, batch]`` positions of each example's id in ``rows``.
    """

    inputs: Mapping[str, torch.Tensor]
    mask: torch.Tensor
    tables: Mapping[str, str] = field(default_factory=dict)
    rows: Mapping[str, torch.Tensor] = field(default_factory=dict)
    local: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return self.mask.shape[0]

    @property
    def num_examples(self) -> torch.Tensor:
        return self.mask.sum()

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """The batch's tensors by group (``inputs``, ``mask``, ``rows``, ``local``)."""
        return {
            "inputs": dict(self.inputs),
            "mask": {"": self.mask},
            "rows": dict(self.rows),
            "local": dict(self.local),
        }

    @classmethod
    def from_tensors(
        cls, groups: Mapping[str, Mapping[str, torch.Tensor]], tables: Mapping[str, str]
    ) -> DeviceBatch:
        """Inverse of `tensors` (``tables`` is not a tensor, so it comes apart)."""
        return cls(
            dict(groups["inputs"]),
            groups["mask"][""],
            tables,
            dict(groups["rows"]),
            dict(groups["local"]),
        )

    def device(self, index: int) -> DeviceBatch:
        """Device ``index``'s batch, out of a batch stacked over a block of devices."""
        groups = {g: {k: v[index] for k, v in t.items()} for g, t in self.tensors().items()}
        return DeviceBatch.from_tensors(groups, self.tables)


class Strategy(ABC):
    """One way for devices and the cloud to collaborate, as pure phase verbs.

    Subclasses set ``name``, override ``init`` and ``score``, and, when devices do local work,
    ``downlink``, ``local`` and ``merge``. ``local`` handles ONE device and must be a pure
    function of its tensor inputs, so that a simulator can ``vmap`` it over a cohort; it runs
    its optimiser steps through `coevo.strategies.scan.scan` (`local_train` does), so that the
    simulator can step a whole block at once.

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
    asks_cloud: ClassVar[bool] = False
    """True when every inference request also goes to the cloud although the device scores
    (weights generated per request): its ``request`` and ``response`` bytes are counted."""
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

    exchanges: ClassVar[bool] = False
    """True: before ``local``, each selected device sends ``query`` up and gets its own
    ``answer`` down (two phases of the round, both counted; see ``coevo.sim.exchange``)."""

    def query(self, payload: Payload, device_state: DeviceState, batch: DeviceBatch) -> Payload:
        """What one device sends up before its local work; pure and vmappable like ``local``."""
        return Payload()

    def answer(self, cloud: CloudState, devices: torch.Tensor, queries: Payload) -> Payload:
        """The cloud's answer to each of ``devices``, stacked ``[len(devices), ...]``.

        ``queries`` holds their queries stacked alike. A device's ``local`` finds its own
        answer's tensors in its device state (and must not return them as new state).
        """
        return Payload()

    def device_flops_per_example(self) -> tuple[float, float]:
        """Forward and backward FLOPs one local training example costs a device.

        By default the task's training estimate, a third forward and two thirds backward; a
        strategy whose devices train something else (or only run forward passes) overrides it.
        """
        total = float(getattr(self.task, "train_flops_per_example", lambda: 0.0)())
        return total / 3.0, 2.0 * total / 3.0

    @abstractmethod
    def score(
        self,
        cloud: CloudState,
        device_state: DeviceState,
        history: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        """Scores ``[block, num_candidates]`` for a block of devices (state stacked for it)."""


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
