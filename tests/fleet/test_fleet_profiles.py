import math

import pytest
import torch

from coevo.fleet import DEFAULT_MIX, TIERS, DeviceProfiles, Tier, sample_profiles
from coevo.fleet.profiles import QUANTITIES


def test_required_tiers_exist_with_plausible_numbers():
    for name in ("low_end_phone", "mid_phone", "flagship_phone", "iot_camera", "car", "laptop"):
        tier = TIERS[name]
        assert tier.name == name
        assert 0.02 <= tier.rtt_s <= 0.15
        assert 1e-10 <= tier.energy_per_flop_j <= 1e-9
        assert 1e-7 <= tier.energy_per_byte_j <= 5e-7
    assert TIERS["low_end_phone"].compute_flops_per_s < TIERS["flagship_phone"].compute_flops_per_s


def test_same_seed_same_fleet_other_seed_other_fleet():
    first = sample_profiles(100, None, 7)
    again = sample_profiles(100, None, 7)
    other = sample_profiles(100, None, 8)
    for name in ("tier", *QUANTITIES):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert not torch.equal(first.compute_flops_per_s, other.compute_flops_per_s)


def test_tier_shares_follow_the_mix():
    profiles = sample_profiles(10_000, None, 0)
    shares = torch.bincount(profiles.tier, minlength=len(profiles.tier_names)) / len(profiles)
    for index, name in enumerate(profiles.tier_names):
        assert shares[index].item() == pytest.approx(DEFAULT_MIX[name], abs=0.02)


def test_mix_weights_are_normalised():
    profiles = sample_profiles(10_000, {"car": 3.0, "iot_camera": 1.0, "laptop": 0.0}, 1)
    assert profiles.tier_names == ("car", "iot_camera", "laptop")
    shares = torch.bincount(profiles.tier, minlength=3) / len(profiles)
    assert shares.tolist() == pytest.approx([0.75, 0.25, 0.0], abs=0.02)


def test_devices_vary_within_a_tier_around_its_median_and_stay_positive():
    profiles = sample_profiles(10_000, {"mid_phone": 1.0}, 2)
    for name in QUANTITIES:
        values = getattr(profiles, name)
        assert bool((values > 0).all())
        assert values.std().item() > 0
        # The tier's number is the median device's: log-values centre on its log.
        median = getattr(TIERS["mid_phone"], name)
        assert values.log().mean().item() == pytest.approx(math.log(median), abs=0.02)
        assert values.log().std().item() == pytest.approx(TIERS["mid_phone"].spread, abs=0.02)


def test_zero_spread_gives_identical_devices():
    flat = Tier("flat", 1e9, 2e9, 1e6, 2e6, 0.05, 1e-9, 2e-7, spread=0.0)
    profiles = sample_profiles(5, {"flat": 1.0}, 3, tiers={"flat": flat})
    assert profiles.compute_flops_per_s.tolist() == [1e9] * 5
    assert profiles.rtt_s.tolist() == [0.05] * 5


def test_unknown_tier_error_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown tier") as info:
        sample_profiles(10, {"toaster": 1.0}, 0)
    for name in TIERS:
        assert name in str(info.value)


@pytest.mark.parametrize("mix", [{"car": -1.0, "laptop": 2.0}, {"car": 0.0}, {"car": float("nan")}])
def test_bad_weights_are_rejected(mix):
    with pytest.raises(ValueError, match="mix weights"):
        sample_profiles(10, mix, 0)


def test_tier_rejects_non_positive_bandwidth():
    with pytest.raises(ValueError, match="uplink_bytes_per_s must be > 0"):
        Tier("broken", 1e9, 1e9, 0.0, 1e6, 0.05, 1e-9, 2e-7)


def test_select_keeps_the_chosen_rows_in_order():
    profiles = sample_profiles(6, None, 4)
    chosen = profiles.select(torch.tensor([4, 1]))
    assert len(chosen) == 2
    assert chosen.tier_names == profiles.tier_names
    assert chosen.rtt_s.tolist() == [profiles.rtt_s[4].item(), profiles.rtt_s[1].item()]
    assert chosen.tier_labels() == [profiles.tier_labels()[4], profiles.tier_labels()[1]]
    with pytest.raises(ValueError, match=r"device ids must be in \[0, 6\)"):
        profiles.select(torch.tensor([6]))


def test_mismatched_lengths_are_rejected():
    profiles = sample_profiles(3, None, 0)
    fields = {name: getattr(profiles, name) for name in QUANTITIES}
    fields["rtt_s"] = torch.ones(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"rtt_s must have shape \[3\]"):
        DeviceProfiles(tier=profiles.tier, tier_names=profiles.tier_names, **fields)
