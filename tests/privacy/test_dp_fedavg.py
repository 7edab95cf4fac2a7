"""DP-FedAvg: plain FedAvg without clipping or noise; clipped uplinks; noise of the right size."""

import math

import pytest
import torch
from pydantic import ValidationError

from coevo.privacy import DPFedAvg, DPFedAvgConfig
from coevo.sim.simulator import simulate
from coevo.strategies import FedAvg
from coevo.testing import tiny_task
from coevo.testing.conformance import check_strategy
from coevo.types import CloudState, Payload


@pytest.fixture(scope="module")
def task():
    return tiny_task()


class RecordingFedAvg(FedAvg):
    """FedAvg that keeps the uplinks its merge received."""

    name = "fedavg"

    def merge(self, cloud, uplinks, weights):
        self.seen = {k: v.clone() for k, v in uplinks.tensors.items()}
        return super().merge(cloud, uplinks, weights)


def final_weights(strategy):
    result = simulate(strategy, torch.Generator().manual_seed(0), devices_per_round=10)
    return {k: v for k, v in result.cloud.tensors.items() if not k.startswith("dp/")}


def test_without_clipping_or_noise_it_is_plain_fedavg(task):
    config = FedAvg.Config(rounds=3)
    plain = final_weights(FedAvg(task, config))
    private = final_weights(
        DPFedAvg.wrap(
            FedAvg(task, config), clip_norm=math.inf, noise_multiplier=0.0, weight_cap=math.inf
        )
    )
    assert plain.keys() == private.keys()
    assert all(torch.equal(plain[k], private[k]) for k in plain)


def test_every_uplink_reaching_the_merge_is_clipped(task):
    inner = RecordingFedAvg(task, FedAvg.Config(rounds=1))
    simulate(DPFedAvg.wrap(inner, clip_norm=0.01, noise_multiplier=0.0), torch.Generator())
    norms = torch.stack([v.flatten(1).double().square().sum(1) for v in inner.seen.values()])
    assert norms.sum(0).sqrt().max() <= 0.01
    assert norms.sum(0).sqrt().min() > 0.009  # these updates are all larger than C


def test_cloud_noise_on_the_mean_is_sigma_c_over_the_weight_sum(task):
    strategy = DPFedAvg.wrap(FedAvg(task), clip_norm=0.5, noise_multiplier=2.0)
    cloud = strategy.init(torch.Generator().manual_seed(0))
    devices = 40
    uplinks = Payload({k: torch.zeros(devices, *cloud[k].shape) for k in strategy.inner.shared})
    weights = torch.full((devices,), 7.0)  # capped at 1 each
    merged = strategy.merge(cloud, uplinks, weights)
    moved = torch.cat([(merged[k] - cloud[k]).flatten() for k in strategy.inner.shared])
    assert moved.std().item() == pytest.approx(2.0 * 0.5 / devices, rel=0.05)
    again = strategy.merge(merged, uplinks, weights)
    second = torch.cat([(again[k] - merged[k]).flatten() for k in strategy.inner.shared])
    assert abs(float(torch.corrcoef(torch.stack([moved, second]))[0, 1])) < 0.05
    assert int(again["dp/round"]) == 2


@pytest.mark.parametrize(
    "settings",
    [
        {"clip_norm": 0.5, "noise_multiplier": 1.0},
        {"clip_norm": 0.5, "noise_multiplier": 1.0, "noise_at": "device", "devices_per_round": 7},
    ],
    ids=["cloud", "device"],
)
def test_dp_fedavg_conforms(task, settings):
    check_strategy(DPFedAvg, settings, task=task, rounds=2, devices_per_round=7)


def test_device_noise_is_split_over_the_cohort(task):
    strategy = DPFedAvg.wrap(
        FedAvg(task), clip_norm=0.4, noise_multiplier=1.5, noise_at="device", devices_per_round=16
    )
    assert strategy.device_noise.std == pytest.approx(1.5 * 0.4 / 4)
    cloud = strategy.init(torch.Generator())
    keys = strategy.init_devices(cloud, task.num_devices)["dp/key"]
    assert len(set(keys.tolist())) == task.num_devices


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"clip_norm": math.inf, "noise_multiplier": 1.0}, "clip_norm"),
        ({"weight_cap": math.inf, "noise_multiplier": 1.0}, "weight_cap"),
        ({"noise_at": "device"}, "devices_per_round"),
        ({"noise_at": "device", "devices_per_round": 5, "weight_cap": 3.0}, "weight_cap"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
    ],
)
def test_inconsistent_settings_are_refused(settings, message):
    with pytest.raises(ValidationError, match=message):
        DPFedAvgConfig(**settings)


def test_private_state_is_kept_out_of_the_inner_merge(task):
    strategy = DPFedAvg.wrap(RecordingFedAvg(task), clip_norm=1.0, noise_multiplier=0.0)
    cloud = strategy.init(torch.Generator())
    assert isinstance(cloud, CloudState) and "dp/key" in cloud
    uplinks = Payload({k: torch.zeros(2, *cloud[k].shape) for k in strategy.inner.shared})
    merged = strategy.merge(cloud, uplinks, torch.ones(2))
    assert torch.equal(merged["dp/key"], cloud["dp/key"])


def test_the_run_accountant_uses_the_cohort_share_and_one_over_devices(task):
    strategy = DPFedAvg.wrap(FedAvg(task), clip_norm=1.0, noise_multiplier=1.3)
    accountant = strategy.accountant(devices_per_round=6)
    assert accountant.sampling_rate == 6 / task.num_devices
    assert accountant.delta == 1 / task.num_devices
    assert accountant.noise_multiplier == 1.3
    assert strategy.accountant(None).sampling_rate == 1.0
