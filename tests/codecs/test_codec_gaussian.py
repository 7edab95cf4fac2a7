"""GaussianNoise: local DP noise with the right distribution, fresh per device and round."""

import math

import pytest
import torch
from scipy import stats
from torch.func import vmap

from coevo.codecs import Chain, ClipNorm, GaussianNoise, Int8
from coevo.codecs.gaussian import device_share_std, gaussian_noise, standard_normal
from coevo.testing.conformance import check_codec

TEMPLATE = {
    "w": torch.randn(4, 5, generator=torch.Generator().manual_seed(0)),
    "b": torch.linspace(-2.0, 3.0, 5),
    "s": torch.tensor(0.75),
    "ids": torch.arange(3),
}


def test_draws_are_standard_normal():
    draws = standard_normal(torch.tensor(12345), (50_000,)).numpy()
    assert stats.kstest(draws, "norm").pvalue > 1e-3
    assert abs(draws.mean()) < 0.02
    assert draws.std() == pytest.approx(1.0, abs=0.02)


def test_noise_has_the_configured_std_and_leaves_integers_alone():
    codec = GaussianNoise(std=0.3)
    update = {"w": torch.full((40_000,), 2.0), "ids": torch.arange(5)}
    wire, state = codec.encode(update, codec.init_state(update))
    noise = (wire["w"] - 2.0).double()
    assert noise.std().item() == pytest.approx(0.3, rel=0.03)
    assert abs(noise.mean().item()) < 0.01
    assert torch.equal(wire["ids"], update["ids"])
    assert int(state["round"]) == 1


def test_noise_is_fresh_each_round_and_for_each_device():
    codec = GaussianNoise(std=1.0)
    update = {"w": torch.zeros(5_000)}
    state = codec.init_state(update)
    first, state = codec.encode(update, state)
    second, _ = codec.encode(update, state)
    other_device, _ = codec.encode({"w": torch.full((5_000,), 1e-3)}, codec.init_state(update))
    for a, b in ((first, second), (first, other_device)):
        correlation = torch.corrcoef(torch.stack([a["w"], b["w"]]))[0, 1]
        assert abs(float(correlation)) < 0.05


def test_unseeded_devices_draw_their_own_keys():
    codec = GaussianNoise(std=1.0, seed=None)
    update = {"w": torch.zeros(3)}
    keys = {int(codec.init_state(update)["key"]) for _ in range(5)}
    assert len(keys) == 5


def test_split_noise_adds_up_to_the_central_noise():
    sigma, clip, devices = 1.5, 0.2, 64
    std = device_share_std(sigma, clip, devices)
    assert std == pytest.approx(sigma * clip / 8)
    codec = GaussianNoise(std=std, seed=None)
    zeros = {"w": torch.zeros(devices, 4_000)}
    states = {
        k: torch.stack([codec.init_state({})[k] for _ in range(devices)]) for k in ("key", "round")
    }
    wire, _ = vmap(codec.encode)(zeros, states)
    assert wire["w"].sum(0).std().item() == pytest.approx(sigma * clip, rel=0.05)


def test_cloud_noise_is_reproducible_from_its_key():
    template = {"w": torch.zeros(3, 4), "ids": torch.arange(2)}
    a = gaussian_noise(template, 0.5, torch.tensor(9))
    assert set(a) == {"w"}
    assert torch.equal(a["w"], gaussian_noise(template, 0.5, torch.tensor(9))["w"])
    assert not torch.equal(a["w"], gaussian_noise(template, 0.5, torch.tensor(10))["w"])


@pytest.mark.parametrize(
    "codec",
    [
        GaussianNoise(0.1),
        GaussianNoise(0.1, seed=None),
        Chain([ClipNorm(1.0), GaussianNoise(0.1), Int8()]),
    ],
    ids=repr,
)
def test_noise_conforms_and_chains_with_clipping_and_quantisation(codec):
    check_codec(codec, TEMPLATE)


@pytest.mark.parametrize("bad", [-0.1, math.inf, math.nan])
def test_a_bad_std_is_refused(bad):
    with pytest.raises(ValueError, match="std"):
        GaussianNoise(bad)
