"""Summary rows over seeds, and the same rows as markdown or ``rich`` tables."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import TypedDict

import numpy as np
from rich.table import Table

from coevo.report.records import StrategyResult

MAIN_METRICS = (
    "hr@10",
    "ndcg@10",
    "gauc",
    "mrr",
    "full_hr@10",
    "full_ndcg@10",
    "full_recall@20",
)
"""Quality columns every report shows (PROTOCOL item 7)."""

GROUP_METRICS = (
    "ndcg@10/tail",
    "ndcg@10/mid",
    "ndcg@10/head",
    "ndcg@10/head_minus_tail",
    "ndcg@10/std",
)
"""Heterogeneity and fairness columns (PROTOCOL item 8)."""

COST_KEYS = (
    "bytes_up_per_device",
    "bytes_down_per_device",
    "device_params",
    "device_flops_per_prediction",
    "device_train_flops_forward",
    "device_train_flops_backward",
    "requests_per_device",
    "train_seconds",
)
"""Cost columns (PROTOCOL item 9)."""

MISSING = "–"
"""What a table shows for a number a strategy did not report."""


class SummaryRow(TypedDict):
    """One strategy summarised over its seeds; metric and cost keys share ``mean`` and ``std``."""

    strategy: str
    n_seeds: int
    seeds: list[int]
    note: str
    mean: dict[str, float]
    std: dict[str, float]


def aggregate(results: Sequence[StrategyResult]) -> list[SummaryRow]:
    """Groups results by strategy, in first-seen order, and summarises each key over seeds.

    ``std`` is the population standard deviation over seeds (0 for one seed). A key that only some
    seeds report is summarised over those seeds. The note is the first non-empty one.
    """
    by_strategy: dict[str, list[StrategyResult]] = {}
    for result in results:
        by_strategy.setdefault(result.strategy, []).append(result)
    rows: list[SummaryRow] = []
    for strategy, runs in by_strategy.items():
        mean: dict[str, float] = {}
        std: dict[str, float] = {}
        for source in ("metrics", "cost"):
            keys = dict.fromkeys(key for run in runs for key in getattr(run, source))
            for key in keys:
                values = np.array(
                    [
                        float(getattr(run, source)[key])
                        for run in runs
                        if key in getattr(run, source)
                    ]
                )
                mean[key] = float(values.mean())
                std[key] = float(values.std())
        rows.append(
            SummaryRow(
                strategy=strategy,
                n_seeds=len(runs),
                seeds=[run.seed for run in runs],
                note=next((run.note for run in runs if run.note), ""),
                mean=mean,
                std=std,
            )
        )
    return rows


def format_mean_std(
    mean: float, std: float | None, digits: int = 4, *, n_seeds: int | None = None
) -> str:
    """``"0.6812 ± 0.0040"``; just ``"0.6812"`` when there is one seed or no ``std``."""
    if std is None or n_seeds == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _scaled(value: float, units: Sequence[str], base: float = 1000.0) -> str:
    """``value`` in the largest unit that keeps it at least 1, with one decimal."""
    if not math.isfinite(value):
        return f"{value} {units[0]}".strip()
    index = 0
    while abs(value) >= base and index < len(units) - 1:
        value /= base
        index += 1
    if index == 0 and float(value).is_integer():
        return f"{value:.0f} {units[0]}".strip()
    return f"{value:.1f} {units[index]}".strip()


def format_bytes(num_bytes: float) -> str:
    """Decimal units, as links are priced: ``12300 -> "12.3 KB"``."""
    return _scaled(num_bytes, ("B", "KB", "MB", "GB", "TB", "PB"))


def format_flops(flops: float) -> str:
    """``1.2e6 -> "1.2 MFLOP"``."""
    return _scaled(flops, ("FLOP", "KFLOP", "MFLOP", "GFLOP", "TFLOP", "PFLOP"))


def format_count(count: float) -> str:
    """``56000 -> "56.0 k"``."""
    return _scaled(count, ("", "k", "M", "G", "T"))


def format_seconds(seconds: float) -> str:
    """``12.34 -> "12.3 s"``."""
    return f"{seconds:.1f} s"


def _unit_formatter(key: str) -> Callable[[float], str] | None:
    """How a cost-like key is shown, judged from its name; ``None`` for a quality metric."""
    name = key.lower()
    if "bytes" in name:
        return format_bytes
    if "flops" in name:
        return format_flops
    if "params" in name:
        return format_count
    if name.endswith("seconds"):
        return format_seconds
    return None


def format_cell(row: SummaryRow, key: str, digits: int = 4) -> str:
    """The text a table shows for ``key`` in ``row``; ``"–"`` when the strategy lacks it.

    ``"strategy"``, ``"note"`` and ``"n_seeds"`` name the row's own fields. Byte, FLOP, parameter
    and second counts are shown in human units, with ``± std`` only when seeds disagree, since
    costs are usually identical across seeds.
    """
    if key == "strategy":
        return row["strategy"]
    if key == "note":
        return row["note"]
    if key == "n_seeds":
        return str(row["n_seeds"])
    if key not in row["mean"]:
        return MISSING
    mean, std = row["mean"][key], row["std"][key]
    formatter = _unit_formatter(key)
    if formatter is None:
        return format_mean_std(mean, std, digits, n_seeds=row["n_seeds"])
    if row["n_seeds"] > 1 and std > 0:
        return f"{formatter(mean)} ± {formatter(std)}"
    return formatter(mean)


_WORDS = {
    "hr": "HR",
    "ndcg": "NDCG",
    "recall": "Recall",
    "gauc": "GAUC",
    "auc": "AUC",
    "mrr": "MRR",
    "flops": "FLOPs",
    "n": "#",
}


def column_label(key: str) -> str:
    """A header for ``key``: ``"ndcg@10/head_minus_tail" -> "NDCG@10 head minus tail"``."""
    spaced = key.replace("_", " ").replace("/", " ")
    return re.sub(r"[A-Za-z]+", lambda word: _WORDS.get(word.group(), word.group()), spaced)


def _escape_markdown(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[SummaryRow], columns: Sequence[str], digits: int = 4) -> str:
    """A GitHub markdown table, one strategy per line, ``columns`` after the strategy name.

    Args:
        rows: from ``aggregate``.
        columns: metric or cost keys, or ``"note"`` / ``"n_seeds"`` for those row fields.
        digits: decimals for quality metrics.
    """
    header = ["strategy", *(column_label(key) for key in columns)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", *("---:" if key != "note" else "---" for key in columns)]) + "|",
    ]
    for row in rows:
        cells = [format_cell(row, key, digits) for key in ("strategy", *columns)]
        lines.append("| " + " | ".join(_escape_markdown(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def rich_table(
    rows: Sequence[SummaryRow], columns: Sequence[str], title: str | None = None, digits: int = 4
) -> Table:
    """The same table as ``markdown_table``, for printing to a terminal with ``rich``."""
    table = Table(title=title)
    table.add_column("strategy", no_wrap=True)
    for key in columns:
        table.add_column(column_label(key), justify="left" if key == "note" else "right")
    for row in rows:
        table.add_row(*(format_cell(row, key, digits) for key in ("strategy", *columns)))
    return table
