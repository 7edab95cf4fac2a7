"""The cost model behind the virtual clock: seconds and joules of one round, per device.

A device downloads its payload, trains, and uploads its result, one after the other:

- ``compute_s = flops / compute_flops_per_s``
- ``download_s = bytes_down / downlink_bytes_per_s + rtt_s`` (no RTT when nothing is sent)
- ``upload_s = bytes_up / uplink_bytes_per_s + rtt_s`` (likewise)
- ``total_s = download_s + compute_s + upload_s``
- ``energy_j = flops * energy_per_flop_j + (bytes_down + bytes_up) * energy_per_byte_j``

A synchronous round lasts as long as its slowest device, so ``summary()`` reports the maximum
and the 95th percentile next to the mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coevo.fleet.profiles import DeviceProfiles


@dataclass(frozen=True, eq=False)
class RoundCost:
    """Per-device cost of one round, float64 tensors ``[num_selected]``; units as named."""

    compute_s: torch.Tensor
    download_s: torch.Tensor
    upload_s: torch.Tensor
    total_s: torch.Tensor
    energy_j: torch.Tensor

    def __len__(self) -> int:
        return self.total_s.shape[0]

    def summary(self) -> dict[str, float]:
        """Mean, 95th percentile and maximum of ``total_s``, and the cohort's total energy.

        An empty cohort costs nothing: every entry is 0.
        """
        if not len(self):
            return {
                "total_s_mean": 0.0,
                "total_s_p95": 0.0,
                "total_s_max": 0.0,
                "energy_j_sum": 0.0,
            }
        return {
            "total_s_mean": self.total_s.mean().item(),
            "total_s_p95": torch.quantile(self.total_s, 0.95).item(),
            "total_s_max": self.total_s.max().item(),
            "energy_j_sum": self.energy_j.sum().item(),
        }


def _per_device(name: str, values: torch.Tensor | float, profiles: DeviceProfiles) -> torch.Tensor:
    """``values`` as float64 ``[num_devices]`` beside ``profiles``; a scalar applies to all."""
    num_devices, device = len(profiles), profiles.tier.device
    values = torch.as_tensor(values, dtype=torch.float64, device=device)
    if values.dim() > 1 or (values.dim() == 1 and values.shape[0] != num_devices):
        raise ValueError(
            f"{name} must have shape [{num_devices}] (one per selected device) or be a scalar, "
            f"got {list(values.shape)}"
        )
    if not bool((values >= 0).all()):
        raise ValueError(f"{name} must be >= 0, got {values[~(values >= 0)].flatten()[0].item()}")
    return values.expand(num_devices)


def round_cost(
    profiles: DeviceProfiles,
    flops: torch.Tensor | float,
    bytes_down: torch.Tensor | float,
    bytes_up: torch.Tensor | float,
) -> RoundCost:
    """Seconds and joules each selected device spends on one round.

    Args:
        profiles: the selected devices' profiles (``fleet_profiles.select(devices)``).
        flops: training FLOPs per device, ``[n]`` or one number for all.
        bytes_down: bytes each device downloads, ``[n]`` or one number.
        bytes_up: bytes each device uploads, ``[n]`` or one number.
    """
    flops = _per_device("flops", flops, profiles)
    bytes_down = _per_device("bytes_down", bytes_down, profiles)
    bytes_up = _per_device("bytes_up", bytes_up, profiles)
    compute_s = flops / profiles.compute_flops_per_s
    # A transfer that does not happen pays no round trip either.
    download_s = bytes_down / profiles.downlink_bytes_per_s + profiles.rtt_s * (bytes_down > 0)
    upload_s = bytes_up / profiles.uplink_bytes_per_s + profiles.rtt_s * (bytes_up > 0)
    energy_j = flops * profiles.energy_per_flop_j + (bytes_down + bytes_up) * (
        profiles.energy_per_byte_j
    )
    return RoundCost(
        compute_s=compute_s,
        download_s=download_s,
        upload_s=upload_s,
        total_s=download_s + compute_s + upload_s,
        energy_j=energy_j,
    )


def fits_in_memory(profiles: DeviceProfiles, bytes_needed: torch.Tensor | float) -> torch.Tensor:
    """Which devices can hold a training footprint of ``bytes_needed``: bool ``[num_devices]``.

    Args:
        profiles: the devices to check.
        bytes_needed: memory the local training step needs, one number or one per device.
    """
    return profiles.memory_bytes >= _per_device("bytes_needed", bytes_needed, profiles)
