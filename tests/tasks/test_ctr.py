import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from coevo.sim.simulator import simulate
from coevo.strategies.fedavg import FedAvg
from coevo.tasks.ctr import CTRModel, RatingCTRTask, per_user_auc
from coevo.tasks.log import InteractionLog
from coevo.tasks.recommendation import state_of
from coevo.testing import make_log
from coevo.types import CloudState

NUM_USER_FEATURES, NUM_GENRES = 30, 19


def user_profile(age_bucket: int, is_male: bool, occupation: int) -> np.ndarray:
    """MovieLens layout: age bucket one-hot (7), gender F/M (2), occupation one-hot (21)."""
    profile = np.zeros(NUM_USER_FEATURES, dtype=np.float32)
    profile[age_bucket] = 1
    profile[7 + int(is_male)] = 1
    profile[9 + occupation] = 1
    return profile


def with_features(log: InteractionLog, seed: int = 0) -> InteractionLog:
    rng = np.random.default_rng(seed)
    users = [
        user_profile(int(rng.integers(7)), bool(rng.integers(2)), int(rng.integers(21)))
        for _ in range(log.num_users)
    ]
    genres = rng.integers(0, 2, (log.num_items, NUM_GENRES)).astype(np.float32)
    return dataclasses.replace(log, user_features=np.stack(users), item_features=genres)


@pytest.fixture(scope="module")
def hand_task() -> RatingCTRTask:
    """User 0: five ratings out of time order (two at t=10); user 1: three; user 2: one."""
    log = make_log(
        {0: [4, 7, 1, 2, 3], 1: [5, 0, 6], 2: [8]},
        10,
        ratings={0: [5, 1, 4, 3, 2], 1: [4, 2, 5], 2: [1]},
        timestamps={0: [30, 10, 20, 10, 40], 1: [3, 1, 2], 2: [0]},
    )
    genres = np.zeros((10, NUM_GENRES), dtype=np.float32)
    genres[7, [1, 8]] = 1  # item 7: Action, Drama
    profiles = np.stack(
        [user_profile(2, True, 5), user_profile(0, False, 20), user_profile(6, True, 0)]
    )
    return RatingCTRTask.from_log(
        dataclasses.replace(log, user_features=profiles, item_features=genres)
    )


@pytest.fixture(scope="module")
def synthetic_task() -> RatingCTRTask:
    """Seven users with 4 to 23 ratings over 12 items, random profiles and genres."""
    rng = np.random.default_rng(1)
    sizes = [4, 9, 23, 6, 14, 11, 5]
    log = make_log(
        {user: rng.integers(0, 12, n).tolist() for user, n in enumerate(sizes)},
        12,
        ratings={
            user: rng.integers(1, 6, n).astype(float).tolist() for user, n in enumerate(sizes)
        },
        timestamps={user: rng.permutation(n).tolist() for user, n in enumerate(sizes)},
    )
    return RatingCTRTask.from_log(with_features(log))


def test_model_has_29057_parameters_for_1682_items():
    model = CTRModel(1682)
    assert sum(p.numel() for p in model.parameters()) == 1682 * 16 + 65 * 32 + 32 + 32 + 1 == 29_057
    logits = model(torch.tensor([[3, 5, 7]]), torch.zeros(1, 3, 49))
    assert logits.shape == (1, 3)


def test_split_is_80_20_per_user_in_timestamp_then_item_order(hand_task):
    # User 0 by (timestamp, item): (10, 2) (10, 7) (20, 1) (30, 4) | (40, 3); floor(0.8 * 5) = 4.
    # User 1: (1, 0) (2, 6) | (3, 5); floor(2.4) = 2. User 2: floor(0.8) = 0, its row tests.
    rows, offsets = hand_task.device_rows("device")
    assert offsets.tolist() == [0, 4, 6, 6]
    assert hand_task.item[rows].tolist() == [2, 7, 1, 4, 0, 6]
    # Ratings 3, 1, 4, 5 and 2, 5: a click is a rating of 4 or more.
    assert hand_task.label[rows].tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert hand_task.test_offsets.tolist() == [0, 1, 2, 3]
    assert hand_task.item[hand_task.test_rows].tolist() == [3, 5, 8]
    assert hand_task.num_devices == 3
    with pytest.raises(ValueError, match="device-period"):
        hand_task.device_rows("cloud")


def test_side_vector_is_user_profile_then_item_genres(hand_task):
    rows, _ = hand_task.device_rows("device")
    side = hand_task.gather(rows[1:2])["side"][0]  # user 0 (25-34, M, occupation 5), item 7
    expected = torch.zeros(49)
    expected[2] = 1  # age bucket 25-34
    expected[7 + 1] = 1  # gender M
    expected[9 + 5] = 1  # occupation 5
    expected[30 + 1] = expected[30 + 8] = 1  # Action, Drama
    assert torch.equal(side, expected)


def test_from_log_needs_user_and_item_features():
    with pytest.raises(ValueError, match="user_features and item_features"):
        RatingCTRTask.from_log(make_log({0: [1, 2]}, 3))


def test_batch_loss_is_bce_over_real_rows_only(synthetic_task):
    torch.manual_seed(0)
    model = synthetic_task.device_model()
    params = dict(model.named_parameters())
    inputs = synthetic_task.gather(torch.tensor([0, 3, 5, 8, 0]))
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    inputs["label"][4] = 1 - inputs["label"][0]  # padding must not count, whatever its label
    loss = RatingCTRTask.batch_loss(model, params, inputs, mask)
    logits = model(inputs["item"][:4], inputs["side"][:4])
    expected = F.binary_cross_entropy_with_logits(logits, inputs["label"][:4])
    assert torch.allclose(loss, expected, atol=1e-6)


def test_batch_loss_on_stacked_devices_is_each_devices_own_loss(synthetic_task):
    # Three devices, each with its own weights and rows (the last with one real row only).
    torch.manual_seed(0)
    per_device = [dict(synthetic_task.device_model().named_parameters()) for _ in range(3)]
    inputs = [synthetic_task.gather(torch.tensor(rows)) for rows in ([0, 3], [5, 8], [1, 2])]
    masks = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    stacked_params = {k: torch.stack([p[k] for p in per_device]) for k in per_device[0]}
    stacked_inputs = {k: torch.stack([i[k] for i in inputs]) for k in inputs[0]}
    loss = RatingCTRTask.batch_loss
    assert loss.stacked
    stacked = loss(None, stacked_params, stacked_inputs, masks)
    one_by_one = torch.stack([loss(None, per_device[d], inputs[d], masks[d]) for d in range(3)])
    assert stacked.shape == (3,)
    torch.testing.assert_close(stacked, one_by_one)


def test_fedavg_vectorized_equals_loop(synthetic_task):
    config = FedAvg.Config.model_validate(
        {
            "rounds": 3,
            "private": [],
            "local": {"epochs": 2, "lr": 0.5, "batch_size": 3, "optimizer": "sgd"},
        }
    )
    torch.manual_seed(0)
    start = CloudState(state_of(synthetic_task.device_model()))
    cohorts = [torch.tensor([0, 2, 3, 5]), torch.tensor([1, 2, 4, 5, 6]), torch.arange(7)]
    results = [
        simulate(
            FedAvg(synthetic_task, config),
            torch.Generator().manual_seed(0),
            backend=backend,
            block_size=3,
            cloud=start,
            select=lambda round: cohorts[round],
        )
        for backend in ("vectorized", "loop")
    ]
    for name, tensor in results[0].cloud.tensors.items():
        assert not torch.equal(tensor, start[name]), name
        assert torch.allclose(tensor, results[1].cloud[name], atol=1e-5), name


def test_evaluate_matches_sklearn(synthetic_task):
    torch.manual_seed(3)
    model = synthetic_task.device_model()
    metrics = synthetic_task.evaluate(dict(model.named_parameters()))
    rows = synthetic_task.test_rows
    with torch.no_grad():
        logits = model(synthetic_task.item[rows], synthetic_task.side[rows]).numpy()
    labels = synthetic_task.label[rows].numpy()
    assert metrics["test_rows"] == len(rows)
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, logits), abs=1e-9)
    users = synthetic_task.user[rows].numpy()
    per_user, weights = [], []
    for user in np.unique(users):
        own = users == user
        if 0 < labels[own].sum() < own.sum():
            per_user.append(roc_auc_score(labels[own], logits[own]))
            weights.append(own.sum())
    assert metrics["user_auc_users"] == len(per_user) >= 2
    assert metrics["user_auc"] == pytest.approx(np.mean(per_user), abs=1e-6)
    assert metrics["gauc"] == pytest.approx(np.average(per_user, weights=weights), abs=1e-6)


def test_per_user_auc_counts_ties_half_and_skips_one_class_users():
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    logits = torch.tensor([2.0, 1.0, 2.0, 0.5, 0.5, 0.5, 3.0])
    # User 0: 1 positive (2.0) vs negatives 1.0, 2.0 -> (1 + 0.5) / 2. User 1: (0.5 + 0.5) / 2.
    auc = per_user_auc(labels, logits, torch.tensor([0, 3, 6, 7]))
    assert auc[:2].tolist() == [0.75, 0.5]
    assert torch.isnan(auc[2])
