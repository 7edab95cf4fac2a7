import pytest
import torch

from coevo.sim.batching import cohort_batch
from coevo.sim.simulator import simulate
from coevo.sim.wire import wire_bytes
from coevo.strategies import Dccl
from coevo.strategies.dccl import HELD, _kl, apply_patch, cloud_windows
from coevo.testing import tiny_task
from coevo.types import DeviceState, Payload

FAST = {
    "pretrain": {"epochs": 2, "eval_every": 1},
    "patch": {"epochs": 2},
    "local": {"epochs": 3, "lr": 0.05},
    "metapatch_dim": 4,
}


@pytest.fixture(scope="module")
def task():
    return tiny_task()


@pytest.fixture(scope="module")
def strategy(task):
    return Dccl(task, Dccl.Config.model_validate(FAST))


@pytest.fixture(scope="module")
def cloud(strategy):
    return strategy.init(torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def run(strategy, cloud):
    return simulate(strategy, torch.Generator().manual_seed(0), cloud=cloud)


def _device_batch(strategy, device):
    task, local = strategy.task, strategy.config.local
    rows, offsets = task.device_rows("device")
    sizes = {"epochs": local.epochs, "batch_size": local.batch_size}
    return cohort_batch(task, rows, offsets, torch.tensor([device]), seed=0, **sizes).device(0)


def _own_loss(strategy, cloud, batch, metapatch):
    """The device's patched training loss with ``metapatch``, on the weights it downloaded."""
    net = strategy.net
    with torch.no_grad():
        net.load_state_dict({k: cloud[k] for k in strategy.names}, strict=False)
        history, target = batch.inputs["history"], batch.inputs["target"]
        real = batch.mask.flatten() > 0
        state = net.user_state(history.flatten(0, 1))[real]
        user = apply_patch(state, metapatch, net.theta)
        return float(
            torch.nn.functional.cross_entropy(user @ net.catalogue().T, target.flatten()[real])
        )


def test_local_trains_only_the_metapatch_and_it_fits_the_device_data(strategy, cloud):
    batch = _device_batch(strategy, 0)
    state = DeviceState({k: v[0] for k, v in strategy.init_devices(cloud, 1).tensors.items()})
    payload = strategy.downlink(cloud, 0)
    _, new, _ = strategy.local(payload, state, batch)
    assert set(new.tensors) == {"metapatch", "trained", "device"}
    assert new["trained"] == 1
    # The encoder's guess (the starting metapatch) is improved on by training on device data.
    history = batch.inputs["history"].flatten(0, 1)[batch.mask.flatten() > 0]
    net = strategy.net
    with torch.no_grad():
        net.load_state_dict({k: cloud[k] for k in strategy.names}, strict=False)
        guess = net.encoder(net.user_state(history)).mean(0)
    assert not torch.allclose(new["metapatch"], guess)
    assert _own_loss(strategy, cloud, batch, new["metapatch"]) < _own_loss(
        strategy, cloud, batch, guess
    )


def test_uplink_is_the_metapatch_and_the_id_and_its_bytes_are_counted(strategy, run, task):
    state = DeviceState({k: v[3] for k, v in run.devices.tensors.items()})
    uplink, _, _ = strategy.local(
        strategy.downlink(run.cloud, 0), state, _device_batch(strategy, 3)
    )
    assert set(uplink.tensors) == {"metapatch", "device"}
    assert uplink.tensors["metapatch"].shape == (4,)
    assert uplink.tensors["metapatch"].dtype == torch.float32
    assert int(uplink.tensors["device"]) == 3
    size = len(uplink.to_bytes())
    # The same small payload from every device, whatever its amount of private data.
    assert torch.all(run.bytes_up == size)
    assert size < 256
    assert torch.all(run.bytes_down == wire_bytes(strategy.downlink(run.cloud, 0)))


def test_cold_start_devices_are_served_with_the_encoder_metapatch(strategy, run, task):
    split = task.split
    history = split.history(split.target_rows("test")[:4], task.history_len)
    candidates = split.candidates("test")[:4]
    trained = DeviceState({k: v[:4] for k, v in run.devices.tensors.items()})
    cold = strategy.init_devices(run.cloud, 4)
    net = strategy.net
    with torch.no_grad():
        net.load_state_dict({k: run.cloud[k] for k in strategy.names}, strict=False)
        guess = net.encoder(net.user_state(history))
        expected = net(history, candidates, guess)
        unpatched = net(history, candidates, torch.zeros_like(guess))
    served = strategy.score(run.cloud, cold, history, candidates)
    assert torch.allclose(served, expected, atol=1e-5)
    assert not torch.allclose(served, unpatched, atol=1e-4)
    # Devices that trained use their own metapatch on the weights they downloaded.
    with torch.no_grad():
        net.load_state_dict({k: run.cloud[HELD + k] for k in strategy.names}, strict=False)
        own = net(history, candidates, trained["metapatch"])
    assert torch.allclose(strategy.score(run.cloud, trained, history, candidates), own, atol=1e-5)


def test_momodistill_moves_the_cloud_model_towards_the_personal_models(strategy, cloud, task):
    devices = torch.arange(task.num_devices)
    generator = torch.Generator().manual_seed(1)
    metapatch = 3.0 * torch.randn(task.num_devices, 4, generator=generator)
    uplinks = Payload({"metapatch": metapatch, "device": devices})
    settings = strategy.config.model_copy(
        update={
            "distill": strategy.config.distill.model_copy(
                update={"model_epochs": 4, "model_lr": 3e-3, "beta": 10.0}
            )
        }
    )
    distilling = Dccl(task, settings)
    merged = distilling.merge(cloud, uplinks, torch.ones(task.num_devices))
    inputs, _, owner = cloud_windows(task.split, devices, task.shapes.cloud_history)
    net = distilling.net
    valid = inputs != task.num_items

    def gap(weights) -> float:
        """KL(personal || cloud model) on the cloud-period windows of every device."""
        with torch.no_grad():
            net.load_state_dict({k: cloud[k] for k in distilling.names}, strict=False)
            states = net.backbone.encode(inputs)
            teacher = apply_patch(states, metapatch[owner][:, None], net.theta) @ net.catalogue().T
            net.load_state_dict(weights, strict=False)
            return float(_kl(teacher, net.backbone.sequence_logits(inputs))[valid].mean())

    before = gap({k: cloud[k] for k in distilling.names})
    after = gap({k: merged[k] for k in distilling.names})
    assert after < 0.95 * before
    # Devices keep serving with the weights they downloaded until their next round.
    assert all(torch.equal(merged[HELD + k], cloud[k]) for k in distilling.names)
    assert not torch.equal(merged["theta"], cloud["theta"])
