"""Every codec's halves are pure: no mutation, deterministic, vmappable over a cohort."""

import pytest
import torch
from torch.func import vmap

from coevo.codecs import Chain, Float16, Int8, TopK, encoded_bytes
from coevo.types import DeviceState, Payload

CODECS = [
    Float16(),
    Int8(),
    Int8(per_channel=True),
    TopK(0.3),
    TopK(0.3, error_feedback=False),
    Chain([TopK(0.1), Int8()]),
    Chain([TopK(0.5), Float16(), Int8(per_channel=True)]),
]
NUM_DEVICES = 3


def device_update(device):
    generator = torch.Generator().manual_seed(device)
    return {
        "w": torch.randn(4, 5, generator=generator),
        "b": torch.randn(5, generator=generator),
        "s": torch.randn((), generator=generator),
        "ids": torch.arange(3) + device,
    }


def warm_state(codec, device):
    """A state after one round, so that error-feedback residuals are not all zeros."""
    update = device_update(device + 100)
    _, state = codec.encode(update, codec.init_state(update))
    return state


def clone(tensors):
    return {name: tensor.clone() for name, tensor in tensors.items()}


def assert_same(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert torch.equal(actual[name], expected[name]), name


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_inputs_are_not_mutated_and_outputs_are_deterministic(codec):
    update, state = device_update(0), warm_state(codec, 0)
    update_before, state_before = clone(update), clone(state)
    wire, new_state = codec.encode(update, state)
    assert_same(update, update_before)
    assert_same(state, state_before)

    wire_again, new_state_again = codec.encode(update, state)
    assert_same(wire_again, wire)
    assert_same(new_state_again, new_state)

    wire_before = clone(wire)
    decoded = codec.decode(wire, update)
    assert_same(wire, wire_before)
    assert_same(codec.decode(wire, update), decoded)


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_vmapped_encode_over_devices_equals_a_loop(codec):
    updates = [device_update(device) for device in range(NUM_DEVICES)]
    states = [warm_state(codec, device) for device in range(NUM_DEVICES)]
    looped = [codec.encode(update, state) for update, state in zip(updates, states, strict=True)]

    stacked_updates = {name: torch.stack([u[name] for u in updates]) for name in updates[0]}
    stacked_states = {name: torch.stack([s[name] for s in states]) for name in states[0]}
    wires, new_states = vmap(codec.encode)(stacked_updates, stacked_states)

    for device, (wire, new_state) in enumerate(looped):
        assert_same({name: tensor[device] for name, tensor in wires.items()}, wire)
        assert_same({name: tensor[device] for name, tensor in new_states.items()}, new_state)

    template = updates[0]
    decoded = vmap(lambda wire: codec.decode(wire, template))(wires)
    for device, (wire, _) in enumerate(looped):
        expected = codec.decode(wire, template)
        assert_same({name: tensor[device] for name, tensor in decoded.items()}, expected)


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_bytes_are_the_serialised_payload_and_state_survives_safetensors(codec):
    update = device_update(0)
    wire, state = codec.encode(update, warm_state(codec, 0))
    assert encoded_bytes(wire) == len(Payload(wire).to_bytes())
    assert Payload.from_bytes(Payload(wire).to_bytes()).tensors.keys() == wire.keys()
    restored = DeviceState.from_bytes(DeviceState(state).to_bytes()).tensors
    assert_same(dict(restored), state)
    # A codec must give the same result from a state that crossed the wire.
    assert_same(codec.encode(update, restored)[0], codec.encode(update, state)[0])
