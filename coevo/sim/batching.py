"""Per-device batches: a device's visible rows cut into shuffled optimiser steps."""

from __future__ import annotations

import torch

from coevo.strategies.base import DeviceBatch
from coevo.tasks.protocol import P1Split, Period


def device_rows(split: P1Split, period: Period) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``period`` grouped by device: ``(rows, offsets [num_devices + 1])``."""
    rows = split.rows(period)
    counts = torch.bincount(split.device_of_row[rows], minlength=split.num_devices)
    return rows, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])


def device_batch(
    split: P1Split,
    rows: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    history_len: int,
    generator: torch.Generator,
    num_steps: int | None = None,
) -> DeviceBatch:
    """Shuffle ``rows`` once per epoch and cut them into steps of ``batch_size``.

    Each epoch ends with a partial step padded with masked examples; ``num_steps`` pads the
    result further with fully masked steps (so that a cohort shares one step count).
    """
    per_epoch = -(-len(rows) // batch_size)
    steps = []
    for _ in range(epochs):
        order = rows[torch.randperm(len(rows), generator=generator)]
        padded = torch.full((per_epoch * batch_size,), -1, dtype=torch.long)
        padded[: len(order)] = order
        steps.append(padded.view(per_epoch, batch_size))
    index = torch.cat(steps) if steps else torch.empty(0, batch_size, dtype=torch.long)
    if num_steps is not None and num_steps > len(index):
        pad = torch.full((num_steps - len(index), batch_size), -1, dtype=torch.long)
        index = torch.cat([index, pad])
    mask = (index >= 0).float()
    safe = index.clamp(min=0).flatten()
    if len(split.items) == 0:
        raise ValueError("empty split")
    history = split.history(safe, history_len).view(*index.shape, history_len)
    target = split.items[safe].view(index.shape)
    return DeviceBatch(history=history, target=target, mask=mask)
