"""Small hand-made data for tests and examples."""

from __future__ import annotations

import numpy as np

from coevo.tasks.log import InteractionLog


def make_log(
    sequences: dict[int, list[int]],
    num_items: int,
    *,
    ratings: dict[int, list[float]] | None = None,
    timestamps: dict[int, list[int]] | None = None,
    item_features: np.ndarray | None = None,
) -> InteractionLog:
    """A log from explicit per-user item sequences (timestamps 0, 1, 2, ... unless given)."""
    users, items, rates, times = [], [], [], []
    for user, seq in sequences.items():
        users += [user] * len(seq)
        items += seq
        rates += (ratings or {}).get(user, [5.0] * len(seq))
        times += (timestamps or {}).get(user, list(range(len(seq))))
    return InteractionLog(
        name="handmade",
        user=np.array(users, dtype=np.int64),
        item=np.array(items, dtype=np.int64),
        rating=np.array(rates, dtype=np.float32),
        timestamp=np.array(times, dtype=np.int64),
        num_users=max(sequences) + 1,
        num_items=num_items,
        item_features=item_features,
    )


def tiny_task(num_devices: int = 24, num_items: int = 150, seed: int = 0):
    """A small synthetic recommendation task with tiny models (seconds to train)."""
    from coevo.tasks.protocol import split_p1
    from coevo.tasks.recommendation import ModelShapes, RecommendationTask
    from coevo.tasks.synthetic import SyntheticConfig, make_world

    world = SyntheticConfig(
        num_devices=num_devices,
        num_items=num_items,
        min_interactions=10,
        mean_interactions=16,
        max_interactions=40,
    )
    log = make_world(world, seed)
    shapes = ModelShapes(
        device_dim=8, device_history=5, cloud_dim=8, cloud_history=8, cloud_layers=1
    )
    return RecommendationTask(log, split_p1(log, seed), shapes)
