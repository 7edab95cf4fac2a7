"""The report's plot for request policies: quality against requests per device.

Built on a ``matplotlib.figure.Figure`` with the Agg canvas, never through ``pyplot``, as the
report's other plots (``coevo.report.plots``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Point = tuple[float, float]
"""``(requests per device, quality)``."""


def plot_quality_vs_requests(
    curves: Mapping[str, Sequence[Point]],
    path: Path | str,
    *,
    metric: str = "GAUC",
    reference: float | None = None,
    keep: float = 0.995,
) -> Path:
    """One line per policy (points sorted by requests); returns ``path``.

    Args:
        curves: policy name -> its points, e.g. an IntellectReq threshold sweep.
        reference: the always-request quality; draws the ``keep`` share of it as a line.
    """
    figure = Figure(figsize=(6.0, 4.0), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, points in curves.items():
        ordered = sorted(points)
        style = "o-" if len(ordered) > 1 else "s"
        axes.plot([p[0] for p in ordered], [p[1] for p in ordered], style, label=name, ms=4)
    if reference is not None:
        axes.axhline(keep * reference, color="grey", ls="--", lw=1, label=f"{keep:.1%} of always")
    axes.set_xlabel("requests per device")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} against requests per device")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", bbox_inches="tight")
    figure.clear()
    return path
