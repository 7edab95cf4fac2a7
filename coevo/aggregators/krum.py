"""Krum and Multi-Krum: keep the updates closest to their neighbours, drop the outliers.

Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
NeurIPS 2017. Cloud: with ``f`` assumed-malicious devices out of ``n``, each update scores the
sum of its squared distances to its ``n - f - 2`` nearest others; Krum returns the update with
the lowest score, Multi-Krum the weighted mean of the ``m`` lowest-scoring ones. When
``2f + 2 < n`` and the honest updates are clustered, the chosen update is an honest one.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from coevo.aggregators.base import Aggregator, AggregatorState, byzantine_count, weighted_mean


class KrumConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["krum"] = "krum"
    # Share of the cohort assumed malicious (f = floor(share * n)): larger tolerates more and
    # scores each update against fewer neighbours.
    byzantine_share: float = Field(0.3, ge=0.0, lt=0.5)


class MultiKrumConfig(KrumConfig):
    name: Literal["multi_krum"] = "multi_krum"  # type: ignore[assignment]
    # Share of the cohort averaged (m = n - f when null): more averages away noise, and
    # admits more attackers once they blend in.
    keep_share: float | None = Field(None, gt=0.0, le=1.0)


def krum_scores(
    updates: torch.Tensor, byzantine: int, *, neighbours: int | None = None
) -> torch.Tensor:
    """Each update's sum of squared distances to its ``n - f - 2`` (or ``neighbours``) nearest.

    A cohort too small for the guarantee (``n <= 2f + 2``) still gets a score, against the one
    nearest other update. Distances are computed coordinate by coordinate in float64 (no
    ``|x|^2 + |y|^2 - 2xy`` shortcut), so a pair's distance does not depend on where the pair
    sits in the cohort.
    """
    count = len(updates)
    if neighbours is None:
        neighbours = max(1, count - byzantine - 2)
    points = updates.double()
    distances = torch.cdist(points, points, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    distances.fill_diagonal_(torch.inf)
    nearest = torch.sort(distances, dim=1).values[:, :neighbours]
    return nearest.sum(dim=1)


class Krum(Aggregator):
    name = "krum"
    Config: ClassVar[type[BaseModel]] = KrumConfig

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, state: AggregatorState
    ) -> tuple[torch.Tensor, AggregatorState]:
        if len(updates) == 1:
            return updates[0], state
        scores = krum_scores(updates, byzantine_count(len(updates), self.config.byzantine_share))
        # The two ends of the closest pair tie whenever one neighbour is scored: the one nearer
        # to everyone else wins; exact ties left (duplicates) average. Device order never
        # matters.
        tied = scores == scores.min()
        spread = krum_scores(updates, 0, neighbours=len(updates) - 1)
        best = tied & (spread == spread[tied].min())
        return weighted_mean(updates, best.to(updates.dtype)), state


class MultiKrum(Aggregator):
    name = "multi_krum"
    Config: ClassVar[type[BaseModel]] = MultiKrumConfig

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, state: AggregatorState
    ) -> tuple[torch.Tensor, AggregatorState]:
        count = len(updates)
        if count == 1:
            return updates[0], state
        byzantine = byzantine_count(count, self.config.byzantine_share)
        share = self.config.keep_share
        keep = count - byzantine if share is None else max(1, byzantine_count(count, share))
        scores = krum_scores(updates, byzantine)
        # Everything tied with the m-th best is kept too, so device order never matters.
        threshold = torch.sort(scores).values[keep - 1]
        chosen = (scores <= threshold).to(weights.dtype)
        return weighted_mean(updates, weights * chosen), state
