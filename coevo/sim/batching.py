"""Cohort batches: each device's visible rows cut into shuffled optimiser steps, stacked.

The shuffle of a row depends only on ``(seed, round, epoch, row)`` through a counter-based
hash, never on which other devices share its block, so the loop backend (blocks of one) and
the vectorised backend (blocks of many) train on exactly the same batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Protocol

import torch

from coevo.strategies.base import DeviceBatch


class Task(Protocol):
    """What batching needs of a task: its example tensors for given rows."""

    def gather(self, rows: torch.Tensor) -> dict[str, torch.Tensor]: ...


class Shuffle(Protocol):
    """An order of each device's rows in an epoch, instead of the built-in hash.

    ``shuffle(devices, counts, round, epoch)`` returns int64 sort keys for the block's rows,
    device after device (``counts[i]`` rows of ``devices[i]``, each in its stored order): a
    device's rows are visited by ascending key. For a reference workload whose order is
    defined some other way (a numpy generator per device and round, say); it must depend on
    the device, not on the block, for the backends to agree.
    """

    def __call__(
        self, devices: torch.Tensor, counts: torch.Tensor, round: int, epoch: int
    ) -> torch.Tensor: ...


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
    sparse: Mapping[str, str] | None = None,
    shuffle: Shuffle | None = None,
) -> DeviceBatch:
    """Stacked batches ``[len(devices), steps, batch, ...]`` for a block of devices.

    Device ``d`` takes ``epochs * ceil(n_d / batch_size)`` steps; each epoch is a fresh shuffle
    (`row_keys` of ``(seed, round, epoch, row)``, or ``shuffle``'s keys) and ends with a partly
    masked step. Devices with fewer steps are padded with fully masked steps, which
    ``local_train`` skips, so a device trains the same whatever its block.
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
        if shuffle is None:
            keys = row_keys(block_rows, seed, round, epoch)
        else:
            keys = shuffle(devices, counts, round, epoch)
            if keys.shape != block_rows.shape:
                raise ValueError(
                    f"shuffle returned {tuple(keys.shape)} keys for {len(block_rows)} rows"
                )
        # Sort by key within each device: a stable sort on keys, then on owner.
        order = torch.argsort(keys, stable=True)
        order = order[torch.argsort(owner[order], stable=True)]
        step = epoch * per_epoch[owner] + position // batch_size
        index[owner, step, position % batch_size] = block_rows[order]
    mask = index >= 0
    inputs = task.gather(index.clamp(min=0))
    touched = {key: touched_rows(inputs[key], mask) for key in set((sparse or {}).values())}
    return DeviceBatch(
        inputs=inputs,
        mask=mask.float(),
        tables=dict(sparse or {}),
        rows={key: rows for key, (rows, _) in touched.items()},
        local={key: local for key, (_, local) in touched.items()},
    )


def touched_rows(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each device's distinct ids, and every example's position among them.

    Args:
        ids: int64 ``[devices, steps, batch]`` table row ids (>= 0).
        mask: bool ``[devices, steps, batch]``: the real examples; padding is ignored.

    Returns:
        ``rows [devices, most distinct]`` the sorted distinct ids of each device's real examples,
        padded with -1, and ``local [devices, steps, batch]`` each example's index into its
        device's ``rows`` (0 for padding).
    """
    devices = len(ids)
    span = int(ids.max()) + 1 if ids.numel() else 1
    owner = torch.arange(devices).view(-1, *([1] * (ids.dim() - 1))).expand_as(ids)
    keys = owner[mask] * span + ids[mask]
    distinct, inverse = torch.unique(keys, return_inverse=True)
    holder = distinct // span
    per_device = torch.bincount(holder, minlength=devices)
    position = torch.arange(len(distinct)) - (per_device.cumsum(0) - per_device)[holder]
    rows = torch.full((devices, max(int(per_device.max()) if devices else 0, 1)), -1)
    rows[holder, position] = distinct % span
    local = torch.zeros_like(ids)
    local[mask] = position[inverse]
    return rows, local


def plan_blocks(num_devices: int, max_size: int) -> list[tuple[int, int]]:
    """Cut a cohort sorted by step count into the fewest blocks of at most ``max_size``.

    A vectorised block runs step-major (`coevo.sim.executor`): each batched step runs only
    the devices with steps left, so a block costs one batched step per step of its longest
    device, whatever the others need. The fewest blocks therefore cost the fewest batched
    steps, and the full blocks go to the longest devices, leaving the remainder, the block
    with the shortest devices, at the front.

    Returns:
        ``(start, end)`` index ranges into the sorted cohort, in order, covering it.

    Example:
        >>> plan_blocks(5, max_size=2)
        [(0, 1), (1, 3), (3, 5)]
    """
    blocks = -(-num_devices // max_size)
    edges = sorted({max(num_devices - k * max_size, 0) for k in range(blocks + 1)})
    return list(itertools.pairwise(edges))
