import pytest
import torch
from pydantic import ValidationError

from coevo.sim.batching import cohort_batch
from coevo.sim.simulator import simulate
from coevo.strategies import FedAvg, FedPer, Finetune
from coevo.testing import tiny_task
from coevo.types import DeviceState

PRETRAIN = {"epochs": 2, "eval_every": 1}


@pytest.fixture(scope="module")
def task():
    return tiny_task()


def _fedper(task, **settings):
    base = {"rounds": 2, "pretrain": PRETRAIN, "local": {"epochs": 2, "lr": 0.01}}
    return FedPer(task, FedPer.Config.model_validate({**base, **settings}))


def test_the_head_never_crosses_the_wire(task):
    strategy = _fedper(task)
    cloud = strategy.init(torch.Generator().manual_seed(0))
    payload = strategy.downlink(cloud, 0)
    assert not any(k.startswith("head.") for k in payload.tensors)
    rows, offsets = task.device_rows("device")
    batch = cohort_batch(task, rows, offsets, torch.arange(1), epochs=2, batch_size=16, seed=0)
    state = DeviceState({k: v[0] for k, v in strategy.init_devices(cloud, 1).tensors.items()})
    uplink, new_state, _ = strategy.local(payload, state, batch.device(0))
    assert set(uplink.tensors) == set(strategy.shared)
    assert not any(k.startswith("head.") for k in uplink.tensors)
    assert set(new_state.tensors) == {"head.weight", "head.bias"}
    assert not torch.equal(new_state["head.weight"], cloud["head.weight"])


def test_heads_personalise_while_the_cloud_head_stays_put(task):
    strategy = _fedper(task)
    cloud = strategy.init(torch.Generator().manual_seed(0))
    result = simulate(strategy, torch.Generator().manual_seed(0), cloud=cloud)
    heads = result.devices["head.weight"]
    assert not torch.equal(heads[0], heads[1])
    assert torch.equal(result.cloud["head.weight"], cloud["head.weight"])
    assert not torch.equal(result.cloud["tower.weight"], cloud["tower.weight"])
    # the uplink is the body update only: smaller than a FedAvg uplink with no private part
    fedavg = FedAvg(task, FedAvg.Config.model_validate({"rounds": 2, "private": []}))
    everything = simulate(fedavg, torch.Generator().manual_seed(0), cloud=cloud)
    head_bytes = 4 * (cloud["head.weight"].numel() + cloud["head.bias"].numel())
    assert int(everything.bytes_up[0] - result.bytes_up[0]) >= 2 * head_bytes


def test_it_starts_from_the_model_cloud_plus_finetune_ships_or_from_fedavgs(task):
    pretrained = _fedper(task).init(torch.Generator().manual_seed(0))
    finetune = Finetune(task, Finetune.Config.model_validate({"pretrain": PRETRAIN}))
    shipped = finetune.init(torch.Generator().manual_seed(0))
    assert all(torch.equal(pretrained[k], shipped[k]) for k in shipped.tensors)
    random = _fedper(task, pretrained=False).init(torch.Generator().manual_seed(0))
    fedavg = FedAvg(task).init(torch.Generator().manual_seed(0))
    assert all(torch.equal(random[k], fedavg[k]) for k in fedavg.tensors)
    assert not torch.equal(random["tower.weight"], pretrained["tower.weight"])


def test_bad_private_settings_are_named(task):
    with pytest.raises(ValidationError, match="private"):
        FedPer.Config.model_validate({"private": []})
    with pytest.raises(ValueError, match=r"'user_head\.'"):
        FedPer(task, FedPer.Config.model_validate({"private": ["user_head."]}))
