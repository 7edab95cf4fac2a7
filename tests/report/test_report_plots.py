import numpy as np

from coevo.report import (
    StrategyResult,
    aggregate,
    plot_device_distribution,
    plot_quality_by_group,
    plot_quality_by_strategy,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return data.startswith(PNG_MAGIC) and len(data) > 1000


def test_each_plot_writes_a_png_and_returns_its_path(tmp_path, results):
    rows = aggregate(results)

    paths = [
        plot_quality_by_strategy(rows, tmp_path / "a.png"),
        plot_quality_by_group(rows, tmp_path / "b.png"),
        plot_device_distribution(results, tmp_path / "nested" / "c.png"),
    ]

    assert paths == [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "nested" / "c.png"]
    assert all(_is_png(path) for path in paths)


def test_plots_tolerate_missing_metrics_and_nan(tmp_path):
    group = np.array([0, 1, 2])
    results = [
        StrategyResult("pop", 0, {"hr@10": 0.4}, {}, group),
        StrategyResult("nan", 0, {"ndcg@10": float("nan")}, {"ndcg@10": np.full(3, np.nan)}, group),
    ]
    rows = aggregate(results)

    assert _is_png(plot_quality_by_strategy(rows, tmp_path / "a.png"))
    assert _is_png(plot_quality_by_group(rows, tmp_path / "b.png"))
    assert _is_png(plot_device_distribution(results, tmp_path / "c.png", metric="gauc"))
    assert _is_png(plot_device_distribution(results, tmp_path / "d.png"))
