"""The fleet: device hardware and network profiles, availability, round costs, device state.

A fleet is described by stacked tensors ``[num_devices]``, never by per-device objects, so that
selecting a cohort, pricing its round and reading its private state are each one vectorised
call:

>>> import torch
>>> from coevo.fleet import diurnal_availability, round_cost, sample_profiles
>>> profiles = sample_profiles(1000, None, seed=0)
>>> availability = diurnal_availability(1000, seed=0)
>>> cohort = torch.nonzero(availability.available(t_s=3 * 3600.0)).flatten()[:10]
>>> cost = round_cost(profiles.select(cohort), flops=1e9, bytes_down=4e6, bytes_up=4e6)
>>> sorted(cost.summary())
['energy_j_sum', 'total_s_max', 'total_s_mean', 'total_s_p95']
"""

from coevo.fleet.availability import Availability, always_available, diurnal_availability
from coevo.fleet.cost import RoundCost, fits_in_memory, round_cost
from coevo.fleet.profiles import (
    DEFAULT_MIX,
    TIERS,
    DeviceProfiles,
    Tier,
    load_trace,
    sample_profiles,
)
from coevo.fleet.state import DeviceStateStore

__all__ = [
    "DEFAULT_MIX",
    "TIERS",
    "Availability",
    "DeviceProfiles",
    "DeviceStateStore",
    "RoundCost",
    "Tier",
    "always_available",
    "diurnal_availability",
    "fits_in_memory",
    "load_trace",
    "round_cost",
    "sample_profiles",
]
