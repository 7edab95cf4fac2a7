"""What a run hands the report: one StrategyResult per (strategy, seed) and one RunInfo per run."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

GROUP_NAMES = ("tail", "mid", "head")
"""Activity-group names, indexed by the codes in ``StrategyResult.group`` (PROTOCOL item 8)."""


@dataclass(frozen=True)
class StrategyResult:
    """The evaluation of one strategy trained with one seed.

    Attributes:
        strategy: registry name, e.g. ``"finetune"``.
        seed: the seed this run used.
        metrics: scalar metrics, e.g. ``"hr@10"``, ``"ndcg@10/tail"``, ``"gauc"``,
            ``"full_ndcg@10"``, ``"val_hr@10"``.
        per_device: per-device metric arrays ``[num_devices]`` keyed like ``metrics``.
        group: int ``[num_devices]`` activity group: 0 tail, 1 mid, 2 head.
        cost: cost numbers, e.g. ``"bytes_up_per_device"``, ``"device_params"``,
            ``"train_seconds"``.
        note: shown next to the strategy in tables, e.g. ``"privacy-free upper bound"``.

    Raises:
        ValueError: when ``group`` or a ``per_device`` array is not one-dimensional, their lengths
            differ, or ``group`` holds a code outside ``0..2``.
    """

    strategy: str
    seed: int
    metrics: Mapping[str, float]
    per_device: Mapping[str, np.ndarray]
    group: np.ndarray
    cost: Mapping[str, float] = field(default_factory=dict)
    note: str = ""

    def __post_init__(self) -> None:
        where = f"StrategyResult({self.strategy!r}, seed={self.seed})"
        group = np.asarray(self.group)
        if group.ndim != 1:
            raise ValueError(f"{where}: group must be 1-D [num_devices], got shape {group.shape}")
        if group.size and (group.min() < 0 or group.max() >= len(GROUP_NAMES)):
            raise ValueError(f"{where}: group codes must lie in 0..{len(GROUP_NAMES) - 1}")
        for name, values in self.per_device.items():
            shape = np.shape(values)
            if shape != group.shape:
                raise ValueError(
                    f"{where}: per_device[{name!r}] has shape {shape}, "
                    f"expected {group.shape} like group"
                )

    @property
    def num_devices(self) -> int:
        return len(self.group)


@dataclass(frozen=True)
class RunInfo:
    """Facts about a run that the report states once, before any strategy trains.

    Attributes:
        run_dir: the folder the run writes into.
        config: the resolved config as plain data; saved as ``config.yaml``.
        dataset: facts about the data (users, items, interactions, per-device size quantiles,
            protocol, seed list).
        models: per model name, its ``"params"`` and ``"flops_per_prediction"``.
    """

    run_dir: Path
    config: Mapping[str, Any]
    dataset: Mapping[str, Any] = field(default_factory=dict)
    models: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


def to_plain(value: Any) -> Any:
    """Turns ``value`` into JSON/YAML-safe Python data.

    Numpy and torch scalars become Python numbers (``float`` for floating types, ``int`` for
    integer ones, so a round counter stays a whole number); arrays and tensors become nested lists;
    mappings become ``dict`` with string keys; tuples and sets become lists; paths become strings.

    Raises:
        TypeError: for anything else, so that a config never silently saves as an opaque string.
    """
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(key): to_plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    # numpy scalars, numpy arrays and torch tensors all expose tolist(); duck typing keeps torch
    # out of the report's imports.
    if hasattr(value, "tolist"):
        return to_plain(value.tolist())
    raise TypeError(
        f"cannot save a value of type {type(value).__name__} in a run record: {value!r}"
    )
