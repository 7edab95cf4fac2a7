"""Adversarial: any strategy, with a seeded share of its devices running an attack.

Device: a device marked malicious in its private state (``attack/malicious``, drawn once
from ``seed``) runs ``malicious_local`` from round ``start_round`` on: it trains on the
attack's poisoned batch and sends the attack's tampered update; every other device (and every
device before ``start_round``) runs the wrapped strategy's ``local`` unchanged. Cloud and
wire: unchanged, except that the downlink's config carries the round number. In a vectorised
cohort both results are computed and the flag picks one per device (``torch.where``), so no
Python branch depends on a device.

Example:
    >>> from coevo.attacks import SignFlip
    >>> from coevo.strategies import FedAvg
    >>> from coevo.testing import tiny_task
    >>> strategy = Adversarial.wrap(FedAvg(tiny_task()), SignFlip(), share=0.2)
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, Field, field_validator

from coevo.aggregators.wrapper import StrategyWrapper, WrapperSettings, lookup, spec_of
from coevo.attacks.base import Attack, malicious_local, mix
from coevo.strategies.base import DeviceBatch, Strategy
from coevo.types import CloudState, DeviceState, Metrics, Payload

MALICIOUS = "attack/malicious"
KEY = "attack/key"


def _attack_class(name: object) -> type[Attack]:
    from coevo.attacks import ATTACKS

    return ATTACKS.get(str(name))


class AdversarialConfig(WrapperSettings):
    name: Literal["adversarial"] = "adversarial"
    # The attack by registry name with its knobs, e.g. {name: scaling, factor: 10}.
    attack: dict[str, Any] = Field(default_factory=lambda: {"name": "sign_flip"})
    # Share of ALL devices that are malicious (round(share * num_devices) of them).
    share: float = Field(0.2, ge=0.0, le=1.0)
    # First round in which the malicious devices attack (before it they behave honestly).
    start_round: int = Field(0, ge=0)
    # Seed of the choice of malicious devices and of the attacks' randomness.
    seed: int = Field(0, ge=0)

    @field_validator("attack")
    @classmethod
    def _valid_attack(cls, spec: dict[str, Any]) -> dict[str, Any]:
        if "name" not in spec:
            raise ValueError("the attack needs a 'name'")
        return (
            lookup(_attack_class, spec["name"]).Config.model_validate(spec).model_dump(mode="json")
        )


def _select(
    flag: torch.Tensor, attacked: dict[str, torch.Tensor], honest: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    return {k: torch.where(flag, attacked[k], v) for k, v in honest.items()}


class Adversarial(StrategyWrapper):
    name = "adversarial"
    Config: ClassVar[type[BaseModel]] = AdversarialConfig

    def __init__(
        self,
        task: Any,
        config: Any = None,
        *,
        inner: Strategy | None = None,
        attack: Attack | None = None,
    ) -> None:
        super().__init__(task, config, inner=inner)
        if attack is None:
            spec = self.settings.attack
            attack = _attack_class(spec["name"])(spec, num_items=task.num_items)
        self.attack = attack

    @classmethod
    def wrap(
        cls,
        strategy: Strategy,
        attack: Attack,
        *,
        share: float = 0.2,
        start_round: int = 0,
        seed: int = 0,
    ) -> Adversarial:
        """``strategy`` with ``share`` of its devices running ``attack`` from ``start_round``."""
        settings = AdversarialConfig.model_validate(
            {"share": share, "start_round": start_round, "seed": seed}
        ).model_copy(update={"inner": spec_of(strategy), "attack": spec_of(attack)})
        return cls(strategy.task, settings, inner=strategy, attack=attack)

    def malicious_devices(self, num_devices: int) -> torch.Tensor:
        """Which devices are malicious: ``round(share * num_devices)`` drawn from ``seed``."""
        count = math.floor(self.settings.share * num_devices + 0.5)
        order = torch.randperm(
            num_devices, generator=torch.Generator().manual_seed(self.settings.seed)
        )
        flags = torch.zeros(num_devices, dtype=torch.bool)
        flags[order[:count]] = True
        return flags

    def init_devices(self, cloud: CloudState, num_devices: int) -> DeviceState:
        inner = self.inner.init_devices(cloud, num_devices)
        keys = mix(torch.arange(num_devices), self.settings.seed)
        return inner.with_tensors(**{MALICIOUS: self.malicious_devices(num_devices), KEY: keys})

    def downlink(self, cloud: CloudState, round: int) -> Payload:
        payload = self.inner.downlink(cloud, round)
        return Payload(payload.tensors, payload.metrics, {**payload.config, "round": round})

    def local(
        self, payload: Payload, device_state: DeviceState, batch: DeviceBatch
    ) -> tuple[Payload, DeviceState, Metrics]:
        flags = {k: device_state[k] for k in (MALICIOUS, KEY)}
        own = device_state.replace(
            tensors={k: v for k, v in device_state.tensors.items() if k not in flags}
        )
        uplink, state, metrics = self.inner.local(payload, own, batch)
        round = int(payload.config.get("round", 0))
        if round >= self.settings.start_round and self.settings.share > 0:
            key = mix(flags[KEY], round)
            if self.attack.poisons_data:
                bad_up, bad_state, bad_metrics = malicious_local(
                    self.attack, self.inner, payload, own, batch, key
                )
            else:
                # Attacks on the update alone reuse the honest training.
                tampered = self.attack.tamper(uplink.tensors, payload.tensors, key)
                bad_up, bad_state, bad_metrics = Payload(tampered), state, metrics
            malicious = flags[MALICIOUS]
            uplink = Payload(
                _select(malicious, dict(bad_up.tensors), dict(uplink.tensors)),
                uplink.metrics,
                uplink.config,
            )
            state = state.replace(
                tensors=_select(malicious, dict(bad_state.tensors), dict(state.tensors))
            )
            metrics = _select(malicious, dict(bad_metrics), dict(metrics))
        return uplink, state.with_tensors(**flags), metrics
