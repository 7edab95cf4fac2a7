import json

import pytest
import yaml
from typer.testing import CliRunner

from coevo.cli import app

runner = CliRunner()

TINY = {
    "name": "tiny",
    "data": {
        "name": "synthetic",
        "synthetic": {
            "num_devices": 30,
            "num_items": 150,
            "min_interactions": 10,
            "mean_interactions": 15,
            "max_interactions": 40,
        },
    },
    "models": {"device": {"dim": 8, "history_len": 5}, "cloud": {"dim": 8, "history_len": 8}},
    "strategies": [
        {"name": "popularity"},
        {"name": "finetune", "pretrain": {"epochs": 1}, "local": {"epochs": 1}},
    ],
}


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_run_writes_a_complete_run_folder(config_file, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(config_file), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {
        "config.yaml",
        "rounds.jsonl",
        "devices.csv",
        "report.md",
        "results.json",
        "quality_by_strategy.png",
    }
    results = json.loads((out / "results.json").read_text())
    assert [r["strategy"] for r in results] == ["popularity", "finetune"]
    report = (out / "report.md").read_text()
    assert "finetune" in report and "popularity" in report
    # the saved config reproduces the run's settings
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["strategies"][1]["pretrain"]["epochs"] == 1


def test_overrides_apply_and_bad_values_name_the_field(config_file):
    ok = runner.invoke(app, ["validate", str(config_file), "--set", "strategies.1.mode=head"])
    assert ok.exit_code == 0, ok.output
    assert "mode: head" in ok.output
    bad = runner.invoke(app, ["validate", str(config_file), "--set", "strategies.1.mode=all"])
    assert bad.exit_code == 2
    assert "strategies.1.mode" in bad.output and "'full' or 'head'" in bad.output
    unknown = runner.invoke(
        app, ["validate", str(config_file), "--set", "strategies.0.name=fedavgg"]
    )
    assert unknown.exit_code == 2 and "strategies.0.name" in unknown.output
    extra = runner.invoke(app, ["validate", str(config_file), "--set", "protocol.varaint=P1"])
    assert extra.exit_code == 2 and "unknown field" in extra.output and "variant" in extra.output


def test_heads_must_divide_the_width(config_file):
    bad = runner.invoke(app, ["validate", str(config_file), "--set", "models.cloud.heads=3"])
    assert bad.exit_code == 2 and "models.cloud.heads" in bad.output


def test_data_info_explains_missing_data(tmp_path, monkeypatch):
    monkeypatch.delenv("COEVO_DATA", raising=False)
    monkeypatch.setenv("COEVO_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(app, ["data", "info", "movielens-100k", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "COEVO_DATA" in result.output and "--data-dir" in result.output


def test_data_info_on_the_synthetic_world():
    result = runner.invoke(app, ["data", "info", "synthetic"])
    assert result.exit_code == 0, result.output
    assert "1,000" in result.output and "per_device_median" in result.output


def test_federated_run_with_fleet_codecs_and_early_stopping(tmp_path):
    config = {
        **TINY,
        "simulation": {
            "devices_per_round": 10,
            "over_selection": 1.5,
            "fleet": {"availability": "always", "dropout_rate": 0.1},
            "uplink_codecs": [{"name": "topk", "fraction": 0.2}, {"name": "int8"}],
            "early_stopping": {"every": 1, "patience": 1},
        },
        "strategies": [
            {"name": "fedavg", "rounds": 30, "local": {"epochs": 1, "lr": 0.5, "optimizer": "sgd"}}
        ],
    }
    path = tmp_path / "fl.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(path), "--output", str(out)])
    assert result.exit_code == 0, result.output
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    training = [r for r in rounds if r.get("phase") != "evaluate"]
    assert 2 <= len(training) < 30  # early stopping ended the run
    assert all(r["selected"] == 15 and r["reported"] <= 10 for r in training)
    times = [r["virtual_seconds"] for r in training]
    assert times == sorted(times) and times[0] > 0
    assert all(r["energy_j"] > 0 and r["device_flops"] > 0 for r in training)


def test_bad_simulation_settings_name_the_field(config_file):
    bad = runner.invoke(
        app, ["validate", str(config_file), "--set", "simulation.uplink_codecs=[{name: zip}]"]
    )
    assert bad.exit_code == 2 and "simulation.uplink_codecs.0.name" in bad.output
    mix = runner.invoke(
        app, ["run", str(config_file), "--set", "simulation.fleet={mix: {toaster: 1.0}}"]
    )
    assert mix.exit_code == 2 and "simulation.fleet.mix" in mix.output and "toaster" in mix.output
