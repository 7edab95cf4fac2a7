"""Robust: any strategy, with its merge fed one robustly aggregated update.

Composes the aggregators of this package (median, trimmed mean, Krum, Multi-Krum, norm
clipping, centred clipping) with any strategy's merge. Device: unchanged. Cloud: the cohort's
stacked uplinks (every tensor flattened into one row per device) are combined by the
aggregator into one update, which the wrapped strategy merges as if every device of the
cohort had sent it (same weights, same count). Wire: unchanged. An aggregator's state between
rounds (an adaptive clipping norm, the last aggregate) lives in the cloud state under
``robust/``.

Example:
    >>> from coevo.aggregators import Median
    >>> from coevo.strategies import FedAvg
    >>> from coevo.testing import tiny_task
    >>> strategy = Robust.wrap(FedAvg(tiny_task()), Median())
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, Field, field_validator

from coevo.aggregators.base import Aggregator, flatten, unflatten
from coevo.aggregators.wrapper import StrategyWrapper, WrapperSettings, lookup, spec_of
from coevo.strategies.base import Strategy
from coevo.types import CloudState, Payload

STATE_PREFIX = "robust/"


def _aggregator_class(name: object) -> type[Aggregator]:
    from coevo.aggregators import AGGREGATORS

    return AGGREGATORS.get(str(name))


class RobustConfig(WrapperSettings):
    name: Literal["robust"] = "robust"
    # The aggregator by registry name with its knobs, e.g. {name: trimmed_mean, trim: 0.2}.
    aggregator: dict[str, Any] = Field(default_factory=lambda: {"name": "median"})

    @field_validator("aggregator")
    @classmethod
    def _valid_aggregator(cls, spec: dict[str, Any]) -> dict[str, Any]:
        if "name" not in spec:
            raise ValueError("the aggregator needs a 'name'")
        config = lookup(_aggregator_class, spec["name"]).Config.model_validate(spec)
        return config.model_dump(mode="json")


class Robust(StrategyWrapper):
    name = "robust"
    Config: ClassVar[type[BaseModel]] = RobustConfig

    def __init__(
        self,
        task: Any,
        config: Any = None,
        *,
        inner: Strategy | None = None,
        aggregator: Aggregator | None = None,
    ) -> None:
        super().__init__(task, config, inner=inner)
        if aggregator is None:
            spec = self.settings.aggregator
            aggregator = _aggregator_class(spec["name"])(spec)
        self.aggregator = aggregator

    @classmethod
    def wrap(cls, strategy: Strategy, aggregator: Aggregator) -> Robust:
        """``strategy`` with its merge fed ``aggregator``'s robust update."""
        settings = RobustConfig.model_construct(
            inner=spec_of(strategy), aggregator=spec_of(aggregator), rounds=None
        )
        return cls(strategy.task, settings, inner=strategy, aggregator=aggregator)

    def merge(self, cloud: CloudState, uplinks: Payload, weights: torch.Tensor) -> CloudState:
        own = {k: v for k, v in cloud.tensors.items() if not k.startswith(STATE_PREFIX)}
        stored = {
            k.removeprefix(STATE_PREFIX): v
            for k, v in cloud.tensors.items()
            if k.startswith(STATE_PREFIX)
        }
        updates = flatten(uplinks.tensors)
        state = stored or self.aggregator.init_state(updates.shape[1])
        combined, state = self.aggregator.aggregate(updates, weights.float(), state)
        # Every device "sent" the aggregate: merges that count uplinks (SCAFFOLD) still see n.
        count = len(weights)
        same = {
            k: v.expand(count, *v.shape) for k, v in unflatten(combined, uplinks.tensors).items()
        }
        merged = self.inner.merge(
            cloud.replace(tensors=own), Payload(same, uplinks.metrics), weights
        )
        return merged.with_tensors(**{STATE_PREFIX + k: v for k, v in state.items()})
