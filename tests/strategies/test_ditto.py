import pytest
import torch

from coevo.sim.simulator import simulate
from coevo.strategies import Ditto, FedAvg
from coevo.testing import tiny_task
from coevo.types import CloudState, DeviceState

LOCAL = {"epochs": 2, "lr": 0.01}


@pytest.fixture(scope="module")
def task():
    return tiny_task()


@pytest.fixture(scope="module")
def start(task):
    """A pretrained starting model shared by every run."""
    config = Ditto.Config.model_validate({"pretrain": {"epochs": 2, "eval_every": 1}})
    return Ditto(task, config).init(torch.Generator().manual_seed(0))


def _run(task, start, rounds=1, **settings):
    config = Ditto.Config.model_validate({"rounds": rounds, "local": LOCAL, **settings})
    strategy = Ditto(task, config)
    return strategy, simulate(strategy, torch.Generator().manual_seed(0), cloud=start)


def _personal(result, name):
    return result.devices[f"personal/{name}"]


def test_global_model_is_fedavg_and_the_personal_model_never_goes_up(task, start):
    _, result = _run(task, start, rounds=2)
    fedavg = FedAvg(
        task, FedAvg.Config.model_validate({"rounds": 2, "private": [], "local": LOCAL})
    )
    reference = simulate(fedavg, torch.Generator().manual_seed(0), cloud=start)
    for k in start.tensors:
        assert torch.allclose(result.cloud[k], reference.cloud[k], atol=1e-6), k
    assert torch.equal(result.bytes_up, reference.bytes_up)
    assert torch.equal(result.bytes_down, reference.bytes_down)
    assert set(result.devices.tensors) == {f"personal/{k}" for k in start.tensors}


def test_a_huge_lambda_pins_the_personal_model_to_the_global_one(task, start):
    # lr * lam = 1: each step lands on the downloaded global weights minus lr * gradient.
    strategy, result = _run(task, start, lam=1e4, personal_lr=1e-4, personal_optimizer="sgd")
    for k in start.tensors:
        gap = (_personal(result, k) - start[k].expand_as(_personal(result, k))).abs().max()
        assert gap < 1e-3, k
    split = task.split
    history = split.history(split.target_rows("test"), task.history_len)
    candidates = split.candidates("test")
    state = DeviceState({k: v for k, v in result.devices.tensors.items()})
    personal = strategy.score(result.cloud, state, history, candidates)
    pinned = {
        f"personal/{k}": start[k].expand(task.num_devices, *start[k].shape) for k in start.tensors
    }
    global_scores = strategy.score(result.cloud, DeviceState(pinned), history, candidates)
    assert torch.allclose(personal, global_scores, atol=1e-3)


def test_the_personal_model_strays_less_as_lambda_grows(task, start):
    distances = []
    for lam in (0.0, 1.0, 10.0):
        _, result = _run(task, start, lam=lam, personal_lr=0.01, personal_optimizer="sgd")
        gap = _personal(result, "item_embedding.weight") - start["item_embedding.weight"]
        distances.append(float(gap.norm()))
    assert distances[0] > distances[1] > distances[2]


def test_personal_models_differ_across_devices_and_score_with_their_own_weights(task, start):
    strategy, result = _run(task, start, lam=0.0)
    embeddings = _personal(result, "item_embedding.weight")
    assert not torch.equal(embeddings[0], embeddings[1])
    split = task.split
    history = split.history(split.target_rows("test")[:2], task.history_len)
    candidates = split.candidates("test")[:2]
    state = DeviceState({k: v[:2] for k, v in result.devices.tensors.items()})
    swapped = DeviceState({k: v[[1, 0]] for k, v in state.tensors.items()})
    scores = strategy.score(result.cloud, state, history, candidates)
    assert not torch.allclose(scores, strategy.score(result.cloud, swapped, history, candidates))
    assert isinstance(result.cloud, CloudState)
