"""A run's stacked device state on disk: memory-mapped, with an undo log for exact resumes.

For fleets whose per-device state outgrows memory (a million devices each holding a personal
layer or SCAFFOLD's control variates), the state lives in ``.npy`` files mapped into memory
(`coevo.fleet.DeviceStateStore`): a round pages in only its cohort's rows. Before a round
writes its rows, the rows it is about to overwrite go to ``undo.safetensors`` (replaced
atomically); the log is deleted once the round's checkpoint is safe. A run resumed after a
crash at any point restores those rows first, so the files always match the checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from coevo.fleet.state import DeviceStateStore
from coevo.strategies.base import Strategy
from coevo.types import CloudState, DeviceState

UNDO = "undo.safetensors"
_INIT_CHUNK = 65_536


class MappedDeviceState:
    """The device state of one run in ``directory``, written round by round.

    Args:
        strategy: its ``init_devices(cloud, n)`` gives the initial rows of any ``n`` devices.
        cloud: the initial cloud state.
        num_devices: fleet size.
        directory: folder of the ``.npy`` files (created; a fresh run replaces old files).
        resume_round: the round of the checkpoint of an interrupted run: reopen its files
            (undoing any rows written after that checkpoint) instead of starting afresh.
    """

    def __init__(
        self,
        strategy: Strategy,
        cloud: CloudState,
        num_devices: int,
        directory: str | Path,
        *,
        resume_round: int | None = None,
    ) -> None:
        self.directory = Path(directory)
        template = strategy.init_devices(cloud, 1).tensors
        self.store: DeviceStateStore | None = None
        if not template:
            return
        files = [self.directory / f"{name}.npy" for name in template]
        if resume_round is not None and all(path.exists() for path in files):
            self.store = DeviceStateStore.open(self.directory)
            self._roll_back(resume_round)
            return
        for path in [*files, self.directory / UNDO]:
            path.unlink(missing_ok=True)
        rows = {name: tensor[0] for name, tensor in template.items()}
        self.store = DeviceStateStore.zeros(num_devices, rows, directory=self.directory)
        for start in range(0, num_devices, _INIT_CHUNK):
            ids = torch.arange(start, min(start + _INIT_CHUNK, num_devices))
            self.store.scatter(ids, strategy.init_devices(cloud, len(ids)).tensors)
        self.store.flush()

    @property
    def state(self) -> DeviceState:
        """The whole fleet's state; its tensors are the mapped files."""
        return DeviceState({} if self.store is None else self.store.tensors)

    def write(
        self, round: int, devices: torch.Tensor, rows: dict[str, torch.Tensor], *, log: bool
    ) -> None:
        """Overwrite ``devices``' rows with ``rows`` for ``round``; ``log``: old rows first."""
        if self.store is None or not rows or len(devices) == 0:
            return
        if not log:
            self.store.scatter(devices, rows)
            return
        old = self.store.gather(devices)
        undo = {f"old/{name}": value.contiguous() for name, value in old.items()}
        temporary = self.directory / (UNDO + ".tmp")
        save_file({"devices": devices.contiguous(), **undo}, temporary, {"round": str(round)})
        os.replace(temporary, self.directory / UNDO)
        self.store.scatter(devices, rows)
        self.store.flush()

    def committed(self) -> None:
        """The round's checkpoint is safe: its undo log is no longer needed."""
        (self.directory / UNDO).unlink(missing_ok=True)

    def _roll_back(self, resume_round: int) -> None:
        """Undo the rows of a round that wrote its state but not its checkpoint."""
        path = self.directory / UNDO
        if not path.exists():
            return
        with safe_open(path, framework="pt") as handle:
            logged = int((handle.metadata() or {}).get("round", "-1"))
        if logged >= resume_round and self.store is not None:
            saved = load_file(path)
            old = {k.removeprefix("old/"): v for k, v in saved.items() if k.startswith("old/")}
            self.store.scatter(saved["devices"], old)
            self.store.flush()
        path.unlink()
