"""The plain weighted mean: FedAvg's aggregation, undefended (the baseline for the others).

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017. Cloud: ``sum_i w_i x_i / sum_i w_i`` with ``w_i`` the devices' row counts. One
malicious update of large norm moves it arbitrarily far.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

from coevo.aggregators.base import Aggregator, AggregatorState, weighted_mean


class MeanConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["mean"] = "mean"


class Mean(Aggregator):
    name = "mean"
    Config: ClassVar[type[BaseModel]] = MeanConfig

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, state: AggregatorState
    ) -> tuple[torch.Tensor, AggregatorState]:
        return weighted_mean(updates, weights), state
