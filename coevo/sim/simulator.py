"""The Simulator: drives a Strategy's verbs over the fleet and accounts bytes.

Every device takes part in each round (full participation). Backends run the same verbs:
``vectorized`` packs devices into blocks of similar step counts and calls ``local`` once per
block under ``torch.func.vmap``; ``loop`` calls it device by device, readable and the oracle
the vectorised backend is tested against.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch.func import vmap

from coevo.sim.batching import cohort_batch, steps_per_device
from coevo.strategies.base import DeviceBatch, Strategy
from coevo.types import CloudState, DeviceState, Payload

Backend = Literal["vectorized", "loop"]
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


def _run_block(
    strategy: Strategy, payload: Payload, state: DeviceState, batch: DeviceBatch, backend: Backend
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``local`` for a block of devices: (stacked uplinks, stacked states, stacked metrics)."""

    def one(tensors, inputs, mask):
        up, new, metrics = strategy.local(payload, DeviceState(tensors), DeviceBatch(inputs, mask))
        return dict(up.tensors), dict(new.tensors), dict(metrics)

    if backend == "vectorized":
        return vmap(one)(dict(state.tensors), dict(batch.inputs), batch.mask)
    outputs = [
        one(
            {k: v[i] for k, v in state.tensors.items()},
            {k: v[i] for k, v in batch.inputs.items()},
            batch.mask[i],
        )
        for i in range(len(batch.mask))
    ]
    uplinks, states, metrics = (
        {k: torch.stack([o[part][k] for o in outputs]) for k in outputs[0][part]}
        for part in range(3)
    )
    return uplinks, states, metrics


def select_cohort(
    num_devices: int, devices_per_round: int | None, rng: torch.Generator
) -> torch.Tensor:
    """Uniformly sampled devices of one round, sorted (all of them when ``None``)."""
    if devices_per_round is None or devices_per_round >= num_devices:
        return torch.arange(num_devices)
    return torch.sort(torch.randperm(num_devices, generator=rng)[:devices_per_round]).values


def simulate(
    strategy: Strategy,
    rng: torch.Generator,
    *,
    backend: Backend = "vectorized",
    block_size: int = 128,
    on_round: RoundHook | None = None,
    on_progress: ProgressHook | None = None,
    cloud: CloudState | None = None,
    devices_per_round: int | None = None,
    select: Callable[[int], torch.Tensor] | None = None,
) -> SimulationResult:
    """Run ``strategy`` for its rounds.

    ``cloud`` skips ``init`` and starts from a given cloud state (to tune device-side settings
    without re-training the cloud). Each round takes ``devices_per_round`` devices sampled
    uniformly (all when ``None``), or the devices ``select(round)`` returns.
    """
    task = strategy.task
    num_devices = task.num_devices
    started = time.perf_counter()
    cloud = strategy.init(rng) if cloud is None else cloud
    devices = strategy.init_devices(cloud, num_devices)
    bytes_up = torch.zeros(num_devices, dtype=torch.long)
    bytes_down = torch.zeros(num_devices, dtype=torch.long)
    if strategy.local_period is not None:
        local = strategy.config.local
        rows, offsets = task.device_rows(strategy.local_period)
        steps = steps_per_device(offsets[1:] - offsets[:-1], local.epochs, local.batch_size)
        size = block_size if backend == "vectorized" else 1
        seed = int(torch.randint(0, 2**62, (1,), generator=rng))
        for round in range(strategy.rounds):
            cohort = (
                select(round)
                if select is not None
                else select_cohort(num_devices, devices_per_round, rng)
            )
            # Blocks of devices with similar step counts keep padding small.
            by_steps = cohort[torch.argsort(steps[cohort], stable=True)]
            blocks = [by_steps[i : i + size] for i in range(0, len(by_steps), size)]
            payload = strategy.downlink(cloud, round)
            bytes_down[cohort] += wire_bytes(payload)
            new_state = {k: v.clone() for k, v in devices.tensors.items()}
            uplinks: dict[str, list[torch.Tensor]] = {}
            losses, done = [], 0
            for block in blocks:
                batch = cohort_batch(
                    task,
                    rows,
                    offsets,
                    block,
                    epochs=local.epochs,
                    batch_size=local.batch_size,
                    seed=seed,
                    round=round,
                )
                state = DeviceState({k: v[block] for k, v in devices.tensors.items()})
                up, new, metrics = _run_block(strategy, payload, state, batch, backend)
                for k, v in new.items():
                    new_state[k][block] = v
                for k, v in up.items():
                    uplinks.setdefault(k, []).append(v)
                if up:
                    # Fixed shapes give every device the same encoded length.
                    bytes_up[block] += wire_bytes(Payload({k: v[0] for k, v in up.items()}))
                losses.append(metrics.get("loss", torch.full((len(block),), float("nan"))))
                done += len(block)
                if on_progress is not None:
                    on_progress(round * len(cohort) + done, strategy.rounds * len(cohort))
            devices = DeviceState(new_state)
            weights = (offsets[1:] - offsets[:-1])[by_steps].float()
            stacked = Payload({k: torch.cat(v) for k, v in uplinks.items()})
            cloud = strategy.merge(cloud, stacked, weights)
            if on_round is not None:
                on_round(
                    {
                        "round": round,
                        "devices": len(cohort),
                        "loss": float(torch.cat(losses).nanmean()),
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
