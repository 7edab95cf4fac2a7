"""The synthetic world: determinism, validity and that each heterogeneity knob does its job."""

from __future__ import annotations

from typing import Any

import numpy as np
import pydantic
import pytest

from coevo.tasks.log import InteractionLog
from coevo.tasks.synthetic import SyntheticConfig, make_world, true_scores


def small(**overrides: Any) -> SyntheticConfig:
    knobs: dict[str, Any] = {"num_devices": 400, "num_items": 200, "max_interactions": 200}
    return SyntheticConfig(**{**knobs, **overrides})


def sequences(log: InteractionLog) -> list[np.ndarray]:
    return np.split(log.item, np.cumsum(log.rows_per_user())[:-1])


def assert_same(first: InteractionLog, second: InteractionLog) -> None:
    for column in ("user", "item", "rating", "timestamp", "item_features", "user_features"):
        np.testing.assert_array_equal(getattr(first, column), getattr(second, column))


def top_decile_share(log: InteractionLog) -> float:
    counts = np.sort(np.bincount(log.item, minlength=log.num_items))[::-1]
    return float(counts[: log.num_items // 10].sum() / counts.sum())


def same_cluster_overlap(log: InteractionLog, num_users: int = 150) -> float:
    assert log.user_features is not None
    cluster = log.user_features[:, :-1].argmax(axis=1)
    sets = [set(items.tolist()) for items in sequences(log)[:num_users]]
    overlaps = [
        len(sets[a] & sets[b]) / len(sets[a] | sets[b])
        for a in range(num_users)
        for b in range(a + 1, num_users)
        if cluster[a] == cluster[b]
    ]
    return float(np.mean(overlaps))


def test_same_seed_same_log_and_other_seed_differs() -> None:
    config = small()
    assert_same(make_world(config, seed=3), make_world(config, seed=3))
    other = make_world(config, seed=4)
    assert not np.array_equal(make_world(config, seed=3).item[:100], other.item[:100])


def test_log_is_valid_sorted_and_typed() -> None:
    config = small(min_interactions=15, mean_interactions=40, max_interactions=120)
    log = make_world(config, seed=0)
    assert log.name == "synthetic"
    assert (log.user.dtype, log.item.dtype) == (np.int64, np.int64)
    assert (log.rating.dtype, log.timestamp.dtype) == (np.float32, np.int64)
    per_user = log.rows_per_user()
    assert per_user.min() >= 15 and per_user.max() <= 120
    assert np.all(np.diff(log.user) >= 0)
    same_user = log.user[1:] == log.user[:-1]
    assert np.all(np.diff(log.timestamp)[same_user] >= 0)
    pairs = log.user * log.num_items + log.item
    assert len(np.unique(pairs)) == log.num_rows, "a device picked an item twice"
    assert set(np.unique(log.rating).tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert log.row_features is None
    assert log.info["num_devices"] == 400 and log.info["seed"] == 0
    InteractionLog(**{**log.__dict__})  # re-validates


def test_about_thirty_percent_of_consecutive_interactions_share_a_second() -> None:
    log = make_world(small(), seed=0)
    same_user = log.user[1:] == log.user[:-1]
    tie_share = np.mean(np.diff(log.timestamp)[same_user] == 0)
    assert 0.25 < tie_share < 0.35
    days = (log.timestamp.max() - log.timestamp.min()) / 86_400
    assert 150 < days < 400


def test_items_have_one_to_three_content_flags() -> None:
    log = make_world(small(), seed=0)
    assert log.item_features is not None and log.item_features.dtype == np.float32
    assert log.item_features.shape == (200, 12)
    assert set(log.item_features.sum(axis=1).tolist()) == {1.0, 2.0, 3.0}


def test_full_content_weight_makes_items_with_equal_flags_equal() -> None:
    for weight, expect_equal in ((1.0, True), (0.5, False)):
        config = small(content_weight=weight)
        flags = make_world(config, seed=0).item_features
        assert flags is not None
        scores = true_scores(config, 0, np.arange(20))
        first, second = next(
            (a, b) for a in range(200) for b in range(a + 1, 200) if (flags[a] == flags[b]).all()
        )
        assert np.allclose(scores[:, first], scores[:, second]) == expect_equal


def test_popularity_exponent_makes_a_long_tail() -> None:
    flat = top_decile_share(make_world(small(popularity_exponent=0.0), seed=0))
    steep = top_decile_share(make_world(small(popularity_exponent=1.2), seed=0))
    assert steep > 1.5 * flat


def test_activity_is_heavy_tailed() -> None:
    per_user = make_world(SyntheticConfig(), seed=0).rows_per_user()
    assert per_user.max() / np.median(per_user) > 3


def test_drift_makes_late_items_fit_the_final_taste() -> None:
    def late_minus_early(drift_scale: float) -> np.ndarray:
        config = small(num_devices=300, drift_scale=drift_scale)
        scores = true_scores(config, 0, np.arange(300))
        gaps = []
        for user, items in enumerate(sequences(make_world(config, seed=0))):
            quarter = len(items) // 4
            gaps.append(
                scores[user, items[-quarter:]].mean() - scores[user, items[:quarter]].mean()
            )
        return np.array(gaps)

    # Without drift the first picks are the best ones: sampling is without replacement.
    assert late_minus_early(0.0).mean() < 0
    drifting = late_minus_early(2.0)
    assert drifting.mean() > 0.3 and np.mean(drifting > 0) > 0.7


def test_personal_deviation_separates_users_of_one_cluster() -> None:
    clones = same_cluster_overlap(make_world(small(personal_scale=0.0, drift_scale=0.0), 0))
    individuals = same_cluster_overlap(make_world(small(personal_scale=3.0, drift_scale=0.0), 0))
    assert clones > 1.6 * individuals


def test_spurious_feature_leaks_the_label_only_on_spurious_devices() -> None:
    log = make_world(small(spurious_share=0.5, spurious_strength=0.9), seed=0)
    assert log.row_features is not None and log.row_features.shape == (log.num_rows, 1)
    assert log.user_features is not None
    spurious_device = log.user_features[:, -1]
    assert 0.35 < spurious_device.mean() < 0.65
    on_spurious = spurious_device[log.user] == 1.0
    agrees = (log.row_features[:, 0] == 1.0) == (log.rating >= 4)
    assert agrees[on_spurious].mean() > 0.85
    assert 0.45 < agrees[~on_spurious].mean() < 0.55


def test_user_features_are_cluster_one_hot_plus_spurious_flag() -> None:
    log = make_world(small(num_clusters=5), seed=0)
    assert log.user_features is not None and log.user_features.shape == (400, 6)
    np.testing.assert_array_equal(log.user_features[:, :5].sum(axis=1), np.ones(400))
    np.testing.assert_array_equal(log.user_features[:, 5], np.zeros(400))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"temperature": 0.1}, {"temperature": 5.0}, {"popularity_weight": 5.0}],
)
def test_share_of_ratings_at_least_four_is_realistic(overrides: dict[str, float]) -> None:
    log = make_world(small(**overrides), seed=0)
    assert 0.45 < np.mean(log.rating >= 4) < 0.65


def test_chunk_size_does_not_change_the_log() -> None:
    config = small(num_devices=700)
    assert_same(make_world(config, seed=1), make_world(config, seed=1, _chunk_users=256))
    with pytest.raises(ValueError, match="multiple of 256"):
        make_world(config, seed=1, _chunk_users=100)


def test_more_devices_extend_the_same_users() -> None:
    fewer = make_world(small(num_devices=300), seed=2)
    more = make_world(small(num_devices=700), seed=2)
    rows = fewer.num_rows
    np.testing.assert_array_equal(fewer.item, more.item[:rows])
    np.testing.assert_array_equal(fewer.rating, more.rating[:rows])
    np.testing.assert_array_equal(fewer.timestamp, more.timestamp[:rows])


def test_true_scores_follow_the_requested_user_order() -> None:
    config = small()
    everyone = true_scores(config, 5, np.arange(400))
    assert everyone.shape == (400, 200) and everyone.dtype == np.float32
    np.testing.assert_allclose(true_scores(config, 5, np.array([7, 3])), everyone[[7, 3]])
    with pytest.raises(ValueError, match="users must lie"):
        true_scores(config, 5, np.array([400]))


def test_config_rejects_bad_values() -> None:
    with pytest.raises(pydantic.ValidationError, match="extra"):
        SyntheticConfig.model_validate({"num_devise": 3})
    with pytest.raises(pydantic.ValidationError, match="max_interactions"):
        SyntheticConfig(num_items=100)
    with pytest.raises(pydantic.ValidationError, match="mean_interactions"):
        SyntheticConfig(min_interactions=80)
    with pytest.raises(pydantic.ValidationError, match="temperature"):
        SyntheticConfig(temperature=0.0)
    config, field = SyntheticConfig(), "num_items"
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        setattr(config, field, 3)
    with pytest.raises(ValueError, match="seed"):
        make_world(small(), seed=-1)


def test_default_world_of_a_thousand_devices() -> None:
    log = make_world(SyntheticConfig(), seed=0)
    assert (log.num_users, log.num_items) == (1000, 500)
    assert 40_000 < log.num_rows < 80_000
