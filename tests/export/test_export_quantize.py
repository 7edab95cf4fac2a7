import tempfile

import numpy as np
import onnx
import pytest
import torch

from coevo.export import ExportError, OnnxScorer, quantize_int8, to_onnx
from coevo.tasks.models import DeviceModel

# int8 scores stay within this share of the largest fp32 score (measured: about 1.5%).
INT8_TOLERANCE = 0.04


@pytest.fixture(scope="module")
def realistic():
    """A MovieLens-sized device model: 1,682 items, 19 genre flags, width 32."""
    generator = torch.Generator().manual_seed(0)
    features = (torch.rand(1682, 19, generator=generator) < 0.1).float()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DeviceModel(1682, dim=32, history_len=20, item_features=features).eval()
    fp32 = to_onnx(model)
    return model, fp32, quantize_int8(fp32)


def test_int8_is_at_least_three_times_smaller(realistic):
    _, fp32, int8 = realistic
    assert len(fp32) / len(int8) >= 3.0
    graph = onnx.load_model_from_string(int8)
    kinds = {init.data_type for init in graph.graph.initializer}
    assert onnx.TensorProto.UINT8 in kinds
    assert "MatMulInteger" in {node.op_type for node in graph.graph.node}


def test_int8_scores_are_close_to_torch_and_rank_alike(realistic):
    model, _, int8 = realistic
    generator = torch.Generator().manual_seed(1)
    history = torch.randint(0, 1682, (64, 20), generator=generator)
    candidates = torch.randint(0, 1682, (64, 100), generator=generator)
    with torch.no_grad():
        expected = model(history, candidates).numpy()
    actual = OnnxScorer(int8).score(history, candidates)
    error = np.abs(actual - expected).max()
    assert 1e-6 < error <= INT8_TOLERANCE * np.abs(expected).max()
    top = np.argsort(-expected, 1)[:, :10]
    top_int8 = np.argsort(-actual, 1)[:, :10]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, top_int8, strict=True)])
    assert overlap >= 0.8


def test_quantisation_leaves_no_files(realistic, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    again = quantize_int8(realistic[1])
    assert list(tmp_path.iterdir()) == []
    assert abs(len(again) - len(realistic[2])) < 64


def test_corrupt_input_gives_a_clear_error(realistic):
    with pytest.raises(ExportError, match="onnx_bytes: not a valid ONNX model"):
        quantize_int8(realistic[1][:1000])
    with pytest.raises(ExportError, match="onnx_bytes: expected bytes, got str"):
        quantize_int8("model.onnx")  # type: ignore[arg-type]
