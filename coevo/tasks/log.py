"""The raw interaction log every dataset loads into, before any protocol splits it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class DatasetError(RuntimeError):
    """A dataset is missing, truncated or corrupt; the message says what and how to fix it."""


@dataclass(frozen=True)
class InteractionLog:
    """One row per (user, item) interaction, ids 0-based and dense.

    Attributes:
        name: dataset name, for reports (``"movielens-100k"``, ``"synthetic"``).
        user: int64 ``[num_rows]`` user (= device) index in ``[0, num_users)``.
        item: int64 ``[num_rows]`` item index in ``[0, num_items)``.
        rating: float32 ``[num_rows]`` explicit rating (1..5 on MovieLens).
        timestamp: int64 ``[num_rows]`` seconds; only the order within a user matters.
        num_users: number of users (devices).
        num_items: number of items.
        item_features: float32 ``[num_items, num_item_features]`` observable item content
            (genre flags on MovieLens), or ``None``.
        user_features: float32 ``[num_users, num_user_features]`` observable user profile, or
            ``None``.
        row_features: float32 ``[num_rows, num_row_features]`` context observed with each
            interaction (the synthetic world's spurious feature), or ``None``.
        info: free-form facts for the report (source path, generator knobs).
    """

    name: str
    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    num_users: int
    num_items: int
    item_features: np.ndarray | None = None
    user_features: np.ndarray | None = None
    row_features: np.ndarray | None = None
    info: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rows = len(self.user)
        for column in ("item", "rating", "timestamp"):
            if len(getattr(self, column)) != rows:
                raise DatasetError(
                    f"{self.name}: column {column!r} has {len(getattr(self, column))} rows, "
                    f"expected {rows} like 'user'"
                )
        if rows and (self.user.min() < 0 or self.user.max() >= self.num_users):
            raise DatasetError(f"{self.name}: user ids must lie in [0, {self.num_users})")
        if rows and (self.item.min() < 0 or self.item.max() >= self.num_items):
            raise DatasetError(f"{self.name}: item ids must lie in [0, {self.num_items})")
        if self.item_features is not None and len(self.item_features) != self.num_items:
            raise DatasetError(
                f"{self.name}: item_features has {len(self.item_features)} rows, "
                f"expected num_items={self.num_items}"
            )
        if self.user_features is not None and len(self.user_features) != self.num_users:
            raise DatasetError(
                f"{self.name}: user_features has {len(self.user_features)} rows, "
                f"expected num_users={self.num_users}"
            )

        if self.row_features is not None and len(self.row_features) != rows:
            raise DatasetError(
                f"{self.name}: row_features has {len(self.row_features)} rows, expected {rows}"
            )

    @property
    def num_rows(self) -> int:
        return len(self.user)

    def rows_per_user(self) -> np.ndarray:
        """int64 ``[num_users]``: how many interactions each user (device) has."""
        return np.bincount(self.user, minlength=self.num_users)


def describe(log: InteractionLog) -> dict[str, float | int | str]:
    """Headline facts of a log: sizes and the per-device interaction count distribution."""
    per_user = log.rows_per_user()
    quantiles = np.percentile(per_user, [20, 50, 80]) if log.num_users else np.zeros(3)
    return {
        "dataset": log.name,
        "users": log.num_users,
        "items": log.num_items,
        "interactions": log.num_rows,
        "per_device_min": int(per_user.min()) if log.num_users else 0,
        "per_device_p20": float(quantiles[0]),
        "per_device_median": float(quantiles[1]),
        "per_device_mean": float(per_user.mean()) if log.num_users else 0.0,
        "per_device_p80": float(quantiles[2]),
        "per_device_max": int(per_user.max()) if log.num_users else 0,
        "share_rating_ge4": float((log.rating >= 4).mean()) if log.num_rows else 0.0,
    }
