"""ONNX Runtime on the device: score requests with an exported (fp32 or int8) scorer."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from coevo.export.onnx import INPUTS, OUTPUT, ExportError, with_params
from coevo.export.quantize import load_model

ArrayLike = np.ndarray | torch.Tensor


class OnnxScorer:
    """One ONNX Runtime session over an exported scorer, created once and reused.

    Args:
        onnx_bytes: a model from ``to_onnx`` or ``quantize_int8``.
        threads: intra-op threads; 1 suits a device serving one request at a time (and a
            host running many device processes).

    Example:
        >>> from coevo.tasks.models import DeviceModel
        >>> from coevo.export import to_onnx
        >>> scorer = OnnxScorer(to_onnx(DeviceModel(num_items=50, dim=8, history_len=5)))
        >>> scorer.score([[1, 2, 3, 50, 50]], [[4, 5, 6]]).shape
        (1, 3)
    """

    def __init__(self, onnx_bytes: bytes, *, threads: int = 1) -> None:
        import onnxruntime as ort

        if not 1 <= threads <= 256:
            raise ExportError(f"threads: {threads}, must be in [1, 256]")
        model = load_model(onnx_bytes)
        names = tuple(i.name for i in model.graph.input)
        if names != INPUTS:
            raise ExportError(f"onnx_bytes: inputs {names}, a scorer needs {INPUTS}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.num_bytes = len(onnx_bytes)
        self.session = ort.InferenceSession(
            bytes(onnx_bytes), options, providers=["CPUExecutionProvider"]
        )

    def score(self, history: ArrayLike, candidates: ArrayLike) -> np.ndarray:
        """Scores ``[batch, num_candidates]`` (float32) of item ids; torch or numpy input."""
        history_ids = _ids(history, "history")
        candidate_ids = _ids(candidates, "candidates")
        if history_ids.shape[0] != candidate_ids.shape[0]:
            raise ExportError(
                f"candidates: batch {candidate_ids.shape[0]}, history has {history_ids.shape[0]}"
            )
        feed = {"history": history_ids, "candidates": candidate_ids}
        (scores,) = self.session.run([OUTPUT], feed)
        return np.asarray(scores)


def _ids(values: ArrayLike, field: str) -> np.ndarray:
    array = (
        values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    )
    if array.ndim != 2 or min(array.shape) == 0:
        raise ExportError(f"{field}: shape {array.shape}, expected [batch, n] with batch, n >= 1")
    if not np.issubdtype(array.dtype, np.integer):
        raise ExportError(f"{field}: dtype {array.dtype}, expected integer item ids")
    return np.ascontiguousarray(array, dtype=np.int64)


def parity(
    model: nn.Module,
    params: Mapping[str, torch.Tensor] | None,
    onnx_bytes: bytes,
    history: ArrayLike,
    candidates: ArrayLike,
) -> float:
    """Largest absolute difference between PyTorch's and ONNX Runtime's scores."""
    history_ids = torch.from_numpy(_ids(history, "history"))
    candidate_ids = torch.from_numpy(_ids(candidates, "candidates"))
    with torch.no_grad():
        expected = with_params(model, params)(history_ids, candidate_ids).float().numpy()
    actual = OnnxScorer(onnx_bytes).score(history_ids, candidate_ids)
    if actual.shape != expected.shape:
        raise ExportError(
            f"onnx_bytes: scores of shape {actual.shape}, torch gives {expected.shape}"
        )
    return float(np.abs(actual - expected).max())
