import io

import numpy as np
import pytest
from rich.console import Console

from coevo.report import (
    COST_KEYS,
    MAIN_METRICS,
    StrategyResult,
    aggregate,
    format_bytes,
    format_flops,
    format_mean_std,
    markdown_table,
    rich_table,
)


def test_aggregate_mean_and_population_std_by_hand(results):
    rows = aggregate(results)

    assert [row["strategy"] for row in rows] == ["cloud_only", "finetune", "central_oracle"]
    cloud = rows[0]
    assert cloud["n_seeds"] == 2
    assert cloud["seeds"] == [0, 1]
    # hr@10 seeds 0.60 and 0.64: mean 0.62, population std |0.64 - 0.60| / 2 = 0.02.
    assert cloud["mean"]["hr@10"] == pytest.approx(0.62)
    assert cloud["std"]["hr@10"] == pytest.approx(0.02)
    # ndcg@10 seeds 0.40 and 0.46: mean 0.43, std 0.03.
    assert cloud["mean"]["ndcg@10"] == pytest.approx(0.43)
    assert cloud["std"]["ndcg@10"] == pytest.approx(0.03)
    # cost train_seconds 3 and 4: mean 3.5, std 0.5.
    assert cloud["mean"]["train_seconds"] == pytest.approx(3.5)
    assert cloud["std"]["train_seconds"] == pytest.approx(0.5)
    assert rows[1]["std"]["hr@10"] == pytest.approx(0.0)
    assert "full_recall@20" not in rows[1]["mean"]
    assert rows[2]["note"] == "privacy-free upper bound"
    assert rows[0]["note"] == ""


def test_aggregate_one_seed_has_zero_std_and_partial_keys_use_seeds_that_have_them():
    group = np.array([0, 1, 2])
    one = StrategyResult("pop", 0, {"hr@10": 0.4, "mrr": 0.2}, {}, group)
    other = StrategyResult("pop", 1, {"hr@10": 0.5}, {}, group)

    (single,) = aggregate([one])
    (both,) = aggregate([one, other])

    assert single["std"]["hr@10"] == 0.0
    assert both["mean"]["mrr"] == pytest.approx(0.2)
    assert both["mean"]["hr@10"] == pytest.approx(0.45)


def test_format_mean_std():
    assert format_mean_std(0.68123, 0.00401) == "0.6812 ± 0.0040"
    assert format_mean_std(0.68123, 0.0, n_seeds=1) == "0.6812"
    assert format_mean_std(0.68123, 0.00401, digits=2) == "0.68 ± 0.00"
    assert format_mean_std(0.5, None) == "0.5000"


def test_human_readable_counts():
    assert format_bytes(12_300) == "12.3 KB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(2_500_000) == "2.5 MB"
    assert format_flops(1.2e6) == "1.2 MFLOP"
    assert format_flops(3.1e10) == "31.0 GFLOP"


def test_markdown_table_rows_missing_marker_and_units(results):
    rows = aggregate(results)

    text = markdown_table(rows, [*MAIN_METRICS, "note"])
    lines = text.strip().splitlines()

    assert len(lines) == 2 + 3
    assert lines[0].startswith("| strategy | HR@10 | NDCG@10 |")
    assert {line.count("|") for line in lines[0:1] + lines[2:]} == {len(MAIN_METRICS) + 3}
    finetune = next(line for line in lines if line.startswith("| finetune "))
    assert finetune.split("|")[-3].strip() == "–"
    assert "0.6200 ± 0.0200" in next(line for line in lines if line.startswith("| cloud_only "))
    assert "privacy-free upper bound" in lines[-1]

    cost = markdown_table(rows, COST_KEYS)
    assert "12.3 KB" in cost
    assert "2.5 MB" in cost
    assert "1.2 MFLOP" in cost
    assert "56.0 k" in cost
    assert "3.5 s ± 0.5 s" in cost


def test_markdown_table_escapes_pipes():
    result = StrategyResult("a|b", 0, {"hr@10": 0.5}, {}, np.array([0]))

    text = markdown_table(aggregate([result]), ["hr@10"])

    assert "| a\\|b | 0.5000 |" in text


def test_rich_table_renders_every_strategy(results):
    table = rich_table(aggregate(results), MAIN_METRICS, title="Quality")
    buffer = io.StringIO()

    Console(file=buffer, width=200).print(table)

    assert table.row_count == 3
    output = buffer.getvalue()
    assert "Quality" in output
    for name in ("cloud_only", "finetune", "central_oracle"):
        assert name in output
