import pytest
import torch

from coevo.codecs import Chain, Float16, Int8, TopK, encoded_bytes


def thousand_floats():
    generator = torch.Generator().manual_seed(0)
    return {"w": torch.randn(1000, generator=generator)}


def test_topk_then_int8_equals_topk_alone_within_the_int8_bound():
    update = thousand_floats()
    topk, int8 = TopK(0.1), Int8()
    chain = Chain([topk, int8])

    chain_wire, _ = chain.encode(update, chain.init_state(update))
    chain_decoded = chain.decode(chain_wire, update)["w"]
    topk_wire, _ = topk.encode(update, topk.init_state(update))
    topk_decoded = topk.decode(topk_wire, update)["w"]

    # The chain only rounds the values top-k kept, each by at most int8's bound for them.
    value_bound = int8.bound({"values": topk_wire["w::values"]})["values"]
    value_bound_dense = torch.zeros(1000).scatter(0, topk_wire["w::indices"].long(), value_bound)
    assert bool(((chain_decoded - topk_decoded).abs() <= value_bound_dense).all())
    assert torch.equal(chain_decoded != 0, topk_decoded != 0)


def test_chain_sends_fewer_bytes_than_either_codec_alone():
    update = thousand_floats()
    chain = Chain([TopK(0.1), Int8()])
    chain_bytes = encoded_bytes(chain.encode(update, chain.init_state(update))[0])
    for codec in (TopK(0.1), Int8()):
        assert chain_bytes < encoded_bytes(codec.encode(update, codec.init_state(update))[0])


def test_wire_keeps_indices_as_int32_and_quantises_only_values():
    update = {"w": torch.tensor([0.1, -3.0, 2.0, 0.5])}
    chain = Chain([TopK(0.5), Int8()])
    wire, _ = chain.encode(update, chain.init_state(update))
    assert {name: tensor.dtype for name, tensor in wire.items()} == {
        "w::indices": torch.int32,
        "w::values::q": torch.int8,
        "w::values::scale": torch.float32,
    }
    assert wire["w::indices"].tolist() == [1, 2]


def test_states_are_namespaced_by_position():
    update = {"w": torch.tensor([0.1, -3.0, 2.0, 0.5]), "b": torch.tensor([1.0, 2.0])}
    chain = Chain([TopK(0.5), Int8(), TopK(0.5, error_feedback=True)])
    state = chain.init_state(update)
    # The third codec sees the int8 scales as floating tensors of their own.
    assert sorted(state) == ["0/b", "0/w", "2/b::values::scale", "2/w::values::scale"]
    _, new_state = chain.encode(update, state)
    assert sorted(new_state) == sorted(state)
    assert torch.equal(new_state["0/w"], torch.tensor([0.1, 0.0, 0.0, 0.5]))


def test_chain_error_feedback_carries_residual_across_rounds():
    chain = Chain([TopK(0.5), Float16()])
    first = {"w": torch.tensor([0.1, -3.0, 2.0, 0.5])}
    second = {"w": torch.tensor([0.0, 0.0, 0.25, 0.75])}
    state = chain.init_state(first)
    _, state = chain.encode(first, state)
    wire, state = chain.encode(second, state)
    assert chain.decode(wire, second)["w"].tolist() == [0.0, 0.0, 0.25, 1.25]


def test_decode_rebuilds_names_shapes_and_dtypes_of_the_template():
    update = {
        "matrix": torch.randn(3, 4, dtype=torch.float64),
        "scalar": torch.tensor(2.0),
        "ids": torch.tensor([7, 8, 9]),
    }
    chain = Chain([TopK(0.5), Float16(), Int8(per_channel=True)])
    wire, _ = chain.encode(update, chain.init_state(update))
    decoded = chain.decode(wire, update)
    assert {name: (t.shape, t.dtype) for name, t in decoded.items()} == {
        name: (t.shape, t.dtype) for name, t in update.items()
    }
    assert torch.equal(decoded["ids"], update["ids"])
    assert chain.bound(update) is None


def test_empty_chain_is_refused():
    with pytest.raises(ValueError, match=r"Chain\.codecs"):
        Chain([])


def test_chain_copies_its_codec_list():
    codecs = [TopK(0.5)]
    chain = Chain(codecs)
    codecs.append(Int8())
    assert chain.codecs == (TopK(0.5),)
