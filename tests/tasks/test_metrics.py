import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from coevo.tasks.metrics import (
    GROUP_NAMES,
    activity_groups,
    candidate_rank,
    ctr_metrics,
    full_ranking_metrics,
    sampled_metrics,
    summarize,
)


def scores_with_ranks(ranks: list[int], num_candidates: int = 100) -> torch.Tensor:
    """Negatives score 99, 98, ..., 1; the positive sits just below the ``rank``-th of them."""
    negatives = torch.arange(num_candidates - 1, 0, -1, dtype=torch.float32)
    positives = torch.tensor([num_candidates - 1 - rank + 0.5 for rank in ranks])
    return torch.cat([positives[:, None], negatives.expand(len(ranks), -1)], dim=1)


def test_sampled_metrics_hand_computed() -> None:
    metrics = sampled_metrics(scores_with_ranks([0, 3, 12]))
    assert list(metrics) == [
        *("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20"),
        *("mrr", "gauc"),
    ]
    expected = {
        "hr@5": [1.0, 1.0, 0.0],
        "hr@10": [1.0, 1.0, 0.0],
        "hr@20": [1.0, 1.0, 1.0],
        "ndcg@5": [1.0, 1 / math.log2(5), 0.0],
        "ndcg@10": [1.0, 1 / math.log2(5), 0.0],
        "ndcg@20": [1.0, 1 / math.log2(5), 1 / math.log2(14)],
        "mrr": [1.0, 1 / 4, 1 / 13],
        "gauc": [1.0, 1 - 3 / 99, 1 - 12 / 99],
    }
    for name, values in expected.items():
        assert metrics[name].dtype == torch.float32
        assert metrics[name].tolist() == pytest.approx(values), name


def test_candidate_rank_counts_strictly_higher_negatives() -> None:
    assert candidate_rank(scores_with_ranks([0, 3, 12, 99])).tolist() == [0, 3, 12, 99]


def test_ties_count_half_without_generator() -> None:
    all_equal = torch.zeros(3, 100)
    assert candidate_rank(all_equal).tolist() == [49, 49, 49]
    # One negative above, two tied: 1 + floor(2 / 2).
    partial = torch.tensor([[1.0, 2.0, 1.0, 1.0, 0.0]])
    assert candidate_rank(partial).tolist() == [2]


def test_ties_are_uniform_with_generator() -> None:
    all_equal = torch.zeros(1, 100)
    ranks = torch.cat(
        [candidate_rank(all_equal, torch.Generator().manual_seed(seed)) for seed in range(2000)]
    )
    assert ranks.min() >= 0 and ranks.max() <= 99
    # The uniform over 0..99 has mean 49.5 and std 28.9; 2.5 is about 4 standard errors.
    assert ranks.float().mean().item() == pytest.approx(49.5, abs=2.5)
    partial = torch.tensor([[1.0, 2.0, 1.0, 1.0, 0.0]]).expand(300, -1)
    partial_ranks = candidate_rank(partial, torch.Generator().manual_seed(0))
    assert set(partial_ranks.tolist()) == {1, 2, 3}


def test_generator_makes_ties_reproducible() -> None:
    scores = torch.randint(0, 3, (20, 100), generator=torch.Generator().manual_seed(1)).float()
    first = candidate_rank(scores, torch.Generator().manual_seed(7))
    second = candidate_rank(scores, torch.Generator().manual_seed(7))
    assert torch.equal(first, second)


def test_nan_scores_raise_naming_the_device() -> None:
    scores = torch.zeros(3, 100)
    scores[1, 40] = float("nan")
    with pytest.raises(ValueError, match=r"device \[1\]"):
        candidate_rank(scores)
    with pytest.raises(ValueError, match=r"device \[1\]"):
        sampled_metrics(scores)


def test_full_ranking_with_exclusions() -> None:
    # Item i scores i, so the target t has 14 - t higher-scored items.
    scores = torch.arange(15.0).expand(3, -1)
    target = torch.tensor([4, 14, 0])
    plain = full_ranking_metrics(scores, target, exclude=None)
    assert plain["full_hr@10"].tolist() == [0.0, 1.0, 0.0]
    assert plain["full_ndcg@10"].tolist() == [0.0, 1.0, 0.0]
    assert plain["full_recall@20"].tolist() == [1.0, 1.0, 1.0]

    exclude = torch.zeros(3, 15, dtype=torch.bool)
    exclude[0, [13, 14]] = True  # two higher-scored training items: rank 10 -> 8
    exclude[1, 14] = True  # the target itself: still ranked, still first
    exclude[2, 1:5] = True  # four higher-scored items: rank 14 -> 10
    masked = full_ranking_metrics(scores, target, exclude)
    assert masked["full_hr@10"].tolist() == [1.0, 1.0, 0.0]
    assert masked["full_ndcg@10"].tolist() == pytest.approx([1 / math.log2(10), 1.0, 0.0])
    assert masked["full_recall@20"].tolist() == [1.0, 1.0, 1.0]


def test_full_ranking_ignores_nan_in_excluded_items_only() -> None:
    scores = torch.tensor([[1.0, float("nan"), 0.0], [1.0, 0.0, 0.0]])
    exclude = torch.tensor([[False, True, False], [False, False, False]])
    result = full_ranking_metrics(scores, torch.tensor([0, 0]), exclude)
    assert result["full_hr@10"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"device \[0\]"):
        full_ranking_metrics(scores, torch.tensor([0, 0]), None)


def test_full_ranking_is_independent_of_chunk_size() -> None:
    source = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (37, 50), generator=source).float()  # many ties
    target = torch.randint(0, 50, (37,), generator=source)
    exclude = torch.rand(37, 50, generator=source) < 0.3
    results = [
        full_ranking_metrics(scores, target, exclude, torch.Generator().manual_seed(5), chunk)
        for chunk in (1, 5, 1024)
    ]
    for other in results[1:]:
        for name, values in results[0].items():
            assert torch.equal(values, other[name]), name


def test_ctr_metrics_match_sklearn() -> None:
    source = torch.Generator().manual_seed(0)
    num_rows = 400
    logits = torch.randint(-4, 5, (num_rows,), generator=source).double() / 2  # many ties
    labels = (torch.rand(num_rows, generator=source) < torch.sigmoid(logits)).long()
    user = torch.randint(0, 25, (num_rows,), generator=source) * 3  # ids need not be dense
    # Users 100 and 101 have one class only and must be skipped by GAUC.
    user = torch.cat([user, torch.tensor([100, 100, 101])])
    labels = torch.cat([labels, torch.tensor([1, 1, 0])])
    logits = torch.cat([logits, torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)])

    result = ctr_metrics(labels, logits, user)

    assert result["auc"] == pytest.approx(roc_auc_score(labels.numpy(), logits.numpy()))
    probabilities = torch.sigmoid(logits).numpy()
    assert result["logloss"] == pytest.approx(log_loss(labels.numpy(), probabilities))
    weighted_sum, total_rows, counted = 0.0, 0, 0
    for user_id in torch.unique(user).tolist():
        rows = user == user_id
        if labels[rows].unique().numel() < 2:
            continue
        auc = roc_auc_score(labels[rows].numpy(), logits[rows].numpy())
        weighted_sum += auc * int(rows.sum())
        total_rows += int(rows.sum())
        counted += 1
    assert result["gauc"] == pytest.approx(weighted_sum / total_rows)
    assert result["gauc_users"] == counted
    assert counted < torch.unique(user).numel()


def test_gauc_hand_computed_skips_single_class_users() -> None:
    # User 0: AUC 1 over 2 rows. User 1: positives only, skipped. User 2: positives {0, 1}
    # against negatives {0, 1} win 0.5 + 0 + 1 + 0.5 of 4 pairs, AUC 0.5 over 4 rows.
    labels = torch.tensor([1, 0, 1, 1, 1, 0, 1, 0, 1])
    logits = torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    user = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2])
    result = ctr_metrics(labels, logits, user)
    assert result["gauc"] == pytest.approx((2 * 1.0 + 4 * 0.5) / 6)
    assert result["gauc_users"] == 2


def test_ctr_metrics_with_one_class_is_nan() -> None:
    result = ctr_metrics(torch.ones(4), torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.zeros(4).long())
    assert math.isnan(result["auc"]) and math.isnan(result["gauc"])
    assert result["gauc_users"] == 0


def test_ctr_metrics_logloss_is_stable_for_extreme_logits() -> None:
    result = ctr_metrics(torch.tensor([1, 0]), torch.tensor([-200.0, 200.0]), torch.tensor([0, 0]))
    assert result["logloss"] == pytest.approx(200.0)


def test_activity_groups_hand_checked() -> None:
    # q20 = 2.8 and q80 = 8.2 by linear interpolation.
    assert activity_groups(torch.arange(1, 11)).tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 2, 2]
    # q20 = 1 and q80 = 2.2: the three devices tied at 1 are all tail, 60% of devices.
    assert activity_groups(torch.tensor([1, 1, 1, 2, 3])).tolist() == [0, 0, 0, 1, 2]
    assert GROUP_NAMES == ("tail", "mid", "head")


def test_summarize_means_per_group() -> None:
    per_device = {
        "hr@10": torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]),
        "ndcg@10": torch.tensor([1.0, 0.0, 0.5, 0.25, 0.0]),
    }
    result = summarize(per_device, torch.tensor([0, 0, 1, 2, 2]))
    assert result == pytest.approx(
        {
            "hr@10": 0.6,
            "hr@10/tail": 0.5,
            "hr@10/mid": 1.0,
            "hr@10/head": 0.5,
            "ndcg@10": 0.35,
            "ndcg@10/tail": 0.5,
            "ndcg@10/mid": 0.5,
            "ndcg@10/head": 0.125,
            "ndcg@10/std": math.sqrt(0.14),
            "ndcg@10/head_minus_tail": -0.375,
        }
    )


def test_summarize_empty_group_is_nan_and_no_group_means_overall_only() -> None:
    per_device = {"ndcg@10": torch.tensor([1.0, 0.0, 0.5])}
    grouped = summarize(per_device, torch.tensor([0, 2, 2]))
    assert math.isnan(grouped["ndcg@10/mid"])
    assert grouped["ndcg@10/head_minus_tail"] == pytest.approx(-0.75)
    assert summarize(per_device) == pytest.approx({"ndcg@10": 0.5, "ndcg@10/std": math.sqrt(1 / 6)})


@settings(max_examples=50, deadline=None, database=None)
@given(
    values=st.permutations(list(range(100))),
    column_order=st.permutations(list(range(1, 100))),
    ks=st.lists(st.integers(1, 120), min_size=1, max_size=6, unique=True).map(sorted),
)
def test_sampled_metrics_ignore_negative_order(
    values: list[int], column_order: list[int], ks: list[int]
) -> None:
    scores = torch.tensor([values], dtype=torch.float32)
    shuffled = scores[:, [0, *column_order]]
    original = sampled_metrics(scores, ks)
    permuted = sampled_metrics(shuffled, ks)
    for name, metric in original.items():
        assert torch.equal(metric, permuted[name]), name
    hits = [original[f"hr@{k}"].item() for k in ks]
    assert hits == sorted(hits)
