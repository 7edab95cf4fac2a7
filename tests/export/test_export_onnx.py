import importlib
import tempfile

import numpy as np
import onnx
import pytest
import torch

from coevo.export import ExportError, OnnxScorer, parity, to_onnx
from coevo.export import onnx as export_onnx
from coevo.tasks.models import DeviceModel
from coevo.testing import tiny_task


def random_params(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: 0.3 * torch.randn(p.shape, generator=generator)
        for name, p in model.named_parameters()
    }


@pytest.fixture(scope="module")
def task():
    return tiny_task()


@pytest.fixture(scope="module")
def exported(task):
    model = task.device_model()
    params = random_params(model, 1)
    return model, params, to_onnx(model, params)


def requests(num_items: int, batch: int, length: int, num_candidates: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    history = torch.randint(0, num_items + 1, (batch, length), generator=generator)
    history[0] = num_items  # a user with no history at all
    candidates = torch.randint(0, num_items, (batch, num_candidates), generator=generator)
    return history, candidates


def test_fp32_export_matches_torch_with_the_given_weights(task, exported):
    model, params, blob = exported
    history, candidates = requests(task.num_items, 16, 5, 100, 0)
    assert parity(model, params, blob, history, candidates) < 1e-5
    # the graph holds the given weights, not the model's own initial ones
    assert parity(model, None, blob, history, candidates) > 1e-2


@pytest.mark.parametrize(
    ("batch", "length", "num_candidates"), [(1, 5, 1), (7, 3, 100), (33, 12, 150), (2, 1, 2)]
)
def test_batch_history_length_and_candidate_count_are_dynamic(
    task, exported, batch, length, num_candidates
):
    model, params, blob = exported
    history, candidates = requests(task.num_items, batch, length, num_candidates, batch)
    scores = OnnxScorer(blob).score(history, candidates)
    assert scores.shape == (batch, num_candidates) and scores.dtype == np.float32
    assert parity(model, params, blob, history.numpy(), candidates.numpy()) < 1e-5


def test_a_second_export_of_the_architecture_carries_its_own_weights(task, exported):
    model, first, blob = exported
    second = random_params(model, 3)
    again = to_onnx(model, second)
    history, candidates = requests(task.num_items, 8, 5, 20, 3)
    assert parity(model, second, again, history, candidates) < 1e-5
    assert parity(model, first, blob, history, candidates) < 1e-5
    assert parity(model, first, again, history, candidates) > 1e-2


def test_graph_has_opset_17_or_more_and_named_dynamic_axes(exported):
    graph = onnx.load_model_from_string(exported[2])
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    axes = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert axes == {"history": ["batch", "length"], "candidates": ["batch", "num_candidates"]}


def test_a_fixed_candidate_count_is_static_in_the_graph(task):
    model = task.device_model()
    graph = onnx.load_model_from_string(to_onnx(model, num_candidates=100))
    candidates = graph.graph.input[1].type.tensor_type.shape.dim
    assert candidates[0].dim_param == "batch" and candidates[1].dim_value == 100


def test_export_leaves_no_files_and_does_not_change_the_model(task, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(export_onnx, "_GRAPHS", {})  # trace afresh
    monkeypatch.chdir(tmp_path)
    model = task.device_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    to_onnx(model, random_params(model, 2))
    assert list(tmp_path.iterdir()) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_weights_name_the_parameter(task):
    model = task.device_model()
    with pytest.raises(ExportError, match=r"params\['head.weight'\]: shape \(3, 3\)"):
        to_onnx(model, {"head.weight": torch.zeros(3, 3)})
    with pytest.raises(ExportError, match=r"unknown names \['tower\.bias2'\]"):
        to_onnx(model, {"tower.bias2": torch.zeros(8)})
    with pytest.raises(ExportError, match=r"params\['tower.bias'\]: holds NaN"):
        to_onnx(model, {"tower.bias": torch.full((8,), float("nan"))})
    with pytest.raises(ExportError, match="num_candidates"):
        to_onnx(model, num_candidates=0)


def test_corrupt_or_foreign_bytes_give_a_clear_error(exported):
    blob = exported[2]
    for bad in (b"", b"definitely not onnx", blob[: len(blob) // 2]):
        with pytest.raises(ExportError, match=r"onnx_bytes: (empty|not a valid ONNX model)"):
            OnnxScorer(bad)
    identity = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
    )
    with pytest.raises(ExportError, match=r"inputs \('x',\), a scorer needs"):
        OnnxScorer(identity.SerializeToString())


def test_requests_are_checked_before_they_reach_the_runtime(exported):
    scorer = OnnxScorer(exported[2])
    with pytest.raises(ExportError, match="candidates: batch 2, history has 1"):
        scorer.score([[1, 2]], [[3], [4]])
    with pytest.raises(ExportError, match="history: dtype float"):
        scorer.score(np.ones((1, 2)), [[3]])
    with pytest.raises(ExportError, match="candidates: shape"):
        scorer.score([[1, 2]], [3, 4])


def test_other_scorers_export_as_they_are():
    class Popular(torch.nn.Module):
        num_items, history_len = 20, 4

        def __init__(self) -> None:
            super().__init__()
            self.bias = torch.nn.Parameter(torch.linspace(-1, 1, 21))

        def forward(self, history, candidates):
            return self.bias[candidates] + 0.0 * history.sum(1, keepdim=True)

    model = Popular()
    history, candidates = requests(20, 3, 4, 6, 0)
    assert parity(model, None, to_onnx(model), history, candidates) < 1e-6


def test_public_names_are_sorted_and_importable():
    module = importlib.import_module("coevo.export")
    assert list(module.__all__) == sorted(module.__all__, key=lambda s: (not s[:1].isupper(), s))
    assert all(hasattr(module, name) for name in module.__all__)
    assert DeviceModel.__name__ not in module.__all__
