"""PNG plots for the run report.

Figures are built as ``matplotlib.figure.Figure`` objects and saved through the Agg renderer
directly, never through ``pyplot``: that leaves the process-wide backend and pyplot's figure
registry untouched (no backend-switch warnings, no figures kept alive, safe in threads), and each
figure is freed as soon as it is saved.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from coevo.report.records import GROUP_NAMES, StrategyResult
from coevo.report.tables import SummaryRow, column_label

_DPI = 120


def _new_figure(num_strategies: int) -> tuple[Figure, Axes]:
    width_inches = max(5.0, 1.2 * num_strategies + 2.0)
    figure = Figure(figsize=(width_inches, 4.0), dpi=_DPI)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _save(figure: Figure, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", bbox_inches="tight")
    figure.clear()
    return path


def _label_strategies(axes: Axes, positions: np.ndarray, names: Sequence[str]) -> None:
    axes.set_xticks(positions, list(names), rotation=30, ha="right")
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)


def _grouped_bars(
    axes: Axes, rows: Sequence[SummaryRow], keys: Sequence[str], labels: Sequence[str]
) -> None:
    """One cluster of bars per strategy, one bar per key, std over seeds as error bars.

    A strategy that lacks a key gets no bar there rather than a misleading zero.
    """
    positions = np.arange(len(rows), dtype=float)
    width = 0.8 / max(len(keys), 1)
    for index, (key, label) in enumerate(zip(keys, labels, strict=True)):
        present = [i for i, row in enumerate(rows) if key in row["mean"]]
        offset = (index - (len(keys) - 1) / 2) * width
        axes.bar(
            positions[present] + offset,
            [rows[i]["mean"][key] for i in present],
            width,
            yerr=[rows[i]["std"][key] for i in present],
            capsize=3,
            label=label,
        )
    _label_strategies(axes, positions, [row["strategy"] for row in rows])
    axes.legend(loc="best", fontsize="small")


def plot_quality_by_strategy(rows: Sequence[SummaryRow], path: Path | str) -> Path:
    """Bars of NDCG@10 and HR@10 per strategy, with std over seeds; returns ``path``."""
    figure, axes = _new_figure(len(rows))
    keys = ("ndcg@10", "hr@10")
    _grouped_bars(axes, rows, keys, [column_label(key) for key in keys])
    axes.set_ylabel("score (mean ± std over seeds)")
    axes.set_title("Quality by strategy")
    return _save(figure, path)


def plot_quality_by_group(rows: Sequence[SummaryRow], path: Path | str) -> Path:
    """Grouped bars of NDCG@10 for the tail, mid and head activity groups; returns ``path``."""
    figure, axes = _new_figure(len(rows))
    _grouped_bars(axes, rows, [f"ndcg@10/{name}" for name in GROUP_NAMES], GROUP_NAMES)
    axes.set_ylabel("NDCG@10 (mean ± std over seeds)")
    axes.set_title("NDCG@10 by activity group")
    return _save(figure, path)


def plot_device_distribution(
    results: Sequence[StrategyResult], path: Path | str, metric: str = "ndcg@10"
) -> Path:
    """Box plot of per-device ``metric``, one box per strategy, from its first seed.

    Only one seed is drawn because per-device values of different seeds are not independent
    samples of the same device population. Strategies without that per-device metric are left
    out; returns ``path``.
    """
    first_seed: dict[str, StrategyResult] = {}
    for result in results:
        first_seed.setdefault(result.strategy, result)
    drawn = {
        name: np.asarray(result.per_device[metric], dtype=float)
        for name, result in first_seed.items()
        if metric in result.per_device and len(result.per_device[metric])
    }
    figure, axes = _new_figure(len(drawn))
    if drawn:
        positions = np.arange(1, len(drawn) + 1, dtype=float)
        axes.boxplot(list(drawn.values()), positions=positions, showmeans=True)
        _label_strategies(axes, positions, list(drawn))
    else:
        axes.text(0.5, 0.5, f"no per-device {metric}", ha="center", va="center")
        axes.set_axis_off()
    axes.set_ylabel(f"per-device {column_label(metric)}")
    axes.set_title(f"Per-device {column_label(metric)} (first seed of each strategy)")
    return _save(figure, path)
