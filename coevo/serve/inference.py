"""Cloud inference for requests a device sends up (strategies that serve from the cloud).

The current cloud state scores a request's candidates after its history, with the device's
initial private state (the cloud never holds a device's trained personal weights). Every
input is checked first, so a bad request gets a 422 naming the field and its limit.
"""

from __future__ import annotations

import torch

from coevo.serve.rounds import Coordinator, Rejected
from coevo.types import DeviceState


def score_request(
    coordinator: Coordinator, device_index: int, history: list[int], candidates: list[int]
) -> torch.Tensor:
    """Scores ``[len(candidates)]`` of ``candidates`` after ``history`` (oldest first)."""
    task, settings = coordinator.task, coordinator.settings
    num_items, length = task.num_items, task.history_len
    if len(history) > length:
        raise Rejected(422, f"history: {len(history)} items exceeds the limit of {length}")
    if not 1 <= len(candidates) <= settings.max_candidates:
        raise Rejected(
            422,
            f"candidates: {len(candidates)} items; allowed 1..{settings.max_candidates} "
            "(serve.max_candidates)",
        )
    for name, items in (("history", history), ("candidates", candidates)):
        bad = [i for i in items if not 0 <= i < num_items]
        if bad:
            raise Rejected(422, f"{name}: item {bad[0]} is outside [0, {num_items})")
    padded = torch.full((1, length), num_items, dtype=torch.long)
    if history:
        padded[0, length - len(history) :] = torch.tensor(history)
    own = coordinator.device_state(device_index).tensors
    state = DeviceState({k: v[None] for k, v in own.items()})
    cloud = coordinator.cloud
    with torch.no_grad():
        scores = coordinator.strategy.score(cloud, state, padded, torch.tensor([candidates]))
    return scores[0]
