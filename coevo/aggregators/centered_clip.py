"""Centred clipping: start from the last aggregate and step towards each update, clipped.

Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust Optimization", ICML
2021. Cloud: from the centre ``v`` (the previous round's aggregate), repeat
``v <- v + sum_i w_i clip(x_i - v, tau) / sum_i w_i``; each iteration moves ``v`` by at most
``tau``, so a minority of attackers can only drag it by a bounded amount. With ``tau`` null,
each iteration takes the median distance of the updates from ``v`` as its radius.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from coevo.aggregators.base import Aggregator, AggregatorState, clip_rows, weighted_mean
from coevo.aggregators.norm_clip import norm_quantile


class CenteredClipConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["centered_clip"] = "centered_clip"
    # Radius of each step: smaller resists attackers harder and lags honest change more.
    # Null: the median distance of the updates from the centre, each iteration.
    tau: float | None = Field(None, gt=0)
    # Clipped steps per round: more converges closer to the robust centre, at linear cost.
    iterations: int = Field(3, ge=1, le=100)


class CenteredClip(Aggregator):
    name = "centered_clip"
    Config: ClassVar[type[BaseModel]] = CenteredClipConfig

    def init_state(self, dim: int) -> AggregatorState:
        return {"center": torch.zeros(dim)}

    def radius(self, offsets: torch.Tensor) -> torch.Tensor:
        """The clipping radius of one iteration for the updates' offsets from the centre."""
        if self.config.tau is not None:
            return torch.tensor(self.config.tau, dtype=torch.float64)
        return norm_quantile(torch.linalg.vector_norm(offsets.double(), dim=1), 0.5)

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, state: AggregatorState
    ) -> tuple[torch.Tensor, AggregatorState]:
        center = state["center"].to(updates.dtype)
        for _ in range(self.config.iterations):
            offsets = updates - center
            center = center + weighted_mean(clip_rows(offsets, self.radius(offsets)), weights)
        return center, {"center": center}
