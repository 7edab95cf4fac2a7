"""Sparse tables: training only the touched rows equals training the whole table."""

import dataclasses
import itertools
from typing import ClassVar

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coevo.sim.batching import cohort_batch, plan_blocks, touched_rows
from coevo.sim.simulator import simulate
from coevo.strategies.fedavg import FedAvg
from coevo.strategies.fedprox import FedProx
from coevo.strategies.local_training import LocalTraining
from coevo.strategies.scaffold import Scaffold
from coevo.tasks.ctr import RatingCTRTask
from coevo.tasks.recommendation import state_of
from coevo.testing import make_log


class DenseCTRTask(RatingCTRTask):
    """The same task without the sparse-table declaration: every row trains every step."""

    sparse_inputs: ClassVar[dict[str, str]] = {}


@pytest.fixture(scope="module")
def logs():
    rng = np.random.default_rng(3)
    items = {u: rng.choice(40, int(rng.integers(3, 30)), replace=False).tolist() for u in range(9)}
    ratings = {u: rng.integers(1, 6, len(v)).tolist() for u, v in items.items()}
    log = make_log(items, 40, ratings=ratings)
    return dataclasses.replace(
        log,
        user_features=rng.integers(0, 2, (9, 30)).astype(np.float32),
        item_features=rng.integers(0, 2, (40, 19)).astype(np.float32),
    )


def test_touched_rows_lists_each_devices_distinct_ids_and_positions():
    ids = torch.tensor([[[5, 2], [5, 0]], [[7, 7], [1, 9]]])
    mask = torch.tensor([[[1, 1], [1, 0]], [[1, 1], [1, 0]]], dtype=torch.bool)
    rows, local = touched_rows(ids, mask)
    assert rows.tolist() == [[2, 5], [1, 7]]
    # Each real example finds its own id; padding (id 0 of device 0, 9 of device 1) is unlisted.
    gathered = torch.gather(
        rows.flatten(), 0, (local + torch.tensor([0, 2])[:, None, None]).flatten()
    )
    assert torch.equal(gathered.view_as(ids)[mask], ids[mask])
    assert 0 not in rows[0].tolist() and 9 not in rows[1].tolist()


def test_touched_rows_pads_short_devices_with_minus_one():
    ids = torch.tensor([[[3, 4, 5]], [[6, 6, 6]]])
    rows, _ = touched_rows(ids, torch.ones_like(ids, dtype=torch.bool))
    assert rows.tolist() == [[3, 4, 5], [6, -1, -1]]


def _run(task, strategy_cls, optimizer, backend="vectorized", **extra):
    local = LocalTraining(
        epochs=2, lr=0.5 if optimizer == "sgd" else 0.01, batch_size=4, optimizer=optimizer
    )
    config = strategy_cls.Config.model_validate(
        {"rounds": 3, "private": [], "local": local, **extra}
    )
    strategy = strategy_cls(task, config)
    torch.manual_seed(0)
    weights = state_of(task.device_model())
    # The strategy's own cloud (SCAFFOLD adds control variates), from the same weights.
    cloud = strategy.init(torch.Generator().manual_seed(0)).with_tensors(**weights)
    return simulate(
        strategy,
        torch.Generator().manual_seed(1),
        backend=backend,
        block_size=4,
        cloud=cloud,
        devices_per_round=5,
    )


@pytest.mark.parametrize(
    ("strategy_cls", "optimizer", "extra"),
    [(FedAvg, "sgd", {}), (FedAvg, "adam", {}), (FedProx, "sgd", {"mu": 0.3})],
)
def test_sparse_table_training_equals_dense_training(logs, strategy_cls, optimizer, extra):
    sparse = _run(RatingCTRTask.from_log(logs), strategy_cls, optimizer, **extra)
    dense = _run(DenseCTRTask.from_log(logs), strategy_cls, optimizer, **extra)
    for name, tensor in dense.cloud.tensors.items():
        torch.testing.assert_close(sparse.cloud.tensors[name], tensor, rtol=1e-5, atol=1e-6)
    table = dense.cloud.tensors["item_embedding.weight"]
    torch.manual_seed(0)
    start = state_of(RatingCTRTask.from_log(logs).device_model())["item_embedding.weight"]
    assert not torch.equal(table, start)


@pytest.mark.parametrize(
    ("strategy_cls", "optimizer", "extra"),
    [
        (FedAvg, "sgd", {}),
        (FedAvg, "adam", {}),
        (FedProx, "sgd", {"mu": 0.3}),
        (Scaffold, "sgd", {}),
    ],
)
def test_stacked_block_steps_give_the_loops_result(logs, strategy_cls, optimizer, extra):
    # The CTR loss stacks, so the vectorised backend steps each block in one autograd pass
    # (row by row for SGD, the whole table with Adam, an anchor or a correction); the loop
    # takes every device's steps with torch.func.grad.
    task = RatingCTRTask.from_log(logs)
    vectorized = _run(task, strategy_cls, optimizer, **extra)
    loop = _run(task, strategy_cls, optimizer, backend="loop", **extra)
    for name, tensor in loop.cloud.tensors.items():
        torch.testing.assert_close(vectorized.cloud.tensors[name], tensor, rtol=1e-5, atol=1e-6)
    for name, tensor in loop.devices.tensors.items():
        torch.testing.assert_close(vectorized.devices.tensors[name], tensor, rtol=1e-5, atol=1e-6)


def test_cohort_batch_adds_touched_rows_only_when_asked(logs):
    task = RatingCTRTask.from_log(logs)
    rows, offsets = task.device_rows("device")
    devices = torch.tensor([0, 3])
    plain = cohort_batch(task, rows, offsets, devices, epochs=1, batch_size=4, seed=0)
    assert not plain.rows and not plain.tables
    sparse = cohort_batch(
        task, rows, offsets, devices, epochs=1, batch_size=4, seed=0, sparse=task.sparse_inputs
    )
    assert sparse.tables == task.sparse_inputs
    for d in range(2):
        real = sparse.mask[d] > 0
        listed = sparse.rows["item"][d]
        assert torch.equal(listed[sparse.local["item"][d][real]], sparse.inputs["item"][d][real])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=9), st.integers(1, 5))
def test_plan_blocks_covers_in_order_within_size_and_runs_fewest_batched_steps(steps, max_size):
    steps = sorted(steps)
    blocks = plan_blocks(len(steps), max_size)
    assert blocks[0][0] == 0 and blocks[-1][1] == len(steps)
    assert all(a < b and b - a <= max_size for a, b in blocks)
    assert all(b == c for (_, b), (c, _) in itertools.pairwise(blocks))
    # A block runs as many batched steps as its longest device: no cut does better.
    n, best = len(steps), float("inf")
    for cuts in itertools.product([False, True], repeat=n - 1):
        edges = [0, *[i + 1 for i, c in enumerate(cuts) if c], n]
        plan = list(itertools.pairwise(edges))
        if all(b - a <= max_size for a, b in plan):
            best = min(best, sum(steps[b - 1] for _, b in plan))
    assert sum(steps[b - 1] for _, b in blocks) == best
