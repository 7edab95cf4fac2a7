import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, grad

from coevo.sim.simulator import simulate
from coevo.strategies import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Scaffold
from coevo.tasks.models import cross_entropy_all_items
from coevo.tasks.protocol import split_p1
from coevo.tasks.recommendation import ModelShapes, RecommendationTask
from coevo.testing import make_log, tiny_task
from coevo.types import CloudState, Payload

SHAPES = ModelShapes(device_dim=4, device_history=3, cloud_dim=4, cloud_history=4, cloud_layers=1)


@pytest.fixture(scope="module")
def task():
    return tiny_task()


@pytest.fixture(scope="module")
def equal_task():
    """Four devices with ten interactions each: two device-period rows apiece."""
    sequences = {d: [(7 * d + 3 * i) % 120 for i in range(10)] for d in range(4)}
    log = make_log(sequences, 120)
    return RecommendationTask(log, split_p1(log, seed=0), SHAPES)


def _config(cls, **settings):
    base = {
        "rounds": 1,
        "private": [],
        "local": {"epochs": 1, "batch_size": 16, "lr": 0.3, "optimizer": "sgd"},
    }
    return cls.Config.model_validate({**base, **settings})


def test_fedavg_one_step_equals_centralised_sgd_on_the_pooled_batch(equal_task):
    strategy = FedAvg(equal_task, _config(FedAvg))
    start = strategy.init(torch.Generator().manual_seed(0))
    result = simulate(strategy, torch.Generator().manual_seed(0), cloud=start)
    split = equal_task.split
    rows = split.rows("device")
    history, target = split.history(rows, 3), split.items[rows]
    params = {k: start[k] for k in strategy.shared}
    buffers = dict(strategy.model.named_buffers())

    def pooled_loss(p):
        logits = functional_call(strategy.model, {**p, **buffers}, (history,))
        return cross_entropy_all_items(logits, target).mean()

    gradient = grad(pooled_loss)(params)
    for k in strategy.shared:
        expected = params[k] - 0.3 * gradient[k]
        assert torch.allclose(result.cloud[k], expected, atol=1e-6), k


@settings(max_examples=25, deadline=None)
@given(st.permutations(range(4)), st.lists(st.floats(0.5, 10.0), min_size=4, max_size=4))
def test_merge_does_not_depend_on_device_order(order, raw_weights):
    task = tiny_task(num_devices=6)
    strategy = FedAvg(task, _config(FedAvg))
    cloud = strategy.init(torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    uplinks = {k: torch.randn(4, *cloud[k].shape, generator=generator) for k in strategy.shared}
    weights = torch.tensor(raw_weights)
    index = torch.tensor(order)
    a = strategy.merge(cloud, Payload(uplinks), weights)
    b = strategy.merge(cloud, Payload({k: v[index] for k, v in uplinks.items()}), weights[index])
    for k in strategy.shared:
        assert torch.allclose(a[k], b[k], atol=1e-5)


def test_private_parameters_never_leave_the_device(task):
    strategy = FedAvg(task, _config(FedAvg, private=["head."]))
    cloud = strategy.init(torch.Generator().manual_seed(0))
    assert not any(k.startswith("head.") for k in strategy.downlink(cloud, 0).tensors)
    result = simulate(strategy, torch.Generator().manual_seed(0), cloud=cloud)
    assert set(result.devices.tensors) == {"head.weight", "head.bias"}
    # the cloud's copy of the head is never updated: nothing about it reached the cloud
    assert torch.equal(result.cloud["head.weight"], cloud["head.weight"])
    assert not torch.equal(result.devices["head.weight"][0], cloud["head.weight"])


def test_only_the_cohort_trains_and_pays(task):
    strategy = FedAvg(task, _config(FedAvg, private=["head."]))
    cloud = strategy.init(torch.Generator().manual_seed(0))
    result = simulate(strategy, torch.Generator().manual_seed(0), cloud=cloud, devices_per_round=5)
    took_part = result.bytes_up > 0
    assert int(took_part.sum()) == 5
    assert torch.all(result.bytes_down[~took_part] == 0)
    untouched = result.devices["head.weight"][~took_part]
    assert torch.equal(untouched, cloud["head.weight"].expand_as(untouched))


def test_fedprox_stays_closer_to_the_global_model(task):
    distances = []
    for mu in (0.0, 5.0):
        strategy = FedProx(
            task, _config(FedProx, mu=mu, local={"epochs": 3, "lr": 0.5, "optimizer": "sgd"})
        )
        cloud = strategy.init(torch.Generator().manual_seed(0))
        result = simulate(strategy, torch.Generator().manual_seed(0), cloud=cloud)
        distances.append(float((result.cloud["tower.weight"] - cloud["tower.weight"]).norm()))
    assert distances[1] < distances[0]


def test_scaffold_server_control_is_the_mean_device_control_under_full_participation(task):
    strategy = Scaffold(task, _config(Scaffold))
    result = simulate(strategy, torch.Generator().manual_seed(0))
    for k in strategy.shared:
        device_controls = result.devices[f"c/{k}"]
        assert torch.allclose(result.cloud[f"c/{k}"], device_controls.mean(0), atol=1e-6)
        assert device_controls.abs().sum() > 0
    # model and control updates both travel: twice FedAvg's uplink
    fedavg = simulate(FedAvg(task, _config(FedAvg)), torch.Generator().manual_seed(0))
    assert result.bytes_up[0] > 1.9 * fedavg.bytes_up[0]


def test_server_optimisers_hand_checked():
    task = tiny_task(num_devices=6)
    size = tiny_task(num_devices=6).shapes.device_dim
    delta = {"tower.bias": torch.full((size,), 0.5)}
    for cls, expected in (
        (FedAvgM, 0.1 * 0.5),  # m = 0.5, step lr * m
        (FedAdam, 0.1 * 0.05 / (0.05 + 1e-3)),  # m = 0.05, v = 0.0025
        (FedAdagrad, 0.1 * 0.05 / (0.5 + 1e-3)),  # v = 0.25
        (FedYogi, 0.1 * 0.05 / (0.05 + 1e-3)),  # v = 0 + 0.01 * 0.25
    ):
        config = cls.Config.model_validate(
            {"server_lr": 0.1, "private": [], "local": {"epochs": 1}}
        )
        strategy = cls(task, config)
        shared = strategy.shared
        cloud = strategy.init(torch.Generator().manual_seed(0))
        zero = CloudState({**cloud.tensors, "tower.bias": torch.zeros(size)})
        full = {k: torch.zeros_like(cloud[k]) for k in shared} | delta
        moved = strategy.server_update(zero, full)
        assert torch.allclose(moved["tower.bias"], torch.full((size,), expected), atol=1e-6)


@pytest.mark.parametrize("cls", [FedAvg, Scaffold, FedAdam])
def test_vectorized_equals_loop(task, cls):
    config = _config(
        cls,
        rounds=2,
        private=["head."],
        local={"epochs": 2, "batch_size": 4, "lr": 0.3, "optimizer": "sgd"},
    )
    runs = [
        simulate(
            cls(task, config),
            torch.Generator().manual_seed(0),
            backend=b,
            block_size=4,
            devices_per_round=10,
        )
        for b in ("vectorized", "loop")
    ]
    for k, v in runs[0].cloud.tensors.items():
        assert torch.allclose(v, runs[1].cloud[k], atol=1e-5), k
    for k, v in runs[0].devices.tensors.items():
        assert torch.allclose(v, runs[1].devices[k], atol=1e-5), k
