import re

import pytest
import torch

from coevo.fleet import DeviceProfiles, fits_in_memory, round_cost, sample_profiles
from coevo.fleet.profiles import QUANTITIES


def profiles(**columns):
    """Devices with 1 GFLOP/s, 1 MB/s both ways, 50 ms RTT, unless ``columns`` say otherwise."""
    defaults = {
        "compute_flops_per_s": 1e9,
        "memory_bytes": 1e9,
        "uplink_bytes_per_s": 1e6,
        "downlink_bytes_per_s": 1e6,
        "rtt_s": 0.05,
        "energy_per_flop_j": 1e-9,
        "energy_per_byte_j": 2e-7,
    }
    num_devices = max((len(v) for v in columns.values() if isinstance(v, list)), default=1)
    values = {
        name: torch.tensor(columns.get(name, [defaults[name]] * num_devices), dtype=torch.float64)
        for name in QUANTITIES
    }
    tier = torch.zeros(num_devices, dtype=torch.int64)
    return DeviceProfiles(tier=tier, tier_names=("test",), **values)


def test_hand_computed_round():
    cost = round_cost(
        profiles(),
        flops=torch.tensor([1e9]),
        bytes_down=torch.tensor([1e6]),
        bytes_up=torch.tensor([1e6]),
    )
    assert cost.compute_s.tolist() == pytest.approx([1.0])
    assert cost.download_s.tolist() == pytest.approx([1.05])
    assert cost.upload_s.tolist() == pytest.approx([1.05])
    assert cost.total_s.tolist() == pytest.approx([3.1])
    # 1e9 FLOP x 1e-9 J + 2e6 B x 2e-7 J = 1.0 J + 0.4 J.
    assert cost.energy_j.tolist() == pytest.approx([1.4])


def test_summary_of_three_devices():
    fleet = profiles(compute_flops_per_s=[1e9, 5e8, 2.5e8])
    cost = round_cost(fleet, flops=1e9, bytes_down=1e6, bytes_up=1e6)
    # Compute takes 1, 2 and 4 s; transfers add 2.1 s each: totals 3.1, 4.1, 6.1.
    assert cost.total_s.tolist() == pytest.approx([3.1, 4.1, 6.1])
    summary = cost.summary()
    assert summary["total_s_mean"] == pytest.approx((3.1 + 4.1 + 6.1) / 3)
    # p95 of three values sits 90% of the way from the middle one to the largest.
    assert summary["total_s_p95"] == pytest.approx(4.1 + 0.9 * 2.0)
    assert summary["total_s_max"] == pytest.approx(6.1)
    assert summary["energy_j_sum"] == pytest.approx(3 * 1.4)


def test_zero_bytes_pay_no_round_trip():
    cost = round_cost(profiles(), flops=1e9, bytes_down=torch.tensor([0.0]), bytes_up=0)
    assert cost.download_s.tolist() == [0.0]
    assert cost.upload_s.tolist() == [0.0]
    assert cost.total_s.tolist() == pytest.approx([1.0])


def test_more_bytes_take_more_seconds():
    fleet = profiles(rtt_s=[0.05] * 5)
    payload = torch.tensor([0.0, 1.0, 1e3, 1e6, 1e8])
    cost = round_cost(fleet, flops=0, bytes_down=payload, bytes_up=payload)
    assert bool((torch.diff(cost.total_s) > 0).all())
    assert bool((torch.diff(cost.energy_j) > 0).all())


def test_sampled_cohort_is_priced_per_device():
    fleet = sample_profiles(100, None, 0).select(torch.arange(0, 100, 10))
    cost = round_cost(fleet, flops=torch.full((10,), 1e10), bytes_down=1e6, bytes_up=1e6)
    assert len(cost) == 10
    assert torch.allclose(cost.compute_s, 1e10 / fleet.compute_flops_per_s)


def test_bad_inputs_are_rejected():
    fleet = profiles(rtt_s=[0.05] * 3)
    with pytest.raises(ValueError, match=r"flops must have shape \[3\]"):
        round_cost(fleet, flops=torch.ones(4), bytes_down=0, bytes_up=0)
    with pytest.raises(ValueError, match=re.escape("bytes_up must be >= 0, got -1.0")):
        round_cost(fleet, flops=1.0, bytes_down=0, bytes_up=torch.tensor([1.0, -1.0, 1.0]))


def test_empty_cohort_costs_nothing():
    empty = sample_profiles(5, None, 0).select(torch.tensor([], dtype=torch.int64))
    summary = round_cost(empty, flops=1e9, bytes_down=1e6, bytes_up=1e6).summary()
    assert summary == {
        "total_s_mean": 0.0,
        "total_s_p95": 0.0,
        "total_s_max": 0.0,
        "energy_j_sum": 0.0,
    }


def test_fits_in_memory():
    fleet = profiles(memory_bytes=[1e8, 5e8, 1e9])
    assert fits_in_memory(fleet, 5e8).tolist() == [False, True, True]
    assert fits_in_memory(fleet, torch.tensor([1e8, 6e8, 1e9])).tolist() == [True, False, True]
