"""Centralised training of a recommendation model on the rows one party may see.

The cloud uses it for pooled cloud-period data (cloud-only, central-oracle, pretraining the
device model). Sequences are cut into windows ending at each device's last visible row, and
every position of a window is a next-item target, so one pass costs one forward per window.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from coevo.tasks.models import CloudModel, DeviceModel, cross_entropy_all_items
from coevo.tasks.protocol import P1Split


@dataclass(frozen=True)
class FitConfig:
    """Optimiser and early-stopping settings for one centralised fit."""

    epochs: int = 60
    lr: float = 1e-3
    batch_size: int = 128
    weight_decay: float = 0.0
    window: int = 50
    patience: int = 5
    eval_every: int = 2


def windows(split: P1Split, rows: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-item targets ``[num_windows, window]`` covering ``rows``.

    ``rows`` must be sorted and, per device, a contiguous run that does not reach the device's
    last row (true for every training period). Windows end at each device's last visible row
    and step back by ``window``; a target whose input is padding is padding too.
    """
    owner = split.device_of_row[rows]
    last = torch.zeros(split.num_devices, dtype=torch.long).scatter_reduce(
        0, owner, rows, reduce="amax", include_self=False
    )
    ends = rows[(last[owner] - rows) % window == 0]
    inputs = split.history(ends, window)
    targets = split.history(ends + 1, window)
    targets = torch.where(inputs == split.num_items, split.num_items, targets)
    return inputs, targets


def fit(
    model: DeviceModel | CloudModel,
    split: P1Split,
    rows: torch.Tensor,
    config: FitConfig,
    generator: torch.Generator,
    validate: Callable[[nn.Module], float] | None = None,
    on_epoch: Callable[[int, float, float | None], None] | None = None,
) -> DeviceModel | CloudModel:
    """Train ``model`` (it must have ``sequence_logits``) with Adam; keep the best validation.

    Returns the model with the weights of the best validation score (the last epoch's when
    ``validate`` is None).
    """
    # Dropout draws from the global generator: fork it, seeded from ``generator``, so that a
    # fit is reproducible and leaves the caller's global RNG untouched.
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        return _fit(model, split, rows, config, generator, validate, on_epoch)


def _fit(
    model: DeviceModel | CloudModel,
    split: P1Split,
    rows: torch.Tensor,
    config: FitConfig,
    generator: torch.Generator,
    validate: Callable[[nn.Module], float] | None,
    on_epoch: Callable[[int, float, float | None], None] | None,
) -> DeviceModel | CloudModel:
    inputs, targets = windows(split, rows, config.window)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best_score, best_state, stale = -float("inf"), copy.deepcopy(model.state_dict()), 0
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(inputs), generator=generator)
        total, count = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            logits = model.sequence_logits(inputs[batch])
            target = targets[batch]
            loss_rows = cross_entropy_all_items(logits.flatten(0, 1), target.flatten())
            valid = (target < split.num_items).sum().clamp(min=1)
            loss = loss_rows.sum() / valid
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            count += len(batch)
        score = None
        if validate is not None and (
            (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
        ):
            model.eval()
            with torch.no_grad():
                score = validate(model)
            if score > best_score:
                best_score, best_state, stale = score, copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
        if on_epoch is not None:
            on_epoch(epoch, total / max(count, 1), score)
        if stale >= config.patience:
            break
    if validate is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model
