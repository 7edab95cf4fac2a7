"""P1 on the real MovieLens-100K: the protocol's own sanity figures (needs COEVO_DATA)."""

import os
from pathlib import Path

import pytest
import torch

from coevo.strategies import Popularity
from coevo.tasks.movielens import load_movielens_100k
from coevo.tasks.protocol import split_p1
from coevo.tasks.recommendation import ModelShapes, RecommendationTask
from coevo.types import DeviceState

DATA = os.environ.get("COEVO_DATA")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not DATA or not (Path(DATA) / "ml-100k" / "u.data").exists(),
        reason="set COEVO_DATA to a folder holding ml-100k/",
    ),
]


@pytest.fixture(scope="module")
def log():
    return load_movielens_100k(DATA)


def test_p1_split_sizes_match_the_protocol(log):
    split = split_p1(log, seed=0)
    assert split.num_devices == 943
    device = split.num_device_period.double()
    assert int(device.min()) >= 5
    assert float(device.median()) == pytest.approx(16, abs=1)
    tail, head = (split.group == 0).float().mean(), (split.group == 2).float().mean()
    assert 0.19 <= float(tail) <= 0.23 and 0.19 <= float(head) <= 0.23


def test_popularity_with_seeded_ties_lands_in_the_protocol_range(log):
    values = []
    for seed in range(3):
        task = RecommendationTask(log, split_p1(log, seed), ModelShapes())
        strategy = Popularity(task)
        cloud = strategy.init(torch.Generator())

        def scorer(devices, history, candidates, strategy=strategy, cloud=cloud):
            return strategy.score(cloud, DeviceState(), history, candidates)

        values.append(task.evaluate(scorer, full_ranking=False, seed=seed)[1]["hr@10"])
    mean = sum(values) / len(values)
    assert 0.39 <= mean <= 0.42, values
