"""Payloads through codecs on the wire, for a whole cohort at once, with exact byte counts."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.func import vmap

from coevo.codecs import Codec, encoded_bytes
from coevo.types import Payload

Stacked = dict[str, torch.Tensor]


def wire_bytes(payload: Payload) -> int:
    """Exact bytes of a payload on the wire; an empty payload is not sent at all."""
    if not payload.tensors and not payload.metrics:
        return 0
    return payload.num_bytes


def send_down(codec: Codec | None, payload: Payload) -> tuple[Payload, int]:
    """The payload devices receive (decoded) and its encoded length in bytes."""
    if codec is None or not payload.tensors:
        return payload, wire_bytes(payload)
    wire, _ = codec.encode(payload.tensors, codec.init_state(payload.tensors))
    decoded = codec.decode(wire, payload.tensors)
    return Payload(decoded, payload.metrics, payload.config), encoded_bytes(wire)


def init_codec_state(
    codec: Codec, template: Mapping[str, torch.Tensor], num_devices: int
) -> Stacked:
    """Every device's initial codec state, stacked ``[num_devices, ...]``."""
    one = codec.init_state(template)
    return {k: v.expand(num_devices, *v.shape).clone() for k, v in one.items()}


def send_up(codec: Codec | None, uplinks: Stacked, state: Stacked) -> tuple[Stacked, Stacked, int]:
    """Encode every device's uplink (vectorised), decode at the cloud.

    Returns the decoded uplinks, the devices' new codec state, and the encoded bytes of one
    device's uplink (codecs here have static shapes, so every device sends the same length).
    """
    if not uplinks:
        return uplinks, state, 0
    if codec is None:
        first = {k: v[0] for k, v in uplinks.items()}
        return uplinks, state, wire_bytes(Payload(first))
    template = {k: v[0] for k, v in uplinks.items()}
    wire, new_state = vmap(codec.encode)(uplinks, state)
    decoded = vmap(lambda w: codec.decode(w, template))(wire)
    return decoded, new_state, encoded_bytes({k: v[0] for k, v in wire.items()})
