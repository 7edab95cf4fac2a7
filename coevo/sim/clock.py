"""The virtual clock: what a round costs each device, and who reports in time.

A device's round takes download time (encoded bytes / downlink bandwidth + RTT), compute time
(training FLOPs / its throughput) and upload time (encoded bytes / uplink bandwidth + RTT), as
the Fleet's cost model says. A synchronous round ends when the last device it waits for
reports: the ``target``-th fastest when over-selecting, never later than the deadline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coevo.fleet import Availability, DeviceProfiles, RoundCost, round_cost


@dataclass(frozen=True)
class Fleet:
    """The simulated devices: hardware and network profiles, and when they are available."""

    profiles: DeviceProfiles
    availability: Availability

    def __post_init__(self) -> None:
        if len(self.profiles) != len(self.availability):
            raise ValueError(
                f"fleet: {len(self.profiles)} profiles but "
                f"{len(self.availability)} availability rows"
            )

    def __len__(self) -> int:
        return len(self.profiles)


@dataclass(frozen=True)
class RoundOutcome:
    """Who reported, how long the round took, and what it cost (per cohort device)."""

    reported: torch.Tensor
    dropped: torch.Tensor
    late: torch.Tensor
    seconds: float
    cost: RoundCost | None


def settle_round(
    fleet: Fleet | None,
    cohort: torch.Tensor,
    flops: torch.Tensor,
    bytes_down: int,
    bytes_up: int,
    *,
    target: int,
    deadline_s: float | None,
    generator: torch.Generator,
    extra_round_trips: int = 0,
) -> RoundOutcome:
    """Decide which of ``cohort`` report this round and when the round ends.

    Without a fleet every device reports instantly (no clock). With one, devices that drop
    out mid-round or finish after ``deadline_s`` never report, and only the ``target`` fastest
    of the rest are merged (over-selection discards the stragglers). ``extra_round_trips``
    adds that many of each device's round-trip times (a protocol's additional exchanges).
    """
    n = len(cohort)
    if fleet is None:
        everyone = torch.ones(n, dtype=torch.bool)
        return RoundOutcome(everyone, ~everyone, ~everyone, 0.0, None)
    profiles = fleet.profiles.select(cohort)
    cost = round_cost(
        profiles,
        flops.double(),
        torch.full((n,), float(bytes_down), dtype=torch.float64),
        torch.full((n,), float(bytes_up), dtype=torch.float64),
    )
    dropped = fleet.availability.dropouts(cohort, generator)
    finish = cost.total_s + extra_round_trips * profiles.rtt_s
    late = torch.zeros(n, dtype=torch.bool)
    if deadline_s is not None:
        late = (finish > deadline_s) & ~dropped
    candidates = ~dropped & ~late
    order = torch.argsort(torch.where(candidates, finish, torch.inf), stable=True)
    reported = torch.zeros(n, dtype=torch.bool)
    reported[order[: min(target, int(candidates.sum()))]] = True
    if reported.any():
        seconds = float(finish[reported].max())
    else:
        seconds = float(deadline_s) if deadline_s is not None else float(finish.max())
    if deadline_s is not None and int(reported.sum()) < target:
        seconds = float(deadline_s)
    return RoundOutcome(reported, dropped, late, seconds, cost)
