"""Run a strategy's ``local`` over a block of devices: vectorised, or one by one."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
from torch.func import vmap

from coevo.strategies.base import DeviceBatch, Strategy
from coevo.types import DeviceState, Payload

Backend = Literal["vectorized", "loop", "ray"]
Stacked = dict[str, torch.Tensor]
Job = tuple[DeviceState, DeviceBatch]
Executor = Callable[[Strategy, Payload, Sequence[Job]], Iterable[tuple[Stacked, Stacked, Stacked]]]
"""``executor(strategy, payload, jobs)``: ``run_block`` for every (state, batch) job, in order
(an iterable, so that a local executor can hand results over one block at a time)."""


def run_block(
    strategy: Strategy,
    payload: Payload,
    state: DeviceState,
    batch: DeviceBatch,
    backend: Backend = "vectorized",
) -> tuple[Stacked, Stacked, Stacked]:
    """``local`` for a block of devices: (stacked uplinks, stacked states, stacked metrics).

    ``vectorized`` makes one ``torch.func.vmap`` call for the whole block; ``loop`` calls
    ``local`` per device (the reference: errors name the block position of the device).
    """

    def one(tensors: Stacked, groups: dict[str, Stacked]):
        device_batch = DeviceBatch.from_tensors(groups, batch.tables)
        up, new, metrics = strategy.local(payload, DeviceState(tensors), device_batch)
        return dict(up.tensors), dict(new.tensors), dict(metrics)

    if backend == "vectorized":
        return vmap(one)(dict(state.tensors), batch.tensors())
    outputs = []
    for i in range(len(batch.mask)):
        try:
            outputs.append(
                one({k: v[i] for k, v in state.tensors.items()}, batch.device(i).tensors())
            )
        except Exception as error:
            raise RuntimeError(
                f"{strategy.name}.local failed on block device {i}: {error}"
            ) from error
    uplinks, states, metrics = (
        {k: torch.stack([o[part][k] for o in outputs]) for k in outputs[0][part]}
        for part in range(3)
    )
    return uplinks, states, metrics


def local_executor(backend: Backend) -> Executor:
    """An executor that runs every block in this process, one after the other."""
    if backend == "ray":
        raise ValueError("backend 'ray' needs a RayExecutor (coevo.sim.ray_backend)")

    def execute(strategy: Strategy, payload: Payload, jobs: Sequence[Job]):
        for state, batch in jobs:
            yield run_block(strategy, payload, state, batch, backend)

    return execute
