import pytest
import torch

from coevo.sim.simulator import simulate
from coevo.sim.wire import wire_bytes
from coevo.strategies import Duet
from coevo.strategies.duet import DuetNetwork, train_generator
from coevo.tasks.models import cross_entropy_all_items
from coevo.testing import tiny_task
from coevo.types import DeviceState

FAST = {
    "pretrain": {"epochs": 2, "eval_every": 1},
    "generator": {"epochs": 3},
    "sequence_len": 5,
}


@pytest.fixture(scope="module")
def task():
    return tiny_task()


@pytest.fixture(scope="module")
def trained(task):
    strategy = Duet(task, Duet.Config.model_validate(FAST))
    return strategy, strategy.init(torch.Generator().manual_seed(0))


def _test_inputs(task, devices=slice(0, 4)):
    split = task.split
    history = split.history(split.target_rows("test")[devices], task.history_len)
    return history, split.candidates("test")[devices]


def test_devices_never_train_and_exchange_nothing_in_training(task, trained):
    strategy, cloud = trained
    result = simulate(strategy, torch.Generator().manual_seed(0), cloud=cloud)
    assert result.rounds == 0
    assert result.bytes_up.sum() == 0 and result.bytes_down.sum() == 0
    assert strategy.device_flops()["backward"] == 0.0
    assert strategy.device_flops()["forward"] > 0


def test_scoring_runs_forward_only_and_leaves_the_weights_unchanged(task, trained):
    strategy, cloud = trained
    before = {k: v.clone() for k, v in cloud.tensors.items()}
    history, candidates = _test_inputs(task)
    scores = strategy.score(cloud, DeviceState(), history, candidates)
    assert not scores.requires_grad
    assert all(torch.equal(cloud[k], v) for k, v in before.items())


def test_generated_layers_follow_the_uploaded_sequence(task, trained):
    strategy, cloud = trained
    history, candidates = _test_inputs(task)
    layers = strategy.generate(cloud, history)
    assert layers["tower.weight"].shape == (4, task.shapes.device_dim, task.shapes.device_dim)
    # Different devices' histories give different layers; the same history the same ones.
    assert not torch.allclose(layers["head.weight"][0], layers["head.weight"][1])
    again = strategy.generate(cloud, history[:1])
    assert torch.allclose(again["head.weight"][0], layers["head.weight"][0], atol=1e-6)
    # Layers generated from another device's sequence (stale ones) score differently.
    fresh = strategy.score_with(cloud, layers, history, candidates)
    swapped = {k: v.roll(1, 0) for k, v in layers.items()}
    assert not torch.allclose(fresh, strategy.score_with(cloud, swapped, history, candidates))
    assert torch.allclose(fresh, strategy.score(cloud, DeviceState(), history, candidates))


def test_request_uploads_item_ids_and_response_carries_the_layers(task, trained):
    strategy, _ = trained
    history, candidates = _test_inputs(task)
    request = strategy.request(history[0], candidates[0])
    assert set(request.tensors) == {"sequence"}
    assert request.tensors["sequence"].dtype == torch.int32
    assert torch.equal(request.tensors["sequence"], history[0, -5:].int())
    response = strategy.response(candidates[0])
    dim = task.shapes.device_dim
    assert sum(t.numel() for t in response.tensors.values()) == 2 * (dim * dim + dim)
    assert wire_bytes(response) == len(response.to_bytes())
    assert wire_bytes(response) > 4 * 2 * (dim * dim + dim)


def test_generator_training_lowers_its_loss_on_cloud_data(task):
    strategy = Duet(task, Duet.Config.model_validate(FAST))
    backbone = task.device_model()
    net = DuetNetwork(backbone, condition_dim=8, sequence_len=5)
    rows = task.rows("cloud")
    history, target = task.split.history(rows, 5), task.split.items[rows]

    def loss() -> float:
        with torch.no_grad():
            return float(cross_entropy_all_items(net(history), target).mean())

    before = loss()
    settings = strategy.config.generator.model_copy(update={"epochs": 5, "patience": 5})
    drop = train_generator(net, task, settings, torch.Generator().manual_seed(0))
    assert drop > 0
    assert loss() < before
