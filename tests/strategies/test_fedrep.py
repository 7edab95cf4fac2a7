import pytest
import torch
from pydantic import ValidationError

from coevo.sim.batching import cohort_batch
from coevo.sim.simulator import simulate
from coevo.strategies import FedRep
from coevo.strategies.fedrep import first_epochs
from coevo.strategies.local_training import local_train
from coevo.testing import tiny_task
from coevo.types import DeviceState

PRETRAIN = {"epochs": 2, "eval_every": 1}


@pytest.fixture(scope="module")
def task():
    return tiny_task()


def _fedrep(task, **settings):
    base = {"rounds": 2, "pretrain": PRETRAIN, "local": {"epochs": 3, "lr": 0.01}}
    return FedRep(task, FedRep.Config.model_validate({**base, **settings}))


def _device_batch(task, device, epochs):
    rows, offsets = task.device_rows("device")
    block = torch.tensor([device])
    return cohort_batch(task, rows, offsets, block, epochs=epochs, batch_size=4, seed=0).device(0)


def test_first_epochs_keeps_each_row_once_per_kept_epoch(task):
    device = int(task.split.num_device_period.argmax())
    batch = _device_batch(task, device, epochs=3)
    one = first_epochs(batch, 3, 1)
    rows = int(task.split.num_device_period[device])
    assert batch.num_steps > 3
    assert int(one.mask.sum()) == rows == int(batch.mask.sum()) // 3
    kept_targets = batch.inputs["target"][one.mask.bool()]
    all_targets = batch.inputs["target"][batch.mask.bool()]
    assert sorted(kept_targets.tolist() * 3) == sorted(all_targets.tolist())
    assert int(first_epochs(batch, 3, 3).mask.sum()) == int(batch.mask.sum())


def test_head_trains_first_on_the_downloaded_body_then_the_body_under_the_new_head(task):
    strategy = _fedrep(task, body_epochs=1)
    cloud = strategy.init(torch.Generator().manual_seed(0))
    payload = strategy.downlink(cloud, 0)
    state = DeviceState({k: v[0] for k, v in strategy.init_devices(cloud, 1).tensors.items()})
    batch = _device_batch(task, 0, epochs=3)
    uplink, new_state, _ = strategy.local(payload, state, batch)
    params = {**payload.tensors, **state.tensors}
    loss, lr = task.batch_loss, 0.01
    head, _ = local_train(strategy.model, params, strategy.private, batch, lr, loss=loss)
    for k in strategy.private:
        assert torch.allclose(new_state[k], head[k], atol=1e-6), k
    body, _ = local_train(
        strategy.model, head, strategy.shared, first_epochs(batch, 3, 1), lr, loss=loss
    )
    for k in strategy.shared:
        assert torch.allclose(uplink.tensors[k], body[k] - payload.tensors[k], atol=1e-6), k
    assert set(uplink.tensors) == set(strategy.shared)  # the head never goes up


def test_more_body_epochs_move_the_global_body_further(task):
    moves = []
    for body_epochs in (1, 3):
        strategy = _fedrep(task, body_epochs=body_epochs)
        cloud = strategy.init(torch.Generator().manual_seed(0))
        result = simulate(strategy, torch.Generator().manual_seed(0), cloud=cloud)
        assert torch.equal(result.cloud["head.weight"], cloud["head.weight"])
        moves.append(float((result.cloud["tower.weight"] - cloud["tower.weight"]).norm()))
    assert moves[1] > moves[0] > 0


def test_body_epochs_beyond_local_epochs_is_refused():
    with pytest.raises(ValidationError, match="body_epochs"):
        FedRep.Config.model_validate({"body_epochs": 4, "local": {"epochs": 3}})
