"""The per-device exchange before local work: each device's ``query`` up, its own ``answer`` down.

A strategy with ``exchanges = True`` (retrieval of samples for a device, weights generated from
its uploaded sequence) gets, in every round, two phases before ``local``: each selected device
computes ``query`` from the round's downlink, its state and its batch (vectorised like
``local``), the cloud answers the block's stacked queries with ``answer``, and each device's
answer reaches its ``local`` as extra tensors of its device state. Both directions are counted
at their real encoded length; payloads here have static shapes, so every device sends and
receives the same number of bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.func import vmap

from coevo.sim.wire import wire_bytes
from coevo.strategies.base import DeviceBatch, Strategy
from coevo.types import CloudState, DeviceState, Payload

Job = tuple[DeviceState, DeviceBatch]


def run_queries(
    strategy: Strategy, payload: Payload, state: DeviceState, batch: DeviceBatch, loop: bool
) -> dict[str, torch.Tensor]:
    """``query`` of every device of a block, stacked ``[block, ...]`` (one ``vmap`` call)."""

    def one(tensors: dict[str, torch.Tensor], groups: dict[str, dict[str, torch.Tensor]]):
        device_batch = DeviceBatch.from_tensors(groups, batch.tables)
        return dict(strategy.query(payload, DeviceState(tensors), device_batch).tensors)

    if not loop:
        return vmap(one)(dict(state.tensors), batch.tensors())
    outputs = [
        one({k: v[i] for k, v in state.tensors.items()}, batch.device(i).tensors())
        for i in range(len(batch.mask))
    ]
    return {k: torch.stack([o[k] for o in outputs]) for k in outputs[0]}


def exchange(
    strategy: Strategy,
    cloud: CloudState,
    payload: Payload,
    blocks: Sequence[torch.Tensor],
    jobs: Sequence[Job],
    *,
    loop: bool = False,
) -> tuple[list[Job], int, int]:
    """The jobs with each device's answer in its state, and the bytes of one query and answer.

    Args:
        blocks: device ids of each job's block, in the order of ``jobs``.
        loop: call ``query`` device by device (the reference backend).
    """
    answered: list[Job] = []
    query_bytes = answer_bytes = 0
    for block, (state, batch) in zip(blocks, jobs, strict=True):
        queries = run_queries(strategy, payload, state, batch, loop)
        answers = strategy.answer(cloud, block, Payload(queries)).tensors
        clash = set(answers) & set(state.tensors)
        if clash:
            raise ValueError(f"{strategy.name}.answer names clash with device state: {clash}")
        query_bytes = wire_bytes(Payload({k: v[0] for k, v in queries.items()}))
        answer_bytes = wire_bytes(Payload({k: v[0] for k, v in answers.items()}))
        answered.append((state.with_tensors(**answers), batch))
    return answered, query_bytes, answer_bytes
