"""The Policy contract: one batched run-time decision, whether each device asks the cloud.

A device serves a stream of sessions with parameters (a user representation) that the cloud
generated from its history at some earlier time. Before each session a Policy decides, for a
batch of devices at once, whether to request fresh ones. Policies see device-side features
only (the streaming simulator computes them from what a device holds); they never see the
cloud's data or the quality that a request would bring.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel

from coevo.types import DeviceState

FEATURE_NAMES = (
    "age",
    "log_new",
    "loglik_new",
    "loglik_recent",
    "loglik_old",
    "rank_recent",
    "rank_old",
    "new_share",
    "alignment",
    "drift",
    "uncertainty",
)
"""Device-side features of a request, each float32 ``[batch]``:

- ``age``: sessions since the on-device parameters were generated;
- ``log_new``: ``log(1 + items seen since then)``;
- ``loglik_new`` / ``loglik_recent``: mean log-likelihood (softmax over the catalogue) of the
  items seen since then / of the last few of them, under the on-device parameters (0 if none);
- ``loglik_old``: the same for the last few items the parameters were generated from (how
  predictable this user is at all);
- ``rank_recent`` / ``rank_old``: mean share of the catalogue the parameters score above each
  of the last few new items / of the items they were generated from (0 is a perfect ranking);
- ``new_share``: share of the current history window that is new since then;
- ``alignment``: cosine between the parameters' user vector and the mean of the new items;
- ``drift``: 1 - cosine between the mean of the new items and the mean of the items the
  parameters were generated from (0 if none);
- ``uncertainty``: entropy of the parameters' softmax over the catalogue, over ``log N``.
"""


@dataclass(frozen=True)
class Requests:
    """One session's decision inputs for a batch of devices.

    Attributes:
        devices: int64 ``[batch]`` the devices' ids (stable across sessions).
        session: int64 ``[batch]`` the session about to be served.
        features: float32 tensors ``[batch]`` named as in ``FEATURE_NAMES``.
    """

    devices: torch.Tensor
    session: torch.Tensor
    features: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.devices)

    def select(self, index: torch.Tensor | slice) -> Requests:
        """The requests of a subset of the batch."""
        return Requests(
            self.devices[index],
            self.session[index],
            {name: value[index] for name, value in self.features.items()},
        )


@dataclass(frozen=True)
class Actions:
    """A policy's answer for a batch of devices.

    Attributes:
        request: bool ``[batch]``: True where the device asks the cloud for fresh parameters.
        score: float32 ``[batch]``: the policy's urgency (higher asks sooner); thresholded
            policies request where it exceeds their threshold.
        state: the devices' new private policy state, stacked ``[batch, ...]``.
    """

    request: torch.Tensor
    score: torch.Tensor
    state: DeviceState


class Policy(ABC):
    """Decides, for a batch of devices, whether each asks the cloud before its next session.

    Subclasses set ``name`` and ``Config`` and override ``decide``; learned policies also
    override ``parameters`` (the shared weights every device downloads once). ``decide`` must
    be a pure function of its inputs and treat devices independently, so that a batch gives
    the same answers as one device at a time.

    Example:
        >>> class Odd(Policy):
        ...     name = "odd"
        ...     Config = BaseModel
        ...     def decide(self, requests, device_state):
        ...         request = requests.session % 2 == 1
        ...         return Actions(request, request.float(), counted(device_state, request))
    """

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]

    def __init__(
        self, config: Any = None, parameters: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        self.config: Any = config if config is not None else self.Config()
        self._parameters = {k: v.detach().clone() for k, v in (parameters or {}).items()}

    def parameters(self) -> dict[str, torch.Tensor]:
        """Shared weights every device holds (downloaded once; empty for fixed rules)."""
        return dict(self._parameters)

    def init_state(self, num_devices: int) -> DeviceState:
        """Every device's initial policy state, stacked ``[num_devices, ...]``."""
        return DeviceState({"requests": torch.zeros(num_devices, dtype=torch.long)})

    @abstractmethod
    def decide(self, requests: Requests, device_state: DeviceState) -> Actions:
        """Whether each device of the batch requests now, and its new state."""


def counted(device_state: DeviceState, request: torch.Tensor) -> DeviceState:
    """The state with each device's request counter advanced by its decision."""
    return device_state.with_tensors(requests=device_state["requests"] + request.long())


def uniform_draws(seed: int, devices: torch.Tensor, session: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) that depend only on ``(seed, device, session)`` (a 32-bit hash).

    A counter-based draw keeps a batch's decisions equal to one device's at a time.
    """
    mask = 0xFFFFFFFF
    x = (devices.long() * 0x9E3779B1 + session.long() * 0x85EBCA77 + seed * 0xC2B2AE3D) & mask
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & mask
    x = (x >> 16) ^ x
    return x.double().div(2.0**32).float()
