"""Malicious device-runtime mode: a real device process that runs one of ``coevo.attacks``.

The same ``Attack`` objects the simulator's ``Adversarial`` wrapper uses, applied by one
device to its own round: it trains on the attack's poisoned batch (label flipping, backdoor,
free-riding) and sends the attack's tampered update (sign flip, scaling, noise) instead of the
honest one, *before* the uplink codec, so the server sees exactly what a malicious simulated
device would send. The attack's randomness is keyed as in ``Adversarial``
(``mix(mix(device_index, seed), round)``), so a served attacker and a simulated one send the
same update for the same device, round and seed. Nothing changes on the server or the wire.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from coevo.attacks import ATTACKS, Attack, malicious_local, mix
from coevo.strategies.base import DeviceBatch, Strategy
from coevo.types import DeviceState, Metrics, Payload

SCALE_KNOBS = ("factor", "sigma", "boost")
"""The knob ``--attack-scale`` sets: an attack's magnitude (the first of these it has)."""


@dataclass(frozen=True)
class DeviceAttack:
    """One device's attack: which behaviour, from which round, with which randomness seed.

    Args:
        attack: the behaviour (an ``ATTACKS`` entry, built).
        start_round: the first round it attacks in (honest before).
        seed: the attack randomness seed (``Adversarial``'s ``seed``).
    """

    attack: Attack
    start_round: int = 0
    seed: int = 0

    @classmethod
    def build(
        cls,
        name: str,
        *,
        scale: float | None = None,
        knobs: dict[str, Any] | None = None,
        num_items: int | None = None,
        start_round: int = 0,
        seed: int = 0,
    ) -> DeviceAttack:
        """The attack ``name`` with ``knobs``; ``scale`` sets its magnitude knob.

        Raises:
            ValueError: for an unknown attack, a ``scale`` the attack has no knob for, or a
                knob out of range (the message names it).
        """
        try:
            attack_class = ATTACKS.get(name)
        except LookupError as error:
            raise ValueError(f"--attack: {error}") from None
        spec = dict(knobs or {})
        if scale is not None:
            fields = attack_class.Config.model_fields
            knob = next((k for k in SCALE_KNOBS if k in fields), None)
            if knob is None:
                raise ValueError(
                    f"--attack-scale: attack {name!r} has no magnitude knob "
                    f"(one of {', '.join(SCALE_KNOBS)})"
                )
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"--attack-scale: must be a positive number, got {scale}")
            spec[knob] = scale
        if start_round < 0:
            raise ValueError(f"--attack-start-round: must be >= 0, got {start_round}")
        return cls(attack_class(spec, num_items=num_items), start_round, seed)

    def key(self, device_index: int, round: int) -> torch.Tensor:
        """The attack randomness key of ``device_index`` in ``round`` (as ``Adversarial``)."""
        return mix(mix(torch.tensor(device_index), self.seed), round)

    def active(self, round: int) -> bool:
        return round >= self.start_round

    def strategy(self, strategy: Strategy, device_index: int, round: int) -> Strategy:
        """``strategy`` whose ``local`` is the malicious one for this device and round (honest
        before ``start_round``); ``run_block`` takes it in place of the honest strategy."""
        if not self.active(round):
            return strategy
        return _MaliciousLocal(strategy, self.attack, self.key(device_index, round))  # type: ignore[return-value]


class _MaliciousLocal:
    """A strategy whose ``local`` trains on the poisoned batch and sends the tampered update;
    every other attribute is the honest strategy's."""

    def __init__(self, strategy: Strategy, attack: Attack, key: torch.Tensor) -> None:
        self._strategy, self._attack, self._key = strategy, attack, key

    def __getattr__(self, name: str) -> Any:
        return getattr(self._strategy, name)

    def local(
        self, payload: Payload, device_state: DeviceState, batch: DeviceBatch
    ) -> tuple[Payload, DeviceState, Metrics]:
        return malicious_local(
            self._attack, self._strategy, payload, device_state, batch, self._key
        )


@dataclass(frozen=True)
class AttackSpec:
    """What ``--attack``, ``--attack-scale``, ``--attack-start-round`` and ``--attack-seed``
    ask for; ``build`` makes the attack once the task (its item count) is known."""

    name: str
    scale: float | None = None
    start_round: int = 0
    seed: int = 0

    def build(self, num_items: int | None = None) -> DeviceAttack:
        """The attack (``ValueError`` naming the option that is wrong)."""
        return DeviceAttack.build(
            self.name,
            scale=self.scale,
            num_items=num_items,
            start_round=self.start_round,
            seed=self.seed,
        )


def malicious_indices(indices: list[int], share: float, seed: int) -> set[int]:
    """Which of ``indices`` run the attack: ``round(share * len(indices))`` drawn from ``seed``
    (the same draw as ``Adversarial.malicious_devices`` when ``indices`` is ``0..n-1``).

    Raises:
        ValueError: for a share outside [0, 1].
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"--malicious-share: must be in [0, 1], got {share}")
    count = math.floor(share * len(indices) + 0.5)
    order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))
    return {indices[int(i)] for i in order[:count]}
