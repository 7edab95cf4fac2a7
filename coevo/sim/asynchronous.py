"""The asynchronous driver (FedBuff): devices train concurrently; the cloud merges every K.

Virtual time is event-driven. Slots hold ``concurrency`` devices in flight; a device's
arrival time is its start time plus its download, compute and upload time from the Fleet's
cost model. Arrivals are processed in time order; each frees a slot, and a device that
dropped out arrives with nothing. When K updates are buffered the cloud merges them
(staleness-weighted) and refills every free slot with devices available at that moment,
trained together in one vectorised block with the new model.
"""

from __future__ import annotations

import heapq
from typing import Any

import torch

from coevo.fleet import round_cost
from coevo.sim.batching import cohort_batch
from coevo.sim.clock import Fleet
from coevo.sim.executor import Executor
from coevo.sim.wire import send_down, send_up
from coevo.types import CloudState, DeviceState, Payload


def run_async(
    strategy: Any,
    rng: torch.Generator,
    cloud: CloudState,
    devices: DeviceState,
    *,
    fleet: Fleet | None,
    execute: Executor,
    block_size: int,
    seed: int,
    on_round: Any = None,
    stop: Any = None,
) -> tuple[CloudState, DeviceState, torch.Tensor, torch.Tensor, float, int]:
    """Run ``strategy.rounds`` buffered merges; returns states, bytes, clock and merges."""
    task = strategy.task
    config = strategy.config
    num_devices = task.num_devices
    local = config.local
    rows, offsets = task.device_rows(strategy.local_period)
    sparse = getattr(task, "sparse_inputs", None)
    counts = offsets[1:] - offsets[:-1]
    flops_per_example = sum(strategy.device_flops_per_example())
    bytes_up = torch.zeros(num_devices, dtype=torch.long)
    bytes_down = torch.zeros(num_devices, dtype=torch.long)
    busy = torch.zeros(num_devices, dtype=torch.bool)
    events: list[tuple[float, int, int, dict[str, Any]]] = []
    clock_s, version, launched = 0.0, 0, 0
    buffer: list[dict[str, Any]] = []
    stopped = False

    def launch(slots: int) -> None:
        nonlocal launched
        free = ~busy
        if fleet is not None:
            free &= fleet.availability.available(clock_s)
        candidates = torch.nonzero(free).squeeze(1)
        if slots <= 0 or len(candidates) == 0:
            return
        chosen = candidates[torch.randperm(len(candidates), generator=rng)[:slots]]
        payload, down = send_down(None, strategy.downlink(cloud, version))
        results = []
        for start in range(0, len(chosen), block_size):
            block = chosen[start : start + block_size]
            state = DeviceState({k: v[block] for k, v in devices.tensors.items()})
            batch = cohort_batch(
                task,
                rows,
                offsets,
                block,
                epochs=local.epochs,
                batch_size=local.batch_size,
                seed=seed,
                round=launched,
                sparse=sparse,
            )
            results.append((block, *next(iter(execute(strategy, payload, [(state, batch)])))))
        launched += 1
        for block, up, new, _ in results:
            _, _, up_bytes = send_up(None, up, {})
            flops = counts[block].double() * local.epochs * flops_per_example
            if fleet is not None:
                profiles = fleet.profiles.select(block)
                cost = round_cost(profiles, flops, float(down), float(up_bytes))
                dropped = fleet.availability.dropouts(block, rng)
                finish = clock_s + cost.total_s
            else:
                dropped = torch.zeros(len(block), dtype=torch.bool)
                finish = torch.full((len(block),), clock_s)
            bytes_down[block] += down
            busy[block] = True
            for i, device in enumerate(block.tolist()):
                update = {k: v[i] for k, v in up.items()}
                personal = {k: v[i] for k, v in new.items()}
                item = {
                    "update": update,
                    "personal": personal,
                    "version": version,
                    "dropped": bool(dropped[i]),
                    "bytes": up_bytes,
                }
                heapq.heappush(events, (float(finish[i]), device, len(events) + launched, item))

    def arrive(device: int, item: dict[str, Any]) -> None:
        nonlocal cloud, version, buffer, stopped
        bytes_up[device] += item["bytes"]
        for k, v in item["personal"].items():
            devices.tensors[k][device] = v
        buffer.append({"device": device, **item})
        if len(buffer) < config.buffer_size:
            return
        staleness = torch.tensor([version - b["version"] for b in buffer])
        # The discount scales each update itself (Nguyen et al., Algorithm 1), so a buffer of
        # equally stale updates moves the model less; row counts only weight the average.
        discount = strategy.staleness_weight(staleness).float()
        weights = counts[[b["device"] for b in buffer]].float()
        names = buffer[0]["update"]
        stacked = Payload(
            {
                k: torch.stack([b["update"][k] * d for b, d in zip(buffer, discount, strict=True)])
                for k in names
            }
        )
        cloud = strategy.merge(cloud, stacked, weights)
        version += 1
        if on_round is not None:
            on_round(
                {
                    "round": version - 1,
                    "merged": len(buffer),
                    "mean_staleness": float(staleness.double().mean()),
                    "virtual_seconds": clock_s,
                    "bytes_up": float(bytes_up.sum()),
                    "bytes_down": float(bytes_down.sum()),
                }
            )
        buffer = []
        if stop is not None and stop(version - 1, cloud, devices):
            stopped = True

    # A fleet that never delivers (every device drops out) must not spin forever: stop after
    # ten times the launches a run without failures would need.
    budget = 10 * strategy.rounds * (config.concurrency // config.buffer_size + 1) + 10
    launch(config.concurrency)
    while version < strategy.rounds and events and launched <= budget and not stopped:
        clock_s, device, _, item = heapq.heappop(events)
        busy[device] = False
        if not item["dropped"]:
            arrive(device, item)
        free = int(config.concurrency - busy.sum())
        # Refill in groups (vectorised) once a buffer's worth of slots is free.
        if free >= config.buffer_size or not events:
            launch(free)
    return cloud, devices, bytes_up, bytes_down, clock_s, version
