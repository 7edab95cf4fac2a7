"""The Service's binary wire format: safetensors bodies with JSON metadata, and their checks.

A model download is the downlink payload after the downlink codec: the codec's wire tensors,
plus metadata naming the template (names, shapes, dtypes) the device decodes them against. An
update upload is the uplink after the uplink codec, with ``info`` metadata carrying
``num_examples`` (the merge weight) and optional ``metrics``. ``parse_update`` checks an upload
byte by byte before any tensor is built, so a hostile body is refused with a message that
names the field and the limit instead of reaching ``safetensors`` or the strategy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from coevo.codecs import Codec
from coevo.types import Payload

MAX_HEADER_BYTES = 1 << 20
"""Largest safetensors JSON header accepted (a header is names, shapes and offsets only)."""

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ITEM_BYTES = {
    name: torch.empty((), dtype=dtype).element_size() for dtype, name in DTYPE_NAMES.items()
}
_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class WireError(ValueError):
    """A body that breaks the wire format; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TensorSpec:
    """Name-free description of one tensor: its shape and safetensors dtype name."""

    shape: tuple[int, ...]
    dtype: str

    def meta(self) -> torch.Tensor:
        """A data-free tensor with this shape and dtype (codecs' templates read only those)."""
        return torch.empty(self.shape, dtype=_DTYPES[self.dtype], device="meta")


def specs_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    return {k: TensorSpec(tuple(v.shape), DTYPE_NAMES[v.dtype]) for k, v in tensors.items()}


def wire_specs(codec: Codec | None, template: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
    """The tensors ``codec`` sends for a payload shaped like ``template`` (run on meta tensors)."""
    metas = {k: spec.meta() for k, spec in template.items()}
    if codec is None or not metas:
        return dict(template)
    wire, _ = codec.encode(metas, codec.init_state(metas))
    return specs_of(wire)


def template_json(template: Mapping[str, TensorSpec]) -> str:
    return json.dumps({k: [list(s.shape), s.dtype] for k, s in template.items()})


def template_from_json(text: str) -> dict[str, TensorSpec]:
    raw = json.loads(text)
    return {
        k: TensorSpec(tuple(int(n) for n in shape), str(dtype)) for k, (shape, dtype) in raw.items()
    }


def encode_payload(
    payload: Payload,
    codec: Codec | None,
    state: Mapping[str, torch.Tensor] | None = None,
    **info: Any,
) -> tuple[bytes, dict[str, torch.Tensor]]:
    """Serialise ``payload`` through ``codec``: ``(body, the codec's new state)``.

    ``state`` is the sender's codec state (a fresh one when ``None``); ``info`` goes into the
    ``info`` metadata as JSON (model version, round, ``num_examples``), apart from the
    payload's own ``config`` so that the strategy sees that unchanged.
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in payload.tensors.items()}
    new_state: dict[str, torch.Tensor] = {}
    wire = tensors
    if codec is not None and tensors:
        own = codec.init_state(tensors) if state is None else state
        wire, new_state = codec.encode(tensors, own)
    metadata = {
        "metrics": json.dumps({k: float(v) for k, v in payload.metrics.items()}),
        "config": json.dumps(dict(payload.config)),
        "info": json.dumps(info),
        "template": template_json(specs_of(tensors)),
    }
    body = save_safetensors({k: v.contiguous() for k, v in wire.items()}, metadata=metadata)
    return body, new_state


def decode_payload(body: bytes, codec: Codec | None) -> tuple[Payload, dict[str, Any]]:
    """``(payload, info)`` of a body, decoded against the template in its own metadata."""
    wire = load_safetensors(body)
    metadata = _header(body).get("__metadata__", {})
    template = template_from_json(metadata.get("template", "{}"))
    tensors = dict(wire)
    if codec is not None and template:
        tensors = codec.decode(wire, {k: s.meta() for k, s in template.items()})
    payload = Payload(
        tensors=tensors,
        metrics=json.loads(metadata.get("metrics", "{}")),
        config=json.loads(metadata.get("config", "{}")),
    )
    return payload, json.loads(metadata.get("info", "{}"))


def _header(body: bytes) -> dict[str, Any]:
    length = int.from_bytes(body[:8], "little")
    header = json.loads(body[8 : 8 + length])
    return header if isinstance(header, dict) else {}


@dataclass(frozen=True)
class Upload:
    """A checked upload: its wire tensors, merge weight and reported metrics."""

    wire: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float]


def parse_update(body: bytes, expected: Mapping[str, TensorSpec], *, max_examples: int) -> Upload:
    """Check an upload against the wire tensors ``expected``; raises ``WireError`` naming the
    first problem (truncation, header, names, dtypes, shapes, non-finite values, metadata)."""
    entries, metadata, data_bytes = _checked_header(body)
    missing = sorted(set(expected) - set(entries))
    unexpected = sorted(set(entries) - set(expected))
    if missing or unexpected:
        raise WireError(
            f"tensors: missing {missing or 'none'}, unexpected {unexpected or 'none'}; "
            f"expected exactly {sorted(expected)}"
        )
    for name, spec in expected.items():
        entry = entries[name]
        if entry["dtype"] != spec.dtype:
            raise WireError(f"tensor {name!r}: dtype {entry['dtype']}, expected {spec.dtype}")
        if tuple(entry["shape"]) != spec.shape:
            raise WireError(f"tensor {name!r}: shape {entry['shape']}, expected {list(spec.shape)}")
        end = entry["data_offsets"][1]
        if end > data_bytes:
            raise WireError(
                f"body: truncated: tensor {name!r} ends at byte {end} of the data section, "
                f"which has {data_bytes} bytes"
            )
    try:
        wire = load_safetensors(body)
    except Exception as error:
        raise WireError(f"body: malformed safetensors: {error}") from None
    for name, tensor in wire.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WireError(f"tensor {name!r}: contains NaN or Inf values")
    info = _json_object(metadata, "info")
    metrics = _json_object(metadata, "metrics")
    num_examples = info.get("num_examples")
    if type(num_examples) is not int or not 0 <= num_examples <= max_examples:
        raise WireError(
            f"metadata.info.num_examples: must be an integer in [0, {max_examples}], "
            f"got {num_examples!r}"
        )
    for key, value in metrics.items():
        if type(value) not in (int, float) or not math.isfinite(value):
            raise WireError(f"metadata.metrics.{key}: must be a finite number, got {value!r}")
    return Upload(wire=wire, num_examples=num_examples, metrics=dict(metrics))


def _json_object(metadata: Mapping[str, str], key: str) -> dict[str, Any]:
    if key not in metadata:
        return {}
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError as error:
        raise WireError(f"metadata.{key}: malformed JSON ({error})") from None
    if not isinstance(value, dict):
        raise WireError(f"metadata.{key}: must be a JSON object, got {type(value).__name__}")
    return value


def _checked_header(body: bytes) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """``(tensor entries, metadata, data section bytes)`` of a safetensors body, validated."""
    if len(body) < 8:
        raise WireError(
            f"body: {len(body)} bytes; a safetensors body starts with an 8-byte header length"
        )
    length = int.from_bytes(body[:8], "little")
    if length > MAX_HEADER_BYTES:
        raise WireError(
            f"body: malformed safetensors header: declared length {length} bytes exceeds the "
            f"limit of {MAX_HEADER_BYTES} bytes"
        )
    if length > len(body) - 8:
        raise WireError(
            f"body: truncated: the safetensors header declares {length} bytes, "
            f"only {len(body) - 8} follow"
        )
    try:
        header = json.loads(body[8 : 8 + length])
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WireError(f"body: malformed safetensors header: not JSON ({error})") from None
    if not isinstance(header, dict):
        raise WireError("body: malformed safetensors header: must be a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise WireError(
            "body: malformed safetensors header: __metadata__ must map strings to strings"
        )
    for name, entry in header.items():
        _check_entry(name, entry)
    return header, metadata, len(body) - 8 - length


def _check_entry(name: str, entry: Any) -> None:
    problem = f"body: malformed safetensors header: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise WireError(f"{problem} needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ITEM_BYTES:
        raise WireError(f"{problem}: unknown dtype {dtype!r}; known: {sorted(_ITEM_BYTES)}")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise WireError(f"{problem}: shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(n) is int and n >= 0 for n in offsets)
        or offsets[1] < offsets[0]
    ):
        raise WireError(f"{problem}: data_offsets must be [begin, end] with 0 <= begin <= end")
    size = math.prod(shape) * _ITEM_BYTES[dtype]
    if offsets[1] - offsets[0] != size:
        raise WireError(
            f"{problem}: data_offsets span {offsets[1] - offsets[0]} bytes, its dtype and "
            f"shape need {size}"
        )
