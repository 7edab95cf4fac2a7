"""Label flipping: the device trains on its own histories with wrong next items.

Tolpegin et al., "Data Poisoning Attacks Against Federated Learning Systems", ESORICS 2020.
Device: every target item ``t`` of its batch becomes ``permutation[t]``, a fixed seeded
permutation of the catalogue shared by all attackers, then it trains and sends the update
honestly, so the update looks normal in size but teaches wrong associations.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from coevo.attacks.base import Attack
from coevo.strategies.base import DeviceBatch


class LabelFlipConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["label_flip"] = "label_flip"
    # Seed of the item permutation the attackers agree on.
    seed: int = Field(0, ge=0)


class LabelFlip(Attack):
    name = "label_flip"
    Config: ClassVar[type[BaseModel]] = LabelFlipConfig
    poisons_data = True

    def __init__(self, config: Any = None, *, num_items: int | None = None) -> None:
        super().__init__(config, num_items=num_items)
        if num_items is None or num_items < 1:
            raise ValueError(f"label_flip: num_items must be a positive count, got {num_items}")
        generator = torch.Generator().manual_seed(self.config.seed)
        self.permutation = torch.randperm(num_items, generator=generator)

    def poison(self, batch: DeviceBatch, key: torch.Tensor) -> DeviceBatch:
        if batch.tables:
            raise ValueError("label_flip: needs a task without sparse tables (targets are ids)")
        flipped = self.permutation[batch.inputs["target"]]
        return replace(batch, inputs={**batch.inputs, "target": flipped})
