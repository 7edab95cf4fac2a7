"""RunWriter: the callback that turns a run into a folder a reader can check and rerun.

Layout of the folder::

    config.yaml                 the resolved config, written before training starts
    rounds.jsonl                one JSON record per round, appended and flushed as it happens
    devices.csv                 per-device metrics of every (strategy, seed)
    results.json                every (strategy, seed): metrics, cost, note
    report.md                   tables and plots, written when the run ends
    quality_by_strategy.png, quality_by_group.png, device_distribution.png
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from coevo.report.callbacks import Callback
from coevo.report.plots import (
    plot_device_distribution,
    plot_quality_by_group,
    plot_quality_by_strategy,
)
from coevo.report.records import GROUP_NAMES, RunInfo, StrategyResult, to_plain
from coevo.report.tables import (
    COST_KEYS,
    GROUP_METRICS,
    MAIN_METRICS,
    MISSING,
    SummaryRow,
    aggregate,
    format_count,
    format_flops,
    markdown_table,
)

CONFIG_FILE = "config.yaml"
ROUNDS_FILE = "rounds.jsonl"
DEVICES_FILE = "devices.csv"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
_DEVICE_COLUMNS = ["strategy", "seed", "device", "group"]
_PLOTS = {
    "quality_by_strategy.png": "NDCG@10 and HR@10 by strategy",
    "quality_by_group.png": "NDCG@10 by activity group",
    "device_distribution.png": "Per-device NDCG@10",
}


def _write_atomically(path: Path, text: str) -> None:
    """Readers of ``path`` see the old or the new content, never half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _fact(value: Any) -> str:
    """A dataset fact as one table cell: ``{"p20": 7, "p50": 16}`` -> ``"p20: 7, p50: 16"``."""
    if isinstance(value, Mapping):
        return ", ".join(f"{key}: {_fact(item)}" for key, item in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_fact(item) for item in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def load_results(run_dir: Path | str) -> list[dict[str, Any]]:
    """Reads ``results.json`` of a run folder: one ``{strategy, seed, metrics, cost, note}`` each.

    Raises:
        FileNotFoundError: when the folder has no ``results.json`` (no strategy finished yet).
    """
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: no strategy of that run has finished")
    results: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    return results


def load_strategy_results(run_dir: Path | str) -> list[StrategyResult]:
    """A run folder's results as `StrategyResult`s (metrics, cost and note; no per-device data).

    Raises:
        FileNotFoundError: as `load_results`.
    """
    return [
        StrategyResult(
            strategy=r["strategy"],
            seed=r["seed"],
            metrics=r["metrics"],
            per_device={},
            group=np.zeros(0, dtype=np.int64),
            cost=r["cost"],
            note=r.get("note", ""),
        )
        for r in load_results(run_dir)
    ]


class RunWriter(Callback):
    """Writes a run folder as the run goes, so that a crash keeps everything finished so far.

    Args:
        title: the report's heading; defaults to ``"coevo run <folder name>"``.

    Raises:
        FileExistsError: from ``on_run_start`` when ``run_dir`` exists and is not an empty folder,
            so that one run never mixes its records into another's.
    """

    def __init__(self, title: str | None = None) -> None:
        self.title = title
        self._run: RunInfo | None = None
        self._results: list[StrategyResult] = []

    @property
    def run_dir(self) -> Path:
        if self._run is None:
            raise RuntimeError("RunWriter: on_run_start has not been called")
        return Path(self._run.run_dir)

    def on_run_start(self, run: RunInfo) -> None:
        run_dir = Path(run.run_dir)
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise FileExistsError(
                f"run folder {run_dir} already exists and is not empty; choose a new folder"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        self._run = run
        self._results = []
        config_text = yaml.safe_dump(to_plain(run.config), sort_keys=False, allow_unicode=True)
        (run_dir / CONFIG_FILE).write_text(config_text, encoding="utf-8")

    def on_round_end(self, record: Mapping[str, Any]) -> None:
        # Opened per record so that each line is on disk once this returns, with no handle left
        # open if the run dies.
        with (self.run_dir / ROUNDS_FILE).open("a", encoding="utf-8") as rounds:
            rounds.write(json.dumps(to_plain(record)) + "\n")

    def on_strategy_end(self, result: StrategyResult) -> None:
        self._append_devices(result)
        self._results.append(result)
        self._write_results(self._results)

    def on_run_end(self, results: Sequence[StrategyResult]) -> None:
        run = self._run
        if run is None:
            raise RuntimeError("RunWriter: on_run_end called before on_run_start")
        self._write_results(results)
        rows = aggregate(results)
        plot_quality_by_strategy(rows, self.run_dir / "quality_by_strategy.png")
        plot_quality_by_group(rows, self.run_dir / "quality_by_group.png")
        plot_device_distribution(results, self.run_dir / "device_distribution.png")
        _write_atomically(self.run_dir / REPORT_FILE, self._report(run, results, rows))

    def _write_results(self, results: Sequence[StrategyResult]) -> None:
        records = [
            {
                "strategy": result.strategy,
                "seed": result.seed,
                "metrics": to_plain(result.metrics),
                "cost": to_plain(result.cost),
                "note": result.note,
            }
            for result in results
        ]
        _write_atomically(self.run_dir / RESULTS_FILE, json.dumps(records, indent=2) + "\n")

    def _append_devices(self, result: StrategyResult) -> None:
        """Appends the result's devices; rewrites the file only if it brings new metric columns."""
        path = self.run_dir / DEVICES_FILE
        names = sorted(result.per_device)
        columns = _DEVICE_COLUMNS + names
        rewrite, existing = True, []
        if path.is_file():
            with path.open(newline="", encoding="utf-8") as previous:
                reader = csv.DictReader(previous)
                header = list(reader.fieldnames or [])
                if set(columns) <= set(header):
                    columns, rewrite = header, False
                else:
                    existing = list(reader)
                    added = (set(header) | set(names)) - set(_DEVICE_COLUMNS)
                    columns = _DEVICE_COLUMNS + sorted(added)
        target = path.with_name(f".{path.name}.tmp") if rewrite else path
        values = [np.asarray(result.per_device[name]).tolist() for name in names]
        groups = [GROUP_NAMES[code] for code in np.asarray(result.group).tolist()]
        with target.open("w" if rewrite else "a", newline="", encoding="utf-8") as out:
            writer = csv.DictWriter(out, fieldnames=columns, restval="")
            if rewrite:
                writer.writeheader()
                writer.writerows(existing)
            for device, (group, *device_values) in enumerate(zip(groups, *values, strict=True)):
                row = {"strategy": result.strategy, "seed": result.seed, "device": device}
                writer.writerow(
                    row | {"group": group} | dict(zip(names, device_values, strict=True))
                )
        if rewrite:
            os.replace(target, path)

    def _report(
        self, run: RunInfo, results: Sequence[StrategyResult], rows: Sequence[SummaryRow]
    ) -> str:
        seen_metrics = dict.fromkeys(key for result in results for key in result.metrics)
        other_metrics = [key for key in seen_metrics if key not in MAIN_METRICS + GROUP_METRICS]
        cost_keys = list(dict.fromkeys([*COST_KEYS, *(k for r in results for k in r.cost)]))
        note = ["note"] if any(row["note"] for row in rows) else []
        seeds = sorted({result.seed for result in results})
        title = self.title or f"coevo run {self.run_dir.name}"
        parts = [f"# {title}\n\n"]
        parts += ["## Data\n\n", "| fact | value |\n|---|---|\n"]
        parts += [f"| {_fact(key)} | {_fact(value)} |\n" for key, value in run.dataset.items()]
        parts += [
            "\n## Models\n\n",
            "| model | params | FLOPs per request (one user, 100 candidates) |\n|---|---:|---:|\n",
        ]
        for name, facts in run.models.items():
            params = format_count(facts["params"]) if "params" in facts else MISSING
            flops = facts.get("flops_per_prediction")
            flops_text = MISSING if flops is None else format_flops(flops)
            parts.append(f"| {_fact(name)} | {params} | {flops_text} |\n")
        parts += [
            "\n## Quality\n\n",
            f"Mean ± population std over seeds {', '.join(map(str, seeds))}; "
            "under protocol P1 sampled metrics rank the test item among 99 negatives and `full_` "
            "metrics among all items.\n\n",
            markdown_table(rows, [*MAIN_METRICS, *note]),
            "\n## By activity group\n\n",
            "Tail and head are the bottom and top 20% of devices by cloud-period interactions.\n\n",
            markdown_table(rows, GROUP_METRICS),
            "\n## Cost\n\n",
            "Mean over seeds; byte counts are per device.\n\n",
            markdown_table(rows, cost_keys),
        ]
        if other_metrics:
            parts += ["\n## Other metrics\n\n", markdown_table(rows, other_metrics)]
        parts.append("\n## Plots\n\n")
        parts += [f"![{caption}]({name})\n\n" for name, caption in _PLOTS.items()]
        parts += [
            "## Reproduce\n\n",
            f"From this folder: `coevo run {CONFIG_FILE}`. Per-round records are in "
            f"`{ROUNDS_FILE}`, per-device metrics in `{DEVICES_FILE}`, raw results in "
            f"`{RESULTS_FILE}`.\n",
        ]
        return "".join(parts)
