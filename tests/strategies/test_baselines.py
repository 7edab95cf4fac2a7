import pytest
import torch

from coevo.sim.batching import cohort_batch
from coevo.sim.simulator import simulate
from coevo.sim.wire import wire_bytes
from coevo.strategies import CentralOracle, CloudOnly, DeviceOnly, Finetune, Popularity
from coevo.strategies.base import DeviceBatch
from coevo.strategies.local_training import local_train
from coevo.testing import tiny_task
from coevo.types import DeviceState

FAST = {"train": {"epochs": 2, "eval_every": 1}}


@pytest.fixture(scope="module")
def task():
    return tiny_task()


def test_popularity_counts_only_what_the_cloud_may_see(task):
    cloud = Popularity(task).init(torch.Generator())
    split = task.split
    counts = torch.bincount(split.items[split.rows("cloud")], minlength=split.num_items)
    assert torch.equal(cloud["counts"], counts.float())
    everything = torch.bincount(split.items, minlength=split.num_items)
    assert not torch.equal(cloud["counts"], everything.float())


def test_oracle_trains_on_more_rows_than_cloud_only(task):
    cloud_only = CloudOnly(task, CloudOnly.Config.model_validate(FAST))
    oracle = CentralOracle(task, CentralOracle.Config.model_validate(FAST))
    assert len(task.rows(oracle.train_period)) > len(task.rows(cloud_only.train_period))
    a = cloud_only.init(torch.Generator().manual_seed(0))
    b = oracle.init(torch.Generator().manual_seed(0))
    assert not torch.equal(a["item_embedding.weight"], b["item_embedding.weight"])


def _finetune(task, **settings):
    config = Finetune.Config.model_validate(
        {"pretrain": {"epochs": 2, "eval_every": 1}, "local": {"epochs": 2}, **settings}
    )
    return Finetune(task, config)


def test_finetune_keeps_personal_weights_on_the_device(task):
    strategy = _finetune(task)
    result = simulate(strategy, torch.Generator().manual_seed(0))
    assert result.bytes_up.sum() == 0  # nothing leaves a device
    model_bytes = wire_bytes(strategy.downlink(result.cloud, 0))
    assert torch.all(result.bytes_down == model_bytes)
    embeddings = result.devices["item_embedding.weight"]
    assert embeddings.shape[0] == task.num_devices
    assert not torch.equal(embeddings[0], embeddings[1])  # each device adapted on its own
    assert not torch.equal(embeddings[0], result.cloud["item_embedding.weight"])


def test_head_mode_changes_only_the_head(task):
    strategy = _finetune(task, mode="head")
    result = simulate(strategy, torch.Generator().manual_seed(0))
    assert set(result.devices.tensors) == {"head.weight", "head.bias"}
    assert not torch.equal(result.devices["head.weight"][0], result.cloud["head.weight"])


def test_head_mode_backpropagates_far_less_than_full_fine_tuning(task):
    full = Finetune(task, Finetune.Config(mode="full")).device_flops_per_example()
    head = Finetune(task, Finetune.Config(mode="head")).device_flops_per_example()
    assert head[0] == full[0]
    dim, items = task.shapes.device_dim, task.num_items
    assert head[1] == 2 * items * dim + 2 * dim * dim + dim
    assert head[1] < full[1] / 2


def test_l2_pull_keeps_weights_closer_to_the_global_model(task):
    distances = []
    for l2 in (0.0, 50.0):
        strategy = _finetune(task, l2=l2, local={"epochs": 3, "lr": 0.01})
        result = simulate(strategy, torch.Generator().manual_seed(0))
        delta = result.devices["head.weight"] - result.cloud["head.weight"]
        distances.append(float(delta.norm()))
    assert distances[1] < distances[0]


def test_padding_steps_change_nothing(task):
    strategy = DeviceOnly(task)
    cloud = strategy.init(torch.Generator().manual_seed(0))
    rows, offsets = task.device_rows("cloud+device")
    settings = {"epochs": 1, "batch_size": 4, "seed": 3}
    batch = cohort_batch(task, rows, offsets, torch.tensor([0]), **settings)
    one = DeviceBatch({k: v[0] for k, v in batch.inputs.items()}, batch.mask[0])
    extra = 5
    padded = DeviceBatch(
        {k: torch.cat([v, v[:extra]]) for k, v in one.inputs.items()},
        torch.cat([one.mask, torch.zeros_like(one.mask[:extra])]),
    )
    params = dict(cloud.tensors)
    loss = task.batch_loss
    a, _ = local_train(strategy.model, params, list(params), one, 0.01, loss=loss)
    b, _ = local_train(strategy.model, params, list(params), padded, 0.01, loss=loss)
    for k in params:
        assert torch.allclose(a[k], b[k], atol=1e-6)
        assert not torch.equal(a[k], params[k]) or k == "item_embedding.weight"


def test_device_only_sends_nothing_and_scores_with_personal_models(task):
    strategy = DeviceOnly(task, DeviceOnly.Config.model_validate({"local": {"epochs": 2}}))
    result = simulate(strategy, torch.Generator().manual_seed(0))
    assert result.bytes_up.sum() == 0 and result.bytes_down.sum() == 0
    history = task.split.history(task.split.target_rows("test"), 5)[:2]
    candidates = task.split.candidates("test")[:2]
    block = DeviceState({k: v[:2] for k, v in result.devices.tensors.items()})
    scores = strategy.score(result.cloud, block, history, candidates)
    swapped = DeviceState({k: v[[1, 0]] for k, v in result.devices.tensors.items()})
    assert not torch.allclose(scores, strategy.score(result.cloud, swapped, history, candidates))
