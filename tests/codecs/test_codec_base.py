import doctest

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import coevo.codecs
from coevo.codecs import SEP, Codec, encoded_bytes
from coevo.codecs import base as codec_base
from coevo.codecs import chain as codec_chain
from coevo.types import Payload


@pytest.mark.parametrize("module", [codec_base, codec_chain], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    results = doctest.testmod(module)
    assert results.attempted > 0
    assert results.failed == 0


def test_all_is_sorted_and_importable():
    exported = coevo.codecs.__all__
    assert len(set(exported)) == len(exported)
    assert list(exported) == sorted(
        exported, key=lambda s: (not s.isupper(), not s[:1].isupper(), s)
    )
    for symbol in exported:
        assert hasattr(coevo.codecs, symbol), symbol


def test_encoded_bytes_is_the_serialised_payload_length():
    wire = {
        "w::q": torch.tensor([127, -64, 32], dtype=torch.int8),
        "w::scale": torch.tensor(1 / 127),
    }
    assert encoded_bytes(wire) == len(Payload(wire).to_bytes())
    # The 3 + 4 data bytes are dwarfed by the header, which is why bytes are never estimated.
    assert encoded_bytes(wire) > 3 + 4
    assert encoded_bytes({}) == len(Payload().to_bytes())


def test_a_codec_without_both_halves_cannot_be_built():
    class EncodeOnly(Codec):
        name = "encode-only"

        def encode(self, tensors, state):
            return dict(tensors), {}

    with pytest.raises(TypeError, match="decode"):
        EncodeOnly()


def test_defaults_are_stateless_and_unbounded():
    class Identity(Codec):
        name = "identity"

        def encode(self, tensors, state):
            return dict(tensors), {}

        def decode(self, wire, template):
            return {name: wire[name] for name in template}

    codec = Identity()
    update = {"w": torch.ones(2)}
    assert codec.init_state(update) == {}
    assert codec.bound(update) is None
    assert SEP == "::"


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 5), max_size=3), min_size=0, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.int8, torch.int64, torch.bool]),
    loss=st.floats(allow_nan=False, allow_infinity=False),
    round=st.integers(0, 10**9),
)
def test_num_bytes_equals_the_encoded_length_for_any_layout(shapes, dtype, loss, round):
    """The byte count comes from the layout alone; it must match encoding the values."""
    tensors = {f"t{i}": torch.ones(shape).to(dtype) for i, shape in enumerate(shapes)}
    payload = Payload(tensors, metrics={"loss": loss}, config={"round": round})
    assert payload.num_bytes == len(payload.to_bytes())
    doubled = Payload({k: torch.cat([v, v]) if v.dim() else v for k, v in tensors.items()})
    assert doubled.num_bytes == len(doubled.to_bytes())
