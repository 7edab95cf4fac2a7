"""Rating-as-click CTR: one device per user, a rating >= 4 is a click, scored by a small MLP.

Each user's ratings are ordered by (timestamp, item id); the first ``floor(0.8 n)`` are that
device's training rows, the rest its test rows. A row's input is its item and a 49-float side
vector: the user's profile (age bucket, gender, occupation one-hots on MovieLens) followed by
the item's genre flags. Evaluation reports global test AUC and per-user AUC.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from coevo.tasks.log import InteractionLog
from coevo.tasks.metrics import auc_per_group, ctr_metrics
from coevo.tasks.protocol import Period

TRAIN_SHARE_NUMERATOR, TRAIN_SHARE_DENOMINATOR = 4, 5
"""Each user's first ``floor(4 n / 5)`` rows train (integer arithmetic: exactly 0.8 n)."""
CLICK_RATING = 4.0
"""Ratings at or above this are positives."""


class CTRModel(nn.Module):
    """``concat(item embedding, side features) -> Linear -> ReLU -> Linear`` click logit.

    With 1,682 items, 16-d embeddings, 49 side features and 32 hidden units this has
    ``1682 * 16 + (65 * 32 + 32) + (32 + 1) = 29,057`` parameters.

    Example:
        >>> model = CTRModel(num_items=10, num_side=49)
        >>> model(torch.tensor([[1, 2]]), torch.zeros(1, 2, 49)).shape
        torch.Size([1, 2])
    """

    def __init__(
        self, num_items: int, num_side: int = 49, embedding_dim: int = 16, hidden_dim: int = 32
    ) -> None:
        super().__init__()
        self.item_embedding = nn.Embedding(num_items, embedding_dim)
        self.hidden = nn.Linear(embedding_dim + num_side, hidden_dim)
        self.output = nn.Linear(hidden_dim, 1)

    def forward(self, item: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        """Logits ``[...]`` for items ``[...]`` with side features ``[..., num_side]``."""
        return ctr_logits(dict(self.named_parameters()), item, side)


def ctr_logits(
    params: Mapping[str, torch.Tensor], item: torch.Tensor, side: torch.Tensor
) -> torch.Tensor:
    """`CTRModel`'s forward pass as a function of its parameters (no module swapping).

    With every parameter stacked over devices (``item_embedding.weight [devices, rows, dim]``
    and so on), ``item [devices, batch]`` and ``side [devices, batch, num_side]``, each device's
    rows are scored with its own weights, in batched matrix products.
    """
    table = params["item_embedding.weight"]
    if table.dim() == 2:
        features = torch.cat([F.embedding(item, table), side], dim=-1)
        hidden = F.relu(F.linear(features, params["hidden.weight"], params["hidden.bias"]))
        return F.linear(hidden, params["output.weight"], params["output.bias"]).squeeze(-1)
    devices, num_rows, dim = table.shape
    flat = (item + torch.arange(devices)[:, None] * num_rows).reshape(-1)
    rows = table.reshape(-1, dim).index_select(0, flat).view(*item.shape, dim)
    features = torch.cat([rows, side], dim=-1)
    hidden = torch.baddbmm(params["hidden.bias"][:, None], features, params["hidden.weight"].mT)
    logits = torch.baddbmm(
        params["output.bias"][:, None], hidden.relu(), params["output.weight"].mT
    )
    return logits.squeeze(-1)


class CTRLoss:
    """Binary cross-entropy with logits of `ctr_logits`, averaged over the real examples.

    Written ``softplus(z) - y * z``: the same value as ``binary_cross_entropy_with_logits``
    with fewer operations forward and backward. ``mask [..., batch]`` is 1 for a real example;
    the mean is over the last axis, so stacked inputs (see `ctr_logits`) give one loss per
    device (``stacked``: local training may then step a block of devices at once).
    """

    stacked: ClassVar[bool] = True

    def __call__(
        self,
        model: nn.Module,
        params: Mapping[str, torch.Tensor],
        inputs: Mapping[str, torch.Tensor],
        mask: torch.Tensor,
    ) -> torch.Tensor:
        logits = ctr_logits(params, inputs["item"], inputs["side"])
        loss = ((F.softplus(logits) - inputs["label"] * logits) * mask).sum(-1)
        return loss / mask.sum(-1).clamp(min=1.0)


class RatingCTRTask:
    """Per-user click prediction on rated items; the devices are the log's users.

    Rows are held once, sorted by (user, timestamp, item), as flat tensors: ``item [R]``,
    ``side [R, num_side]``, ``label [R]`` (float 0/1) and ``user [R]``. Training and test rows
    are row indices in the ragged layout: concatenated over devices with offsets
    ``[num_devices + 1]``, device ``d`` owning ``rows[offsets[d]:offsets[d + 1]]``.

    Example:
        >>> import dataclasses, numpy as np
        >>> from coevo.testing import make_log
        >>> log = make_log({0: [1, 2, 3, 4, 5], 1: [0, 2]}, 6, ratings={0: [5, 1, 4, 2, 3]})
        >>> log = dataclasses.replace(
        ...     log, user_features=np.eye(2, 30, dtype=np.float32),
        ...     item_features=np.zeros((6, 19), np.float32))
        >>> task = RatingCTRTask.from_log(log)
        >>> rows, offsets = task.device_rows("device")
        >>> offsets.tolist(), task.gather(rows)["label"].tolist()
        ([0, 4, 5], [1.0, 0.0, 1.0, 0.0, 1.0])
    """

    sparse_inputs: ClassVar[dict[str, str]] = {"item_embedding.weight": "item"}
    """The item table is read only by row lookups of ``item``: devices train the rows they touch."""

    def __init__(
        self,
        *,
        item: torch.Tensor,
        side: torch.Tensor,
        label: torch.Tensor,
        user: torch.Tensor,
        train_rows: torch.Tensor,
        train_offsets: torch.Tensor,
        test_rows: torch.Tensor,
        test_offsets: torch.Tensor,
        num_items: int,
    ) -> None:
        self.item = item
        self.side = side
        self.label = label
        self.user = user
        self.train_rows = train_rows
        self.train_offsets = train_offsets
        self.test_rows = test_rows
        self.test_offsets = test_offsets
        self.num_items = num_items

    @classmethod
    def from_log(cls, log: InteractionLog) -> RatingCTRTask:
        """Split ``log`` per user by time and build each row's side vector.

        Raises:
            ValueError: when the log lacks user or item features.
        """
        if log.user_features is None or log.item_features is None:
            raise ValueError(f"{log.name}: the CTR task needs user_features and item_features")
        # lexsort sorts by its last key first: user, then timestamp, then item id.
        order = np.lexsort((log.item, log.timestamp, log.user))
        user = torch.from_numpy(log.user[order].astype(np.int64))
        item = torch.from_numpy(log.item[order].astype(np.int64))
        label = torch.from_numpy((log.rating[order] >= CLICK_RATING).astype(np.float32))
        user_features = torch.from_numpy(np.asarray(log.user_features, dtype=np.float32))
        item_features = torch.from_numpy(np.asarray(log.item_features, dtype=np.float32))
        side = torch.cat([user_features[user], item_features[item]], dim=1)

        counts = torch.bincount(user, minlength=log.num_users)
        starts = counts.cumsum(0) - counts
        position = torch.arange(len(user)) - starts[user]
        train_counts = counts * TRAIN_SHARE_NUMERATOR // TRAIN_SHARE_DENOMINATOR
        is_train = position < train_counts[user]
        zero = torch.zeros(1, dtype=torch.long)
        return cls(
            item=item,
            side=side,
            label=label,
            user=user,
            train_rows=torch.nonzero(is_train).flatten(),
            train_offsets=torch.cat([zero, train_counts.cumsum(0)]),
            test_rows=torch.nonzero(~is_train).flatten(),
            test_offsets=torch.cat([zero, (counts - train_counts).cumsum(0)]),
            num_items=log.num_items,
        )

    @property
    def num_devices(self) -> int:
        return len(self.train_offsets) - 1

    @property
    def num_side(self) -> int:
        return self.side.shape[1]

    def device_model(self) -> CTRModel:
        return CTRModel(self.num_items, self.num_side)

    def train_flops_per_example(self) -> float:
        """FLOPs of one training row: the two linear layers forward, x3 with the backward."""
        model = self.device_model()
        forward = sum(
            2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear)
        )
        return 3.0 * forward

    def device_rows(self, period: Period) -> tuple[torch.Tensor, torch.Tensor]:
        """Each device's training rows: ``(rows, offsets [num_devices + 1])``.

        Only ``"device"`` exists here: every training row lives on its user's device.
        """
        if period != "device":
            raise ValueError(f"the CTR task has only device-period rows, not {period!r}")
        return self.train_rows, self.train_offsets

    def gather(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """``item [...]``, ``side [..., num_side]`` and ``label [...]`` of ``rows`` (any shape)."""
        return {"item": self.item[rows], "side": self.side[rows], "label": self.label[rows]}

    batch_loss: ClassVar[CTRLoss] = CTRLoss()
    """``batch_loss(model, params, inputs, mask)``: the training loss of one step (`CTRLoss`)."""

    def evaluate(self, params: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Test metrics of the model with weights ``params``.

        Returns:
            ``auc`` (global), ``user_auc`` (unweighted mean of per-user AUCs over the
            ``user_auc_users`` users with both classes in test), ``gauc`` (the same per-user
            AUCs weighted by test rows, from `ctr_metrics`), ``logloss`` and ``test_rows``.
        """
        model = self.device_model()
        rows = self.test_rows
        with torch.no_grad():
            weights = {**params, **dict(model.named_buffers())}
            logits = functional_call(model, weights, (self.item[rows], self.side[rows]))
        labels = self.label[rows]
        result: dict[str, float] = dict(ctr_metrics(labels, logits, self.user[rows]))
        per_user = per_user_auc(labels, logits, self.test_offsets)
        counted = ~torch.isnan(per_user)
        result["user_auc"] = float(per_user[counted].mean())
        result["user_auc_users"] = int(counted.sum())
        result["test_rows"] = len(rows)
        return result


def per_user_auc(labels: torch.Tensor, logits: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """AUC of each user's rows ``[offsets[u]:offsets[u + 1]]``; NaN for a one-class user.

    Every (positive, negative) pair of a user counts 1 when the positive scores higher and
    1/2 on a tie, as sklearn's ``roc_auc_score``.

    Returns:
        float64 ``[len(offsets) - 1]``.
    """
    counts = offsets[1:] - offsets[:-1]
    user = torch.repeat_interleave(torch.arange(len(counts)), counts)
    auc, _, _ = auc_per_group(user, logits.to(torch.float64), labels == 1)
    result = torch.full((len(counts),), float("nan"), dtype=torch.float64)
    result[: len(auc)] = auc
    return result
