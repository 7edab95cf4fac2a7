"""Slow-fast: the fast model re-ranks from in-session clicks (a clicked item's neighbours move
up), without it the scores are the slow model's, gates train on the device and average in the
cloud, and the conformance checks pass."""

import pytest
import torch

from coevo.sim.simulator import simulate
from coevo.strategies import CloudOnly, SlowFast
from coevo.strategies.slowfast import interest_representations
from coevo.testing import check_strategy, tiny_task
from coevo.types import CloudState, DeviceState, Payload

FAST = {"train": {"epochs": 1, "eval_every": 1}}


@pytest.fixture(scope="module")
def task():
    return tiny_task()


@pytest.fixture(scope="module")
def cloud(task):
    return SlowFast(task, SlowFast.Config(**FAST)).init(torch.Generator().manual_seed(0))


def scores(task, cloud, fast_weight, history, candidates):
    strategy = SlowFast(task, SlowFast.Config(fast_weight=fast_weight, **FAST))
    state = DeviceState({"gates": cloud["gates"].expand(len(history), 2)})
    return strategy.score(cloud, state, history, candidates)


def test_a_clicked_items_neighbours_move_up(task, cloud):
    strategy = SlowFast(task)
    representations = interest_representations(strategy._slow(cloud), strategy.slow_model)
    split = task.split
    row = split.target_rows("test")[:1]
    history = split.history(row, task.history_len)
    clicked = int(split.negatives[0, 0])
    similarity = representations[: task.num_items] @ representations[clicked]
    similarity[clicked] = -2.0
    order = similarity.argsort(descending=True)
    near, far = order[:10], order[-10:]
    candidates = torch.cat([near, far])[None]
    after = torch.cat([history[:, 1:], torch.tensor([[clicked]])], dim=1)

    def margin(fast_weight, h):
        s = scores(task, cloud, fast_weight, h, candidates)[0]
        return float(s[:10].mean() - s[10:].mean())

    # The click lifts its neighbours over the far items by more with the fast model than the
    # slow model alone does (the slow model sees the click too, through the history).
    with_fast = margin(3.0, after) - margin(3.0, history)
    slow_only = margin(0.0, after) - margin(0.0, history)
    assert with_fast > slow_only + 1.0


def test_without_the_fast_model_scores_are_the_slow_models(task, cloud):
    split = task.split
    rows = split.target_rows("test")[:3]
    history = split.history(rows, task.history_len)
    candidates = split.candidates("test")[:3]
    cloud_only = CloudOnly(task)
    slow = CloudState(SlowFast(task)._slow(cloud))
    want = cloud_only.score(slow, DeviceState(), history, candidates)
    assert torch.allclose(scores(task, cloud, 0.0, history, candidates), want)


def test_gates_train_on_the_device_and_average_in_the_cloud(task, cloud):
    strategy = SlowFast(task, SlowFast.Config(local={"epochs": 3, "lr": 0.5}, **FAST))
    run = simulate(strategy, torch.Generator().manual_seed(0), cloud=cloud)
    gates = run.devices["gates"]
    assert not torch.allclose(gates, cloud["gates"].expand_as(gates))
    rows = task.device_rows("device")[1]
    weights = (rows[1:] - rows[:-1]).float()
    want = (gates * (weights / weights.sum())[:, None]).sum(0)
    assert torch.allclose(run.cloud["gates"], want, atol=1e-6)
    uplink = Payload({"gates": gates[0]})
    assert torch.all(run.bytes_up == uplink.num_bytes)


def test_a_page_carries_scores_and_half_precision_representations(task):
    page = SlowFast(task).response(torch.arange(100))
    assert page.tensors["scores"].shape == (100,)
    assert page.tensors["representations"].dtype == torch.float16
    assert page.num_bytes > 100 * 4 + 100 * task.shapes.cloud_dim * 2


def test_slowfast_conforms(task):
    check_strategy(SlowFast, FAST, task=task, rounds=2)


def test_device_training_flops_count_the_gates_only(task):
    strategy = SlowFast(task, SlowFast.Config(window=4, local={"batch_size": 8}))
    forward, backward = strategy.device_flops_per_example()
    # Forward: 8 in-batch candidates against 4 recent clicks of cloud_dim numbers each.
    assert forward == 2.0 * 4 * task.shapes.cloud_dim * 8 + 4.0 * 4 * 8
    # Backward reaches the two gates only: no term grows with the representations' size.
    assert backward == 7.0 * 8
    assert backward < forward / 10
    assert backward < task.train_flops_per_example() / 100
