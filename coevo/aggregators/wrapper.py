"""A strategy around another strategy: every verb delegates unless the wrapper changes it.

``Robust`` (robust aggregation) and ``Adversarial`` (malicious devices) are wrappers, so that
they compose with any strategy and with each other without the Simulator knowing about them.
In a run config the wrapped strategy is a nested spec::

    strategies:
      - name: robust
        aggregator: {name: median}
        inner:
          name: adversarial
          attack: {name: sign_flip}
          share: 0.2
          inner: {name: fedavg, local: {lr: 0.5, optimizer: sgd}}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from coevo.strategies.base import DeviceBatch, Strategy
from coevo.tasks.recommendation import RecommendationTask
from coevo.types import CloudState, DeviceState, Metrics, Payload

T = TypeVar("T")


def _strategy_class(name: object) -> type[Strategy]:
    from coevo.strategies import STRATEGIES  # the registry imports the wrappers

    return STRATEGIES.get(str(name))


def lookup(find: Callable[[object], T], name: object) -> T:
    """``find(name)`` with an unknown name as a ``ValueError``, which pydantic reports against
    the field (registries raise ``KeyError``s)."""
    try:
        return find(name)
    except LookupError as error:
        raise ValueError(str(error)) from None


class WrapperSettings(BaseModel):
    """Settings every wrapper shares: the wrapped strategy, and optionally its rounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # The wrapped strategy's spec, as in the run config's strategies list.
    inner: dict[str, Any] = Field(default_factory=lambda: {"name": "fedavg"})
    # Replaces the wrapped strategy's rounds when set (and so every nested one's).
    rounds: int | None = Field(None, ge=1, le=100_000)

    @field_validator("inner")
    @classmethod
    def _valid_inner(cls, spec: dict[str, Any]) -> dict[str, Any]:
        if "name" not in spec:
            raise ValueError("the wrapped strategy needs a 'name'")
        return (
            lookup(_strategy_class, spec["name"])
            .Config.model_validate(spec)
            .model_dump(mode="json")
        )


def build_inner(task: RecommendationTask, settings: WrapperSettings) -> Strategy:
    """The wrapped strategy of ``settings``, with the wrapper's ``rounds`` pushed down."""
    cls = _strategy_class(settings.inner["name"])
    spec = dict(settings.inner)
    if settings.rounds is not None and "rounds" in cls.Config.model_fields:
        spec["rounds"] = settings.rounds
    return cls(task, cls.Config.model_validate(spec))


class StrategyWrapper(Strategy):
    """Delegates every verb to ``self.inner``; subclasses override the verbs they change.

    ``config`` is the wrapped strategy's settings (the Simulator reads ``rounds`` and ``local``
    there); the wrapper's own are ``settings``.
    """

    settings: Any

    def __init__(
        self,
        task: RecommendationTask,
        config: BaseModel | Mapping[str, Any] | None = None,
        *,
        inner: Strategy | None = None,
    ) -> None:
        if config is None or isinstance(config, Mapping):
            config = self.Config.model_validate(dict(config or {}))
        self.inner = (
            inner if inner is not None else build_inner(task, cast(WrapperSettings, config))
        )
        super().__init__(task, self.inner.config)
        self.settings = config
        # The wrapper trains, serves and runs like what it wraps.
        vars(self).update(
            local_period=self.inner.local_period,
            serving=self.inner.serving,
            note=self.inner.note,
        )

    def __getattr__(self, name: str) -> Any:
        # Whatever else a driver asks of the strategy (FedBuff's staleness_weight) is the inner's.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def init(self, rng: torch.Generator) -> CloudState:
        return self.inner.init(rng)

    def init_devices(self, cloud: CloudState, num_devices: int) -> DeviceState:
        return self.inner.init_devices(cloud, num_devices)

    def downlink(self, cloud: CloudState, round: int) -> Payload:
        return self.inner.downlink(cloud, round)

    def local(
        self, payload: Payload, device_state: DeviceState, batch: DeviceBatch
    ) -> tuple[Payload, DeviceState, Metrics]:
        return self.inner.local(payload, device_state, batch)

    def merge(self, cloud: CloudState, uplinks: Payload, weights: torch.Tensor) -> CloudState:
        return self.inner.merge(cloud, uplinks, weights)

    def request(self, history: torch.Tensor, candidates: torch.Tensor) -> Payload:
        return self.inner.request(history, candidates)

    def response(self, candidates: torch.Tensor) -> Payload:
        return self.inner.response(candidates)

    def score(
        self,
        cloud: CloudState,
        device_state: DeviceState,
        history: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        return self.inner.score(cloud, device_state, history, candidates)


def spec_of(component: Any) -> dict[str, Any]:
    """A built strategy's, aggregator's or attack's spec: its name and settings."""
    config = getattr(component, "settings", component.config)
    return {
        **(config.model_dump(mode="json") if config is not None else {}),
        "name": component.name,
    }
