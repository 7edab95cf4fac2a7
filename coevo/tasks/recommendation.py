"""The recommendation Task: a P1 split, the device and cloud model builders, loss and metrics."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from coevo.tasks.log import InteractionLog
from coevo.tasks.metrics import full_ranking_metrics, sampled_metrics, summarize
from coevo.tasks.models import (
    CloudModel,
    DeviceModel,
    count_parameters,
    cross_entropy_all_items,
    flops_per_request,
)
from coevo.tasks.protocol import P1Split, Period

Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``scorer(devices, history, candidates) -> scores``: scores for a contiguous block of devices."""


@dataclass(frozen=True)
class ModelShapes:
    """Sizes of the two model families (see ``coevo.config.schema.ModelsConfig``)."""

    device_dim: int = 32
    device_history: int = 20
    cloud_dim: int = 64
    cloud_history: int = 50
    cloud_layers: int = 2
    cloud_heads: int = 2
    cloud_dropout: float = 0.2


class RecommendationTask:
    """Sequential next-item recommendation under P1, one device per user.

    The task owns the data split, builds both models and evaluates any scorer on the
    validation or test candidates; strategies only say how the models are trained and served.
    """

    def __init__(self, log: InteractionLog, split: P1Split, shapes: ModelShapes) -> None:
        self.log = log
        self.split = split
        self.shapes = shapes
        self._train_flops: float | None = None

    @property
    def num_devices(self) -> int:
        return self.split.num_devices

    @property
    def num_items(self) -> int:
        return self.split.num_items

    @property
    def history_len(self) -> int:
        """Longest history any model reads; evaluation inputs are cut to it."""
        return max(self.shapes.cloud_history, self.shapes.device_history)

    def device_model(self) -> DeviceModel:
        return DeviceModel(
            self.num_items,
            dim=self.shapes.device_dim,
            history_len=self.shapes.device_history,
            item_features=self.split.item_features,
        )

    def cloud_model(self) -> CloudModel:
        s = self.shapes
        return CloudModel(
            self.num_items,
            dim=s.cloud_dim,
            history_len=s.cloud_history,
            num_layers=s.cloud_layers,
            num_heads=s.cloud_heads,
            dropout=s.cloud_dropout,
            item_features=self.split.item_features,
        )

    def model_facts(self) -> dict[str, dict[str, float]]:
        """Parameter count and FLOPs per request (one user, 100 candidates) of each model."""
        facts = {}
        for name, model, length in (
            ("device", self.device_model(), self.shapes.device_history),
            ("cloud", self.cloud_model(), self.shapes.cloud_history),
        ):
            facts[name] = {
                "params": float(count_parameters(model)),
                "flops_per_prediction": float(flops_per_request(model, length)),
            }
        return facts

    def train_flops_per_example(self) -> float:
        """FLOPs of one device-model training example: forward over the catalogue, x3 with
        the backward pass (the usual estimate for dense layers)."""
        if self._train_flops is None:
            model = self.device_model()
            forward = flops_per_request(model, self.shapes.device_history, self.num_items)
            self._train_flops = 3.0 * forward
        return self._train_flops

    def rows(self, period: Period) -> torch.Tensor:
        return self.split.rows(period)

    def device_rows(self, period: Period) -> tuple[torch.Tensor, torch.Tensor]:
        """Training rows of ``period`` grouped by device: ``(rows, offsets [num_devices + 1])``."""
        rows = self.split.rows(period)
        counts = torch.bincount(self.split.device_of_row[rows], minlength=self.num_devices)
        return rows, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])

    def gather(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Example tensors of ``rows`` (any shape): the device history before each row and
        the row's item, ``history [..., device_history]`` and ``target [...]``."""
        length = self.shapes.device_history
        history = self.split.history(rows.flatten(), length).view(*rows.shape, length)
        return {"history": history, "target": self.split.items[rows]}

    @staticmethod
    def batch_loss(
        model: nn.Module,
        params: Mapping[str, torch.Tensor],
        inputs: Mapping[str, torch.Tensor],
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Full-catalogue softmax cross-entropy, averaged over the real examples of a step."""
        weights = {**params, **dict(model.named_buffers())}
        logits = functional_call(model, weights, (inputs["history"],))
        loss = cross_entropy_all_items(logits, inputs["target"]) * mask
        return loss.sum() / mask.sum().clamp(min=1.0)

    def evaluate(
        self,
        scorer: Scorer,
        which: str = "test",
        *,
        full_ranking: bool = True,
        chunk_size: int = 256,
        seed: int = 0,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Per-device metrics and their summary (by activity group) for ``scorer``.

        Ties are broken by a generator seeded with ``seed`` so that every strategy of a run
        sees the same tie-break.
        """
        split = self.split
        rows = split.target_rows("val" if which == "val" else "test")
        candidates = split.candidates("val" if which == "val" else "test")
        history = split.history(rows, self.history_len)
        per_device: dict[str, list[torch.Tensor]] = {}
        generator = torch.Generator().manual_seed(seed)
        all_items = torch.arange(self.num_items)
        with torch.no_grad():
            for first in range(0, self.num_devices, chunk_size):
                last = min(first + chunk_size, self.num_devices)
                devices = torch.arange(first, last)
                scores = scorer(devices, history[first:last], candidates[first:last])
                block = sampled_metrics(scores, generator=generator)
                if full_ranking:
                    every = all_items.expand(last - first, -1)
                    full = scorer(devices, history[first:last], every)
                    seen = split.seen_before(first, last, "val" if which == "val" else "test")
                    block |= full_ranking_metrics(
                        full, split.items[rows[first:last]], seen, generator=generator
                    )
                for name, values in block.items():
                    per_device.setdefault(name, []).append(values)
        merged = {name: torch.cat(parts) for name, parts in per_device.items()}
        return merged, summarize(merged, split.group)


def num_parameters(params: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in params.values())


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of a module's parameters, keyed by name (the weights that travel)."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}
