"""Evaluation metrics of PROTOCOL.md: sampled and full ranking (P1), CTR-style (P2), groups.

Ranking metrics return one value per device so that callers can aggregate them by activity group
with ``summarize``; ``ctr_metrics`` aggregates itself because its unit is a row, not a device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

GROUP_NAMES = ("tail", "mid", "head")
"""Names of the values ``activity_groups`` returns, in order: 0, 1, 2."""

_METRIC_DTYPE = torch.float32


def _raise_on_nan(values: Tensor, row_offset: int = 0) -> None:
    nan_rows = (torch.isnan(values).any(dim=1).nonzero().flatten() + row_offset).tolist()
    if nan_rows:
        more = f" and {len(nan_rows) - 5} more" if len(nan_rows) > 5 else ""
        raise ValueError(f"scores contain NaN for device {nan_rows[:5]}{more}")


def _tie_uniforms(num_devices: int, generator: torch.Generator | None) -> Tensor | None:
    # Drawn once for all devices, so a result never depends on how the devices were chunked.
    if generator is None:
        return None
    return torch.rand(num_devices, generator=generator, device=generator.device)


def _rank(greater: Tensor, ties: Tensor, uniforms: Tensor | None) -> Tensor:
    if uniforms is None:
        return greater + ties // 2
    # The positive and its tied negatives form ties + 1 slots; pick the positive's slot uniformly.
    slot = (uniforms.to(greater.device) * (ties + 1).to(uniforms.dtype)).long()
    return greater + torch.minimum(slot, ties)


def _hit_and_gain(rank: Tensor, ks: Sequence[int]) -> dict[str, Tensor]:
    gain = 1.0 / torch.log2(rank.to(_METRIC_DTYPE) + 2.0)
    result = {f"hr@{k}": (rank < k).to(_METRIC_DTYPE) for k in ks}
    result.update({f"ndcg@{k}": torch.where(rank < k, gain, 0.0) for k in ks})
    return result


def candidate_rank(scores: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """0-based rank of column 0 (the held-out positive) among each device's candidates.

    The rank is the number of negatives (columns ``1..C-1``) scoring strictly higher plus, for
    the ``t`` negatives tied with the positive, a uniformly random slot in ``0..t`` drawn with
    ``generator``. Without a generator ties count half: ``rank = greater + floor(t / 2)``,
    deterministic but half a slot below the random draw's mean when ``t`` is odd.

    Args:
        scores: ``[num_devices, num_candidates]`` scores, higher is better.
        generator: source of the tie-breaking draws; one uniform is consumed per device.

    Returns:
        int64 ``[num_devices]`` ranks in ``[0, num_candidates)``.

    Raises:
        ValueError: if ``scores`` is not 2-D or any score is NaN (the message names the devices).
    """
    if scores.dim() != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores must be [num_devices, num_candidates], got {tuple(scores.shape)}")
    _raise_on_nan(scores)
    positive, negatives = scores[:, :1], scores[:, 1:]
    greater = (negatives > positive).sum(dim=1)
    ties = (negatives == positive).sum(dim=1)
    return _rank(greater, ties, _tie_uniforms(scores.shape[0], generator))


def sampled_metrics(
    scores: Tensor,
    ks: Sequence[int] = (5, 10, 20),
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Per-device HR@K, NDCG@K, MRR and GAUC over sampled candidates (PROTOCOL.md P1, item 7).

    With ``rank`` from ``candidate_rank``: ``hr@K = rank < K``; ``ndcg@K = 1 / log2(rank + 2)``
    when ``rank < K`` else 0; ``mrr = 1 / (rank + 1)``, not truncated; ``gauc = 1 - rank / (C-1)``,
    the AUC of the positive against its ``C - 1`` negatives.

    Args:
        scores: ``[num_devices, C]`` scores; column 0 is the positive, the rest negatives, C >= 2.
        ks: cut-offs for HR and NDCG.
        generator: tie-breaking source, see ``candidate_rank``.

    Returns:
        ``{"hr@5", ..., "ndcg@5", ..., "mrr", "gauc"}``, each float32 ``[num_devices]``.
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores need a positive and >= 1 negative, got {tuple(scores.shape)}")
    rank = candidate_rank(scores, generator)
    result = _hit_and_gain(rank, ks)
    rank_float = rank.to(_METRIC_DTYPE)
    result["mrr"] = 1.0 / (rank_float + 1.0)
    result["gauc"] = 1.0 - rank_float / (scores.shape[1] - 1)
    return result


def full_ranking_metrics(
    scores: Tensor,
    target: Tensor,
    exclude: Tensor | None,
    generator: torch.Generator | None = None,
    chunk_size: int = 1024,
) -> dict[str, Tensor]:
    """Per-device HR@10, NDCG@10 and Recall@20 of the target ranked among all items.

    Items where ``exclude`` is True (the device's training items) are left out of the ranking;
    the target is always ranked, whatever the mask says. With one target per device Recall@20
    equals HR@20. Ties are handled as in ``candidate_rank``. Devices are processed
    ``chunk_size`` at a time, so the temporaries are ``[chunk_size, num_items]``; the results do
    not depend on ``chunk_size``.

    Args:
        scores: ``[num_devices, num_items]`` scores, higher is better.
        target: int64 ``[num_devices]`` held-out item of each device.
        exclude: bool ``[num_devices, num_items]`` items not to rank, or ``None``.
        generator: tie-breaking source; one uniform is consumed per device.
        chunk_size: devices per chunk.

    Returns:
        ``{"full_hr@10", "full_ndcg@10", "full_recall@20"}``, each float32 ``[num_devices]``.

    Raises:
        ValueError: on mismatched shapes, a target out of range, or NaN among the ranked scores.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [num_devices, num_items], got {tuple(scores.shape)}")
    num_devices, num_items = scores.shape
    if target.shape != (num_devices,):
        raise ValueError(f"target must be [{num_devices}], got {tuple(target.shape)}")
    if exclude is not None and exclude.shape != scores.shape:
        raise ValueError(f"exclude must be {tuple(scores.shape)}, got {tuple(exclude.shape)}")
    if num_devices and (target.min() < 0 or target.max() >= num_items):
        raise ValueError(f"target items must lie in [0, {num_items})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    uniforms = _tie_uniforms(num_devices, generator)
    ranks = []
    for start in range(0, num_devices, chunk_size):
        stop = min(start + chunk_size, num_devices)
        chunk = scores[start:stop]
        chunk_target = target[start:stop].to(chunk.device).unsqueeze(1)
        is_target = torch.zeros_like(chunk, dtype=torch.bool).scatter_(1, chunk_target, True)
        ranked = torch.ones_like(is_target) if exclude is None else ~exclude[start:stop].bool()
        # NaN in an excluded item is harmless (it is never compared), so it is not an error.
        _raise_on_nan(torch.where(ranked | is_target, chunk, 0.0), row_offset=start)
        competitors = ranked & ~is_target
        target_score = chunk.gather(1, chunk_target)
        greater = ((chunk > target_score) & competitors).sum(dim=1)
        ties = ((chunk == target_score) & competitors).sum(dim=1)
        chunk_uniforms = None if uniforms is None else uniforms[start:stop]
        ranks.append(_rank(greater, ties, chunk_uniforms))
    rank = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long, device=scores.device)
    metrics = _hit_and_gain(rank, (10, 20))
    return {
        "full_hr@10": metrics["hr@10"],
        "full_ndcg@10": metrics["ndcg@10"],
        "full_recall@20": metrics["hr@20"],
    }


def auc_per_group(
    group: Tensor, score: Tensor, is_positive: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Each group's AUC (NaN for a one-class group), positives and negatives; groups dense."""
    # One sort by (group, score) gives every row its rank within its group, tied scores sharing
    # their average rank, so each group's Mann–Whitney AUC counts ties half. Groups are dense.
    order = torch.sort(score, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]
    sorted_group, sorted_score = group[order], score[order]
    new_run = torch.ones_like(sorted_group, dtype=torch.bool)
    new_run[1:] = (sorted_group[1:] != sorted_group[:-1]) | (sorted_score[1:] != sorted_score[:-1])
    run_id = torch.cumsum(new_run.long(), 0) - 1
    run_sizes = torch.bincount(run_id)
    rows = torch.bincount(sorted_group)
    group_starts = torch.cumsum(rows, 0) - rows
    positions = torch.arange(len(order), device=order.device)
    run_starts = positions[new_run] - group_starts[sorted_group[new_run]]
    rank = (run_starts + (run_sizes + 1) / 2)[run_id]
    sorted_positive = is_positive[order].to(torch.float64)
    positives = torch.bincount(sorted_group, sorted_positive, minlength=len(rows))
    negatives = rows - positives
    rank_sums = torch.bincount(sorted_group, rank * sorted_positive, minlength=len(rows))
    # A group with one class gives 0 / 0 = NaN.
    auc = (rank_sums - positives * (positives + 1) / 2) / (positives * negatives)
    return auc, positives, negatives


def ctr_metrics(labels: Tensor, logits: Tensor, user: Tensor) -> dict[str, float]:
    """Global AUC, GAUC and logloss of CTR-style predictions (PROTOCOL.md P2).

    AUC is the Mann–Whitney statistic with average ranks for tied logits (ties count half, as in
    sklearn's ``roc_auc_score``). GAUC is each user's AUC averaged over the users with both
    classes, **weighted by the user's number of rows**; other users are skipped, and
    ``gauc_users`` says how many counted. Per-user AUCs come from one sort by (user, logit) and
    rank sums. Logloss is the mean binary cross-entropy computed from logits, so it stays finite
    where ``sigmoid`` would saturate. Values that are undefined (one class only) are NaN.

    Args:
        labels: ``[num_rows]`` 0/1 labels (any numeric or bool dtype).
        logits: ``[num_rows]`` predicted logits.
        user: int64 ``[num_rows]`` user of each row; ids need not be dense.

    Returns:
        ``{"auc", "gauc", "gauc_users", "logloss"}`` as Python numbers.
    """
    if not (labels.shape == logits.shape == user.shape) or labels.dim() != 1 or not len(labels):
        raise ValueError(
            f"labels, logits and user must be equal non-empty 1-D shapes, got "
            f"{tuple(labels.shape)}, {tuple(logits.shape)}, {tuple(user.shape)}"
        )
    label, logit = labels.to(torch.float64), logits.to(torch.float64)
    if torch.isnan(logit).any() or not ((label == 0) | (label == 1)).all():
        raise ValueError("labels must be 0 or 1 and logits must not be NaN")
    is_positive = label == 1
    _, user_index = torch.unique(user, return_inverse=True)
    global_auc, _, _ = auc_per_group(torch.zeros_like(user_index), logit, is_positive)
    user_auc, positives, negatives = auc_per_group(user_index, logit, is_positive)
    counted = (positives > 0) & (negatives > 0)
    weights = (positives + negatives)[counted]
    # With no user counted this is 0 / 0 = NaN, the documented value.
    gauc = (user_auc[counted] * weights).sum() / weights.sum()
    logloss = F.binary_cross_entropy_with_logits(logit, label)
    return {
        "auc": float(global_auc),
        "gauc": float(gauc),
        "gauc_users": int(counted.sum()),
        "logloss": float(logloss),
    }


def activity_groups(counts: Tensor) -> Tensor:
    """Activity group of each device: 0 tail, 1 mid, 2 head (PROTOCOL.md P1, item 8).

    Tail is ``count <= q20`` and head ``count >= q80``, with ``q`` from
    ``torch.quantile(counts.float(), q)`` (linear interpolation). Because the comparisons are
    inclusive, devices tied at a cut-off all join the outer group, so tail or head may hold more
    than 20% of devices. When ``q20 == q80`` a device satisfying both is tail.

    Args:
        counts: ``[num_devices]`` activity per device (cloud-period interactions under P1).

    Returns:
        int64 ``[num_devices]`` group indices into ``GROUP_NAMES``.
    """
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"counts must be a non-empty 1-D tensor, got {tuple(counts.shape)}")
    values = counts.float()
    low, high = torch.quantile(values, torch.tensor([0.2, 0.8], device=values.device))
    group = torch.ones_like(values, dtype=torch.long)
    group[values >= high] = 2
    group[values <= low] = 0
    return group


def summarize(per_device: Mapping[str, Tensor], group: Tensor | None = None) -> dict[str, float]:
    """Means of per-device metrics, overall and per activity group, plus NDCG@10 spread.

    For each metric ``m``: ``m`` (mean over devices) and, with ``group``, ``m/tail``, ``m/mid``,
    ``m/head`` (means within the group, NaN for an empty group). When ``ndcg@10`` is present:
    ``ndcg@10/std`` (population std over devices) and, with ``group``,
    ``ndcg@10/head_minus_tail``.

    Args:
        per_device: metric name to ``[num_devices]`` values, e.g. from ``sampled_metrics``.
        group: int64 ``[num_devices]`` from ``activity_groups``, or ``None``.

    Returns:
        Metric name to Python float.
    """
    result: dict[str, float] = {}
    if group is not None and group.numel() and (group.min() < 0 or group.max() >= len(GROUP_NAMES)):
        raise ValueError(f"group values must lie in [0, {len(GROUP_NAMES)})")
    for name, raw_values in per_device.items():
        values = raw_values.to(torch.float64)
        if values.dim() != 1:
            raise ValueError(f"metric {name!r} must be 1-D, got {tuple(values.shape)}")
        if group is not None and group.shape != values.shape:
            raise ValueError(f"group is {tuple(group.shape)} but {name!r} is {tuple(values.shape)}")
        result[name] = float(values.mean())
        if group is None:
            continue
        group_index = group.to(values.device, torch.long)
        sums = torch.bincount(group_index, weights=values, minlength=len(GROUP_NAMES))
        sizes = torch.bincount(group_index, minlength=len(GROUP_NAMES)).to(torch.float64)
        means = sums / sizes  # 0 / 0 gives the NaN promised for an empty group
        for index, group_name in enumerate(GROUP_NAMES):
            result[f"{name}/{group_name}"] = float(means[index])
    if "ndcg@10" in per_device:
        result["ndcg@10/std"] = float(per_device["ndcg@10"].to(torch.float64).std(correction=0))
        if group is not None:
            result["ndcg@10/head_minus_tail"] = result["ndcg@10/head"] - result["ndcg@10/tail"]
    return result
