"""Device hardware and network: tiers, sampled fleets (:func:`sample_profiles`) and traces.

A trace (:func:`load_trace`) is a CSV file with a header and one row per device, rows in any order:

- ``device_id`` (each of 0..n-1 once) and ``tier`` (a non-empty label, any text);
- ``compute_flops_per_s`` (effective training FLOP/s) and ``memory_bytes`` (for training), > 0;
- ``uplink_bytes_per_s`` and ``downlink_bytes_per_s`` (bandwidth, bytes/s), > 0;
- ``rtt_s`` (seconds), ``energy_per_flop_j`` and ``energy_per_byte_j`` (joules), >= 0;
- optional, all three or none: ``timezone_offset_h`` (local minus UTC, -12..14),
  ``active_start_h`` and ``active_end_h`` (local hours 0..24 of the daily idle window).
- optional: ``dropout_rate`` (0..1, default 0). Any optional column gives the profiles an
  :class:`~coevo.fleet.availability.Availability` (all day where no window is given).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from coevo.fleet.availability import LIMITS, Availability, as_device_ids

_GIB = 2**30


@dataclass(frozen=True)
class Tier:
    """A class of devices, each quantity its median device's; units as named.

    ``spread`` is the sigma of the lognormal factor that varies every quantity per device (0:
    all devices of the tier identical; 0.5: the middle 68% within x0.6..x1.6 of the median).
    """

    name: str
    compute_flops_per_s: float
    memory_bytes: float
    uplink_bytes_per_s: float
    downlink_bytes_per_s: float
    rtt_s: float
    energy_per_flop_j: float
    energy_per_byte_j: float
    spread: float = 0.4

    def __post_init__(self) -> None:
        for name in (*QUANTITIES, "spread"):
            value = getattr(self, name)
            if not (value > 0 if name in _POSITIVE else value >= 0):
                raise ValueError(f"tier {self.name}: {name} must be {_limit(name)}, got {value}")


# The per-device quantities, in field order; the first four must be strictly positive.
QUANTITIES = tuple(field.name for field in fields(Tier))[1:-1]
_POSITIVE = QUANTITIES[:4]


def _limit(name: str) -> str:
    if name in _POSITIVE:
        return "> 0"
    return "in [{}, {}]".format(*LIMITS[name]) if name in LIMITS else ">= 0"


# Why these numbers, column by column:
# compute: effective backprop throughput, ~10-25% of the SoC's peak FP32 on CPU (TFLite/PyTorch).
# memory: what a background job may hold before the OS kills it, about a third of the RAM.
# links (down/up Mbit/s, RTT): 4G 20/5, 4G+ 40/10 at 60-100 ms; 5G 200/40, Wi-Fi 100/40 at 20-30 ms.
# energy per FLOP: sustained SoC power / effective throughput (2 W / 2e9 FLOP/s = 1e-9 J).
# energy per byte: radio energy at bulk rates, LTE dearer than Wi-Fi (Huang et al., MobiSys 2012).
TIERS: dict[str, Tier] = {
    # Cortex-A53-class phone on 4G, 2 W under load; the widest spread of the phones.
    "low_end_phone": Tier("low_end_phone", 2e9, 1 * _GIB, 6.25e5, 2.5e6, 0.10, 1e-9, 5e-7, 0.5),
    # Mid-range Snapdragon 6/7-class phone on 4G+, 3 W under load.
    "mid_phone": Tier("mid_phone", 6e9, 2 * _GIB, 1.25e6, 5e6, 0.06, 5e-10, 3e-7, 0.4),
    # Flagship phone (big cores) on 5G or Wi-Fi, 4 W under load.
    "flagship_phone": Tier("flagship_phone", 2e10, 4 * _GIB, 5e6, 2.5e7, 0.03, 2e-10, 1.5e-7, 0.3),
    # Embedded camera SoC on shared 2.4 GHz Wi-Fi, 1 W for training, 256 MiB spare.
    "iot_camera": Tier("iot_camera", 1e9, _GIB / 4, 1.25e6, 2.5e6, 0.05, 1e-9, 2e-7, 0.3),
    # Automotive SoC on a cellular modem while driving, 30 W; coverage varies most.
    "car": Tier("car", 5e10, 8 * _GIB, 1.25e6, 6.25e6, 0.08, 6e-10, 3e-7, 0.6),
    # Laptop CPU (4 cores, AVX2) on home broadband Wi-Fi, 25 W.
    "laptop": Tier("laptop", 1e11, 8 * _GIB, 5e6, 1.25e7, 0.02, 2.5e-10, 1e-7, 0.4),
}

# A phone-heavy fleet with a few laptops, the usual cross-device setting.
DEFAULT_MIX: dict[str, float] = dict(
    low_end_phone=0.3, mid_phone=0.4, flagship_phone=0.2, laptop=0.1
)


@dataclass(frozen=True, eq=False)
class DeviceProfiles:
    """Each device's hardware and network, float64 ``[num_devices]``; ``tier`` indexes names."""

    tier: torch.Tensor
    tier_names: tuple[str, ...]
    compute_flops_per_s: torch.Tensor
    memory_bytes: torch.Tensor
    uplink_bytes_per_s: torch.Tensor
    downlink_bytes_per_s: torch.Tensor
    rtt_s: torch.Tensor
    energy_per_flop_j: torch.Tensor
    energy_per_byte_j: torch.Tensor
    availability: Availability | None = None

    def __post_init__(self) -> None:
        shape = self.tier.shape
        if self.tier.dim() != 1 or self.tier.dtype != torch.int64:
            raise ValueError(f"tier must be 1-D int64, got {self.tier.dtype} {list(shape)}")
        for name in QUANTITIES:
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} must have shape {list(shape)} like tier")
        if self.tier.numel() and not 0 <= self.tier.min() <= self.tier.max() < len(self.tier_names):
            raise ValueError(f"tier indices must be in [0, {len(self.tier_names)})")
        if self.availability is not None and len(self.availability) != len(self):
            raise ValueError(f"availability has {len(self.availability)} devices, not {len(self)}")

    def __len__(self) -> int:
        return self.tier.shape[0]

    def tier_labels(self) -> list[str]:
        """Each device's tier name, in device order."""
        return [self.tier_names[index] for index in self.tier.tolist()]

    def select(self, devices: torch.Tensor) -> DeviceProfiles:
        """The profiles of ``devices`` only, in the order given (a cohort, renumbered 0..k-1)."""
        devices = as_device_ids(devices, len(self))
        selected = {name: getattr(self, name)[devices] for name in ("tier", *QUANTITIES)}
        availability = None if self.availability is None else self.availability.select(devices)
        return DeviceProfiles(tier_names=self.tier_names, availability=availability, **selected)

    def to_csv(self, path: str | Path) -> None:
        """Write the profiles as a trace that :func:`load_trace` reads back exactly."""
        columns = {name: getattr(self, name).tolist() for name in QUANTITIES}
        if self.availability is not None:
            columns.update({name: getattr(self.availability, name).tolist() for name in LIMITS})
        with Path(path).open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["device_id", "tier", *columns])
            # A Python float is written as its repr, the shortest text that parses back exactly.
            rows = zip(range(len(self)), self.tier_labels(), *columns.values(), strict=True)
            writer.writerows(rows)


def sample_profiles(
    num_devices: int,
    mix: Mapping[str, float] | None,
    seed: int,
    *,
    tiers: Mapping[str, Tier] = TIERS,
) -> DeviceProfiles:
    """Draw a fleet: each device's tier from ``mix``, then a lognormal factor per quantity.

    Args:
        num_devices: fleet size.
        mix: relative weight of each tier name (normalised); ``None`` means :data:`DEFAULT_MIX`.
        seed: seeds the ``torch.Generator`` behind every draw, so a seed gives one fleet.
        tiers: the tier catalogue the names in ``mix`` refer to.
    """
    if num_devices < 0:
        raise ValueError(f"num_devices must be >= 0, got {num_devices}")
    mix = DEFAULT_MIX if mix is None else mix
    unknown = sorted(set(mix) - set(tiers))
    if unknown:
        raise ValueError(f"unknown tier(s) {unknown} in mix; known tiers: {sorted(tiers)}")
    names = tuple(mix)
    weights = torch.tensor([mix[name] for name in names], dtype=torch.float64)
    if not (torch.isfinite(weights).all() and (weights >= 0).all() and weights.sum() > 0):
        raise ValueError(f"mix weights must be finite, >= 0 and not all zero, got {dict(mix)}")
    generator = torch.Generator().manual_seed(seed)
    tier = torch.multinomial(weights, num_devices, replacement=True, generator=generator)
    table = [[getattr(tiers[name], q) for q in (*QUANTITIES, "spread")] for name in names]
    per_device = torch.tensor(table, dtype=torch.float64)[tier].T
    noise = torch.randn(len(QUANTITIES), num_devices, generator=generator, dtype=torch.float64)
    values = (per_device[:-1] * torch.exp(noise * per_device[-1])).contiguous()
    return DeviceProfiles(tier=tier, tier_names=names, **dict(zip(QUANTITIES, values, strict=True)))


def _column(path: Path, name: str, texts: list[str], lines: list[int]) -> torch.Tensor:
    """One numeric column as float64, every cell checked against the column's limit."""
    try:
        values = torch.from_numpy(np.asarray(texts, dtype=np.float64))
    except ValueError:
        for line, text in zip(lines, texts, strict=True):
            try:
                float(text)
            except ValueError:
                raise ValueError(
                    f"{path} line {line}: {name} must be a number, got {text!r}"
                ) from None
        raise
    low, high = LIMITS.get(name, (0.0, math.inf))
    inside = (values > 0) if name in _POSITIVE else (values >= low) & (values <= high)
    bad = torch.nonzero(~(inside & torch.isfinite(values)))
    if bad.numel():
        line, text = lines[int(bad[0])], texts[int(bad[0])].strip()
        raise ValueError(f"{path} line {line}: {name} must be {_limit(name)}, got {text}")
    return values


def load_trace(path: str | Path) -> DeviceProfiles:
    """Read a device trace (columns and units in the module docstring), sorted by device_id.

    Raises:
        ValueError: naming the file, the 1-based line, the column and the limit of a bad cell.
    """
    path = Path(path)
    with path.open(newline="") as file:
        reader = csv.DictReader(file, restval="")
        header = [name.strip() for name in reader.fieldnames or []]
        reader.fieldnames = header
        # line_num is read once a row is parsed, so it is that row's line in the file.
        rows = [(reader.line_num, row) for row in reader]
    missing = [name for name in ("device_id", "tier", *QUANTITIES) if name not in header]
    if missing:
        raise ValueError(f"{path} line 1: missing column(s) {missing}; header is {header}")
    optional = [name for name in LIMITS if name in header]
    window = [name for name in LIMITS if name != "dropout_rate"]
    if 0 < len(set(window) & set(optional)) < len(window):
        raise ValueError(f"{path} line 1: give all of {window} or none of them")
    if not rows:
        raise ValueError(f"{path}: the trace has no devices")
    lines = [line for line, _ in rows]
    for line, row in rows:
        if None in row or not row["tier"].strip():
            raise ValueError(f"{path} line {line}: need {len(header)} fields, tier not empty")
    text = {name: [row[name] for _, row in rows] for name in ("device_id", *QUANTITIES, *optional)}
    device_id = _column(path, "device_id", text["device_id"], lines)
    # Sorting ids and comparing with 0..n-1 finds a fractional, duplicate or missing id at once.
    order = torch.argsort(device_id, stable=True)
    wrong = torch.nonzero(device_id[order] != torch.arange(len(rows), dtype=torch.float64))
    if wrong.numel():
        index, last = int(order[int(wrong[0])]), len(rows) - 1
        got, line = text["device_id"][index].strip(), lines[index]
        raise ValueError(f"{path} line {line}: device_id must be each of 0..{last} once, got {got}")
    labels = [row["tier"].strip() for _, row in rows]
    tier_names = tuple(sorted(set(labels)))
    index_of = {name: index for index, name in enumerate(tier_names)}
    tier = torch.tensor([index_of[label] for label in labels], dtype=torch.int64)[order]
    values = {
        name: _column(path, name, text[name], lines)[order] for name in text if name != "device_id"
    }
    columns = {name: values.pop(name) for name in optional}
    availability = Availability.from_columns(columns, len(rows)) if columns else None
    return DeviceProfiles(tier=tier, tier_names=tier_names, availability=availability, **values)
