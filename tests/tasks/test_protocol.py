import numpy as np
import pytest
import torch

from coevo.tasks.log import DatasetError
from coevo.tasks.protocol import split_p1, split_p2
from coevo.testing import make_log


def test_split_sizes_follow_the_protocol(small_log):
    split = split_p1(small_log, seed=0)
    assert split.lengths.tolist() == [10, 12, 20]
    # floor(0.75 * (n - 2)) cloud rows, the rest of n - 2 on the device
    assert split.num_cloud.tolist() == [6, 7, 13]
    assert split.num_device_period.tolist() == [2, 3, 5]


def test_visibility_of_periods(small_log):
    split = split_p1(small_log, seed=0)
    cloud, device = set(split.rows("cloud").tolist()), set(split.rows("device").tolist())
    both = set(split.rows("cloud+device").tolist())
    targets = set(split.target_rows("val").tolist()) | set(split.target_rows("test").tolist())
    assert cloud.isdisjoint(device) and cloud | device == both
    assert both.isdisjoint(targets)
    assert len(both) + len(targets) == len(split.items)
    # cloud rows are each device's prefix
    assert sorted(cloud) == [0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15, 16, 22, *range(23, 35)]


def test_order_is_by_time_and_ties_by_seed_never_by_item_id():
    # user 0: items 9, 8, 7 share one timestamp, then item 1 later
    log = make_log({0: [9, 8, 7, 1, 2, 3]}, 120, timestamps={0: [5, 5, 5, 6, 7, 8]})
    orders = {tuple(split_p1(log, seed).items[:3].tolist()) for seed in range(30)}
    assert len(orders) > 2  # ties really are shuffled by the seed
    for seed in range(5):
        assert split_p1(log, seed).items[3:].tolist() == [1, 2, 3]


def test_history_is_left_padded_and_stays_within_a_device():
    log = make_log({0: [1, 2, 3, 4, 5], 1: [6, 7, 8, 9, 10]}, 120)
    split = split_p1(log, seed=0)
    history = split.history(torch.tensor([1, 5, 7]), 3)
    pad = split.num_items
    assert history.tolist() == [[pad, pad, 1], [pad, pad, pad], [pad, 6, 7]]


def test_negatives_are_unrated_distinct_and_seeded(small_log):
    a, b = split_p1(small_log, seed=0), split_p1(small_log, seed=0)
    c = split_p1(small_log, seed=1)
    assert torch.equal(a.negatives, b.negatives)
    assert not torch.equal(a.negatives, c.negatives)
    for device in range(a.num_devices):
        rated = set(small_log.item[small_log.user == device].tolist())
        negatives = a.negatives[device].tolist()
        assert len(set(negatives)) == 99
        assert rated.isdisjoint(negatives)
    assert a.candidates("test")[:, 0].tolist() == a.items[a.target_rows("test")].tolist()


def test_p1_plus_keeps_only_high_ratings_as_positives():
    log = make_log({0: list(range(10))}, 120, ratings={0: [5, 1, 4, 2, 5, 4, 3, 5, 4, 5]})
    split = split_p1(log, seed=0, variant="P1+")
    assert split.items.tolist() == [0, 2, 4, 5, 7, 8, 9]
    # the low-rated items are still not valid negatives
    assert set(split.negatives[0].tolist()).isdisjoint({1, 3, 6})


def test_short_users_are_dropped_and_too_small_catalogues_rejected():
    log = make_log({0: [1, 2, 3], 1: [4, 5, 6, 7]}, 120)
    split = split_p1(log, seed=0)
    assert split.user_ids.tolist() == [1]
    with pytest.raises(DatasetError, match="num_negatives=99"):
        split_p1(make_log({0: list(range(30))}, 100), seed=0)


def test_seen_before_marks_exactly_the_history(small_log):
    split = split_p1(small_log, seed=0)
    mask = split.seen_before(0, 3, "test")
    for device in range(3):
        lo, hi = split.offsets[device], split.offsets[device + 1]
        expected = set(split.items[lo : hi - 1].tolist())
        assert set(torch.nonzero(mask[device]).squeeze(1).tolist()) == expected


def test_p2_split_shares_and_labels():
    ratings = {0: [5, 4, 3, 2, 1, 5, 4, 3, 2, 1]}
    log = make_log({0: list(range(10))}, 20, ratings=ratings)
    split = split_p2(log, seed=0)
    assert split.period.tolist() == [0] * 7 + [1] + [2] * 2
    assert split.label.tolist() == [1, 1, 0, 0, 0, 1, 1, 0, 0, 0]
    assert np.isclose(float(split.label.mean()), 0.4)
