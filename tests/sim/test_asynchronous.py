import pytest
import torch

from coevo.fleet import always_available, sample_profiles
from coevo.sim import Fleet, simulate
from coevo.strategies import FedBuff
from coevo.testing import tiny_task


@pytest.fixture(scope="module")
def task():
    return tiny_task()


def _fedbuff(task, **settings):
    base = {
        "rounds": 4,
        "buffer_size": 3,
        "concurrency": 6,
        "local": {"epochs": 1, "batch_size": 4, "lr": 0.3, "optimizer": "sgd"},
    }
    return FedBuff(task, FedBuff.Config.model_validate({**base, **settings}))


def _fleet(task, dropout_rate=0.0):
    profiles = sample_profiles(task.num_devices, None, 0)
    return Fleet(profiles, always_available(task.num_devices, dropout_rate=dropout_rate))


def test_merges_every_k_arrivals_with_staleness(task):
    records = []
    result = simulate(
        _fedbuff(task),
        torch.Generator().manual_seed(0),
        fleet=_fleet(task),
        on_round=records.append,
    )
    assert result.rounds == 4 and len(records) == 4
    assert all(r["merged"] == 3 for r in records)
    times = [r["virtual_seconds"] for r in records]
    assert times == sorted(times) and times[0] > 0
    # after the first merge, devices that started on the old model arrive stale
    assert max(r["mean_staleness"] for r in records) > 0


def test_staleness_discount():
    strategy = _fedbuff(tiny_task(num_devices=6))
    weights = strategy.staleness_weight(torch.tensor([0, 3, 8]))
    assert torch.allclose(weights, torch.tensor([1.0, 0.5, 1 / 3], dtype=torch.float64))


def test_async_is_deterministic_and_vectorized_equals_loop(task):
    runs = [
        simulate(
            _fedbuff(task),
            torch.Generator().manual_seed(0),
            fleet=_fleet(task, 0.1),
            backend=b,
            block_size=4,
        )
        for b in ("vectorized", "vectorized", "loop")
    ]
    for k, v in runs[0].cloud.tensors.items():
        assert torch.equal(v, runs[1].cloud[k])
        assert torch.allclose(v, runs[2].cloud[k], atol=1e-5), k
    assert runs[0].virtual_seconds == runs[2].virtual_seconds


def test_dropped_devices_never_reach_the_buffer(task):
    start = _fedbuff(task).init(torch.Generator().manual_seed(0))
    result = simulate(
        _fedbuff(task), torch.Generator().manual_seed(0), cloud=start, fleet=_fleet(task, 1.0)
    )
    assert result.rounds == 0 and result.bytes_up.sum() == 0
    assert torch.equal(result.cloud["tower.weight"], start["tower.weight"])


def test_stale_updates_move_the_model_less(task):
    start = _fedbuff(task).init(torch.Generator().manual_seed(0))
    moved = []
    for exponent in (0.0, 5.0):
        strategy = _fedbuff(task, staleness_exponent=exponent)
        result = simulate(
            strategy, torch.Generator().manual_seed(0), cloud=start, fleet=_fleet(task)
        )
        moved.append(float((result.cloud["tower.weight"] - start["tower.weight"]).norm()))
    assert moved[1] < moved[0]


def test_stop_hook_ends_an_asynchronous_run(task):
    calls = []

    def stop(round, cloud, devices):
        calls.append(round)
        return round == 1

    result = simulate(
        _fedbuff(task), torch.Generator().manual_seed(0), fleet=_fleet(task), stop=stop
    )
    assert result.rounds == 2 and calls == [0, 1]


def test_a_custom_row_order_is_refused_for_an_asynchronous_run(task):
    def order(devices, counts, round, epoch):
        return torch.zeros(int(counts.sum()), dtype=torch.long)

    with pytest.raises(ValueError, match=r"shuffle: fedbuff runs asynchronously"):
        simulate(
            _fedbuff(task), torch.Generator().manual_seed(0), fleet=_fleet(task), shuffle=order
        )
