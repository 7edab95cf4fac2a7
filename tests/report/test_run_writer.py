import csv
import json

import numpy as np
import pytest
import torch
import yaml

from coevo.report import (
    CallbackList,
    RunInfo,
    RunWriter,
    StrategyResult,
    load_results,
    load_strategy_results,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("quality_by_strategy.png", "quality_by_group.png", "device_distribution.png")


def _fake_run(writer, run_info, results, rounds_per_result=3):
    callbacks = CallbackList([writer])
    callbacks.on_run_start(run_info)
    for result in results:
        for round_index in range(rounds_per_result):
            callbacks.on_round_end(
                {
                    "strategy": result.strategy,
                    "seed": result.seed,
                    "round": np.int64(round_index),
                    "loss": np.float32(0.5),
                    "bytes_up": torch.tensor(1024.0),
                }
            )
        callbacks.on_strategy_end(result)
    callbacks.on_run_end(results)


def test_writer_produces_a_complete_run_folder(run_info, results):
    _fake_run(RunWriter(), run_info, results)
    run_dir = run_info.run_dir

    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == run_info.config

    lines = (run_dir / "rounds.jsonl").read_text().splitlines()
    assert len(lines) == len(results) * 3
    first = json.loads(lines[0])
    assert first == {
        "strategy": "cloud_only",
        "seed": 0,
        "round": 0,
        "loss": 0.5,
        "bytes_up": 1024.0,
    }
    assert isinstance(first["loss"], float)

    with (run_dir / "devices.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        device_rows = list(reader)
    assert reader.fieldnames == ["strategy", "seed", "device", "group", "hr@10", "ndcg@10"]
    assert len(device_rows) == 3 * 2 * 6
    assert [row["group"] for row in device_rows[:6]] == [
        "tail",
        "tail",
        "mid",
        "mid",
        "head",
        "head",
    ]
    assert float(device_rows[4]["ndcg@10"]) == pytest.approx(0.7 + 0.40 - 0.45)

    loaded = load_results(run_dir)
    assert [(r["strategy"], r["seed"]) for r in loaded] == [(r.strategy, r.seed) for r in results]
    assert loaded[0]["metrics"]["hr@10"] == pytest.approx(0.60)
    assert loaded[4]["note"] == "privacy-free upper bound"
    again = load_strategy_results(run_dir)
    assert [(r.strategy, r.seed, r.note) for r in again] == [
        (r.strategy, r.seed, r.note) for r in results
    ]
    assert again[0].metrics["hr@10"] == pytest.approx(0.60) and again[0].cost == results[0].cost

    report = (run_dir / "report.md").read_text()
    for name in ("cloud_only", "finetune", "central_oracle", "privacy-free upper bound"):
        assert name in report
    for heading in ("## Data", "## Models", "## Quality", "## By activity group", "## Cost"):
        assert heading in report
    assert "| device | 56.0 k | 120.0 KFLOP |" in report
    assert "| device_period_size | p20: 7, p50: 16, p80: 43 |" in report
    assert "0.6200 ± 0.0200" in report
    assert "–" in report
    assert "`coevo run config.yaml`" in report
    for plot in PLOTS:
        assert f"]({plot})" in report
        data = (run_dir / plot).read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 1000

    assert sorted(path.name for path in run_dir.iterdir()) == sorted(
        ["config.yaml", "rounds.jsonl", "devices.csv", "results.json", "report.md", *PLOTS]
    )


def test_results_are_on_disk_after_each_strategy(run_info, results):
    writer = RunWriter()
    writer.on_run_start(run_info)

    writer.on_strategy_end(results[0])
    assert len(load_results(run_info.run_dir)) == 1
    writer.on_strategy_end(results[1])
    assert len(load_results(run_info.run_dir)) == 2


def test_devices_csv_gains_columns_a_later_strategy_brings(run_info):
    group = np.array([0, 2])
    first = StrategyResult("pop", 0, {}, {"ndcg@10": np.array([0.1, 0.2])}, group)
    second = StrategyResult(
        "ditto", 0, {}, {"ndcg@10": np.array([0.3, 0.4]), "gauc": np.array([0.8, 0.9])}, group
    )
    writer = RunWriter()
    writer.on_run_start(run_info)

    writer.on_strategy_end(first)
    writer.on_strategy_end(second)
    writer.on_strategy_end(first)

    with (run_info.run_dir / "devices.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == ["strategy", "seed", "device", "group", "gauc", "ndcg@10"]
    assert [(row["strategy"], row["gauc"], row["group"]) for row in rows] == [
        ("pop", "", "tail"),
        ("pop", "", "head"),
        ("ditto", "0.8", "tail"),
        ("ditto", "0.9", "head"),
        ("pop", "", "tail"),
        ("pop", "", "head"),
    ]


def test_non_empty_run_dir_is_refused(run_info):
    run_info.run_dir.mkdir(parents=True)
    (run_info.run_dir / "old.txt").write_text("from another run")

    with pytest.raises(FileExistsError, match="demo"):
        RunWriter().on_run_start(run_info)


def test_a_file_in_place_of_run_dir_is_refused(tmp_path):
    (tmp_path / "run").write_text("")

    with pytest.raises(FileExistsError, match="run"):
        RunWriter().on_run_start(RunInfo(run_dir=tmp_path / "run", config={}))


def test_empty_existing_run_dir_is_accepted(tmp_path):
    (tmp_path / "run").mkdir()

    RunWriter().on_run_start(RunInfo(run_dir=tmp_path / "run", config={"a": 1}))

    assert (tmp_path / "run" / "config.yaml").is_file()


def test_hooks_before_run_start_fail_clearly():
    with pytest.raises(RuntimeError, match="on_run_start"):
        RunWriter().on_round_end({"round": 1})


def test_load_results_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"results\.json"):
        load_results(tmp_path)
