"""FedAvg rounds over a million simulated devices: time and peak memory of every phase.

Run: ``python benchmarks/sim_scale.py [--devices 1000000] [--per-round 10000] [--rounds 3]``.

The workload, defined so that other systems can be measured on it:

- data: the built-in synthetic world (``coevo.tasks.synthetic``) with ``--devices`` devices,
  2,000 items, at least 10 and on average 30 interactions per device, every other knob at its
  default, seed 0; split under protocol P1 (seed 0): per device the last interaction is the
  test target, the one before it the validation target, the first 75% of the rest cloud-period
  and the remainder device-period rows, 99 sampled negatives per device;
- model: the device model (``coevo.tasks.models.DeviceModel``: 32-dim item embeddings plus
  content flags, mean of the last 20 items, tower and head layers, full-catalogue softmax);
- training: FedAvg, ``--per-round`` devices a round drawn uniformly without replacement from
  every device, ``--rounds`` rounds, on each device 1 epoch of plain SGD (lr 0.5, batch 16)
  over its device-period rows, merged by row-weighted mean, vectorised backend in blocks of 128
  devices; no fleet, so every selected device reports;
- private state: only ``head.bias`` (32 floats) stays on each device, so that per-device state
  exists at a million devices (128 MB) without the 4 GB a private ``head`` would need;
- quality: validation HR@10 over the 100 sampled candidates, on a fixed uniform sample of
  ``--eval-devices`` devices, before and after training (three rounds move it only a little).

Each round shows two rows: "train" (cohort selection, batches and local training of every
block, ending when the simulator reports progress) and "stack, merge" (concatenating the
uplinks, settling the round, merging). ``rss_now_gib`` is the resident memory at that moment;
peak RSS is the process maximum (``ru_maxrss``), so it never decreases.
The bar is a peak RSS of at most 8 GiB at 1,000,000 devices. The last line is machine-readable:
``sim_scale: devices=... per_round=... s_per_round=... peak_rss_gib=...``, where
``s_per_round`` is the mean wall time of the rounds (selection, training, merge).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from coevo.sim.simulator import select_cohort, simulate
from coevo.strategies.fedavg import FedAvg
from coevo.strategies.local_training import LocalTraining
from coevo.tasks.metrics import sampled_metrics
from coevo.tasks.protocol import split_p1
from coevo.tasks.recommendation import ModelShapes, RecommendationTask
from coevo.tasks.synthetic import SyntheticConfig, make_world
from coevo.types import CloudState, DeviceState

PRIVATE = ("head.bias",)


def _peak_rss_gib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kibibytes, macOS bytes.
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def _rss_now_gib() -> float:
    """Resident memory at this moment (Linux only; NaN elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except OSError:
        return float("nan")
    return pages * resource.getpagesize() / 2**30


class PhaseTable:
    """Rows of (phase, wall seconds, RSS now, peak RSS so far), printed as they finish."""

    def __init__(self) -> None:
        print(f"{'phase':<46} {'seconds':>8} {'rss_now_gib':>11} {'peak_rss_gib':>12}", flush=True)

    def add(self, phase: str, seconds: float) -> None:
        print(
            f"{phase:<46} {seconds:>8.1f} {_rss_now_gib():>11.2f} {_peak_rss_gib():>12.2f}",
            flush=True,
        )


def sampled_val_hr10(
    strategy: FedAvg,
    cloud: CloudState,
    devices: DeviceState,
    sample: torch.Tensor,
    seed: int,
) -> float:
    """Validation HR@10 (100 sampled candidates) averaged over the devices of ``sample``.

    ``RecommendationTask.evaluate`` scores every device; this reads only the sample's rows, so
    that a quality check at a million devices costs what it costs at ``len(sample)``.
    """
    task = strategy.task
    split = task.split
    rows = split.target_rows("val")[sample]
    history = split.history(rows, task.history_len)
    candidates = torch.cat([split.items[rows][:, None], split.negatives[sample]], dim=1)
    generator = torch.Generator().manual_seed(seed)
    hits = []
    with torch.no_grad():
        for start in range(0, len(sample), 1024):
            block = slice(start, start + 1024)
            state = DeviceState({k: v[sample[block]] for k, v in devices.tensors.items()})
            scores = strategy.score(cloud, state, history[block], candidates[block])
            hits.append(sampled_metrics(scores, generator=generator)["hr@10"])
    return float(torch.cat(hits).double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1_000_000)
    parser.add_argument("--per-round", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--items", type=int, default=2_000)
    parser.add_argument("--eval-devices", type=int, default=10_000)
    # Devices per vmap call: larger blocks amortise the call overhead but pad more steps.
    parser.add_argument("--block-size", type=int, default=128)
    # Intra-op threads: more than the cores left idle makes every op wait for a descheduled
    # worker (on a busy 2-core machine, 2 threads ran a training block 100x slower than 1).
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seed = args.seed
    table = PhaseTable()

    started = time.perf_counter()
    world = SyntheticConfig(
        num_devices=args.devices,
        num_items=args.items,
        min_interactions=10,
        mean_interactions=30.0,
    )
    log = make_world(world, seed)
    table.add(f"world generation ({log.num_rows:,} rows)", time.perf_counter() - started)

    started = time.perf_counter()
    split = split_p1(log, seed)
    table.add("P1 split", time.perf_counter() - started)

    started = time.perf_counter()
    task = RecommendationTask(log, split, ModelShapes())
    config = FedAvg.Config(
        rounds=args.rounds,
        private=PRIVATE,
        local=LocalTraining(epochs=1, lr=0.5, batch_size=16, optimizer="sgd"),
    )
    strategy = FedAvg(task, config)
    rng = torch.Generator().manual_seed(seed)
    cloud = strategy.init(rng)
    task.train_flops_per_example()
    table.add("task and model build", time.perf_counter() - started)

    sample = torch.sort(
        torch.randperm(task.num_devices, generator=torch.Generator().manual_seed(seed + 1))[
            : args.eval_devices
        ]
    ).values
    started = time.perf_counter()
    initial_devices = strategy.init_devices(cloud, len(sample))
    everyone = torch.arange(len(sample))
    hr10_before = sampled_val_hr10(strategy, cloud, initial_devices, everyone, seed)
    del initial_devices
    table.add(f"val HR@10 on {len(sample):,} devices (before)", time.perf_counter() - started)

    all_devices = torch.arange(task.num_devices)
    cohort_rng = torch.Generator().manual_seed(seed + 2)
    marks: dict[str, float] = {"start": time.perf_counter()}
    round_seconds: list[float] = []

    def select(round: int) -> torch.Tensor:
        # The simulator asks for a cohort as a round begins: the split point between the
        # one-off setup (per-device state, row index) and the round itself.
        now = time.perf_counter()
        if round == 0:
            table.add("simulate setup (device state, rows)", now - marks["start"])
        marks["round"] = now
        return select_cohort(all_devices, args.per_round, cohort_rng)

    def on_progress(done: int, of: int) -> None:
        # Called once every block has trained, before the uplinks are stacked and merged:
        # the memory here is the cohort's uplinks still held block by block.
        marks["trained"] = time.perf_counter()
        table.add(
            f"round {done}: train {args.per_round:,} devices", marks["trained"] - marks["round"]
        )

    def on_round(record: dict[str, float]) -> None:
        now = time.perf_counter()
        round_seconds.append(now - marks["round"])
        table.add(
            f"round {int(record['round']) + 1}: stack, merge (loss {record['loss']:.3f})",
            now - marks["trained"],
        )

    result = simulate(
        strategy,
        rng,
        backend="vectorized",
        block_size=args.block_size,
        cloud=cloud,
        select=select,
        on_progress=on_progress,
        on_round=on_round,
    )

    started = time.perf_counter()
    hr10_after = sampled_val_hr10(strategy, result.cloud, result.devices, sample, seed)
    table.add(f"val HR@10 on {len(sample):,} devices (after)", time.perf_counter() - started)

    state_mib = sum(v.numel() * v.element_size() for v in result.devices.tensors.values()) / 2**20
    shared = sum(cloud[k].numel() * cloud[k].element_size() for k in strategy.shared)
    peak_gib = _peak_rss_gib()
    s_per_round = sum(round_seconds) / max(len(round_seconds), 1)
    print(
        f"private per-device state: {', '.join(PRIVATE)} = {state_mib:.0f} MiB for "
        f"{task.num_devices:,} devices; threads={args.threads} block_size={args.block_size}"
    )
    print(
        f"uplink: {shared:,} bytes of shared-weight update per device, "
        f"{shared * args.per_round / 2**30:.2f} GiB per copy for a cohort of {args.per_round:,}"
    )
    print(
        f"val HR@10 on {len(sample):,} sampled devices: {hr10_before:.4f} before, "
        f"{hr10_after:.4f} after {len(round_seconds)} rounds"
    )
    print(f"peak RSS {peak_gib:.2f} GiB: {'within' if peak_gib <= 8 else 'OVER'} the 8 GiB bar")
    print(
        f"sim_scale: devices={task.num_devices} per_round={args.per_round} "
        f"s_per_round={s_per_round:.2f} peak_rss_gib={peak_gib:.2f}"
    )


if __name__ == "__main__":
    main()
