"""When devices can take part: a daily idle window per device, and dropouts mid-round.

Production federated learning only trains on devices that are idle, charging and on an
unmetered network, which for phones means the night at home; participation follows the sun
across time zones and 6-10% of the devices that start a round drop out before reporting
(Bonawitz et al., "Towards Federated Learning at Scale: System Design", MLSys 2019).

Virtual time ``t_s`` is seconds since midnight UTC of day 0. A device's window is given in its
local hours ``[active_start_h, active_end_h)``; a window with ``start > end`` wraps past
midnight (22 -> 6 is eight hours), ``0 -> 24`` is all day, and equal start and end also mean
all day (a zero-length window cannot be expressed: leave such a device out of the fleet).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

_HOURS_PER_DAY = 24.0
# Allowed range of each per-device field, shared with the trace reader.
LIMITS = {
    "timezone_offset_h": (-12.0, 14.0),
    "active_start_h": (0.0, _HOURS_PER_DAY),
    "active_end_h": (0.0, _HOURS_PER_DAY),
    "dropout_rate": (0.0, 1.0),
}


def as_device_ids(devices: torch.Tensor, num_devices: int) -> torch.Tensor:
    """Device ids as a 1-D int64 CPU tensor, each in ``[0, num_devices)``."""
    devices = torch.as_tensor(devices)
    if devices.dim() != 1 or devices.is_floating_point() or devices.dtype == torch.bool:
        raise ValueError(
            f"devices must be a 1-D integer tensor, got {devices.dtype} of shape "
            f"{list(devices.shape)}"
        )
    devices = devices.to(device="cpu", dtype=torch.int64)
    if devices.numel() and (int(devices.min()) < 0 or int(devices.max()) >= num_devices):
        raise ValueError(
            f"device ids must be in [0, {num_devices}), got ids from {int(devices.min())} "
            f"to {int(devices.max())}"
        )
    return devices


@dataclass(frozen=True, eq=False)
class Availability:
    """Per-device daily idle windows and dropout probabilities, float64 tensors ``[num_devices]``.

    Attributes:
        timezone_offset_h: local time minus UTC, in hours (-12 to 14).
        active_start_h: local hour (0-24) at which the device becomes idle, charging, on Wi-Fi.
        active_end_h: local hour (0-24) at which that window closes; may be before the start.
        dropout_rate: probability (0-1) that a device which started a round abandons it.
    """

    timezone_offset_h: torch.Tensor
    active_start_h: torch.Tensor
    active_end_h: torch.Tensor
    dropout_rate: torch.Tensor

    def __post_init__(self) -> None:
        shape = self.timezone_offset_h.shape
        for name, (low, high) in LIMITS.items():
            values = getattr(self, name)
            if values.dim() != 1 or values.shape != shape:
                raise ValueError(
                    f"{name} must have shape {list(shape)} like timezone_offset_h, got "
                    f"{list(values.shape)}"
                )
            inside = (values >= low) & (values <= high)
            if not bool(inside.all()):
                raise ValueError(
                    f"{name} must be in [{low}, {high}], got {values[~inside][0].item()}"
                )

    @classmethod
    def from_columns(cls, columns: Mapping[str, torch.Tensor], num_devices: int) -> Availability:
        """From the fields a trace gives; missing fields as in :func:`always_available`."""
        defaults = always_available(num_devices)
        return cls(**{name: columns.get(name, getattr(defaults, name)) for name in LIMITS})

    def __len__(self) -> int:
        return self.timezone_offset_h.shape[0]

    def available(self, t_s: float) -> torch.Tensor:
        """Which devices are inside their window at virtual time ``t_s``: bool ``[num_devices]``."""
        local_h = torch.remainder(t_s / 3600.0 + self.timezone_offset_h, _HOURS_PER_DAY)
        # Measuring hours since the window opened, modulo a day, makes wrapped windows
        # (22 -> 6) the same comparison as plain ones (9 -> 17).
        length_h = torch.remainder(self.active_end_h - self.active_start_h, _HOURS_PER_DAY)
        length_h = torch.where(length_h == 0, _HOURS_PER_DAY, length_h)
        since_open_h = torch.remainder(local_h - self.active_start_h, _HOURS_PER_DAY)
        return since_open_h < length_h

    def dropouts(self, devices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Which of ``devices`` drop out of the round they started: bool, same length.

        Args:
            devices: int64 ids of the devices that started the round.
            generator: the source of randomness; the same generator state gives the same draws.
        """
        devices = as_device_ids(devices, len(self))
        draws = torch.rand(devices.numel(), generator=generator, dtype=torch.float64)
        return draws < self.dropout_rate[devices]

    def select(self, devices: torch.Tensor) -> Availability:
        """The availability of ``devices`` only, in the order given."""
        devices = as_device_ids(devices, len(self))
        return Availability(
            timezone_offset_h=self.timezone_offset_h[devices],
            active_start_h=self.active_start_h[devices],
            active_end_h=self.active_end_h[devices],
            dropout_rate=self.dropout_rate[devices],
        )


def always_available(num_devices: int, *, dropout_rate: float = 0.0) -> Availability:
    """Every device available all day (the idealised fleet most simulators assume)."""
    if num_devices < 0:
        raise ValueError(f"num_devices must be >= 0, got {num_devices}")
    zeros = torch.zeros(num_devices, dtype=torch.float64)
    return Availability(
        timezone_offset_h=zeros,
        active_start_h=zeros,
        active_end_h=torch.full_like(zeros, _HOURS_PER_DAY),
        dropout_rate=torch.full_like(zeros, dropout_rate),
    )


def diurnal_availability(
    num_devices: int,
    seed: int,
    *,
    window_h: float = 8.0,
    dropout_rate: float = 0.05,
    night_start_h: float = 22.0,
    jitter_h: float = 1.5,
    timezone_offsets_h: Sequence[float] = (-8.0, -5.0, 0.0, 1.0, 5.5, 8.0, 9.0),
) -> Availability:
    """A fleet that trains at night, local time, spread over a few time zones.

    Args:
        num_devices: fleet size.
        seed: seeds the generator that draws time zones and window starts.
        window_h: length of each device's daily window, in hours (0 < window_h <= 24).
        dropout_rate: the same dropout probability for every device.
        night_start_h: typical local hour the window opens (phones go on the charger at night).
        jitter_h: standard deviation of the window start around ``night_start_h``, in hours.
        timezone_offsets_h: the offsets devices are spread over uniformly; the default covers
            the Americas, Europe, India and East Asia.
    """
    if num_devices < 0:
        raise ValueError(f"num_devices must be >= 0, got {num_devices}")
    if not 0.0 < window_h <= _HOURS_PER_DAY:
        raise ValueError(f"window_h must be in (0, 24], got {window_h}")
    if jitter_h < 0:
        raise ValueError(f"jitter_h must be >= 0, got {jitter_h}")
    if not timezone_offsets_h:
        raise ValueError("timezone_offsets_h must name at least one offset")
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.tensor(list(timezone_offsets_h), dtype=torch.float64)
    zone = torch.randint(len(offsets), (num_devices,), generator=generator)
    jitter = jitter_h * torch.randn(num_devices, generator=generator, dtype=torch.float64)
    start_h = torch.remainder(night_start_h + jitter, _HOURS_PER_DAY)
    # A 24-hour window ends exactly where it starts (all day); adding 24 and taking the
    # remainder could round to just past the start and leave a window of almost nothing.
    end_h = start_h if window_h == _HOURS_PER_DAY else start_h + window_h
    return Availability(
        timezone_offset_h=offsets[zone],
        active_start_h=start_h,
        active_end_h=torch.remainder(end_h, _HOURS_PER_DAY),
        dropout_rate=torch.full((num_devices,), dropout_rate, dtype=torch.float64),
    )
