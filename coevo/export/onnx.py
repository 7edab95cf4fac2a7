"""The recommendation device model's scorer as an ONNX graph, built in memory.

The graph computes what ``score_shared`` computes on the device: ``scores [batch,
num_candidates]`` (float32) from ``history [batch, length]`` and ``candidates [batch,
num_candidates]`` (int64 item ids, history left-padded with the padding item ``num_items``).
Batch, history length and candidate count are dynamic axes.

A :class:`~coevo.tasks.models.DeviceModel` is exported in its inference form: the item table
``item_embedding + feature_projection(item_features)`` is folded into one constant table, and
the item bias into a one-column table, both read with ``Gather``. The arithmetic is the model's
(scores agree to about 1e-7), the graph carries one table instead of an id table plus a content
feature table, and ONNX Runtime's dynamic quantisation turns both tables into int8 (it quantises
``Gather``, not the ``GatherND`` that tensor indexing exports to). Any other module with a
``forward(history, candidates)``, a ``DeviceModel`` subclass included, is exported as it is.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from coevo.tasks.models import DeviceModel

OPSET = 18
INPUTS = ("history", "candidates")
OUTPUT = "scores"


class ExportError(ValueError):
    """Bad input to an export step (weights, shapes, ONNX bytes), with the field and limit."""


class DeviceScorer(nn.Module):
    """Inference form of a ``DeviceModel``: folded item table, same user tower, same scores.

    Example:
        >>> model = DeviceModel(num_items=50, dim=8, history_len=5).eval()
        >>> history, candidates = torch.tensor([[1, 2, 3, 50, 50]]), torch.tensor([[4, 5]])
        >>> torch.allclose(DeviceScorer(model)(history, candidates), model(history, candidates))
        True
    """

    item_table: torch.Tensor
    bias_table: torch.Tensor

    def __init__(self, model: DeviceModel) -> None:
        super().__init__()
        self.num_items = model.num_items
        self.history_len = model.history_len
        with torch.no_grad():
            items = torch.arange(model.num_items + 1)
            table = model.item_vectors(items).detach().clone()
            bias = model.item_bias.detach().clone()[:, None]
        self.register_buffer("item_table", table)
        self.register_buffer("bias_table", bias)
        self.tower = copy.deepcopy(model.tower)
        self.head = copy.deepcopy(model.head)

    def forward(self, history: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        history = history[:, -self.history_len :]
        mask = (history != self.num_items).unsqueeze(-1).float()
        pooled = (F.embedding(history, self.item_table) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        user = self.head(pooled + torch.tanh(self.tower(pooled)))
        vectors = F.embedding(candidates, self.item_table)
        scores = (vectors * user.unsqueeze(1)).sum(-1)
        return scores + F.embedding(candidates, self.bias_table).squeeze(-1)


def with_params(model: nn.Module, params: Mapping[str, torch.Tensor] | None) -> nn.Module:
    """A copy of ``model`` in eval mode holding ``params`` (checked against its parameters)."""
    clone = copy.deepcopy(model).eval()
    if params is None:
        return clone
    own = dict(clone.named_parameters())
    unknown = sorted(set(params) - set(own))
    if unknown:
        raise ExportError(f"params: unknown names {unknown}; the model has {sorted(own)}")
    with torch.no_grad():
        for name, value in params.items():
            if tuple(value.shape) != tuple(own[name].shape):
                raise ExportError(
                    f"params[{name!r}]: shape {tuple(value.shape)}, "
                    f"the model needs {tuple(own[name].shape)}"
                )
            if not torch.isfinite(value).all():
                raise ExportError(f"params[{name!r}]: holds NaN or Inf")
            own[name].copy_(value)
    return clone


def example_inputs(
    num_items: int, history_len: int, num_candidates: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of two users to trace with (sizes > 1, so no axis is specialised to 1)."""
    history = torch.arange(2 * history_len).view(2, history_len) % num_items
    history[0, : history_len // 2] = num_items
    candidates = torch.arange(2 * num_candidates).view(2, num_candidates) % num_items
    return history, candidates


def to_onnx(
    model: nn.Module,
    params: Mapping[str, torch.Tensor] | None = None,
    *,
    num_candidates: int | None = None,
) -> bytes:
    """Serialised ONNX (opset 18, weights inside) of ``model``'s scorer.

    Args:
        model: a ``DeviceModel`` (exported in its folded inference form; the traced graph is
            kept per architecture, so a later export only swaps weights) or any module whose
            ``forward(history, candidates)`` returns scores; it needs ``num_items`` and
            ``history_len`` attributes.
        params: weights to export instead of the model's own (names as ``named_parameters``;
            a subset is allowed). The model itself is not changed.
        num_candidates: fix the candidate axis to this size (a static graph); None keeps it
            dynamic. Batch and history length are always dynamic.

    Returns:
        The model as bytes; nothing is written to disk.
    """
    if num_candidates is not None and not 2 <= num_candidates <= 1_000_000:
        raise ExportError(f"num_candidates: {num_candidates}, must be in [2, 1000000] or None")
    sizes = {name: getattr(model, name, None) for name in ("num_items", "history_len")}
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ExportError(f"model: needs a positive int attribute {name!r} to build inputs")
    num_items, history_len = int(sizes["num_items"] or 0), int(sizes["history_len"] or 0)
    module = with_params(model, params)
    if type(module) is not DeviceModel:
        return _trace(module, num_items, history_len, num_candidates).SerializeToString()
    scorer = DeviceScorer(module).eval()
    weights = scorer.state_dict()
    key = (num_items, history_len, num_candidates, *(tuple(w.shape) for w in weights.values()))
    template = _GRAPHS.get(key)
    if template is None:
        template = _trace(scorer, num_items, history_len, num_candidates)
        _GRAPHS[key] = template
        while len(_GRAPHS) > 8:
            _GRAPHS.pop(next(iter(_GRAPHS)))
    return _refill(template, weights).SerializeToString()


_GRAPHS: dict[tuple, onnx.ModelProto] = {}
"""Traced scorer graphs by architecture: tracing takes seconds, swapping weights microseconds."""


def _refill(template: onnx.ModelProto, weights: Mapping[str, torch.Tensor]) -> onnx.ModelProto:
    """A copy of ``template`` holding ``weights`` (initializers of the same names)."""
    graph = onnx.ModelProto()
    graph.CopyFrom(template)
    names = {init.name for init in graph.graph.initializer}
    if not set(weights) <= names:
        raise ExportError(f"model: the traced graph lacks weights {sorted(set(weights) - names)}")
    for init in graph.graph.initializer:
        if init.name in weights:
            array = weights[init.name].detach().cpu().float().numpy()
            init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
    return graph


def _trace(
    scorer: nn.Module, num_items: int, history_len: int, num_candidates: int | None
) -> onnx.ModelProto:
    """The ONNX graph of ``scorer.forward(history, candidates)`` with its weights inside."""
    inputs = example_inputs(num_items, max(history_len, 2), num_candidates or 3)
    batch = torch.export.Dim("batch")
    length = torch.export.Dim("length")
    candidate_axis = {} if num_candidates else {1: torch.export.Dim("num_candidates")}
    dynamic = {"history": {0: batch, 1: length}, "candidates": {0: batch, **candidate_axis}}
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    with warnings.catch_warnings():
        # The exporter warns and logs about its own internals (tree specs, axis names,
        # torchvision operators it skips); none concern a recommender.
        warnings.simplefilter("ignore")
        exporter_log.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                scorer,
                inputs,
                dynamo=True,
                external_data=False,
                opset_version=OPSET,
                input_names=list(INPUTS),
                output_names=[OUTPUT],
                dynamic_shapes=dynamic,
                verbose=False,
            )
        finally:
            exporter_log.setLevel(level)
    if program is None:
        raise ExportError("model: the exporter returned no program")
    return program.model_proto
