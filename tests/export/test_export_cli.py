import re

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from coevo.cli import app
from coevo.config import RunConfig, parse
from coevo.export import OnnxScorer
from coevo.sim.experiment import build_task, load_log

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
    "strategies": [{"name": "finetune", "pretrain": {"epochs": 2}, "local": {"epochs": 1}}],
}


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    result = runner.invoke(app, ["run", str(path), "--output", str(folder / "run")])
    assert result.exit_code == 0, result.output
    return folder / "run"


def task_of(run_folder):
    config = parse(RunConfig, yaml.safe_load((run_folder / "config.yaml").read_text()))
    return build_task(load_log(config, config.seeds[0]), config, config.seeds[0])


def test_export_of_a_run_pretrains_writes_both_models_and_reports_parity(run_folder):
    result = runner.invoke(app, ["export", str(run_folder)])
    assert result.exit_code == 0, result.output
    diffs = [float(d) for d in re.findall(r"parity max \|diff\| (\S+)", result.output)]
    assert len(diffs) == 2 and diffs[0] < 1e-5 and 1e-6 < diffs[1] < 0.05
    assert "size ratio fp32/int8" in result.output
    # the written model scores the P1 test requests as the saved weights do in PyTorch
    task = task_of(run_folder)
    model = task.device_model().eval()
    model.load_state_dict(load_file(run_folder / "model.safetensors"), strict=False)
    history = task.split.history(task.split.target_rows("test"), 5)
    candidates = task.split.candidates("test")
    with torch.no_grad():
        expected = model(history, candidates).numpy()
    for name in ("model.onnx", "model.int8.onnx"):
        scores = OnnxScorer((run_folder / name).read_bytes()).score(history, candidates)
        assert abs(scores - expected).max() < (1e-5 if name == "model.onnx" else 0.05)
    # a second export of the run reuses the saved weights
    first = (run_folder / "model.onnx").read_bytes()
    again = runner.invoke(app, ["export", str(run_folder)])
    assert again.exit_code == 0 and "pretraining" not in again.output
    assert (run_folder / "model.onnx").read_bytes() == first


def test_export_with_weights_uses_them(run_folder, tmp_path):
    model = task_of(run_folder).device_model()
    weights = {n: torch.full_like(p, 0.01) for n, p in model.named_parameters()}
    checkpoint = tmp_path / "simulation.safetensors"
    save_file({f"cloud/{k}": v for k, v in weights.items()}, checkpoint)
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["export", str(run_folder), "--weights", str(checkpoint), "--output", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "pretraining" not in result.output
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.int8.onnx"}


def test_bad_weights_and_sources_are_named(run_folder, tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    result = runner.invoke(app, ["export", str(run_folder), "--weights", str(corrupt)])
    assert result.exit_code == 2 and "--weights" in result.output
    assert "not a readable safetensors" in result.output
    partial = tmp_path / "partial.safetensors"
    save_file({"head.weight": torch.zeros(8, 8)}, partial)
    result = runner.invoke(app, ["export", str(run_folder), "--weights", str(partial)])
    assert result.exit_code == 2 and "lacks" in result.output and "tower.weight" in result.output
    model = task_of(run_folder).device_model()
    wrong = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    wrong["head.weight"] = torch.zeros(3, 3)
    save_file(wrong, tmp_path / "wrong.safetensors")
    result = runner.invoke(
        app, ["export", str(run_folder), "--weights", str(tmp_path / "wrong.safetensors")]
    )
    assert result.exit_code == 2 and "head.weight" in result.output and "(8, 8)" in result.output
    result = runner.invoke(app, ["export", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "not found" in result.output
