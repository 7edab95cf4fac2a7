"""The accountant agrees with Opacus, spends more with every round, and calibrates σ safely."""

import itertools
import math

import pytest

from coevo.privacy import PrivacyAccountant, calibrate_noise, rdp_epsilon


def test_epsilon_matches_opacus_for_known_parameters():
    from opacus.accountants import RDPAccountant

    reference = RDPAccountant()
    for _ in range(1000):
        reference.step(noise_multiplier=1.0, sample_rate=0.01)
    ours = PrivacyAccountant(noise_multiplier=1.0, sampling_rate=0.01, delta=1e-5).epsilon(1000)
    assert ours == pytest.approx(2.10, abs=0.005)
    assert ours == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    accountant = PrivacyAccountant(noise_multiplier=1.2, sampling_rate=0.1, delta=1e-3)
    spent = [accountant.epsilon(rounds) for rounds in (0, 1, 10, 50, 200)]
    assert spent[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(spent))
    noisier = PrivacyAccountant(noise_multiplier=2.4, sampling_rate=0.1, delta=1e-3)
    assert noisier.epsilon(50) < accountant.epsilon(50)


def test_no_noise_spends_an_infinite_budget():
    assert rdp_epsilon(0.0, 0.1, 5, 1e-3) == math.inf


@pytest.mark.parametrize("target", [0.5, 1.0, 2.0, 4.0, 8.0])
def test_calibrated_noise_stays_within_the_target(target):
    delta, rate, rounds = 1 / 943, 100 / 943, 60
    sigma = calibrate_noise(target, delta, rate, rounds)
    spent = rdp_epsilon(sigma, rate, rounds, delta)
    assert target - 0.05 <= spent <= target


def test_an_infinite_target_needs_no_noise():
    assert calibrate_noise(math.inf, 1e-3, 0.1, 10) == 0.0


def test_fleet_parameters():
    accountant = PrivacyAccountant.for_fleet(1.0, devices_per_round=50, num_devices=1000)
    assert accountant.sampling_rate == 0.05 and accountant.delta == 1e-3


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"noise_multiplier": 1.0, "sampling_rate": 0.0, "delta": 1e-5}, "sampling_rate"),
        ({"noise_multiplier": 1.0, "sampling_rate": 0.1, "delta": 1.0}, "delta"),
        ({"noise_multiplier": -1.0, "sampling_rate": 0.1, "delta": 1e-5}, "noise_multiplier"),
    ],
)
def test_bad_parameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PrivacyAccountant(**kwargs)
