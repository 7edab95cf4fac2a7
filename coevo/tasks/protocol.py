"""Evaluation protocols P1 (per-user temporal device/cloud split) and P2 (CTR view).

P1 follows PROTOCOL.md section 2: each user is a device; its interactions are ordered by
``(timestamp, seeded random tie-break)``; the last is the test target, the second-to-last the
validation target, the first ``floor(0.75 * (n - 2))`` are cloud-period (pooled, visible to the
cloud) and the rest device-period (visible to that device only). 99 evaluation negatives per user
are drawn once per seed from items the user never rated.

Per-device data uses the ragged layout of DESIGN.md: one concatenated ``items`` tensor and an
``offsets`` tensor, device ``d`` owning rows ``offsets[d]:offsets[d + 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
import torch

from coevo.tasks.log import DatasetError, InteractionLog
from coevo.tasks.metrics import activity_groups

Period = Literal["cloud", "device", "cloud+device"]
CLOUD_SHARE = 0.75
MIN_INTERACTIONS = 4  # one cloud row, one device row, validation and test
_CHUNK_USERS = 4096


@dataclass(frozen=True)
class P1Split:
    """A P1 split of a log: ragged per-device sequences with period boundaries.

    Attributes:
        items: int64 ``[num_rows]`` every kept interaction, per device in protocol order.
        offsets: int64 ``[num_devices + 1]``.
        num_cloud: int64 ``[num_devices]`` length of each device's cloud-period prefix.
        negatives: int64 ``[num_devices, 99]`` evaluation negatives, never rated by the device.
        group: int64 ``[num_devices]`` activity group by cloud-period count (0 tail, 1 mid, 2 head).
        user_ids: int64 ``[num_devices]`` the device's user id in the source log.
        num_items: catalogue size; index ``num_items`` is the padding item.
        item_features: float32 ``[num_items, F]`` or ``None``.
        seed: seed of the tie-break and of the negatives.
        variant: ``"P1"`` (every rating is a positive) or ``"P1+"`` (ratings >= 4 only).
        dataset: name of the source log.
    """

    items: torch.Tensor
    offsets: torch.Tensor
    num_cloud: torch.Tensor
    negatives: torch.Tensor
    group: torch.Tensor
    user_ids: torch.Tensor
    num_items: int
    item_features: torch.Tensor | None
    seed: int
    variant: str
    dataset: str

    @property
    def num_devices(self) -> int:
        return len(self.num_cloud)

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def num_device_period(self) -> torch.Tensor:
        return self.lengths - 2 - self.num_cloud

    @cached_property
    def device_of_row(self) -> torch.Tensor:
        """int64 ``[num_rows]``: which device owns each row."""
        return torch.repeat_interleave(torch.arange(self.num_devices), self.lengths)

    def rows(self, period: Period) -> torch.Tensor:
        """Global row indices of every training target in ``period``, grouped by device.

        Visibility: ``"cloud"`` rows are what the cloud may train on; ``"device"`` rows are
        private to their device; the validation and test rows are never returned.
        """
        position = torch.arange(len(self.items)) - self.offsets[:-1][self.device_of_row]
        cloud = self.num_cloud[self.device_of_row]
        train_end = self.lengths[self.device_of_row] - 2
        if period == "cloud":
            keep = position < cloud
        elif period == "device":
            keep = (position >= cloud) & (position < train_end)
        else:
            keep = position < train_end
        return torch.nonzero(keep).squeeze(1)

    def target_rows(self, which: Literal["val", "test"]) -> torch.Tensor:
        """Global row index of each device's validation or test target, ``[num_devices]``."""
        return self.offsets[1:] - (2 if which == "val" else 1)

    def history(self, rows: torch.Tensor, length: int) -> torch.Tensor:
        """The ``length`` items before each row within its device, left-padded, ``[M, length]``.

        The padding value is ``num_items``. History never crosses into another device.
        """
        start = self.offsets[:-1][self.device_of_row[rows]]
        index = rows[:, None] - length + torch.arange(length)
        valid = index >= start[:, None]
        return torch.where(valid, self.items[index.clamp(min=0)], self.num_items)

    def candidates(self, which: Literal["val", "test"]) -> torch.Tensor:
        """``[num_devices, 100]``: the held-out positive in column 0, then the 99 negatives."""
        positive = self.items[self.target_rows(which)]
        return torch.cat([positive[:, None], self.negatives], dim=1)

    def seen_before(self, first: int, last: int, which: Literal["val", "test"]) -> torch.Tensor:
        """Bool ``[last - first, num_items]``: items devices ``first:last`` saw before a target.

        Used to exclude a device's own history from full-ranking evaluation.
        """
        lo, hi = int(self.offsets[first]), int(self.offsets[last])
        owner = self.device_of_row[lo:hi] - first
        position = torch.arange(lo, hi)
        limit = self.target_rows(which)[first:last]
        keep = position < limit[owner]
        mask = torch.zeros(last - first, self.num_items, dtype=torch.bool)
        mask[owner[keep], self.items[lo:hi][keep]] = True
        return mask


def _protocol_order(log: InteractionLog, keep: np.ndarray, seed: int) -> np.ndarray:
    """Row order by (user, timestamp, seeded uniform tie-break), never by item id."""
    tie_break = np.random.default_rng([seed, 0]).random(log.num_rows)
    order = np.lexsort((tie_break, log.timestamp, log.user))
    return order[keep[order]]


def _sample_negatives(
    log: InteractionLog, users: np.ndarray, num_negatives: int, seed: int
) -> np.ndarray:
    """Uniform draws without replacement from items each user never rated (any rating)."""
    rated_keys = np.unique(log.user * log.num_items + log.item)
    most_rated = np.bincount(rated_keys // log.num_items, minlength=log.num_users).max()
    if log.num_items - most_rated < num_negatives:
        raise DatasetError(
            f"{log.name}: a user rated {most_rated} of {log.num_items} items; P1 needs "
            f"num_negatives={num_negatives} unrated items per user"
        )
    out = np.empty((len(users), num_negatives), dtype=np.int64)
    for start in range(0, len(users), _CHUNK_USERS):
        chunk = users[start : start + _CHUNK_USERS]
        rng = np.random.default_rng([seed, 1, start // _CHUNK_USERS])
        keys = rng.random((len(chunk), log.num_items), dtype=np.float32)
        lo = np.searchsorted(rated_keys, chunk * log.num_items)
        hi = np.searchsorted(rated_keys, (chunk + 1) * log.num_items)
        counts = hi - lo
        rows = np.repeat(np.arange(len(chunk)), counts)
        # Each user's rated keys are the contiguous run rated_keys[lo:hi].
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        cols = rated_keys[np.repeat(lo, counts) + within] % log.num_items
        keys[rows, cols] = -1.0
        out[start : start + len(chunk)] = np.argpartition(-keys, num_negatives - 1, axis=1)[
            :, :num_negatives
        ]
    return out


def split_p1(
    log: InteractionLog,
    seed: int,
    *,
    variant: Literal["P1", "P1+"] = "P1",
    num_negatives: int = 99,
    cloud_share: float = CLOUD_SHARE,
) -> P1Split:
    """Split ``log`` under P1 (or P1+, positives = ratings >= 4) for one seed.

    Users with fewer than four positives are dropped (none are on MovieLens-100K under P1).
    """
    keep = np.ones(log.num_rows, dtype=bool) if variant == "P1" else log.rating >= 4
    order = _protocol_order(log, keep, seed)
    user = log.user[order]
    counts = np.bincount(user, minlength=log.num_users)
    users = np.nonzero(counts >= MIN_INTERACTIONS)[0]
    if len(users) == 0:
        raise DatasetError(f"{log.name}: no user has {MIN_INTERACTIONS} or more positives")
    row_keep = counts[user] >= MIN_INTERACTIONS
    items = log.item[order][row_keep]
    lengths = counts[users]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    num_cloud = np.floor(cloud_share * (lengths - 2)).astype(np.int64)
    num_cloud = np.clip(num_cloud, 1, lengths - 3)
    negatives = _sample_negatives(log, users, num_negatives, seed)
    features = None if log.item_features is None else torch.from_numpy(log.item_features).float()
    return P1Split(
        items=torch.from_numpy(items.astype(np.int64)),
        offsets=torch.from_numpy(offsets.astype(np.int64)),
        num_cloud=torch.from_numpy(num_cloud),
        negatives=torch.from_numpy(negatives),
        group=activity_groups(torch.from_numpy(num_cloud)),
        user_ids=torch.from_numpy(users.astype(np.int64)),
        num_items=log.num_items,
        item_features=features,
        seed=seed,
        variant=variant,
        dataset=log.name,
    )


@dataclass(frozen=True)
class P2Split:
    """P2 (CTR view): observed ratings labelled ``rating >= 4``, split 70/10/20 per user in time.

    Row arrays are aligned; ``period`` is 0 cloud, 1 device, 2 test.
    """

    user: torch.Tensor
    item: torch.Tensor
    label: torch.Tensor
    period: torch.Tensor
    num_users: int
    num_items: int
    seed: int


def split_p2(
    log: InteractionLog, seed: int, *, shares: tuple[float, float] = (0.7, 0.1)
) -> P2Split:
    """Per-user chronological split with a seeded tie-break into cloud / device / test periods."""
    order = _protocol_order(log, np.ones(log.num_rows, dtype=bool), seed)
    user = log.user[order]
    counts = np.bincount(user, minlength=log.num_users)
    starts = np.concatenate([[0], np.cumsum(counts)])[:-1]
    position = np.arange(len(user)) - starts[user]
    # The epsilon keeps 0.7 + 0.1 = 0.7999... from losing a row to floating point.
    cloud_end = np.floor(shares[0] * counts + 1e-9)[user]
    device_end = np.floor((shares[0] + shares[1]) * counts + 1e-9)[user]
    period = np.where(position < cloud_end, 0, np.where(position < device_end, 1, 2))
    return P2Split(
        user=torch.from_numpy(user.astype(np.int64)),
        item=torch.from_numpy(log.item[order].astype(np.int64)),
        label=torch.from_numpy((log.rating[order] >= 4).astype(np.float32)),
        period=torch.from_numpy(period.astype(np.int64)),
        num_users=log.num_users,
        num_items=log.num_items,
        seed=seed,
    )
