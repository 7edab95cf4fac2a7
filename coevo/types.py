"""Frozen tensor containers that cross every boundary: Payload, CloudState, DeviceState, Metrics."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

Metrics = dict[str, torch.Tensor]
"""Scalars (0-d tensors) a ``local`` call reports, e.g. ``{"loss": tensor(0.41)}``."""

Scalar = str | int | float | bool


@dataclass(frozen=True)
class Payload:
    """What crosses the wire between a device and the cloud.

    ``tensors`` is the content; ``metrics`` are numbers reported alongside it; ``config`` carries
    small settings (round number, learning rate). ``to_bytes`` is the exact wire format
    (safetensors, with metrics and config as JSON in its header), so ``num_bytes`` is what a
    transfer really costs.
    """

    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    config: Mapping[str, Scalar] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.tensors.items()}
        return save_safetensors(tensors, metadata=self._metadata())

    def _metadata(self) -> dict[str, str]:
        return {"metrics": json.dumps(dict(self.metrics)), "config": json.dumps(dict(self.config))}

    @classmethod
    def from_bytes(cls, data: bytes) -> Payload:
        tensors = load_safetensors(data)
        # safetensors layout: 8-byte little-endian header length, then the JSON header.
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        metadata = header.get("__metadata__", {})
        return cls(
            tensors=tensors,
            metrics=json.loads(metadata.get("metrics", "{}")),
            config=json.loads(metadata.get("config", "{}")),
        )

    @property
    def num_bytes(self) -> int:
        """``len(self.to_bytes())``, without encoding the tensors' values (they never change it)."""
        layout = tuple((name, t.dtype, tuple(t.shape)) for name, t in self.tensors.items())
        metadata = self._metadata()
        return _encoded_length(layout, metadata["metrics"], metadata["config"])


@functools.lru_cache(maxsize=1024)
def _encoded_length(
    layout: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...], metrics: str, config: str
) -> int:
    """Length of the safetensors encoding of tensors with ``layout`` (name, dtype, shape).

    The encoding is a header (names, dtypes, shapes, offsets, metadata) and the raw values, so
    its length depends on the layout alone: zeros of the same layout encode to the same length.
    """
    zeros = {name: torch.zeros(shape, dtype=dtype) for name, dtype, shape in layout}
    return len(save_safetensors(zeros, metadata={"metrics": metrics, "config": config}))


@dataclass(frozen=True)
class TensorState:
    """A frozen bag of named tensors with ``replace``; the base of CloudState and DeviceState."""

    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def replace(self, **changes: Any) -> Any:
        return replace(self, **changes)

    def with_tensors(self, **tensors: torch.Tensor) -> Any:
        return replace(self, tensors={**self.tensors, **tensors})

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def to_bytes(self) -> bytes:
        return save_safetensors({k: v.detach().contiguous().cpu() for k, v in self.tensors.items()})

    @classmethod
    def from_bytes(cls, data: bytes) -> Any:
        return cls(tensors=load_safetensors(data))


@dataclass(frozen=True)
class CloudState(TensorState):
    """Everything the cloud keeps between rounds (global weights, optimiser moments)."""


@dataclass(frozen=True)
class DeviceState(TensorState):
    """One device's private state, or a cohort's stacked ``[num_devices, ...]`` state."""
