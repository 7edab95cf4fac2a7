import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from coevo.codecs import Float16, Int8, encoded_bytes

QUANTIZERS = [Float16(), Int8(), Int8(per_channel=True)]


@st.composite
def float_tensors(draw):
    """Small float32 tensors: plain, all zeros, or with one huge outlier."""
    shape = tuple(draw(st.lists(st.integers(1, 4), max_size=3)))
    values = draw(arrays(np.float32, shape, elements=st.floats(-1e3, 1e3, width=32)))
    kind = draw(st.sampled_from(["plain", "zeros", "outlier"]))
    if kind == "zeros":
        values = np.zeros(shape, np.float32)
    elif kind == "outlier":
        position = draw(st.integers(0, values.size - 1))
        magnitude = draw(st.floats(2.0**14, 2.0**100, width=32))
        values.reshape(-1)[position] = magnitude * draw(st.sampled_from([-1.0, 1.0]))
    return torch.from_numpy(values)


def round_trip(codec, tensors):
    wire, _ = codec.encode(tensors, codec.init_state(tensors))
    return codec.decode(wire, tensors)


@pytest.mark.parametrize("codec", QUANTIZERS, ids=repr)
@settings(deadline=None, max_examples=60)
@given(tensor=float_tensors())
def test_round_trip_error_within_bound(codec, tensor):
    decoded = round_trip(codec, {"w": tensor})["w"]
    bound = codec.bound({"w": tensor})["w"]
    assert decoded.shape == tensor.shape and decoded.dtype == tensor.dtype
    assert bound.shape == tensor.shape
    # float64 makes the measured error exact, so only the codec's own rounding is judged.
    error = (decoded.double() - tensor.double()).abs()
    assert bool((error <= bound.double()).all()), (error - bound.double()).max()


@settings(deadline=None)
@given(values=st.lists(st.floats(width=16, allow_nan=False, allow_infinity=False), min_size=1))
def test_fp16_is_exact_for_values_float16_represents(values):
    tensor = torch.tensor(values, dtype=torch.float32)
    assert torch.equal(round_trip(Float16(), {"w": tensor})["w"], tensor)


def test_fp16_saturates_instead_of_overflowing():
    decoded = round_trip(Float16(), {"w": torch.tensor([1e6, -1e6, 1.0])})["w"]
    assert decoded.tolist() == [65504.0, -65504.0, 1.0]


def test_int8_hand_case():
    tensor = torch.tensor([1.0, -0.5, 0.25])
    wire, state = Int8().encode({"w": tensor}, {})
    assert state == {}
    assert wire["w::scale"].item() == pytest.approx(1 / 127)
    # -0.5·127 = -63.5 rounds half to even.
    assert wire["w::q"].tolist() == [127, -64, 32]
    assert wire["w::q"].dtype == torch.int8 and wire["w::scale"].dtype == torch.float32
    decoded = Int8().decode(wire, {"w": tensor})["w"]
    assert decoded.tolist() == pytest.approx([1.0, -64 / 127, 32 / 127])
    assert bool(((decoded - tensor).abs() <= 0.5 / 127 + 1e-7).all())


def test_int8_per_channel_beats_per_tensor_on_uneven_channels():
    tensor = torch.tensor([[127.0, -127.0, 0.0], [0.3, -0.2, 0.1]])
    per_tensor = round_trip(Int8(), {"w": tensor})["w"]
    per_channel = round_trip(Int8(per_channel=True), {"w": tensor})["w"]
    per_tensor_error = (per_tensor - tensor).abs().max().item()
    per_channel_error = (per_channel - tensor).abs().max().item()
    # Per tensor, scale 1 rounds the whole second channel to zero.
    assert per_tensor_error == pytest.approx(0.3)
    assert per_channel_error < 0.3 / 254 + 1e-7
    wire, _ = Int8(per_channel=True).encode({"w": tensor}, {})
    assert wire["w::scale"].tolist() == pytest.approx([1.0, 0.3 / 127])


@pytest.mark.parametrize("shape", [(), (3,)])
def test_int8_per_channel_falls_back_to_one_scale_below_two_dims(shape):
    wire, _ = Int8(per_channel=True).encode({"w": torch.ones(shape)}, {})
    assert wire["w::scale"].shape == ()


def test_int8_zero_tensor_decodes_to_zeros_without_nan():
    tensor = torch.zeros(2, 3)
    for codec in (Int8(), Int8(per_channel=True)):
        wire, _ = codec.encode({"w": tensor}, {})
        assert not bool(wire["w::scale"].isnan().any())
        assert torch.equal(codec.decode(wire, {"w": tensor})["w"], tensor)


@pytest.mark.parametrize("codec", QUANTIZERS, ids=repr)
def test_integer_tensors_pass_through_untouched(codec):
    tensors = {"w": torch.tensor([0.5, -1.0]), "count": torch.tensor([3, 70000], dtype=torch.int64)}
    wire, _ = codec.encode(tensors, {})
    assert wire["count"] is tensors["count"]
    assert torch.equal(codec.decode(wire, tensors)["count"], tensors["count"])
    assert torch.equal(codec.bound(tensors)["count"], torch.zeros(2))


@pytest.mark.parametrize("codec", QUANTIZERS, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_float_dtypes_keep_their_dtype_and_bound(codec, dtype):
    tensor = torch.tensor([[1.5, -0.01, 3e-6], [250.0, 7.0, -1e5]], dtype=dtype)
    decoded = round_trip(codec, {"w": tensor})["w"]
    assert decoded.dtype == dtype
    error = (decoded.double() - tensor.double()).abs()
    assert bool((error <= codec.bound({"w": tensor})["w"].double()).all())


def test_wire_name_collision_is_refused():
    tensors = {"w": torch.ones(2), "w::q": torch.ones(2, dtype=torch.int8)}
    with pytest.raises(ValueError, match="'w::q'"):
        Int8().encode(tensors, {})


def test_bytes_of_quantised_1000_floats():
    tensors = {"w": torch.linspace(-1.0, 1.0, 1000)}
    raw_bytes = encoded_bytes(tensors)
    int8_bytes = encoded_bytes(Int8().encode(tensors, {})[0])
    fp16_bytes = encoded_bytes(Float16().encode(tensors, {})[0])
    assert 0.25 < int8_bytes / raw_bytes < 0.3
    assert 0.45 < fp16_bytes / raw_bytes < 0.55
