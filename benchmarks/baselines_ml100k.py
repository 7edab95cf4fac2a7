"""The foundation baselines on MovieLens-100K under protocol P1, tuned on validation only.

1. The cloud models early-stop on validation HR@10. With ``--tune`` the device-side learning
   rate (and fine-tuning mode) of device-only and fine-tune are first chosen from a small grid
   on validation HR@10 of the first seed, reusing one cloud pretraining for every fine-tune
   candidate; without it the shipped config's values (chosen that way) are used.
2. The tuned config runs for every seed (each seed redraws the tie-break, the negatives and the
   initialisations) into a run folder with its report.
3. A mean ± std table, then the headline line.

    python benchmarks/baselines_ml100k.py --data-dir ../shared/data [--seeds 5]

Seeds can run in parallel processes and be reported together:

    python benchmarks/baselines_ml100k.py --seed-list 0,2,4 --threads 1 --output runs/a &
    python benchmarks/baselines_ml100k.py --seed-list 1,3 --threads 1 --output runs/b
    python benchmarks/baselines_ml100k.py --report runs/a runs/b
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

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
from coevo.sim.experiment import build_task, load_log, run, run_dir_for, strategy_configs
from coevo.sim.simulator import simulate
from coevo.strategies import STRATEGIES

CONFIG = Path(__file__).parents[1] / "configs" / "baselines_ml100k.yaml"
GRID = {
    "device_only": [{"local": {"lr": lr}} for lr in (3e-3, 1e-2)],
    "finetune": [
        {"mode": mode, "local": {"lr": lr}}
        for mode in ("full", "head")
        for lr in (3e-4, 1e-3, 3e-3)
    ],
}
COLUMNS = ("hr@10", "ndcg@10", "gauc", "full_hr@10", "ndcg@10/tail", "ndcg@10/head")


def _merge(base: dict, change: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in change.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def tune(config: RunConfig, console: Console) -> RunConfig:
    """Pick each grid strategy's settings by validation HR@10 on the first seed."""
    seed = config.seeds[0]
    task = build_task(load_log(config, seed), config, seed)
    specs = [dict(spec) for spec in config.strategies]
    for index, spec in enumerate(specs):
        grid = GRID.get(spec["name"])
        if not grid:
            continue
        cls = STRATEGIES.get(spec["name"])
        cloud, scores = None, []
        for change in grid:
            candidate = _merge(spec, change)
            strategy = cls(task, parse(cls.Config, candidate))
            if cloud is None:
                cloud = strategy.init(torch.Generator().manual_seed(seed))
            result = simulate(strategy, torch.Generator().manual_seed(seed), cloud=cloud)

            def scorer(devices, history, candidates, result=result, strategy=strategy):
                block = type(result.devices)(
                    {k: v[devices] for k, v in result.devices.tensors.items()}
                )
                return strategy.score(result.cloud, block, history, candidates)

            val = task.evaluate(scorer, "val", full_ranking=False, seed=seed)[1]["hr@10"]
            scores.append(val)
            console.print(f"tune {spec['name']} {change}: val HR@10 {val:.4f}")
        specs[index] = _merge(spec, grid[max(range(len(grid)), key=scores.__getitem__)])
    return config.model_copy(update={"strategies": specs})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", default=None, help="folder holding ml-100k/ (else $COEVO_DATA)"
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tune", action="store_true", help="choose device-side settings first")
    parser.add_argument("--seed-list", default=None, help="comma-separated seeds (else 0..seeds-1)")
    parser.add_argument("--report", nargs="+", type=Path, help="only report these run folders")
    args = parser.parse_args()
    console = Console(width=160)
    if args.report:
        results = [r for folder in args.report for r in load_strategy_results(folder)]
        report(results, console)
        return
    seeds = [int(s) for s in args.seed_list.split(",")] if args.seed_list else range(args.seeds)
    data = apply_overrides(
        load_yaml(CONFIG),
        [f"seeds={list(seeds)}", f"threads={args.threads}"]
        + ([f"data.data_dir={args.data_dir}"] if args.data_dir else []),
    )
    config = parse(RunConfig, data, source=str(CONFIG))
    strategy_configs(config)
    torch.set_num_threads(args.threads)
    if args.tune:
        config = tune(config, console)
    run_dir = args.output or run_dir_for(config)
    results = run(
        config, run_dir, CallbackList([RunWriter(title=config.name), RichProgress(console=console)])
    )
    console.print(f"run folder: {run_dir}; strategies: {config.strategies}")
    report(results, console)


def report(results: list[StrategyResult], console: Console) -> None:
    """The mean ± std table over seeds, then the headline line."""
    rows = aggregate(results)
    seeds = sorted({r.seed for r in results})
    table = Table(title=f"Baselines on MovieLens-100K, P1, seeds {seeds} (test, mean ± std)")
    table.add_column("strategy")
    for column in COLUMNS:
        table.add_column(column, justify="right")
    for row in rows:
        n = row["n_seeds"]
        cells = [format_mean_std(row["mean"][c], row["std"][c], n_seeds=n) for c in COLUMNS]
        table.add_row(row["strategy"], *cells)
    console.print(table)
    hr10 = {row["strategy"]: row["mean"]["hr@10"] for row in rows}
    print(
        "baselines_ml100k: "
        f"popularity_hr10={hr10['popularity']:.4f} cloud_only_hr10={hr10['cloud_only']:.4f} "
        f"finetune_hr10={hr10['finetune']:.4f} oracle_hr10={hr10['central_oracle']:.4f} "
        f"device_only_hr10={hr10['device_only']:.4f}"
    )


if __name__ == "__main__":
    main()
