"""The Simulator: drives a Strategy's verbs over the fleet and accounts bytes.

Every device takes part in each round here (full participation); the ``loop`` backend runs
``local`` device by device, which is also the reference the vectorised backend is checked
against.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from coevo.sim.batching import device_batch, device_rows
from coevo.strategies.base import Strategy
from coevo.types import CloudState, DeviceState, Payload

RoundHook = Callable[[dict[str, float]], None]
ProgressHook = Callable[[int, int], None]


@dataclass(frozen=True)
class SimulationResult:
    """Final states and per-device traffic of one strategy's run."""

    cloud: CloudState
    devices: DeviceState
    bytes_up: torch.Tensor
    bytes_down: torch.Tensor
    train_seconds: float


def wire_bytes(payload: Payload) -> int:
    """Exact bytes of a payload on the wire; an empty payload is not sent at all."""
    if not payload.tensors and not payload.metrics:
        return 0
    return payload.num_bytes


def simulate(
    strategy: Strategy,
    rng: torch.Generator,
    *,
    on_round: RoundHook | None = None,
    on_progress: ProgressHook | None = None,
) -> SimulationResult:
    """Run ``strategy`` for its rounds with every device, one device at a time."""
    task = strategy.task
    num_devices = task.num_devices
    started = time.perf_counter()
    cloud = strategy.init(rng)
    devices = strategy.init_devices(cloud, num_devices)
    bytes_up = torch.zeros(num_devices, dtype=torch.long)
    bytes_down = torch.zeros(num_devices, dtype=torch.long)
    if strategy.local_period is not None:
        rows, offsets = device_rows(task.split, strategy.local_period)
        local = strategy.config.local
        for round in range(strategy.rounds):
            payload = strategy.downlink(cloud, round)
            bytes_down += wire_bytes(payload)
            uplinks, weights, losses = [], [], []
            new_state: dict[str, list[torch.Tensor]] = {k: [] for k in devices.tensors}
            for device in range(num_devices):
                batch = device_batch(
                    task.split,
                    rows[offsets[device] : offsets[device + 1]],
                    epochs=local.epochs,
                    batch_size=local.batch_size,
                    history_len=task.shapes.device_history,
                    generator=rng,
                )
                state = DeviceState({k: v[device] for k, v in devices.tensors.items()})
                uplink, state, metrics = strategy.local(payload, state, batch)
                for k in new_state:
                    new_state[k].append(state[k])
                uplinks.append(uplink)
                weights.append(batch.num_examples)
                losses.append(float(metrics.get("loss", torch.tensor(float("nan")))))
                bytes_up[device] += wire_bytes(uplink)
                if on_progress is not None:
                    on_progress(round * num_devices + device + 1, strategy.rounds * num_devices)
            devices = DeviceState({k: torch.stack(v) for k, v in new_state.items()})
            cloud = strategy.merge(cloud, uplinks, torch.stack(weights))
            if on_round is not None:
                on_round(
                    {
                        "round": round,
                        "devices": num_devices,
                        "loss": sum(losses) / len(losses),
                        "bytes_up": float(bytes_up.sum()),
                        "bytes_down": float(bytes_down.sum()),
                    }
                )
    return SimulationResult(
        cloud=cloud,
        devices=devices,
        bytes_up=bytes_up,
        bytes_down=bytes_down,
        train_seconds=time.perf_counter() - started,
    )
