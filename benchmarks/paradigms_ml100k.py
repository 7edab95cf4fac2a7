"""Every device–cloud paradigm on MovieLens-100K under protocol P1, with a paired test.

Runs the strategies of ``configs/paradigms_ml100k.yaml`` (the foundation baselines and every
device–cloud strategy) for each seed, then prints one table, mean ± std over seeds: HR@10,
NDCG@10, GAUC, full-ranking HR@10, tail and head NDCG@10, bytes up and down per device,
on-device training FLOPs (forward and backward) per device, requests per device, and the
p-value of a paired t-test of NDCG@10 against ``cloud_only`` over the seeds. Request policies
are measured by ``benchmarks/request_policies.py``; pass the ``request_share_at_995`` of its
last line with ``--request-share`` to put it in the headline.

    python benchmarks/paradigms_ml100k.py --data-dir ../shared/data [--seeds 5] [--only a,b]

Seeds (or strategies) can run in parallel processes and be reported together:

    python benchmarks/paradigms_ml100k.py --seed-list 0,2,4 --threads 1 --output runs/a &
    python benchmarks/paradigms_ml100k.py --seed-list 1,3 --threads 1 --output runs/b
    python benchmarks/paradigms_ml100k.py --report runs/a runs/b

The last line: ``paradigms_ml100k: cloud_only_ndcg10=… best=NAME best_ndcg10=… best_p=…
duet_vs_finetune=… request_share_at_995=…``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from coevo.config import RunConfig, apply_overrides, load_yaml, parse
from coevo.report import (
    CallbackList,
    RichProgress,
    RunWriter,
    StrategyResult,
    aggregate,
    format_mean_std,
    load_strategy_results,
)
from coevo.sim.experiment import run, run_dir_for, strategy_configs

CONFIG = Path(__file__).parents[1] / "configs" / "paradigms_ml100k.yaml"
QUALITY = ("hr@10", "ndcg@10", "gauc", "full_hr@10", "ndcg@10/tail", "ndcg@10/head")
COST = (
    "bytes_up_per_device",
    "bytes_down_per_device",
    "device_train_flops_forward",
    "device_train_flops_backward",
    "requests_per_device",
)
REFERENCE = "cloud_only"
NOT_CANDIDATES = {"central_oracle", REFERENCE}
"""The best strategy is chosen among those a deployment could run (not the privacy-free bound)."""


def paired_p(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of a paired t-test of ``a`` against ``b`` (NaN under two pairs)."""
    if len(a) < 2 or len(a) != len(b):
        return math.nan
    from scipy.stats import ttest_rel

    diff = np.asarray(a) - np.asarray(b)
    if np.allclose(diff, diff[0]):
        return 0.0 if diff[0] != 0 else 1.0
    return float(ttest_rel(a, b).pvalue)


def _by_seed(results: list[StrategyResult], strategy: str, key: str) -> dict[int, float]:
    return {r.seed: float(r.metrics[key]) for r in results if r.strategy == strategy}


def _short(value: float) -> str:
    if math.isnan(value):
        return "–"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


def report(results: list[StrategyResult], console: Console, request_share: float) -> None:
    """The table, then the headline line."""
    rows = aggregate(results)
    seeds = sorted({r.seed for r in results})
    reference = _by_seed(results, REFERENCE, "ndcg@10")
    table = Table(title=f"Paradigms on MovieLens-100K, P1, seeds {seeds} (test, mean ± std)")
    table.add_column("strategy")
    for column in (*QUALITY, "bytes up", "bytes down", "fwd FLOPs", "bwd FLOPs", "requests"):
        table.add_column(column, justify="right")
    table.add_column("p vs cloud", justify="right")
    p_values: dict[str, float] = {}
    for row in rows:
        name, n = row["strategy"], row["n_seeds"]
        mine = _by_seed(results, name, "ndcg@10")
        common = sorted(set(mine) & set(reference))
        p_values[name] = paired_p([mine[s] for s in common], [reference[s] for s in common])
        cells = [format_mean_std(row["mean"][c], row["std"][c], n_seeds=n) for c in QUALITY]
        costs = [_short(row["mean"].get(c, math.nan)) for c in COST]
        shown_p = "" if name == REFERENCE else f"{p_values[name]:.3g}"
        table.add_row(name, *cells, *costs, shown_p)
    console.print(table)
    ndcg = {row["strategy"]: row["mean"]["ndcg@10"] for row in rows}
    candidates = {k: v for k, v in ndcg.items() if k not in NOT_CANDIDATES}
    best = max(candidates, key=candidates.__getitem__) if candidates else "none"
    gains = {
        f"{best}_tail_gain": _gain(rows, best, "ndcg@10/tail"),
        f"{best}_mean_gain": _gain(rows, best, "ndcg@10"),
    }
    console.print("best strategy's gain over cloud_only (NDCG@10): " + json.dumps(gains))
    share = request_share
    duet = ndcg.get("duet", math.nan) / ndcg.get("finetune", math.nan)
    print(
        f"paradigms_ml100k: cloud_only_ndcg10={ndcg.get(REFERENCE, math.nan):.4f} "
        f"best={best} best_ndcg10={ndcg.get(best, math.nan):.4f} "
        f"best_p={p_values.get(best, math.nan):.4g} duet_vs_finetune={duet:.3f} "
        f"request_share_at_995={share:.3f}"
    )


def _gain(rows: list, name: str, key: str) -> float:
    mean = {row["strategy"]: row["mean"] for row in rows}
    if name not in mean or REFERENCE not in mean:
        return math.nan
    return round(mean[name][key] - mean[REFERENCE][key], 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", default=None, help="folder holding ml-100k/ (else $COEVO_DATA)"
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--seed-list", default=None, help="comma-separated seeds (else 0..seeds-1)")
    parser.add_argument("--only", default=None, help="comma-separated strategy names")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", nargs="+", type=Path, help="only report these run folders")
    parser.add_argument(
        "--request-share",
        type=float,
        default=math.nan,
        help="request_share_at_995 from benchmarks/request_policies.py",
    )
    args = parser.parse_args()
    console = Console(width=200)
    if args.report:
        results = [r for folder in args.report for r in load_strategy_results(folder)]
        runs = [(r.strategy, r.seed) for r in results]
        repeated = sorted({run for run in runs if runs.count(run) > 1})
        if repeated:
            sys.exit(f"--report: these (strategy, seed) runs appear twice: {repeated}")
        report(results, console, args.request_share)
        return
    seeds = [int(s) for s in args.seed_list.split(",")] if args.seed_list else range(args.seeds)
    data = apply_overrides(
        load_yaml(CONFIG),
        [f"seeds={list(seeds)}", f"threads={args.threads}"]
        + ([f"data.data_dir={args.data_dir}"] if args.data_dir else []),
    )
    if args.only:
        wanted = set(args.only.split(","))
        data["strategies"] = [s for s in data["strategies"] if s.get("label", s["name"]) in wanted]
        if not data["strategies"]:
            sys.exit(f"--only {args.only}: no such strategy in {CONFIG}")
    config = parse(RunConfig, data, source=str(CONFIG))
    strategy_configs(config)
    torch.set_num_threads(args.threads)
    run_dir = args.output or run_dir_for(config)
    results = run(
        config, run_dir, CallbackList([RunWriter(title=config.name), RichProgress(console=console)])
    )
    console.print(f"run folder: {run_dir}")
    report(results, console, args.request_share)


if __name__ == "__main__":
    main()
