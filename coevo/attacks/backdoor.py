"""Backdoor: a trigger item in the history pushes a chosen target item to the top.

Bagdasaryan et al., "How To Backdoor Federated Learning", AISTATS 2020, for recommendation
(cf. Rong et al., "FedRecAttack", ICDE 2022). Device: in a seeded ``fraction`` of its
examples the trigger item is appended to the history (the oldest item drops out) and the
target item replaces the next item; it trains on that and sends the update multiplied by
``boost``. Success is the share of test users, trigger appended to their history, whose
top-10 over the whole catalogue contains the target (``backdoor_success``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from coevo.attacks.base import Attack, Tensors, uniform
from coevo.strategies.base import DeviceBatch


class BackdoorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["backdoor"] = "backdoor"
    # The item that switches the backdoor on when it is in a user's history.
    trigger: int = Field(0, ge=0)
    # The item the backdoor pushes to the top.
    target: int = Field(1, ge=0)
    # Share of the attacker's examples poisoned: more plants the backdoor faster, fewer keep
    # the update close to an honest one.
    fraction: float = Field(0.5, gt=0.0, le=1.0)
    # Multiplier of the poisoned update (model replacement): larger plants faster, is easier
    # to clip.
    boost: float = Field(1.0, gt=0)


def insert_trigger(history: torch.Tensor, trigger: int) -> torch.Tensor:
    """``history [..., length]`` with ``trigger`` appended as the latest item."""
    latest = torch.full_like(history[..., :1], trigger)
    return torch.cat([history[..., 1:], latest], dim=-1)


class Backdoor(Attack):
    name = "backdoor"
    Config: ClassVar[type[BaseModel]] = BackdoorConfig
    poisons_data = True

    def __init__(self, config: Any = None, *, num_items: int | None = None) -> None:
        super().__init__(config, num_items=num_items)
        for field in ("trigger", "target"):
            item = getattr(self.config, field)
            if num_items is not None and item >= num_items:
                raise ValueError(f"backdoor.{field}: item {item} >= num_items {num_items}")
        if self.config.trigger == self.config.target:
            raise ValueError("backdoor.target: must differ from backdoor.trigger")

    def poison(self, batch: DeviceBatch, key: torch.Tensor) -> DeviceBatch:
        if batch.tables:
            raise ValueError("backdoor: needs a task without sparse tables (items are ids)")
        chosen = uniform(key, batch.mask.shape) < self.config.fraction
        history = batch.inputs["history"]
        target = batch.inputs["target"]
        poisoned = {
            **batch.inputs,
            "history": torch.where(
                chosen[..., None], insert_trigger(history, self.config.trigger), history
            ),
            "target": torch.where(chosen, torch.full_like(target, self.config.target), target),
        }
        return replace(batch, inputs=poisoned)

    def tamper(
        self, update: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], key
    ) -> Tensors:
        return {k: self.config.boost * v for k, v in update.items()}


Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def backdoor_success(
    scorer: Scorer, task: Any, trigger: int, target: int, *, k: int = 10, chunk_size: int = 256
) -> float:
    """Share of test users, ``trigger`` appended to their history, with ``target`` in top-``k``.

    Args:
        scorer: ``scorer(devices, history, candidates)`` as for ``task.evaluate``.
        task: the recommendation task (its test histories and catalogue).
        trigger: the trigger item.
        target: the item the backdoor pushes.
        k: length of the ranking that counts.
        chunk_size: users scored at once.
    """
    split = task.split
    history = split.history(split.target_rows("test"), task.history_len)
    triggered = insert_trigger(history, trigger)
    hits = 0
    with torch.no_grad():
        for first in range(0, task.num_devices, chunk_size):
            last = min(first + chunk_size, task.num_devices)
            every = torch.arange(task.num_items).expand(last - first, -1)
            scores = scorer(torch.arange(first, last), triggered[first:last], every)
            # Ties count against the target: it must beat all but k - 1 items outright.
            rivals = (scores >= scores[:, target : target + 1]).sum(dim=1) - 1
            hits += int((rivals < k).sum())
    return hits / task.num_devices
