"""Cohort batches: each device's visible rows cut into shuffled optimiser steps, stacked.

The shuffle of a row depends only on ``(seed, round, epoch, row)`` through a counter-based
hash, never on which other devices share its block, so the loop backend (blocks of one) and
the vectorised backend (blocks of many) train on exactly the same batches.
"""

from __future__ import annotations

from typing import Protocol

import torch

from coevo.strategies.base import DeviceBatch


class Task(Protocol):
    """What batching needs of a task: its example tensors for given rows."""

    def gather(self, rows: torch.Tensor) -> dict[str, torch.Tensor]: ...


_MIX_1 = -4658895280553007687  # 0xBF58476D1CE4E5B9 as int64
_MIX_2 = -7723592293110705685  # 0x94D049BB133111EB as int64
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64


def row_keys(rows: torch.Tensor, *salt: int) -> torch.Tensor:
    """Pseudo-random int64 keys of ``rows`` (splitmix64 finaliser); wraps like C integers."""
    x = rows.long() * _GOLDEN
    for value in salt:
        x = (x ^ (x >> 31)) * _MIX_1 + value
    x = (x ^ (x >> 30)) * _MIX_1
    x = (x ^ (x >> 27)) * _MIX_2
    return x ^ (x >> 31)


def steps_per_device(counts: torch.Tensor, epochs: int, batch_size: int) -> torch.Tensor:
    return epochs * (-(-counts // batch_size))


def cohort_batch(
    task: Task,
    rows: torch.Tensor,
    offsets: torch.Tensor,
    devices: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    round: int = 0,
) -> DeviceBatch:
    """Stacked batches ``[len(devices), steps, batch, ...]`` for a block of devices.

    Device ``d`` takes ``epochs * ceil(n_d / batch_size)`` steps; each epoch is a fresh shuffle
    and ends with a partly masked step. Devices with fewer steps are padded with fully masked
    steps, which ``local_train`` skips, so a device trains the same whatever its block.
    """
    start, end = offsets[devices], offsets[devices + 1]
    counts = end - start
    per_epoch = -(-counts // batch_size)
    num_steps = int((epochs * per_epoch).max()) if len(devices) else 0
    index = torch.full((len(devices), max(num_steps, 1), batch_size), -1, dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(devices)), counts)
    position = torch.arange(int(counts.sum())) - torch.repeat_interleave(
        counts.cumsum(0) - counts, counts
    )
    block_rows = rows[torch.repeat_interleave(start, counts) + position]
    for epoch in range(epochs):
        keys = row_keys(block_rows, seed, round, epoch)
        # Sort by key within each device: a stable sort on keys, then on owner.
        order = torch.argsort(keys, stable=True)
        order = order[torch.argsort(owner[order], stable=True)]
        step = epoch * per_epoch[owner] + position // batch_size
        index[owner, step, position % batch_size] = block_rows[order]
    return DeviceBatch(inputs=task.gather(index.clamp(min=0)), mask=(index >= 0).float())
