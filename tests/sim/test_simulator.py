import pytest
import torch

from coevo.sim.batching import cohort_batch, row_keys
from coevo.sim.simulator import simulate
from coevo.strategies import DeviceOnly, Finetune
from coevo.testing import tiny_task


@pytest.fixture(scope="module")
def task():
    return tiny_task()


def test_row_keys_are_deterministic_and_salted():
    rows = torch.arange(1000)
    assert torch.equal(row_keys(rows, 1, 2), row_keys(rows, 1, 2))
    assert not torch.equal(row_keys(rows, 1, 2), row_keys(rows, 1, 3))
    assert len(torch.unique(row_keys(rows, 7))) == 1000


def test_batches_do_not_depend_on_the_block(task):
    rows, offsets = task.device_rows("device")
    settings = {"epochs": 2, "batch_size": 3, "seed": 11}
    together = cohort_batch(task, rows, offsets, torch.tensor([2, 5, 7]), **settings)
    alone = cohort_batch(task, rows, offsets, torch.tensor([5]), **settings)
    steps = alone.mask.shape[1]
    assert torch.equal(together.inputs["target"][1, :steps], alone.inputs["target"][0])
    assert torch.equal(together.mask[1, :steps], alone.mask[0])
    assert together.mask[1, steps:].sum() == 0


def test_each_epoch_visits_every_device_row_once(task):
    rows, offsets = task.device_rows("device")
    batch = cohort_batch(task, rows, offsets, torch.tensor([4]), epochs=3, batch_size=2, seed=0)
    seen = batch.inputs["target"][0][batch.mask[0] > 0]
    expected = task.split.items[rows[offsets[4] : offsets[5]]]
    assert sorted(seen.tolist()) == sorted(expected.tolist() * 3)


@pytest.mark.parametrize("strategy_cls", [DeviceOnly, Finetune])
def test_vectorized_equals_loop(task, strategy_cls):
    settings = {"local": {"epochs": 2, "batch_size": 4}}
    if strategy_cls is Finetune:
        settings["pretrain"] = {"epochs": 1}
    config = strategy_cls.Config.model_validate(settings)
    results = [
        simulate(
            strategy_cls(task, config),
            torch.Generator().manual_seed(0),
            backend=backend,
            block_size=5,
        )
        for backend in ("vectorized", "loop")
    ]
    for name, tensor in results[0].devices.tensors.items():
        # float32 reductions in a different order: agreement to 1e-5
        assert torch.allclose(tensor, results[1].devices[name], atol=1e-5), name
    assert torch.equal(results[0].bytes_down, results[1].bytes_down)


def reversed_order(devices, counts, round, epoch):
    """Each device's rows last to first; the key depends on the device's own rows only."""
    return torch.cat([torch.arange(int(n), 0, -1) for n in counts]) + 0 * round


def test_a_shuffle_hook_sets_each_devices_row_order(task):
    rows, offsets = task.device_rows("device")
    batch = cohort_batch(
        task,
        rows,
        offsets,
        torch.tensor([1, 4]),
        epochs=1,
        batch_size=2,
        seed=0,
        shuffle=reversed_order,
    )
    own = rows[offsets[4] : offsets[5]]
    seen = batch.inputs["target"][1][batch.mask[1] > 0]
    assert seen.tolist() == task.split.items[own.flip(0)].tolist()


def test_a_shuffle_with_the_wrong_number_of_keys_is_refused(task):
    rows, offsets = task.device_rows("device")
    with pytest.raises(ValueError, match=r"shuffle returned \(3,\) keys for \d+ rows"):
        cohort_batch(
            task,
            rows,
            offsets,
            torch.tensor([4]),
            epochs=1,
            batch_size=2,
            seed=0,
            shuffle=lambda devices, counts, round, epoch: torch.arange(3),
        )


def test_a_custom_shuffle_trains_alike_on_both_backends_and_differs_from_the_hash(task):
    config = DeviceOnly.Config.model_validate({"local": {"epochs": 1, "batch_size": 2}})

    def run(backend, shuffle):
        strategy = DeviceOnly(task, config)
        generator = torch.Generator().manual_seed(0)
        return simulate(strategy, generator, backend=backend, block_size=5, shuffle=shuffle)

    vectorized, loop = run("vectorized", reversed_order), run("loop", reversed_order)
    hashed = run("vectorized", None)
    for name, tensor in vectorized.devices.tensors.items():
        assert torch.allclose(tensor, loop.devices[name], atol=1e-5), name
    assert any(
        not torch.allclose(tensor, hashed.devices[name], atol=1e-4)
        for name, tensor in vectorized.devices.tensors.items()
    )
