"""On-device training: its settings (`LocalTraining`) and the one training loop every
strategy that trains on the device runs (`local_train`, one `TrainStep` per step)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import grad, grad_and_value

from coevo.strategies.base import DeviceBatch, LossFn, Params
from coevo.strategies.scan import scan
from coevo.types import DeviceState, Metrics, Payload


class LocalTraining(BaseModel):
    """How a device trains in one round."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Passes over the device's rows per round; more adapts further and overfits sooner.
    epochs: int = Field(5, ge=1, le=1000)
    # Adam step size on the device.
    lr: float = Field(1e-3, gt=0, le=10.0)
    # Examples per step; small devices have few rows, so small batches give more steps.
    batch_size: int = Field(16, ge=1, le=4096)
    # adam adapts per weight (robust to lr); sgd is what federated analyses assume.
    optimizer: Literal["adam", "sgd"] = "adam"


def local_train(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    trainable: Sequence[str],
    batch: DeviceBatch,
    lr: float,
    *,
    loss: LossFn,
    anchor: Mapping[str, torch.Tensor] | None = None,
    l2: float = 0.0,
    correction: Mapping[str, torch.Tensor] | None = None,
    optimizer: str = "adam",
    betas: tuple[float, float] = (0.9, 0.999),
    as_update: Sequence[str] = (),
) -> tuple[Params, torch.Tensor]:
    """Adam or plain SGD on ``trainable`` params over every step of ``batch``; pure, vmappable.

    Steps whose mask is all padding leave the parameters and the optimiser moments unchanged,
    so devices padded to a common step count train exactly as if alone. With ``anchor``, the
    loss adds ``l2 / 2 * ||w - anchor||^2`` over the anchored names (regularised fine-tuning,
    FedProx's proximal term). ``correction`` is added to every gradient (SCAFFOLD's ``c - c_i``).
    The steps run through `coevo.strategies.scan.scan` (one `TrainStep` each), so that the
    vectorised simulator can step a whole block of devices at once.

    Sparse tables (``batch.tables``) train on the rows the batch touches only, and the rows are
    written back at the end: the same result as training the whole table (rows never looked
    up get zero gradients, so neither SGD nor Adam nor the anchor moves them), at a cost
    proportional to the rows touched. With ``correction`` every row moves, so the whole table
    trains.

    Returns the new parameters (all of them; those named in ``as_update`` as their change,
    trained minus given, which for a sparse table is built from the touched rows alone) and
    the mean training loss over real examples.
    """
    sparse = (
        {}
        if correction is not None
        else {p: key for p, key in batch.tables.items() if p in trainable and key in batch.rows}
    )
    tables = {p: _padded_table(params[p]) for p in sparse}
    positions = {p: _table_positions(batch.rows[key], params[p]) for p, key in sparse.items()}
    params = {**params, **{p: tables[p][positions[p]] for p in sparse}}
    if anchor is not None and sparse:
        pinned = {p: _padded_table(anchor[p])[positions[p]] for p in sparse if p in anchor}
        anchor = {**anchor, **pinned}
    inputs = {**batch.inputs, **{key: batch.local[key] for key in sparse.values()}}
    weights = {k: params[k] for k in trainable}
    pulled = anchor is not None and l2 > 0
    adam = optimizer != "sgd"
    # Plain SGD without an anchor moves only the rows a step looks up: the step differentiates
    # with respect to those rows alone and adds the update into the table in place.
    by_row = () if adam or pulled else tuple(sparse.items())
    weights.update({p: weights[p].clone() for p, _ in by_row})
    sizes = batch.mask.sum(-1)
    actives = (sizes > 0).to(batch.mask.dtype)
    step = TrainStep(model, loss, lr, l2 if pulled else 0.0, adam, betas, by_row)
    const = {
        "frozen": {k: v for k, v in params.items() if k not in trainable},
        "anchor": {k: anchor[k] for k in weights if k in anchor} if pulled and anchor else {},
        "correction": dict(correction or {}),
    }
    moments = {k: torch.zeros_like(v) for k, v in weights.items()} if adam else {}
    start: dict[str, Any] = {
        "weights": weights,
        "first": moments,
        "second": {k: v.clone() for k, v in moments.items()},
        "loss": torch.zeros(()),
    }
    xs: dict[str, Any] = {"inputs": inputs, "mask": batch.mask, "size": sizes, "rate": actives * lr}
    if adam:
        xs.update(active=actives, count=actives.cumsum(0).clamp(min=1.0))
    end = scan(step, const, start, xs, sizes > 0)
    weights = dict(end["weights"])
    mean_loss = end["loss"] / batch.mask.sum().clamp(min=1.0)
    for p, key in sparse.items():
        if p in as_update:
            # Padding slots never train, so their change is exactly zero: adding it into row 0
            # leaves that row's sum exact, and the update is built without the padding row.
            change = weights[p] - params[p]
            rows = batch.rows[key].clamp(min=0)[:, None].expand_as(change)
            weights[p] = change.new_zeros(tables[p][:-1].shape).scatter_add_(0, rows, change)
        else:
            written = tables[p].index_copy(0, positions[p], weights[p])
            weights[p] = written[: len(written) - 1]
    for k in as_update:
        if k not in sparse:
            weights[k] = weights[k] - params[k]
    return {**const["frozen"], **weights}, mean_loss


@dataclass(frozen=True)
class TrainStep:
    """One optimiser step of `local_train`: ``step(const, carry, x) -> carry`` for `scan`.

    ``const`` holds ``frozen`` (untrained params), ``anchor`` (pull targets, when ``l2 > 0``)
    and ``correction`` (added to every gradient); ``carry`` the ``weights``, Adam's ``first``
    and ``second`` moments and the ``loss`` sum (weighted by real examples); ``x`` the step's
    ``inputs``, ``mask``, ``size`` (real examples) and ``rate`` (lr, or 0 for a padding step),
    and for Adam ``active`` (1 or 0) and ``count`` (its step number). ``by_row`` names the
    sparse tables SGD updates row by row, in place (the carry's own copy of the touched rows),
    with the input that looks them up.
    """

    model: nn.Module
    loss: LossFn
    lr: float
    l2: float
    adam: bool
    betas: tuple[float, float]
    by_row: tuple[tuple[str, str], ...]

    def __call__(self, const: Mapping[str, Any], carry: Mapping[str, Any], x: Mapping[str, Any]):
        """The step of one device (pure, vmappable; gradients by ``torch.func.grad``)."""
        return self._step(const, carry, x, stacked=False)

    @property
    def stacked(self) -> Callable[..., dict[str, Any]] | None:
        """The step of a whole block at once, when the loss stacks (``loss.stacked``).

        It takes the same trees with a leading device axis on every leaf and runs one forward
        and one backward pass (plain autograd) for the block: as the loss of each device
        depends on its own weights only, the gradient of their sum is every device's own.
        """
        return partial(self._step, stacked=True) if getattr(self.loss, "stacked", False) else None

    def _step(self, const, carry, x, *, stacked: bool) -> dict[str, Any]:
        weights, inputs, mask = dict(carry["weights"]), dict(x["inputs"]), x["mask"]
        looked_up, step_weights = {}, weights
        if self.by_row:
            step_weights = dict(weights)
            for p, key in self.by_row:
                ids, table = inputs[key], weights[p]
                if stacked:
                    # Row ids into the devices' tables viewed end to end as [rows, dim]: one
                    # index serves the gather now and the update below.
                    devices, flat = len(ids), ids.reshape(len(ids), -1)
                    offsets = torch.arange(devices)[:, None] * table.shape[1]
                    looked_up[p] = (flat + offsets).reshape(-1)
                    rows = table.reshape(-1, table.shape[-1])[looked_up[p]]
                    step_weights[p] = rows.view(devices, flat.shape[1], -1)
                    positions = torch.arange(flat.shape[1]).expand_as(flat)
                else:
                    looked_up[p] = ids.reshape(-1)
                    step_weights[p] = table[looked_up[p]]
                    positions = torch.arange(ids.numel())
                inputs[key] = positions.reshape(ids.shape)
        loss = partial(self._loss, const=const, inputs=inputs, mask=mask)
        if stacked:
            grads, value = _autograd(loss, step_weights)
        else:
            # Only the weights cross grad's wrapping: the rest are constants of the step.
            grads, value = (
                grad(loss, has_aux=True)(step_weights)
                if self.l2 > 0
                else grad_and_value(lambda w: loss(w)[0])(step_weights)
            )
        total = torch.addcmul(carry["loss"], value, x["size"])
        correction = const["correction"]
        if correction:
            grads = {k: g + correction[k] if k in correction else g for k, g in grads.items()}
        first, second = dict(carry["first"]), dict(carry["second"])
        for k in weights:
            shape = (-1,) + (1,) * (weights[k].dim() - 1) if stacked else ()
            rate = x["rate"].view(shape) if stacked else x["rate"]
            if not self.adam and k in looked_up:
                # weights[k] is the carry's own copy of the table's touched rows.
                rows, change = weights[k], grads[k] * -rate
                if stacked:
                    dim = rows.shape[-1]
                    rows.view(-1, dim).index_add_(0, looked_up[k], change.view(-1, dim))
                else:
                    rows.index_put_((looked_up[k],), change, accumulate=True)
            elif not self.adam:
                weights[k] = torch.addcmul(weights[k], grads[k], rate, value=-1.0)
            else:
                active, t, (beta1, beta2) = (
                    x["active"].view(shape),
                    x["count"].view(shape),
                    self.betas,
                )
                first[k] = first[k] + active * (1 - beta1) * (grads[k] - first[k])
                second[k] = second[k] + active * (1 - beta2) * (grads[k] ** 2 - second[k])
                update = (first[k] / (1 - beta1**t)) / ((second[k] / (1 - beta2**t)).sqrt() + 1e-8)
                weights[k] = weights[k] - active * self.lr * update
        return {"weights": weights, "first": first, "second": second, "loss": total}

    def _loss(self, w: Params, *, const: Mapping[str, Any], inputs: Params, mask: torch.Tensor):
        value = self.loss(self.model, {**const["frozen"], **w}, inputs, mask)
        reported = value.detach()
        if self.l2 > 0:
            anchor, lead = const["anchor"], value.shape
            pull = sum(
                ((w[k] - anchor[k]) ** 2).reshape(*lead, -1).sum(-1) for k in w if k in anchor
            )
            value = value + 0.5 * self.l2 * pull
        return value, reported


def _autograd(loss: Callable, weights: Params) -> tuple[Params, torch.Tensor]:
    """Gradients of ``loss(weights)`` (``(per-device values, reported)``) summed over devices."""
    leaves = {k: v.detach().requires_grad_() for k, v in weights.items()}
    with torch.enable_grad():
        value, reported = loss(leaves)
        grads = torch.autograd.grad(value.sum(), list(leaves.values()), materialize_grads=True)
    return dict(zip(leaves, grads, strict=True)), reported


def personal_finetune(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    personal: Sequence[str],
    batch: DeviceBatch,
    local: Any,
    *,
    loss: LossFn,
    l2: float = 0.0,
) -> tuple[Payload, DeviceState, Metrics]:
    """A device's ``local`` that fine-tunes its ``personal`` weights from the downloaded
    ``params`` (pulled back towards them by ``l2``) and sends nothing up.

    ``local`` is the strategy's `coevo.strategies.local_training.LocalTraining`.
    """
    trained, value = local_train(
        model,
        params,
        personal,
        batch,
        local.lr,
        loss=loss,
        anchor=params,
        l2=l2,
        optimizer=local.optimizer,
    )
    return Payload(), DeviceState({k: trained[k] for k in personal}), {"loss": value}


def _padded_table(table: torch.Tensor) -> torch.Tensor:
    """``table`` with one zero row appended: where the padding of a sparse batch points."""
    return torch.cat([table, torch.zeros_like(table[:1])])


def _table_positions(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Row ids with the padding (-1) sent to the appended zero row of `_padded_table`."""
    return torch.where(rows < 0, len(table), rows)
