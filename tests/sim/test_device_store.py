"""Device state in memory-mapped files: same results as in memory, exact resumes after crashes."""

import pytest
import torch

from coevo.fleet import always_available, sample_profiles
from coevo.sim import Fleet, simulate
from coevo.sim import simulator as simulator_module
from coevo.sim.device_store import UNDO
from coevo.strategies import FedAvg
from coevo.testing import tiny_task


@pytest.fixture(scope="module")
def task():
    return tiny_task()


def _fedavg(task, rounds=4):
    # The private head makes the state per device: it lives in the store.
    config = FedAvg.Config.model_validate(
        {"rounds": rounds, "local": {"epochs": 1, "batch_size": 4, "lr": 0.3, "optimizer": "sgd"}}
    )
    return FedAvg(task, config)


def _settings(task):
    fleet = Fleet(
        sample_profiles(task.num_devices, None, 0),
        always_available(task.num_devices, dropout_rate=0.2),
    )
    return {"devices_per_round": 8, "fleet": fleet}


def _same(a, b):
    for k, v in a.cloud.tensors.items():
        assert torch.equal(v, b.cloud[k]), k
    assert set(a.devices.tensors) == set(b.devices.tensors)
    for k, v in a.devices.tensors.items():
        assert torch.equal(v, b.devices[k]), k


def test_mapped_state_gives_the_in_memory_result(task, tmp_path):
    strategy = _fedavg(task)
    assert strategy.private, "the test needs per-device state"
    memory = simulate(strategy, torch.Generator().manual_seed(0), **_settings(task))
    mapped = simulate(
        strategy,
        torch.Generator().manual_seed(0),
        device_state_dir=str(tmp_path / "state"),
        **_settings(task),
    )
    _same(memory, mapped)
    files = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert files == sorted(f"{name}.npy" for name in strategy.private)


def test_crash_between_state_write_and_checkpoint_resumes_exactly(task, tmp_path, monkeypatch):
    strategy = _fedavg(task)
    whole = simulate(strategy, torch.Generator().manual_seed(0), **_settings(task))
    state_dir, ckpt = str(tmp_path / "state"), str(tmp_path / "ckpt")
    real_save = simulator_module.save_checkpoint
    saved = []

    def crash_on_third(folder, checkpoint):
        if len(saved) == 2:
            raise OSError("disk gone")
        saved.append(checkpoint.round)
        return real_save(folder, checkpoint)

    monkeypatch.setattr(simulator_module, "save_checkpoint", crash_on_third)
    with pytest.raises(OSError, match="disk gone"):
        simulate(
            strategy,
            torch.Generator().manual_seed(0),
            checkpoint=ckpt,
            device_state_dir=state_dir,
            **_settings(task),
        )
    # Round 2 wrote its rows (logged) but no checkpoint: the files are ahead of it.
    assert saved == [1, 2] and (tmp_path / "state" / UNDO).exists()
    monkeypatch.setattr(simulator_module, "save_checkpoint", real_save)
    resumed = simulate(
        strategy,
        torch.Generator().manual_seed(0),
        checkpoint=ckpt,
        device_state_dir=state_dir,
        **_settings(task),
    )
    assert resumed.rounds == 4
    _same(whole, resumed)
    assert not (tmp_path / "state" / UNDO).exists()


def test_a_fresh_run_replaces_old_state_files(task, tmp_path):
    strategy = _fedavg(task, rounds=2)
    state_dir = str(tmp_path / "state")
    first = simulate(strategy, torch.Generator().manual_seed(0), device_state_dir=state_dir)
    again = simulate(strategy, torch.Generator().manual_seed(0), device_state_dir=state_dir)
    _same(first, again)
