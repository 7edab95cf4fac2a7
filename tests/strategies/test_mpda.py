import pytest
import torch

from coevo.sim.batching import cohort_batch
from coevo.sim.exchange import run_queries
from coevo.sim.simulator import simulate
from coevo.sim.wire import wire_bytes
from coevo.strategies import Finetune, Mpda
from coevo.testing import tiny_task
from coevo.types import DeviceState, Payload

PRETRAIN = {"epochs": 2, "eval_every": 1}
LOCAL = {"epochs": 2, "lr": 0.01}


@pytest.fixture(scope="module")
def task():
    return tiny_task()


def _mpda(task, **settings):
    base = {"pretrain": PRETRAIN, "local": LOCAL, "neighbours": 3, "samples_per_neighbour": 4}
    return Mpda(task, Mpda.Config.model_validate({**base, **settings}))


@pytest.fixture(scope="module")
def mpda(task):
    return _mpda(task)


@pytest.fixture(scope="module")
def cloud(mpda):
    return mpda.init(torch.Generator().manual_seed(0))


def _queries(task, strategy, cloud):
    """Every device's query, as the simulator computes it in round 0."""
    rows, offsets = task.device_rows("device")
    devices = torch.arange(task.num_devices)
    batch = cohort_batch(task, rows, offsets, devices, epochs=2, batch_size=16, seed=0)
    state = strategy.init_devices(cloud, task.num_devices)
    payload = strategy.downlink(cloud, 0)
    return devices, Payload(run_queries(strategy, payload, state, batch, loop=False))


def test_the_query_is_one_unit_vector_and_no_item_id(task, mpda, cloud):
    _, queries = _queries(task, mpda, cloud)
    assert set(queries.tensors) == {"profile"}
    profile = queries.tensors["profile"]
    assert profile.dtype == torch.float32 and profile.shape == (task.num_devices, 8)
    assert torch.allclose(profile.norm(dim=1), torch.ones(task.num_devices), atol=1e-5)


def test_only_other_users_cloud_period_rows_come_down(task, mpda, cloud):
    devices, queries = _queries(task, mpda, cloud)
    rows = mpda.retrieve(cloud, devices, queries)
    assert rows.shape == (task.num_devices, 3 * 4)
    real = rows >= 0
    assert real.float().mean() > 0.9
    cloud_rows = torch.zeros(len(task.split.items), dtype=torch.bool)
    cloud_rows[task.rows("cloud")] = True
    assert bool(cloud_rows[rows[real]].all())
    owner = task.split.device_of_row[rows.clamp(min=0)]
    assert not bool((owner == devices[:, None])[real].any())
    # what is sent is exactly those rows' examples, whose history is cloud-period too
    answer = mpda.answer(cloud, devices, queries).tensors
    examples = task.gather(rows.clamp(min=0))
    target = answer["retrieved/target"].long()
    assert torch.equal(target[real], examples["target"][real])
    assert bool((target[~real] == task.num_items).all())
    history = answer["retrieved/history"].long()[real]
    history_rows = rows[real][:, None] - torch.arange(history.shape[1], 0, -1)
    shown = history != task.num_items
    assert bool(cloud_rows[history_rows[shown]].all())


def test_the_most_similar_user_is_retrieved_first(task, mpda, cloud):
    profiles = cloud["index/profiles"]
    devices = torch.tensor([0, 1])
    queries = Payload({"profile": profiles[[5, 9]]})
    rows = mpda.retrieve(cloud, devices, queries)
    assert torch.equal(rows[0, :4], cloud["index/rows"][5])
    assert torch.equal(rows[1, :4], cloud["index/rows"][9])
    own = mpda.retrieve(cloud, torch.tensor([5]), Payload({"profile": profiles[[5]]}))
    assert not bool(torch.isin(own, cloud["index/rows"][5][cloud["index/rows"][5] >= 0]).any())


def test_bytes_are_the_encoded_query_model_and_answer(task, mpda, cloud):
    records = []
    result = simulate(mpda, torch.Generator().manual_seed(0), cloud=cloud, on_round=records.append)
    devices, queries = _queries(task, mpda, cloud)
    answer = mpda.answer(cloud, devices[:1], Payload({"profile": queries.tensors["profile"][:1]}))
    one_answer = Payload({k: v[0] for k, v in answer.tensors.items()})
    one_query = Payload({"profile": queries.tensors["profile"][0]})
    assert torch.all(result.bytes_up == len(one_query.to_bytes()))
    expected = wire_bytes(mpda.downlink(cloud, 0)) + len(one_answer.to_bytes())
    assert torch.all(result.bytes_down == expected)
    assert records[0]["bytes_up"] == float(result.bytes_up.sum())
    assert records[0]["bytes_down"] == float(result.bytes_down.sum())
    # ids travel as int16: 12 samples of (history + target) ids are a few hundred bytes
    assert len(one_answer.to_bytes()) < 12 * (task.shapes.device_history + 1) * 2 + 400


def test_without_retrieved_samples_it_is_cloud_plus_finetune(task, cloud):
    plain = _mpda(task, per_step=0)
    finetune = Finetune(
        task, Finetune.Config.model_validate({"pretrain": PRETRAIN, "local": LOCAL})
    )
    weights = type(cloud)({k: v for k, v in cloud.tensors.items() if not k.startswith("index/")})
    a = simulate(plain, torch.Generator().manual_seed(0), cloud=cloud)
    b = simulate(finetune, torch.Generator().manual_seed(0), cloud=weights)
    for k, v in b.devices.tensors.items():
        assert torch.allclose(a.devices[k], v, atol=1e-6), k
    augmented = simulate(_mpda(task), torch.Generator().manual_seed(0), cloud=cloud)
    moved = augmented.devices["head.weight"] - a.devices["head.weight"]
    assert float(moved.abs().max()) > 1e-4


def test_retrieved_examples_enter_every_step_with_their_weight(task, mpda, cloud):
    devices, queries = _queries(task, mpda, cloud)
    answer = mpda.answer(cloud, devices[:1], Payload({"profile": queries.tensors["profile"][:1]}))
    state = DeviceState({k: v[0] for k, v in answer.tensors.items()})
    rows, offsets = task.device_rows("device")
    batch = cohort_batch(task, rows, offsets, devices[:1], epochs=2, batch_size=16, seed=0)
    one = batch.device(0)
    augmented = mpda.augmented(state, one)
    assert augmented.mask.shape == (one.num_steps, 16 + 8)
    assert torch.equal(augmented.mask[:, :16], one.mask)
    active = one.mask.sum(1) > 0
    extra = augmented.mask[:, 16:]
    assert bool(((extra == 0.5) | (extra == 0)).all())
    assert bool((extra[active].sum(1) > 0).all()) and float(extra[~active].sum()) == 0


def test_one_device_alone_is_refused():
    with pytest.raises(ValueError, match="two devices"):
        Mpda(tiny_task(num_devices=1))
