import logging
import sys

import pytest
import torch

from coevo.sim.batching import cohort_batch
from coevo.sim.executor import local_executor
from coevo.sim.ray_backend import RayExecutor
from coevo.sim.simulator import simulate
from coevo.strategies import FedAvg
from coevo.testing import tiny_task
from coevo.types import DeviceState

ray = pytest.importorskip("ray")

# Generous for 2 shared cores, but a broken cluster fails the test instead of hanging it.
TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def local_ray():
    """A private 2-CPU Ray instance for this module, shut down even when a test fails."""
    ray.init(
        num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False
    )
    try:
        assert ray.cluster_resources().get("CPU") == 2
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def task():
    return tiny_task()


def _fedavg(task, rounds=2, epochs=1):
    local = {"epochs": epochs, "batch_size": 4, "lr": 0.3, "optimizer": "sgd"}
    return FedAvg(task, FedAvg.Config.model_validate({"rounds": rounds, "local": local}))


def _jobs(strategy, block_sizes):
    """Consecutive blocks of devices with the given sizes, batched as the simulator does."""
    task = strategy.task
    rows, offsets = task.device_rows(strategy.local_period)
    devices = strategy.init_devices(strategy.init(torch.Generator().manual_seed(0)), 24)
    local = strategy.config.local
    jobs, start = [], 0
    for size in block_sizes:
        block = torch.arange(start, start + size)
        start += size
        state = DeviceState({k: v[block] for k, v in devices.tensors.items()})
        batch = cohort_batch(
            task, rows, offsets, block, epochs=local.epochs, batch_size=local.batch_size, seed=3
        )
        jobs.append((state, batch))
    return jobs


def test_ray_equals_vectorized(local_ray, task):
    settings = {"block_size": 4, "devices_per_round": 10}
    strategy = _fedavg(task)
    expected = simulate(strategy, torch.Generator().manual_seed(0), **settings)
    with RayExecutor(num_actors=2, timeout_s=TIMEOUT_S) as executor:
        got = simulate(strategy, torch.Generator().manual_seed(0), executor=executor, **settings)
    assert got.rounds == expected.rounds == 2
    for name, tensor in expected.cloud.tensors.items():
        assert torch.allclose(got.cloud[name], tensor, atol=1e-6), name
    for name, tensor in expected.devices.tensors.items():
        assert torch.allclose(got.devices[name], tensor, atol=1e-6), name
    assert torch.equal(got.bytes_up, expected.bytes_up)


def test_results_come_back_in_job_order(local_ray, task):
    strategy = _fedavg(task, epochs=3)
    # Round-robin gives actor 0 the three big blocks and actor 1 the two single devices, so
    # actor 1 finishes first although its blocks sit between actor 0's in the job list.
    sizes = [7, 1, 7, 1, 8]
    jobs = _jobs(strategy, sizes)
    payload = strategy.downlink(strategy.init(torch.Generator().manual_seed(0)), 0)
    expected = local_executor("vectorized")(strategy, payload, jobs)
    with RayExecutor(num_actors=2, timeout_s=TIMEOUT_S) as executor:
        got = executor(strategy, payload, jobs)
    assert len(got) == len(jobs)
    for size, got_parts, expected_parts in zip(sizes, got, expected, strict=True):
        for got_part, expected_part in zip(got_parts, expected_parts, strict=True):
            assert got_part.keys() == expected_part.keys()
            for name, tensor in expected_part.items():
                assert got_part[name].shape[0] == size
                assert torch.allclose(got_part[name], tensor, atol=1e-6), name


def test_a_late_actor_raises_timeout_naming_it(local_ray, task):
    strategy = _fedavg(task, epochs=5)
    payload = strategy.downlink(strategy.init(torch.Generator().manual_seed(0)), 0)
    with RayExecutor(num_actors=2, timeout_s=TIMEOUT_S) as executor:
        # A first call starts the actors and sends the strategy, so only the blocks are late.
        executor(strategy, payload, _jobs(strategy, [1]))
        executor.timeout_s = 1e-3
        with pytest.raises(TimeoutError, match=r"actor 0 of 2 \(holding 3 blocks\)"):
            executor(strategy, payload, _jobs(strategy, [4, 4, 4, 4, 4, 4]))


def test_without_ray_it_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'coevo\[ray\]'"):
        RayExecutor()
