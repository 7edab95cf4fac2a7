"""Request policies on MovieLens-100K under P1 in streaming mode: quality against requests.

The cloud model (cloud-only's self-attentive recommender) trains on cloud-period data. Each
device then serves its device-period interactions as sessions with the user representation
the cloud generated from its history at its last request; before each session a policy
decides whether to ask for a fresh one. IntellectReq's detector trains in the cloud on a
replay of the cloud-period tail only. Every policy runs on the same streams; the table shows
request share, GAUC (and its share of always-request's), NDCG@10, HR@10 and bytes per device,
the plot (``quality_vs_requests.png``) the curves, and the last line the headline:

    python benchmarks/request_policies.py --data-dir ../shared/data [--epochs 10]

``--cloud-state FILE`` reuses a trained cloud model (saved there on first use). With
``--slowfast`` it also scores cloud-only and ``slowfast`` (MC²-SF) under P1 on the same slow
model (one seed): HR@10, NDCG@10 and GAUC on validation and test.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from coevo.policies import Always, IntellectReq, Never, Periodic, Policy, RandomBudget
from coevo.policies.plot import plot_quality_vs_requests
from coevo.sim.simulator import simulate
from coevo.sim.streaming import (
    CloudUserModel,
    device_stream,
    replay_examples,
    replay_stream,
    simulate_stream,
)
from coevo.strategies import CloudOnly, SlowFast
from coevo.tasks.movielens import load_movielens_100k
from coevo.tasks.protocol import split_p1
from coevo.tasks.recommendation import ModelShapes, RecommendationTask
from coevo.types import CloudState, DeviceState

# Thresholds at these quantiles of the detector's predicted gains on the cloud's replay.
QUANTILES = (0.5, 0.6, 0.7, 0.75, 0.8, 0.82, 0.84, 0.86, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98)
BUDGETS = (0.1, 0.2, 0.3, 0.5)
PERIODS = (2, 3, 4)
BUDGET_SHARE = 0.20
KEEP = 0.995


def cloud_state(task: RecommendationTask, args: argparse.Namespace, console: Console):
    path = Path(args.cloud_state) if args.cloud_state else None
    if path is not None and path.exists():
        console.print(f"cloud model: loaded from {path}")
        return CloudState(torch.load(path))
    started = time.perf_counter()
    config = CloudOnly.Config.model_validate({"train": {"epochs": args.epochs}})
    cloud = CloudOnly(task, config).init(torch.Generator().manual_seed(args.seed))
    console.print(
        f"cloud model: {args.epochs} epochs at most, {time.perf_counter() - started:.0f}s"
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(cloud.tensors), path)
    return cloud


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="folder holding ml-100k/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10, help="cloud model epochs (at most)")
    parser.add_argument("--sessions", type=int, default=5)
    parser.add_argument("--cloud-state", default=None, help="cache file of the cloud model")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--slowfast", action="store_true", help="also evaluate slowfast")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=160)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    output = args.output or Path("runs") / f"request-policies-{stamp}"
    log = load_movielens_100k(args.data_dir)
    task = RecommendationTask(log, split_p1(log, args.seed), ModelShapes())
    split = task.split
    cloud = cloud_state(task, args, console)
    if args.slowfast:
        slowfast(task, cloud, args.seed, console)
    model = CloudUserModel(task.cloud_model(), cloud.tensors)
    stream = device_stream(split, args.sessions)
    started = time.perf_counter()
    features, gain = replay_examples(model, split, replay_stream(split, args.sessions))
    detector = IntellectReq.fit(features, gain, torch.Generator().manual_seed(args.seed))
    console.print(
        f"detector: {len(gain)} replayed examples, {float((gain > 0).float().mean()):.1%} "
        f"where fresh helps, trained in {time.perf_counter() - started:.0f}s"
    )
    runs: list[tuple[str, str, Policy]] = [("always", "", Always()), ("never", "", Never())]
    runs += [("periodic", f"every={k}", Periodic(Periodic.Config(every=k))) for k in PERIODS]
    runs += [
        ("random", f"budget={b}", RandomBudget(RandomBudget.Config(budget=b, seed=args.seed)))
        for b in BUDGETS
    ]
    predicted = detector.predict(features)
    for q in QUANTILES:
        threshold = float(torch.quantile(predicted, q))
        runs.append(
            ("intellectreq", f"q={q} ({threshold:+.4f})", detector.with_threshold(threshold))
        )
    rows = []
    for name, setting, policy in runs:
        summary = simulate_stream(policy, model, split, stream).summary()
        rows.append({"policy": name, "setting": setting, **summary})
    report(rows, output, console)


def slowfast(task: RecommendationTask, cloud: CloudState, seed: int, console: Console) -> None:
    """Cloud-only and slowfast on the same slow model: validation and test metrics."""
    strategy = SlowFast(task)
    prior = torch.tensor(strategy.config.prior, dtype=torch.float32)
    start = CloudState({**{f"slow.{k}": v for k, v in cloud.tensors.items()}, "gates": prior})
    run = simulate(strategy, torch.Generator().manual_seed(seed), cloud=start)
    cloud_only = CloudOnly(task)

    def slowfast_scorer(devices, history, candidates):
        state = DeviceState({k: v[devices] for k, v in run.devices.tensors.items()})
        return strategy.score(run.cloud, state, history, candidates)

    def cloud_scorer(devices, history, candidates):
        return cloud_only.score(cloud, DeviceState(), history, candidates)

    for name, scorer in (("cloud_only", cloud_scorer), ("slowfast", slowfast_scorer)):
        for which in ("val", "test"):
            metrics = task.evaluate(scorer, which, full_ranking=False, seed=seed)[1]
            console.print(
                f"{name} {which}: HR@10 {metrics['hr@10']:.4f} NDCG@10 {metrics['ndcg@10']:.4f} "
                f"GAUC {metrics['gauc']:.4f}"
            )
    console.print(
        f"slowfast bytes per device: {float(run.bytes_down.double().mean()):.0f} down, "
        f"{float(run.bytes_up.double().mean()):.0f} up per round; per page "
        f"{strategy.response(torch.arange(100)).num_bytes} down"
    )


def report(rows: list[dict], output: Path, console: Console) -> None:
    always = next(row for row in rows if row["policy"] == "always")["gauc"]
    table = Table(title="Request policies, MovieLens-100K P1 streaming (device-period sessions)")
    columns = ("request share", "requests/device", "GAUC", "% of always", "NDCG@10", "HR@10")
    for column in ("policy", "setting", *columns, "bytes up/device", "bytes down/device"):
        table.add_column(column, justify="left" if column in ("policy", "setting") else "right")
    for row in rows:
        table.add_row(
            row["policy"],
            row["setting"],
            f"{row['request_share']:.3f}",
            f"{row['requests_per_device']:.2f}",
            f"{row['gauc']:.4f}",
            f"{100 * row['gauc'] / always:.2f}",
            f"{row['ndcg@10']:.4f}",
            f"{row['hr@10']:.4f}",
            f"{row['bytes_up_per_device']:.0f}",
            f"{row['bytes_down_per_device']:.0f}",
        )
    console.print(table)
    curves: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        curves.setdefault(row["policy"], []).append((row["requests_per_device"], row["gauc"]))
    output.mkdir(parents=True, exist_ok=True)
    plot = plot_quality_vs_requests(curves, output / "quality_vs_requests.png", reference=always)
    (output / "results.json").write_text(json.dumps(rows, indent=1))
    console.print(f"plot: {plot}; rows: {output / 'results.json'}")
    learned = [row for row in rows if row["policy"] == "intellectreq"]
    kept = [row["request_share"] for row in learned if row["gauc"] >= KEEP * always]
    within = [row for row in learned if row["request_share"] <= BUDGET_SHARE]
    best = max(within, key=lambda row: row["gauc"]) if within else None
    print(
        f"request_policies: always_gauc={always:.4f} "
        f"learned_gauc={best['gauc'] if best else math.nan:.4f} "
        f"share={best['request_share'] if best else math.nan:.3f} "
        f"request_share_at_995={min(kept) if kept else math.nan:.3f}"
    )


if __name__ == "__main__":
    main()
