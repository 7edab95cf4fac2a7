"""The Simulator: drives a Strategy's verbs over a simulated fleet, round by round.

Each synchronous round: select devices (available now, over-selected), send the downlink
through its codec, train every selected device with ``local`` (one ``vmap`` call per block of
devices with similar step counts, or device by device with the ``loop`` backend), encode the
uplinks, settle who reports before the deadline on the virtual clock, and merge only those.
Bytes are the encoded payloads' real lengths; seconds and energy come from the Fleet.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from coevo.codecs import Codec
from coevo.sim.asynchronous import run_async
from coevo.sim.batching import Shuffle, cohort_batch, plan_blocks, steps_per_device
from coevo.sim.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from coevo.sim.clock import Fleet, settle_round
from coevo.sim.device_store import MappedDeviceState
from coevo.sim.exchange import exchange
from coevo.sim.executor import Backend, Executor, local_executor
from coevo.sim.wire import init_codec_state, send_down, send_up
from coevo.strategies.base import Strategy
from coevo.types import CloudState, DeviceState, Payload

RoundHook = Callable[[dict[str, float]], None]
ProgressHook = Callable[[int, int], None]
StopHook = Callable[[int, CloudState, DeviceState], bool]
_WAIT_FOR_DEVICES_S = 900.0


@dataclass(frozen=True)
class SimulationResult:
    """Final states, per-device traffic and the clock of one strategy's run."""

    cloud: CloudState
    devices: DeviceState
    bytes_up: torch.Tensor
    bytes_down: torch.Tensor
    train_seconds: float
    virtual_seconds: float = 0.0
    rounds: int = 0
    requests: torch.Tensor | None = None
    """Per device, the rounds in which it asked the cloud for its own answer (exchanges)."""


def select_cohort(candidates: torch.Tensor, size: int | None, rng: torch.Generator) -> torch.Tensor:
    """``size`` devices drawn uniformly from ``candidates`` (all when ``None``), sorted."""
    if size is None or size >= len(candidates):
        return candidates
    return torch.sort(candidates[torch.randperm(len(candidates), generator=rng)[:size]]).values


def _secagg_cost(cohort: int, uplinks: dict[str, torch.Tensor]):
    """SecAgg+'s per-device cost for a cohort sending these (stacked) uplinks."""
    from coevo.codecs.secagg import neighbour_degree, secagg_cost

    # The masked vector is the weighted update and the weight (as the service sends it).
    values = sum(tensor[0].numel() for tensor in uplinks.values()) + 1
    degree = min(neighbour_degree(cohort), cohort - 1)
    return secagg_cost(cohort, degree, values)


def secure_group_means(
    uplinks: dict[str, torch.Tensor], weights: torch.Tensor, groups: int, generator: torch.Generator
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """What grouped secure aggregation reveals: each group's weighted mean uplink and weight.

    The reporters are dealt at random into ``min(groups, reporters)`` groups whose sizes differ
    by at most one. Returns ``({name: [groups, ...]}, weights [groups])``.

    Raises:
        ValueError: when an uplink tensor is not floating point (SecAgg+ sums real vectors).
    """
    for name, tensor in uplinks.items():
        if not tensor.is_floating_point():
            raise ValueError(
                f"simulation.secure_aggregation: uplink {name!r} is {tensor.dtype}; secure "
                "aggregation sums floating-point updates only"
            )
    count = len(weights)
    groups = min(groups, count)
    group = torch.empty(count, dtype=torch.long)
    group[torch.randperm(count, generator=generator)] = torch.arange(count) % groups
    totals = torch.zeros(groups, dtype=torch.float64).index_add_(0, group, weights.double())
    means = {}
    for name, tensor in uplinks.items():
        weighted = tensor.double() * weights.double().view(-1, *([1] * (tensor.dim() - 1)))
        sums = torch.zeros((groups, *tensor.shape[1:]), dtype=torch.float64)
        sums.index_add_(0, group, weighted)
        shape = (-1, *([1] * (tensor.dim() - 1)))
        means[name] = (sums / totals.clamp(min=1e-12).view(shape)).to(tensor.dtype)
    return means, totals.to(weights.dtype)


def _executor(backend: Backend) -> Executor:
    if backend == "ray":
        from coevo.sim.ray_backend import RayExecutor

        # Ray shuts down with the process; long-lived users pass their own executor.
        return RayExecutor()
    return local_executor(backend)


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
    fleet: Fleet | None = None,
    over_selection: float = 1.0,
    deadline_s: float | None = None,
    uplink_codec: Codec | None = None,
    downlink_codec: Codec | None = None,
    stop: StopHook | None = None,
    checkpoint: str | None = None,
    executor: Executor | None = None,
    device_state_dir: str | None = None,
    secure_aggregation: bool = False,
    secure_groups: int = 1,
    shuffle: Shuffle | None = None,
) -> SimulationResult:
    """Run ``strategy`` for its rounds and return the final states and accounting.

    Args:
        block_size: most devices trained in one vectorised call (bounds memory).
        cloud: start from this cloud state instead of ``strategy.init``.
        devices_per_round: devices merged per round (all when ``None``); ``over_selection``
            times as many are selected, and the fastest ``devices_per_round`` count.
        select: ``select(round)`` picks the cohort instead (overrides sampling).
        fleet: device profiles and availability; without one, every device is always
            available and the virtual clock does not move.
        deadline_s: devices reporting later than this (virtual seconds) are dropped.
        stop: called after each round with ``(round, cloud, devices)``; True ends the run.
        checkpoint: a folder; the run's state is saved there after every round and a run
            started with the same folder resumes from it, bit for bit.
        executor: runs the round's blocks (the Ray backend shards them over actors); by
            default they run in this process with ``backend``.
        device_state_dir: keep the stacked device state in memory-mapped files in this
            folder (`coevo.sim.device_store`), for fleets whose state outgrows memory; with
            ``checkpoint``, a resumed run reopens them, undoing a round that wrote its rows
            but not its checkpoint.
        secure_aggregation: account each round as SecAgg+ (`coevo.codecs.secagg`): every
            device's uplink is its masked fixed-point vector plus the protocol's keys and
            shares, its downlink gains its neighbours' keys and shares, and the round takes
            the protocol's extra round trips; bytes are the protocol's exact message lengths.
        secure_groups: with ``secure_aggregation`` and a robust strategy, the cohort's
            reporters are split at random into this many SecAgg+ groups (as the Service's
            ``serve.secagg.groups``): the cloud learns each group's weighted mean only, and
            the robust aggregator combines those (at least 3). Bytes are each group's own.
        shuffle: each device's row order per round and epoch (`coevo.sim.batching.Shuffle`),
            for a reference workload that defines its own; by default a counter-based hash.
    """
    task = strategy.task
    num_devices = task.num_devices
    from coevo.aggregators.robust import Robust

    grouped = secure_aggregation and isinstance(strategy, Robust)
    if grouped and secure_groups < 3:
        raise ValueError(
            "simulation.secure_groups: under secure aggregation a robust strategy's aggregator "
            f"sees one mean per group, so it needs at least 3 groups, got {secure_groups}"
        )
    if secure_groups > 1 and not grouped:
        raise ValueError(
            "simulation.secure_groups: groups serve a robust strategy (name: robust) under "
            f"secure_aggregation; {strategy.name} with secure_aggregation={secure_aggregation} "
            "merges the devices' updates directly"
        )
    if fleet is not None and len(fleet) != num_devices:
        raise ValueError(f"fleet has {len(fleet)} devices, the task {num_devices}")
    started = time.perf_counter()
    cloud = strategy.init(rng) if cloud is None else cloud
    initial_cloud = cloud
    mapped = device_state_dir is not None
    devices = DeviceState({}) if mapped else strategy.init_devices(cloud, num_devices)
    # Drawn before a checkpoint restores the generator, so a resumed run shuffles alike.
    seed = int(torch.randint(0, 2**62, (1,), generator=rng))
    state = Checkpoint(
        cloud=cloud,
        devices=devices,
        codec_state={},
        bytes_up=torch.zeros(num_devices, dtype=torch.long),
        bytes_down=torch.zeros(num_devices, dtype=torch.long),
        round=0,
        clock_s=0.0,
        rng_state=rng.get_state(),
    )
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, default=state)
        rng.set_state(state.rng_state)
    cloud, devices = state.cloud, state.devices
    store = None
    if device_state_dir is not None:
        resume_round = state.round if checkpoint is not None and state.round > 0 else None
        store = MappedDeviceState(
            strategy, initial_cloud, num_devices, device_state_dir, resume_round=resume_round
        )
        devices = store.state
    codec_state, clock_s = dict(state.codec_state), state.clock_s
    bytes_up, bytes_down = state.bytes_up.clone(), state.bytes_down.clone()
    requests = torch.zeros(num_devices, dtype=torch.long)
    rounds_done = state.round
    if strategy.local_period is not None and getattr(strategy, "asynchronous", False):
        if shuffle is not None:
            raise ValueError(f"shuffle: {strategy.name} runs asynchronously, in the built-in order")
        size = 1 if backend == "loop" else block_size
        cloud, devices, bytes_up, bytes_down, clock_s, rounds_done = run_async(
            strategy,
            rng,
            cloud,
            devices,
            fleet=fleet,
            execute=executor if executor is not None else _executor(backend),
            block_size=size,
            seed=seed,
            on_round=on_round,
            stop=stop,
        )
    elif strategy.local_period is not None:
        local = strategy.config.local
        rows, offsets = task.device_rows(strategy.local_period)
        sparse = getattr(task, "sparse_inputs", None)
        counts = offsets[1:] - offsets[:-1]
        steps = steps_per_device(counts, local.epochs, local.batch_size)
        forward_per_example, backward_per_example = strategy.device_flops_per_example()
        size = 1 if backend == "loop" else block_size
        execute = executor if executor is not None else _executor(backend)
        target = devices_per_round or num_devices
        for round in range(rounds_done, strategy.rounds):
            if select is not None:
                cohort = select(round)
            else:
                available = torch.arange(num_devices)
                if fleet is not None:
                    available = torch.nonzero(fleet.availability.available(clock_s)).squeeze(1)
                    if len(available) == 0:
                        clock_s += _WAIT_FOR_DEVICES_S
                        continue
                wanted = None if devices_per_round is None else math.ceil(target * over_selection)
                cohort = select_cohort(available, wanted, rng)
            payload, down_bytes = send_down(downlink_codec, strategy.downlink(cloud, round))
            # Sorted by step count, each block's devices leave its batched steps in order.
            by_steps = cohort[torch.argsort(steps[cohort], stable=True)]
            plan = plan_blocks(len(by_steps), size)
            blocks = [by_steps[start:end] for start, end in plan]
            jobs = [
                (
                    DeviceState({k: v[block] for k, v in devices.tensors.items()}),
                    cohort_batch(
                        task,
                        rows,
                        offsets,
                        block,
                        epochs=local.epochs,
                        batch_size=local.batch_size,
                        seed=seed,
                        round=round,
                        sparse=sparse,
                        shuffle=shuffle,
                    ),
                )
                for block in blocks
            ]
            query_bytes = 0
            if strategy.exchanges:
                loop = backend == "loop"
                jobs, query_bytes, answer_bytes = exchange(
                    strategy, cloud, payload, blocks, jobs, loop=loop
                )
                bytes_up[by_steps] += query_bytes
                requests[by_steps] += 1
                down_bytes += answer_bytes
            # Uplinks go straight into one preallocated [cohort, ...] tensor per name: a
            # 10,000-device cohort of dense updates is gigabytes, so no second copy is made.
            uplinks: dict[str, torch.Tensor] = {}
            new_parts: dict[str, list[torch.Tensor]] = {}
            losses, filled = [], 0
            for (_, job_batch), (up, new, metrics) in zip(
                jobs, execute(strategy, payload, jobs), strict=True
            ):
                size_block = len(job_batch.mask)
                for k, v in up.items():
                    if len(v) == len(by_steps):
                        uplinks[k] = v  # one block holds the whole cohort: nothing to copy
                        continue
                    if k not in uplinks:
                        uplinks[k] = torch.empty((len(by_steps), *v.shape[1:]), dtype=v.dtype)
                    uplinks[k][filled : filled + len(v)] = v
                filled += size_block
                for k, v in new.items():
                    new_parts.setdefault(k, []).append(v)
                if "loss" in metrics:
                    losses.append(metrics["loss"])
                del up
            if on_progress is not None:
                on_progress(round + 1, strategy.rounds)
            if uplink_codec is not None and uplinks and not codec_state:
                codec_state = init_codec_state(
                    uplink_codec, {k: v[0] for k, v in uplinks.items()}, num_devices
                )
            own_codec_state = {k: v[by_steps] for k, v in codec_state.items()}
            decoded, new_codec_state, up_bytes = send_up(uplink_codec, uplinks, own_codec_state)
            extra_round_trips = 0
            if secure_aggregation and len(by_steps) > 1:
                largest = -(-len(by_steps) // secure_groups)
                protocol = _secagg_cost(max(largest, 2), uplinks)
                up_bytes, down_bytes = protocol.bytes_up, down_bytes + protocol.bytes_down
                extra_round_trips = protocol.round_trips - 1
            examples = counts[by_steps].double() * local.epochs
            flops = examples * (forward_per_example + backward_per_example)
            outcome = settle_round(
                fleet,
                by_steps,
                flops,
                down_bytes,
                up_bytes,
                target=target,
                deadline_s=deadline_s,
                generator=rng,
                extra_round_trips=extra_round_trips,
            )
            bytes_down[by_steps] += down_bytes
            reporters = by_steps[outcome.reported]
            bytes_up[reporters] += up_bytes
            new_rows = {k: torch.cat(v)[outcome.reported] for k, v in new_parts.items()}
            if store is not None:
                store.write(round, reporters, new_rows, log=checkpoint is not None)
            else:
                for k, v in new_rows.items():
                    devices.tensors[k][reporters] = v
            for k, v in new_codec_state.items():
                codec_state[k][reporters] = v[outcome.reported]
            weights = counts[reporters].float()
            if len(reporters):
                everyone = bool(outcome.reported.all())
                merged = {k: v if everyone else v[outcome.reported] for k, v in decoded.items()}
                if grouped:
                    dealer = torch.Generator().manual_seed((seed + round) % 2**62)
                    merged, weights = secure_group_means(merged, weights, secure_groups, dealer)
                cloud = strategy.merge(cloud, Payload(merged), weights)
                del merged
            del uplinks, decoded
            clock_s += outcome.seconds
            rounds_done = round + 1
            if on_round is not None:
                record = {
                    "round": round,
                    "selected": len(cohort),
                    "reported": len(reporters),
                    "dropped": int(outcome.dropped.sum()),
                    "late": int(outcome.late.sum()),
                    "loss": float(torch.cat(losses).nanmean()) if losses else float("nan"),
                    "bytes_up": float(up_bytes * len(reporters) + query_bytes * len(cohort)),
                    "bytes_down": float(down_bytes * len(cohort)),
                    "virtual_seconds": clock_s,
                    "round_seconds": outcome.seconds,
                    "device_flops": float(flops.sum()),
                    "device_flops_forward": float(examples.sum() * forward_per_example),
                    "device_flops_backward": float(examples.sum() * backward_per_example),
                }
                if outcome.cost is not None:
                    record["energy_j"] = float(outcome.cost.energy_j.sum())
                on_round(record)
            if checkpoint is not None:
                save_checkpoint(
                    checkpoint,
                    Checkpoint(
                        cloud,
                        devices if store is None else DeviceState({}),
                        codec_state,
                        bytes_up,
                        bytes_down,
                        rounds_done,
                        clock_s,
                        rng.get_state(),
                    ),
                )
            if store is not None:
                store.committed()
            if stop is not None and stop(round, cloud, devices):
                break
    return SimulationResult(
        cloud=cloud,
        devices=devices,
        bytes_up=bytes_up,
        bytes_down=bytes_down,
        train_seconds=time.perf_counter() - started,
        virtual_seconds=clock_s,
        rounds=rounds_done,
        requests=requests,
    )
