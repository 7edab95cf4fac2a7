"""Records, tables and plots of a run: what a run hands over, and the callbacks that write it.

A run calls ``Callback`` hooks; ``RunWriter`` turns them into a folder with ``config.yaml``,
``rounds.jsonl``, ``devices.csv``, ``results.json``, PNG plots and ``report.md``, and
``RichProgress`` draws progress bars.
"""

from coevo.report.callbacks import Callback, CallbackList, RichProgress
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
    SummaryRow,
    aggregate,
    format_bytes,
    format_flops,
    format_mean_std,
    markdown_table,
    rich_table,
)
from coevo.report.writer import RunWriter, load_results, load_strategy_results

__all__ = [
    "COST_KEYS",
    "GROUP_METRICS",
    "GROUP_NAMES",
    "MAIN_METRICS",
    "Callback",
    "CallbackList",
    "RichProgress",
    "RunInfo",
    "RunWriter",
    "StrategyResult",
    "SummaryRow",
    "aggregate",
    "format_bytes",
    "format_flops",
    "format_mean_std",
    "load_results",
    "load_strategy_results",
    "markdown_table",
    "plot_device_distribution",
    "plot_quality_by_group",
    "plot_quality_by_strategy",
    "rich_table",
    "to_plain",
]
