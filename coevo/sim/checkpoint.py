"""Checkpoints of a simulation: everything a resumed run needs to continue bit for bit.

One safetensors file per run folder, replaced atomically after every round (written to a
temporary file, then ``os.replace``), so a crash leaves either the previous or the new round.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from coevo.types import CloudState, DeviceState

FILE = "simulation.safetensors"
_GROUPS = ("cloud", "devices", "codec")


@dataclass(frozen=True)
class Checkpoint:
    cloud: CloudState
    devices: DeviceState
    codec_state: dict[str, torch.Tensor]
    bytes_up: torch.Tensor
    bytes_down: torch.Tensor
    round: int
    clock_s: float
    rng_state: torch.Tensor


def save_checkpoint(folder: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` into ``folder`` atomically; returns the file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"cloud/{k}": v for k, v in checkpoint.cloud.tensors.items()}
    tensors |= {f"devices/{k}": v for k, v in checkpoint.devices.tensors.items()}
    tensors |= {f"codec/{k}": v for k, v in checkpoint.codec_state.items()}
    tensors |= {
        "bytes_up": checkpoint.bytes_up,
        "bytes_down": checkpoint.bytes_down,
        "rng_state": checkpoint.rng_state,
    }
    metadata = {"round": str(checkpoint.round), "clock_s": json.dumps(checkpoint.clock_s)}
    path = folder / FILE
    temporary = folder / (FILE + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, temporary, metadata=metadata)
    os.replace(temporary, path)
    return path


def load_checkpoint(folder: str | Path, *, default: Checkpoint) -> Checkpoint:
    """The checkpoint in ``folder``, or ``default`` when there is none yet."""
    path = Path(folder) / FILE
    if not path.exists():
        return default
    tensors = load_file(path)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    groups: dict[str, dict[str, torch.Tensor]] = {group: {} for group in _GROUPS}
    for name, tensor in tensors.items():
        group, _, key = name.partition("/")
        if group in groups and key:
            groups[group][key] = tensor
    return Checkpoint(
        cloud=CloudState(groups["cloud"]),
        devices=DeviceState(groups["devices"]),
        codec_state=groups["codec"],
        bytes_up=tensors["bytes_up"],
        bytes_down=tensors["bytes_down"],
        round=int(metadata["round"]),
        clock_s=float(json.loads(metadata["clock_s"])),
        rng_state=tensors["rng_state"],
    )
