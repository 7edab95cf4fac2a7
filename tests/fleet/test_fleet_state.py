import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from coevo.fleet import DeviceStateStore

TEMPLATE = {"bias": torch.zeros(3), "count": torch.zeros((), dtype=torch.int64)}


def both_stores(tmp_path, num_devices=5):
    memory = DeviceStateStore.zeros(num_devices, TEMPLATE)
    mapped = DeviceStateStore.zeros(num_devices, TEMPLATE, directory=tmp_path / "state")
    return memory, mapped


def test_scatter_then_gather_round_trips_and_leaves_other_rows(tmp_path):
    for store in both_stores(tmp_path):
        store.scatter(
            torch.tensor([3, 1]),
            {
                "bias": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),
                "count": torch.tensor([7, 8]),
            },
        )
        rows = store.gather(torch.tensor([1, 3, 0]))
        assert rows["bias"].tolist() == [[4.0, 5.0, 6.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
        assert rows["count"].tolist() == [8, 7, 0]


def test_memory_and_memmap_stores_agree(tmp_path):
    memory, mapped = both_stores(tmp_path, num_devices=20)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        devices = torch.randperm(20, generator=generator)[:6]
        values = {
            "bias": torch.randn(6, 3, generator=generator),
            "count": torch.randint(0, 9, (6,), generator=generator),
        }
        memory.scatter(devices, values)
        mapped.scatter(devices, values)
    everyone = torch.arange(20)
    for name in TEMPLATE:
        assert torch.equal(memory.gather(everyone)[name], mapped.gather(everyone)[name])


def test_gather_returns_a_copy(tmp_path):
    for store in both_stores(tmp_path):
        rows = store.gather(torch.tensor([0]))
        rows["bias"] += 1
        assert store.gather(torch.tensor([0]))["bias"].tolist() == [[0.0, 0.0, 0.0]]


def test_memmap_store_reopens_with_written_values(tmp_path):
    store = DeviceStateStore.zeros(4, TEMPLATE, directory=tmp_path / "state")
    store.scatter(torch.tensor([2]), {"bias": torch.tensor([[1.5, 2.5, 3.5]])})
    store.flush()
    reopened = DeviceStateStore.open(tmp_path / "state")
    assert reopened.names == ("bias", "count")
    assert reopened.gather(torch.tensor([2, 3]))["bias"].tolist() == [[1.5, 2.5, 3.5], [0, 0, 0]]
    assert np.load(tmp_path / "state" / "bias.npy")[2].tolist() == [1.5, 2.5, 3.5]
    with pytest.raises(FileExistsError, match=re.escape("DeviceStateStore.open(")):
        DeviceStateStore.zeros(4, TEMPLATE, directory=tmp_path / "state")


def test_in_memory_store_saves_and_loads_with_safetensors(tmp_path):
    store = DeviceStateStore.zeros(4, TEMPLATE)
    store.scatter(torch.tensor([0, 3]), {"count": torch.tensor([5, 6])})
    store.save(tmp_path / "state.safetensors")
    loaded = DeviceStateStore.load(tmp_path / "state.safetensors")
    assert loaded.gather(torch.arange(4))["count"].tolist() == [5, 0, 0, 6]
    assert loaded.nbytes == store.nbytes == 4 * 3 * 4 + 4 * 8


def test_memmap_store_refuses_to_save_a_copy(tmp_path):
    _, mapped = both_stores(tmp_path)
    with pytest.raises(ValueError, match=re.escape("DeviceStateStore.open(")):
        mapped.save(tmp_path / "copy.safetensors")


def test_scatter_rejects_duplicates_and_mismatches_without_writing(tmp_path):
    for store in both_stores(tmp_path):
        with pytest.raises(ValueError, match=r"repeat: \[1\]"):
            store.scatter(torch.tensor([1, 1]), {"count": torch.tensor([1, 2])})
        with pytest.raises(ValueError, match=r"bias: expected shape \[2, 3\], got \[2, 4\]"):
            store.scatter(
                torch.tensor([0, 1]), {"count": torch.tensor([1, 2]), "bias": torch.ones(2, 4)}
            )
        with pytest.raises(ValueError, match=re.escape("count: expected dtype torch.int64")):
            store.scatter(torch.tensor([0]), {"count": torch.tensor([1.0])})
        with pytest.raises(ValueError, match="unknown state 'weights'"):
            store.scatter(torch.tensor([0]), {"weights": torch.ones(1, 3)})
        with pytest.raises(ValueError, match=r"device ids must be in \[0, 5\)"):
            store.gather(torch.tensor([5]))
        assert store.gather(torch.arange(5))["count"].tolist() == [0] * 5


def test_bad_templates_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="no NumPy equivalent"):
        DeviceStateStore.zeros(3, {"w": torch.zeros(2, dtype=torch.bfloat16)}, directory=tmp_path)
    assert not (tmp_path / "w.npy").exists()
    with pytest.raises(ValueError, match=re.escape("state name '../w'")):
        DeviceStateStore.zeros(3, {"../w": torch.zeros(2)})
    with pytest.raises(ValueError, match="at least one tensor"):
        DeviceStateStore.zeros(3, {})


def resident_bytes():
    with Path("/proc/self/statm").open() as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_large_memmap_store_lives_in_files_not_ram(tmp_path):
    before = resident_bytes()
    store = DeviceStateStore.zeros(
        200_000, {"embedding": torch.zeros(64)}, directory=tmp_path / "state"
    )
    store.scatter(torch.tensor([0, 199_999]), {"embedding": torch.ones(2, 64)})
    assert store.gather(torch.tensor([199_999, 5]))["embedding"].sum().item() == 64.0
    assert resident_bytes() - before < 20 * 2**20
    assert store.nbytes == 200_000 * 64 * 4
    assert (tmp_path / "state" / "embedding.npy").stat().st_size >= store.nbytes
