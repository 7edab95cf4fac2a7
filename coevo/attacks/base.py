"""The Attack contract: how a malicious device changes its data and its update.

An attack has two halves, each a pure function of tensors so that the same object serves
the Simulator (``vmap``-ed over a cohort by the ``Adversarial`` wrapper) and a device
runtime (one device):

- ``poison(batch, key)``: the batch the device trains on instead of its own (label flipping,
  backdoors, free-riding); the identity for attacks on the update alone;
- ``tamper(update, received, key)``: the uplink it sends instead of the one it computed
  (sign flip, scaling, noise), given what it received from the cloud.

``key`` is an int64 scalar tensor, different per device and round: randomness is drawn from
it with a counter-based hash (``uniform``, ``normal``), because random generators cannot be
used inside ``vmap``. One malicious ``local`` is ``malicious_local``.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from pydantic import BaseModel

from coevo.strategies.base import DeviceBatch, Strategy
from coevo.types import DeviceState, Metrics, Payload

Tensors = dict[str, torch.Tensor]

_MIX_1 = -4658895280553007687  # 0xBF58476D1CE4E5B9 as int64
_MIX_2 = -7723592293110705685  # 0x94D049BB133111EB as int64
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64


def mix(key: torch.Tensor | int, *salt: int) -> torch.Tensor:
    """A new int64 key from ``key`` and ``salt`` (splitmix64 finaliser; wraps like C)."""
    x = torch.as_tensor(key, dtype=torch.long)
    for value in (*salt, 0):
        x = x * _GOLDEN + value
        x = (x ^ _shift_right(x, 30)) * _MIX_1
        x = (x ^ _shift_right(x, 27)) * _MIX_2
        x = x ^ _shift_right(x, 31)
    return x


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic: it copies the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniform(key: torch.Tensor, shape: tuple[int, ...] | torch.Size, salt: int = 0) -> torch.Tensor:
    """Float64 draws in ``(0, 1)`` of ``shape``, a pure function of ``key`` and ``salt``."""
    count = 1
    for size in shape:
        count *= size
    bits = mix(torch.arange(count) * _GOLDEN + key, salt)
    return (_shift_right(bits, 11).double() + 0.5).div(2.0**53).reshape(shape)


def normal(key: torch.Tensor, shape: tuple[int, ...] | torch.Size, salt: int = 0) -> torch.Tensor:
    """Standard normal float32 draws of ``shape`` (Box-Muller), a pure function of ``key``."""
    first, second = uniform(key, shape, 2 * salt), uniform(key, shape, 2 * salt + 1)
    return (torch.sqrt(-2.0 * torch.log(first)) * torch.cos(2.0 * torch.pi * second)).float()


class Attack(ABC):
    """A malicious device behaviour; subclasses set ``name``, ``Config`` and override halves.

    Example:
        >>> class Zero(Attack):
        ...     name = "zero"
        ...     Config = BaseModel
        ...     def tamper(self, update, received, key):
        ...         return {k: torch.zeros_like(v) for k, v in update.items()}
        >>> Zero().tamper({"w": torch.ones(2)}, {}, torch.tensor(0))
        {'w': tensor([0., 0.])}
    """

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]
    poisons_data: ClassVar[bool] = False
    """True when ``poison`` changes the batch (the device then trains on the poisoned one)."""

    def __init__(
        self, config: BaseModel | Mapping[str, Any] | None = None, *, num_items: int | None = None
    ) -> None:
        if config is None or isinstance(config, Mapping):
            config = self.Config.model_validate(dict(config or {}))
        self.config: Any = config
        self.num_items = num_items

    def poison(self, batch: DeviceBatch, key: torch.Tensor) -> DeviceBatch:
        """The batch a malicious device trains on (its own, unchanged, by default)."""
        return batch

    def tamper(
        self, update: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], key
    ) -> Tensors:
        """The uplink a malicious device sends instead of ``update`` (unchanged by default)."""
        return dict(update)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


def malicious_local(
    attack: Attack,
    strategy: Strategy,
    payload: Payload,
    device_state: DeviceState,
    batch: DeviceBatch,
    key: torch.Tensor,
) -> tuple[Payload, DeviceState, Metrics]:
    """One malicious device's ``local``: train on the poisoned batch, send the tampered update.

    ``key`` should differ per device and round; ``Adversarial`` uses
    ``mix(mix(device_index, seed), round)``, and a device runtime can do the same.
    """
    trained = batch if not attack.poisons_data else attack.poison(batch, key)
    uplink, state, metrics = strategy.local(payload, device_state, trained)
    tampered = attack.tamper(uplink.tensors, payload.tensors, key)
    return Payload(tampered, uplink.metrics, uplink.config), state, metrics
