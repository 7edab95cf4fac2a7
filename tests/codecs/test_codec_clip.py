"""ClipNorm: a device's whole update scaled into the L2 ball of radius C, direction kept."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coevo.codecs import Chain, ClipNorm, Int8
from coevo.codecs.clip import update_norm
from coevo.testing.conformance import check_codec

TEMPLATE = {
    "w": torch.randn(4, 5, generator=torch.Generator().manual_seed(0)),
    "b": torch.linspace(-2.0, 3.0, 5),
    "s": torch.tensor(0.75),
    "ids": torch.arange(3),
}


def norm64(tensors):
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors.values()))


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(
        st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False, width=32),
        min_size=1,
        max_size=40,
    ),
    split=st.integers(0, 40),
    max_norm=st.floats(1e-4, 1e4),
)
def test_clipped_norm_never_exceeds_the_bound(values, split, max_norm):
    flat = torch.tensor(values, dtype=torch.float32)
    update = {"a": flat[:split], "b": flat[split:].reshape(1, -1), "ids": torch.arange(2)}
    wire, _ = ClipNorm(max_norm).encode(update, {})
    assert norm64({k: v for k, v in wire.items() if k != "ids"}) <= max_norm
    assert torch.equal(wire["ids"], update["ids"])


@settings(max_examples=100, deadline=None)
@given(scale=st.floats(1e-3, 1e3), max_norm=st.floats(1e-2, 1e2))
def test_clipping_keeps_the_direction_and_leaves_small_updates_alone(scale, max_norm):
    update = {"w": TEMPLATE["w"] * scale, "b": TEMPLATE["b"] * scale}
    wire, _ = ClipNorm(max_norm).encode(update, {})
    norm = float(update_norm(update))
    if norm <= max_norm * (1 - 2**-19):
        assert all(torch.equal(wire[k], update[k]) for k in update)
    else:
        factor = wire["w"].double().norm() / update["w"].double().norm()
        assert torch.allclose(wire["b"].double(), update["b"].double() * factor, rtol=1e-5)
        assert norm64(wire) == pytest.approx(max_norm, rel=1e-5)


def test_a_hand_checked_clip():
    wire, _ = ClipNorm(1.0).encode({"w": torch.tensor([3.0]), "b": torch.tensor([0.0, 4.0])}, {})
    assert wire["w"].tolist() == pytest.approx([0.6])
    assert wire["b"].tolist() == pytest.approx([0.0, 0.8])


def test_infinite_bound_is_the_identity():
    wire, _ = ClipNorm(math.inf).encode(TEMPLATE, {})
    assert all(torch.equal(wire[k], TEMPLATE[k]) for k in TEMPLATE)


@pytest.mark.parametrize(
    "codec", [ClipNorm(0.5), ClipNorm(100.0), Chain([ClipNorm(0.5), Int8()])], ids=repr
)
def test_clip_conforms_and_chains_with_quantisation(codec):
    check_codec(codec, TEMPLATE)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan])
def test_a_non_positive_bound_is_refused(bad):
    with pytest.raises(ValueError, match="max_norm"):
        ClipNorm(bad)
