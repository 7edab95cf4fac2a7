"""Data and system heterogeneity: client-drift corrections, and synchronous against buffered async.

Run: ``python benchmarks/heterogeneity.py [--rounds 250] [--threads 2]`` (about 4 minutes on
one thread of a 2-core machine that was also running another benchmark).

The workload, defined so that other systems can be measured on it:

- data: the built-in synthetic world (``coevo.tasks.synthetic``), seed 0, 1,500 devices, 500
  items, 3 user clusters with ``cluster_scale`` 4 (cluster taste dominates), ``personal_scale``
  0.3, ``popularity_weight`` 0.1 (choices follow taste, not popularity), ``drift_scale`` 0.2, 20
  to 150 interactions a device (mean 50), every other knob at its default. The ~70 items that
  make up 80% of one cluster's interactions overlap those of another cluster by a Jaccard
  index of 0.01-0.08, so devices of different clusters hold very different data;
- split: protocol P1 (seed 0); devices train on their device-period rows only (12 on average);
- model: the device model (``coevo.tasks.models.DeviceModel``, 32 dimensions, last 20 items,
  full-catalogue softmax), every weight shared (``private=[]``): one global model;
- local work, identical for every strategy: 3 epochs of plain SGD (lr 0.1, batch 8) per device
  per round, so devices drift towards their own cluster;
- fleet: ``sample_profiles(1500, DEFAULT_MIX, seed=0)`` (30% low-end phones, 40% mid phones,
  20% flagships, 10% laptops, lognormal spread per device), always available, no dropouts; a
  device's round takes download + compute + upload time from the fleet's cost model, and a
  synchronous round lasts as long as its slowest device;
- quality: validation HR@10 over the 100 sampled candidates of every device, measured every
  250 device updates (5 rounds of 50 devices, or 25 merges of 10 updates); "to target" is the
  first measurement at or above the target, so rounds are multiples of 5.

(a) FedAvg, FedProx (mu 1.0) and SCAFFOLD (option II), 50 devices a round drawn with the same
seed (so the same cohorts), ``--rounds`` rounds. Target: 90% of the best final validation
HR@10 of the three. The settings were chosen on this validation score: of local lr 0.1, 0.2,
0.25, 0.5, 1 and 2, SCAFFOLD diverges (NaN scores) from 0.2 and FedAvg from 0.5, so 0.1 is the
largest value at which all three are stable; of FedProx mu 0.01, 0.1 and 1.0, mu 0.01 tracks
FedAvg within 0.002 and 1.0 scores best.

(b) Synchronous FedAvg (the run of (a): 50 devices a round, a round waits for all 50) against
FedBuff (Nguyen et al., AISTATS 2022) with 50 devices training concurrently, a merge every
K = 10 arrivals, staleness weight ``1 / sqrt(1 + tau)``, and the same budget of device updates
(``--rounds`` x 50, i.e. five times as many merges). Target: 90% of the lower final
validation HR@10 of the two, so that both can reach it. ``async_speedup`` = synchronous
virtual seconds to the target divided by FedBuff's (above 1: FedBuff reaches it in less
simulated time). A control row runs synchronous FedAvg with rounds of K = 10 devices and the
same budget: it merges as often per update as FedBuff, without asynchrony.

The last line is machine-readable: ``heterogeneity: fedavg_rounds=... fedprox_rounds=...
scaffold_rounds=... sync_s=... fedbuff_s=... async_speedup=...``; a run that never reaches
its target reports ``nan``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from coevo.fleet import always_available, sample_profiles
from coevo.sim.clock import Fleet
from coevo.sim.simulator import simulate
from coevo.strategies.base import Strategy
from coevo.strategies.fedavg import FedAvg
from coevo.strategies.fedbuff import FedBuff
from coevo.strategies.fedprox import FedProx
from coevo.strategies.local_training import LocalTraining
from coevo.strategies.scaffold import Scaffold
from coevo.tasks.protocol import split_p1
from coevo.tasks.recommendation import ModelShapes, RecommendationTask
from coevo.tasks.synthetic import SyntheticConfig, make_world
from coevo.types import CloudState, DeviceState, Payload

WORLD = SyntheticConfig(
    num_devices=1500,
    num_items=500,
    num_clusters=3,
    cluster_scale=4.0,
    personal_scale=0.3,
    popularity_weight=0.1,
    drift_scale=0.2,
    min_interactions=20,
    mean_interactions=50.0,
    max_interactions=150,
)
TARGET_SHARE = 0.9


@dataclass
class Curve:
    """Validation HR@10 of one run; points are (round or merge, updates, score, virtual s)."""

    name: str
    points: list[tuple[int, int, float, float]] = field(default_factory=list)
    records: dict[int, dict[str, float]] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def final(self) -> float:
        return self.points[-1][2] if self.points else math.nan

    def reach(self, target: float) -> tuple[float, float]:
        """(round, virtual seconds) of the first measurement at or above ``target``."""
        for round, _, score, virtual_s in self.points:
            if score >= target:
                return float(round), virtual_s
        return math.nan, math.nan


class FedBuffWatched(FedBuff):
    """FedBuff that keeps the cloud state of its latest merge.

    The asynchronous driver calls ``on_round`` after every merge but no ``stop`` hook, so the
    benchmark reads the model to score from here.
    """

    latest: CloudState | None = None

    def merge(self, cloud: CloudState, uplinks: Payload, weights: torch.Tensor) -> CloudState:
        self.latest = super().merge(cloud, uplinks, weights)
        return self.latest


def val_hr10(strategy: Strategy, cloud: CloudState, devices: DeviceState, seed: int) -> float:
    """Validation HR@10 over every device; NaN for a diverged model (non-finite weights)."""
    if any(not bool(torch.isfinite(v).all()) for v in cloud.tensors.values()):
        return math.nan

    def scorer(block: torch.Tensor, history: torch.Tensor, candidates: torch.Tensor):
        state = DeviceState({k: v[block] for k, v in devices.tensors.items()})
        return strategy.score(cloud, state, history, candidates)

    with torch.no_grad():
        _, summary = strategy.task.evaluate(scorer, "val", full_ranking=False, seed=seed)
    return summary["hr@10"]


def run_sync(
    strategy: Strategy,
    name: str,
    fleet: Fleet,
    args: argparse.Namespace,
    devices_per_round: int,
) -> Curve:
    """A synchronous run, scored every ``args.check_every`` device updates."""
    curve = Curve(name)
    every = max(1, args.check_every // devices_per_round)

    def on_round(record: dict[str, float]) -> None:
        curve.records[int(record["round"])] = record

    def stop(round: int, cloud: CloudState, devices: DeviceState) -> bool:
        if (round + 1) % every:
            return False
        score = val_hr10(strategy, cloud, devices, args.seed)
        updates = (round + 1) * devices_per_round
        curve.points.append((round + 1, updates, score, curve.records[round]["virtual_seconds"]))
        # A diverged model only gets worse; the rest of its rounds would be wasted time.
        return math.isnan(score)

    started = time.perf_counter()
    simulate(
        strategy,
        torch.Generator().manual_seed(args.seed),
        block_size=args.block_size,
        devices_per_round=devices_per_round,
        fleet=fleet,
        on_round=on_round,
        stop=stop,
    )
    curve.wall_s = time.perf_counter() - started
    return curve


def run_fedbuff(task: RecommendationTask, fleet: Fleet, args: argparse.Namespace) -> Curve:
    """FedBuff with the same device-update budget as the synchronous runs."""
    budget = args.rounds * args.devices_per_round
    strategy = FedBuffWatched(
        task,
        FedBuff.Config(
            rounds=budget // args.buffer_size,
            private=(),
            local=local_training(args),
            buffer_size=args.buffer_size,
            concurrency=args.concurrency,
            staleness_exponent=0.5,
        ),
    )
    curve = Curve("fedbuff")
    every = max(1, args.check_every // args.buffer_size)

    def on_round(record: dict[str, float]) -> None:
        merge = int(record["round"])
        curve.records[merge] = record
        if (merge + 1) % every or strategy.latest is None:
            return
        score = val_hr10(strategy, strategy.latest, DeviceState(), args.seed)
        updates = (merge + 1) * args.buffer_size
        curve.points.append((merge + 1, updates, score, record["virtual_seconds"]))

    started = time.perf_counter()
    simulate(
        strategy,
        torch.Generator().manual_seed(args.seed),
        block_size=args.block_size,
        fleet=fleet,
        on_round=on_round,
    )
    curve.wall_s = time.perf_counter() - started
    return curve


def local_training(args: argparse.Namespace) -> LocalTraining:
    return LocalTraining(epochs=args.epochs, lr=args.lr, batch_size=8, optimizer="sgd")


def fmt(value: float, digits: int = 1) -> str:
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"


def target_of(curves: list[Curve], pick: Callable[[list[float]], float] = max) -> float:
    """``TARGET_SHARE`` of the best (or, with ``pick=min``, the worst) final score."""
    finals = [c.final for c in curves if not math.isnan(c.final)]
    return TARGET_SHARE * pick(finals) if finals else math.nan


def print_curves(title: str, curves: list[Curve], *, rounds: bool, rows: int = 10) -> None:
    """Validation HR@10 (and virtual seconds) at about ``rows`` checks, a column pair per run.

    Every run is checked after the same numbers of device updates, so a row compares them at
    equal work; a run that stopped early (diverged) shows ``-``.
    """
    print(title)
    header = " ".join(f"{c.name + ' hr10':>14} {'s':>7}" for c in curves)
    print(f"{'updates':>8} " + (f"{'round':>6} " if rounds else "") + header)
    length = max(len(c.points) for c in curves)
    stride = max(1, length // rows)
    for index in sorted({*range(stride - 1, length, stride), length - 1}):
        cells = []
        for curve in curves:
            if index < len(curve.points):
                _, _, score, virtual_s = curve.points[index]
                cells.append(f"{fmt(score, 4):>14} {virtual_s:>7.1f}")
            else:
                cells.append(f"{'-':>14} {'-':>7}")
        step, updates, _, _ = next(c.points[index] for c in curves if index < len(c.points))
        print(f"{updates:>8} " + (f"{step:>6} " if rounds else "") + " ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=250, help="synchronous rounds")
    parser.add_argument("--devices-per-round", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--mu", type=float, default=1.0, help="FedProx proximal weight")
    parser.add_argument("--buffer-size", type=int, default=10, help="FedBuff K")
    parser.add_argument("--concurrency", type=int, default=50, help="FedBuff devices in flight")
    parser.add_argument("--check-every", type=int, default=250, help="device updates")
    # Devices per vmap call: blocks of devices with similar step counts keep padding small.
    parser.add_argument("--block-size", type=int, default=32)
    # Intra-op threads: more than the cores left idle makes every op wait for a descheduled
    # worker (on a busy 2-core machine, 2 threads ran a training block 100x slower than 1).
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    log = make_world(WORLD, args.seed)
    task = RecommendationTask(log, split_p1(log, args.seed), ModelShapes())
    fleet = Fleet(
        sample_profiles(task.num_devices, None, args.seed), always_available(task.num_devices)
    )
    settings: dict[str, Any] = {"rounds": args.rounds, "private": (), "local": local_training(args)}
    strategies: list[tuple[str, Strategy]] = [
        ("fedavg", FedAvg(task, FedAvg.Config(**settings))),
        ("fedprox", FedProx(task, FedProx.Config(**settings, mu=args.mu))),
        ("scaffold", Scaffold(task, Scaffold.Config(**settings))),
    ]
    drift = [run_sync(s, name, fleet, args, args.devices_per_round) for name, s in strategies]
    fedbuff = run_fedbuff(task, fleet, args)
    # Control: synchronous rounds as small as FedBuff's merges, with the same update budget,
    # which separates what asynchrony buys from what merging every K updates buys.
    budget = args.rounds * args.devices_per_round
    small = FedAvg(task, FedAvg.Config(**{**settings, "rounds": budget // args.buffer_size}))
    control = run_sync(small, f"fedavg/{args.buffer_size}", fleet, args, args.buffer_size)

    print(
        f"world: {task.num_devices} devices, {task.num_items} items, {WORLD.num_clusters} "
        f"clusters (scale {WORLD.cluster_scale}), {log.num_rows} interactions; device-period "
        f"rows per device {float(task.split.num_device_period.double().mean()):.1f}; local: "
        f"{args.epochs} epochs SGD lr {args.lr} batch 8; {args.devices_per_round} devices/round"
    )
    print_curves("\n(a) validation HR@10 and virtual seconds by round", drift, rounds=True)
    target_a = target_of(drift)
    print(f"\n(a) target: {TARGET_SHARE:.0%} of the best final = {fmt(target_a, 4)}")
    print(
        f"{'strategy':<10} {'final_hr10':>10} {'best_hr10':>9} {'rounds':>7} {'to_target_s':>11} "
        f"{'s_per_round':>11} {'MB_up/round':>11} {'wall_s':>7}  note"
    )
    reached: dict[str, tuple[float, float]] = {}
    for curve in drift:
        reached[curve.name] = curve.reach(target_a)
        rounds_done = len(curve.records)
        s_per_round = curve.records[rounds_done - 1]["virtual_seconds"] / rounds_done
        mb_up = sum(r["bytes_up"] for r in curve.records.values()) / rounds_done / 1e6
        best = max((p[2] for p in curve.points if not math.isnan(p[2])), default=math.nan)
        note = "never reached the target" if math.isnan(reached[curve.name][0]) else ""
        if math.isnan(curve.final):
            note = f"diverged (NaN weights) by round {curve.points[-1][0]}"
        print(
            f"{curve.name:<10} {fmt(curve.final, 4):>10} {fmt(best, 4):>9} "
            f"{fmt(reached[curve.name][0], 0):>7} {fmt(reached[curve.name][1]):>11} "
            f"{s_per_round:>11.2f} {mb_up:>11.2f} {curve.wall_s:>7.1f}  {note}"
        )

    sync = drift[0]
    title = "\n(b) validation HR@10 and virtual seconds by device updates"
    print_curves(title, [sync, fedbuff, control], rounds=False)
    # Both headline runs must be able to reach it, so the target comes from the lower final.
    target_b = target_of([sync, fedbuff], pick=min)
    print(
        f"\n(b) target: {TARGET_SHARE:.0%} of the lower final of {sync.name} and "
        f"{fedbuff.name} = {fmt(target_b, 4)}"
    )
    print(
        f"{'mode':<10} {'in_flight':>9} {'per_merge':>9} {'merges':>7} {'updates':>8} "
        f"{'final_hr10':>10} {'to_target_s':>11} {'total_s':>8} {'staleness':>9} {'wall_s':>7}"
    )
    seconds: dict[str, float] = {}
    for curve, in_flight, per_merge in (
        (sync, args.devices_per_round, args.devices_per_round),
        (fedbuff, args.concurrency, args.buffer_size),
        (control, args.buffer_size, args.buffer_size),
    ):
        merges = len(curve.records)
        last = curve.records[merges - 1]
        seconds[curve.name] = curve.reach(target_b)[1]
        staleness = sum(r.get("mean_staleness", 0.0) for r in curve.records.values()) / merges
        print(
            f"{curve.name:<10} {in_flight:>9} {per_merge:>9} {merges:>7} {merges * per_merge:>8} "
            f"{fmt(curve.final, 4):>10} {fmt(seconds[curve.name]):>11} "
            f"{last['virtual_seconds']:>8.1f} {staleness:>9.2f} {curve.wall_s:>7.1f}"
        )
    sync_s, fedbuff_s = seconds["fedavg"], seconds["fedbuff"]
    speedup = sync_s / fedbuff_s if fedbuff_s > 0 else math.nan
    print(f"\nthreads={args.threads} total wall {time.perf_counter() - started:.0f} s")
    print(
        f"heterogeneity: fedavg_rounds={fmt(reached['fedavg'][0], 0)} "
        f"fedprox_rounds={fmt(reached['fedprox'][0], 0)} "
        f"scaffold_rounds={fmt(reached['scaffold'][0], 0)} sync_s={fmt(sync_s)} "
        f"fedbuff_s={fmt(fedbuff_s)} async_speedup={fmt(speedup, 2)}"
    )


if __name__ == "__main__":
    main()
