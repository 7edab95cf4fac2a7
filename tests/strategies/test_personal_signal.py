"""On a synthetic world whose users mostly follow a personal taste that a short history barely
reveals, every personalisation strategy recovers part of it: it beats cloud-only on NDCG@10."""

import pytest
import torch

from coevo.sim.simulator import simulate
from coevo.strategies import STRATEGIES
from coevo.tasks.protocol import split_p1
from coevo.tasks.recommendation import ModelShapes, RecommendationTask
from coevo.tasks.synthetic import SyntheticConfig, make_world
from coevo.types import DeviceState

WORLD = SyntheticConfig(
    num_devices=200,
    num_items=300,
    min_interactions=30,
    mean_interactions=60,
    max_interactions=120,
    num_clusters=4,
    cluster_scale=0.3,
    personal_scale=5.0,  # the personal signal: a taste far from the user's cluster
    drift_scale=0.0,
    popularity_weight=0.3,
    temperature=0.3,
)
# Three items of history: the models see little of a user's taste at inference time.
SHAPES = ModelShapes(
    device_dim=16, device_history=3, cloud_dim=16, cloud_history=3, cloud_layers=1, cloud_heads=1
)
TRAIN = {"epochs": 20, "lr": 0.005, "batch_size": 32, "eval_every": 2, "patience": 3}
SETTINGS = {
    "finetune": {"pretrain": TRAIN, "local": {"epochs": 5, "lr": 0.01}},
    "fedper": {"pretrain": TRAIN, "rounds": 5, "local": {"epochs": 2, "lr": 0.03}},
    "fedrep": {"pretrain": TRAIN, "rounds": 5, "local": {"epochs": 3, "lr": 0.03}},
    "ditto": {
        "pretrain": TRAIN,
        "rounds": 5,
        "lam": 0.01,
        "personal_lr": 0.01,
        "local": {"epochs": 2, "lr": 0.003},
    },
    "dccl": {"pretrain": TRAIN, "metapatch_dim": 32, "local": {"epochs": 1, "lr": 0.2}},
    "duet": {},
}
MARGIN = 0.02


@pytest.fixture(scope="module")
def task():
    log = make_world(WORLD, 0)
    return RecommendationTask(log, split_p1(log, 0), SHAPES)


def _ndcg10(task, strategy, **simulate_options):
    result = simulate(strategy, torch.Generator().manual_seed(0), **simulate_options)

    def scorer(devices, history, candidates):
        state = DeviceState({k: v[devices] for k, v in result.devices.tensors.items()})
        return strategy.score(result.cloud, state, history, candidates)

    return task.evaluate(scorer, "test", full_ranking=False)[1]["ndcg@10"]


@pytest.fixture(scope="module")
def cloud_only_ndcg10(task):
    cls = STRATEGIES.get("cloud_only")
    return _ndcg10(task, cls(task, cls.Config.model_validate({"train": TRAIN})))


@pytest.fixture(scope="module")
def pretrained(task):
    """The device model pretrained on cloud-period data, shared by the strategies that start
    from it (each would train the same one from the same seed)."""
    cls = STRATEGIES.get("finetune")
    return cls(task, cls.Config.model_validate(SETTINGS["finetune"])).init(
        torch.Generator().manual_seed(0)
    )


def _settings(cls, name):
    """The tuned settings, or for a strategy without them its defaults with short training."""
    if SETTINGS[name]:
        return cls.Config.model_validate(SETTINGS[name])
    values = cls.Config().model_dump()
    for part in ("train", "pretrain"):
        if isinstance(values.get(part), dict):
            values[part] = {**values[part], **TRAIN}
    return cls.Config.model_validate(values)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_personalisation_beats_cloud_only(name, task, cloud_only_ndcg10, pretrained):
    cls = STRATEGIES.get(name)
    strategy = cls(task, _settings(cls, name))
    start = pretrained if name in ("finetune", "fedper", "fedrep", "ditto") else None
    ndcg10 = _ndcg10(task, strategy, cloud=start)
    assert ndcg10 > cloud_only_ndcg10 + MARGIN, (name, ndcg10, cloud_only_ndcg10)
