"""Stacked per-device state for stateful strategies, in memory or in memory-mapped files.

A strategy's private device state (personal layers, control variates, user embeddings) is one
tensor ``[num_devices, ...]`` per name. The simulator gathers a cohort's rows before ``local``
and scatters the new rows back after it. Given a ``directory``, each tensor is a NumPy ``.npy``
file mapped into memory, so a million-device fleet's state stays on disk and a round pages in
only the rows it touches.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from safetensors.torch import load_file, save_file

from coevo.fleet.availability import as_device_ids

# Names become file names in a memory-mapped store, so they keep to portable characters.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _check_names(names: Iterable[str]) -> None:
    names = list(names)
    if not names:
        raise ValueError("a device state store needs at least one tensor")
    for name in names:
        if not _NAME.fullmatch(name):
            raise ValueError(f"state name {name!r} must match {_NAME.pattern}")


def _numpy_dtype(name: str, dtype: torch.dtype) -> np.dtype[Any]:
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:
        raise ValueError(
            f"{name}: {dtype} has no NumPy equivalent, so it cannot be memory-mapped; "
            "use an in-memory store (directory=None)"
        ) from None


class DeviceStateStore:
    """Named tensors ``[num_devices, ...]``: gather a cohort's rows, scatter its new rows back.

    Example:
        >>> store = DeviceStateStore.zeros(1000, {"bias": torch.zeros(4)})
        >>> store.scatter(torch.tensor([3, 7]), {"bias": torch.ones(2, 4)})
        >>> store.gather(torch.tensor([7, 8]))["bias"]
        tensor([[1., 1., 1., 1.],
                [0., 0., 0., 0.]])
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Wrap stacked CPU tensors; they are kept, not copied, and the store writes into them.

        Args:
            tensors: name -> tensor ``[num_devices, ...]``, the same ``num_devices`` for all.
        """
        _check_names(tensors)
        num_devices = next(iter(tensors.values())).shape[0]
        for name, tensor in tensors.items():
            if tensor.dim() == 0 or tensor.shape[0] != num_devices:
                raise ValueError(
                    f"{name}: expected shape [{num_devices}, ...], got {list(tensor.shape)}"
                )
            if tensor.device.type != "cpu":
                raise ValueError(f"{name}: the store keeps state on the CPU, got {tensor.device}")
        self._tensors = dict(tensors)
        self._arrays: dict[str, np.memmap[Any, Any]] = {}
        self._directory: Path | None = None

    @classmethod
    def zeros(
        cls,
        num_devices: int,
        template: Mapping[str, torch.Tensor],
        *,
        directory: str | Path | None = None,
    ) -> DeviceStateStore:
        """A store of zeros shaped ``[num_devices, *row.shape]`` for each ``name: row``.

        Args:
            num_devices: fleet size.
            template: one device's tensors; only their shapes and dtypes are used.
            directory: if given, back each tensor with ``directory/<name>.npy`` instead of RAM.

        Raises:
            FileExistsError: if a state file is already there (reopen it with :meth:`open`).
        """
        if num_devices < 1:
            raise ValueError(f"num_devices must be >= 1, got {num_devices}")
        _check_names(template)
        if directory is None:
            return cls(
                {
                    name: torch.zeros((num_devices, *row.shape), dtype=row.dtype)
                    for name, row in template.items()
                }
            )
        directory = Path(directory)
        paths = {name: directory / f"{name}.npy" for name in template}
        taken = [str(path) for path in paths.values() if path.exists()]
        if taken:
            raise FileExistsError(
                f"state files already exist: {taken}; use DeviceStateStore.open({str(directory)!r})"
            )
        dtypes = {name: _numpy_dtype(name, row.dtype) for name, row in template.items()}
        directory.mkdir(parents=True, exist_ok=True)
        # A new .npy map is a sparse file: the zeros cost neither RAM nor disk until written.
        arrays = {
            name: open_memmap(
                paths[name], mode="w+", dtype=dtypes[name], shape=(num_devices, *row.shape)
            )
            for name, row in template.items()
        }
        return cls._mapped(arrays, directory)

    @classmethod
    def open(cls, directory: str | Path) -> DeviceStateStore:
        """Reopen a memory-mapped store from its ``.npy`` files, for reading and writing."""
        directory = Path(directory)
        paths = sorted(directory.glob("*.npy"))
        if not paths:
            raise FileNotFoundError(f"no .npy state files in {directory}")
        return cls._mapped({path.stem: open_memmap(path, mode="r+") for path in paths}, directory)

    @classmethod
    def load(cls, path: str | Path) -> DeviceStateStore:
        """An in-memory store from a safetensors file written by :meth:`save`."""
        return cls(load_file(str(path)))

    @classmethod
    def _mapped(cls, arrays: dict[str, np.memmap[Any, Any]], directory: Path) -> DeviceStateStore:
        store = cls({name: torch.from_numpy(array) for name, array in arrays.items()})
        store._arrays = arrays
        store._directory = directory
        return store

    def __len__(self) -> int:
        return self.num_devices

    def __repr__(self) -> str:
        return (
            f"DeviceStateStore(num_devices={self.num_devices}, names={self.names}, "
            f"directory={self._directory})"
        )

    @property
    def num_devices(self) -> int:
        return next(iter(self._tensors.values())).shape[0]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._tensors)

    @property
    def nbytes(self) -> int:
        """Bytes of state across all devices (on disk for a memory-mapped store)."""
        return sum(tensor.numel() * tensor.element_size() for tensor in self._tensors.values())

    @property
    def directory(self) -> Path | None:
        """Where the ``.npy`` files live; ``None`` for an in-memory store."""
        return self._directory

    def gather(self, devices: torch.Tensor) -> dict[str, torch.Tensor]:
        """A copy of the rows of ``devices``: each tensor ``[len(devices), ...]``."""
        index = as_device_ids(devices, self.num_devices)
        return {name: tensor[index] for name, tensor in self._tensors.items()}

    def scatter(self, devices: torch.Tensor, values: Mapping[str, torch.Tensor]) -> None:
        """Write rows of ``devices``; names left out of ``values`` and other rows are unchanged.

        Raises:
            ValueError: for a repeated device id (which write should win is undefined), or a
                name, shape or dtype that does not match the store; nothing is written then.
        """
        index = as_device_ids(devices, self.num_devices)
        ids, counts = torch.unique(index, return_counts=True)
        if bool((counts > 1).any()):
            raise ValueError(f"scatter: device ids repeat: {ids[counts > 1].tolist()[:10]}")
        for name, value in values.items():
            if name not in self._tensors:
                raise ValueError(f"scatter: unknown state {name!r}; the store holds {self.names}")
            stored = self._tensors[name]
            expected = [index.numel(), *stored.shape[1:]]
            if list(value.shape) != expected:
                raise ValueError(f"{name}: expected shape {expected}, got {list(value.shape)}")
            if value.dtype != stored.dtype:
                raise ValueError(f"{name}: expected dtype {stored.dtype}, got {value.dtype}")
        for name, value in values.items():
            self._tensors[name][index] = value.detach().to("cpu")

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The stacked tensors themselves: writes into memory-mapped ones reach their files."""
        return dict(self._tensors)

    def flush(self) -> None:
        """Make written rows durable in the ``.npy`` files; nothing to do in memory."""
        for array in self._arrays.values():
            array.flush()

    def save(self, path: str | Path) -> None:
        """Write an in-memory store to a safetensors file (read it back with :meth:`load`).

        Raises:
            ValueError: for a memory-mapped store, whose files already are its saved form:
                :meth:`flush` it and :meth:`open` its directory instead.
        """
        if self._directory is not None:
            raise ValueError(
                f"this store lives in {self._directory}; call flush() and reopen it with "
                f"DeviceStateStore.open({str(self._directory)!r}) instead of saving a copy"
            )
        save_file({name: tensor.contiguous() for name, tensor in self._tensors.items()}, str(path))
