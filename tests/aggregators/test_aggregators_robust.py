import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from coevo.aggregators import AGGREGATORS, CenteredClip, Mean, Median, Robust
from coevo.config import RunConfig
from coevo.sim.experiment import strategy_configs
from coevo.strategies import STRATEGIES, FedAvg
from coevo.testing import check_strategy, tiny_task
from coevo.types import Payload

LOCAL = {"epochs": 1, "lr": 0.5, "optimizer": "sgd"}


@pytest.fixture(scope="module")
def task():
    return tiny_task()


def _uplinks(strategy, count, seed):
    generator = torch.Generator().manual_seed(seed)
    cloud = strategy.init(torch.Generator().manual_seed(0))
    shapes = {k: cloud[k].shape for k in strategy.inner.shared}
    tensors = {k: torch.randn(count, *s, generator=generator) for k, s in shapes.items()}
    weights = torch.randint(1, 20, (count,), generator=generator).float()
    return cloud, Payload(tensors), weights


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(AGGREGATORS.names()),
    count=st.integers(2, 9),
    seed=st.integers(0, 10_000),
    data=st.data(),
)
def test_merge_does_not_depend_on_device_order(task, name, count, seed, data):
    strategy = Robust.wrap(FedAvg(task), AGGREGATORS.get(name)())
    cloud, uplinks, weights = _uplinks(strategy, count, seed)
    order = torch.tensor(data.draw(st.permutations(range(count))))
    shuffled = Payload({k: v[order] for k, v in uplinks.tensors.items()})
    first = strategy.merge(cloud, uplinks, weights)
    second = strategy.merge(cloud, shuffled, weights[order])
    assert first.tensors.keys() == second.tensors.keys()
    for k in first.tensors:
        assert torch.allclose(first[k], second[k], rtol=1e-5, atol=1e-6), k


def test_robust_mean_merges_exactly_like_fedavg(task):
    fedavg = FedAvg(task)
    cloud, uplinks, weights = _uplinks(Robust.wrap(fedavg, Mean()), 5, 0)
    robust = Robust.wrap(fedavg, Mean()).merge(cloud, uplinks, weights)
    plain = fedavg.merge(cloud, uplinks, weights)
    for k in plain.tensors:
        assert torch.allclose(robust[k], plain[k], atol=1e-7), k


def test_a_median_merge_ignores_one_huge_update_that_moves_fedavg(task):
    fedavg = FedAvg(task)
    cloud, uplinks, weights = _uplinks(Robust.wrap(fedavg, Median()), 5, 1)
    poisoned = Payload({k: v.clone() for k, v in uplinks.tensors.items()})
    for v in poisoned.tensors.values():
        v[0] = 1e6
    robust = Robust.wrap(fedavg, Median()).merge(cloud, poisoned, weights)
    plain = fedavg.merge(cloud, poisoned, weights)
    k = fedavg.shared[0]
    assert float((robust[k] - cloud[k]).abs().max()) < 10
    assert float((plain[k] - cloud[k]).abs().max()) > 1e4


def test_stateful_aggregators_keep_their_state_in_the_cloud_state(task):
    strategy = Robust.wrap(FedAvg(task), CenteredClip())
    cloud, uplinks, weights = _uplinks(strategy, 4, 2)
    merged = strategy.merge(cloud, uplinks, weights)
    assert "robust/center" in merged.tensors
    again = strategy.merge(merged, uplinks, weights)
    assert not torch.equal(again["robust/center"], merged["robust/center"])
    assert set(again.tensors) == set(merged.tensors)


@pytest.mark.parametrize(
    "aggregator", [{"name": "centered_clip"}, {"name": "krum"}, {"name": "adaptive_clip"}]
)
def test_robust_fedavg_passes_the_strategy_conformance_checks(aggregator):
    check_strategy(Robust, {"inner": {"name": "fedavg", "local": LOCAL}, "aggregator": aggregator})


def test_robust_around_an_adversarial_strategy_passes_the_conformance_checks():
    inner = {"name": "adversarial", "attack": {"name": "noise"}, "share": 0.3}
    inner["inner"] = {"name": "fedavg", "local": LOCAL}
    check_strategy(Robust, {"inner": inner, "aggregator": {"name": "trimmed_mean"}})


def test_config_errors_name_the_field_and_the_choices():
    with pytest.raises(ValidationError, match=r"aggregator[\s\S]*unknown aggregator 'medain'"):
        Robust.Config.model_validate({"aggregator": {"name": "medain"}})
    with pytest.raises(ValidationError, match=r"aggregator[\s\S]*trim"):
        Robust.Config.model_validate({"aggregator": {"name": "trimmed_mean", "trim": 0.7}})
    with pytest.raises(ValidationError, match=r"inner[\s\S]*server_lr"):
        Robust.Config.model_validate({"inner": {"name": "fedavg", "server_lr": -1}})


def test_a_run_config_builds_a_robust_strategy_with_the_rounds_pushed_down(task):
    spec = {"name": "robust", "rounds": 3, "aggregator": {"name": "median"}}
    spec["inner"] = {"name": "fedprox", "mu": 0.1, "rounds": 50}
    config = RunConfig.model_validate({"name": "robust", "strategies": [spec]})
    [(cls, settings)] = strategy_configs(config)
    strategy = cls(task, settings)
    assert cls is STRATEGIES.get("robust")
    assert strategy.rounds == 3
    assert strategy.inner.name == "fedprox"
    assert isinstance(strategy.aggregator, Median)


@pytest.mark.parametrize("inner", ["scaffold", "fedbuff"])
def test_wrappers_compose_with_strategies_that_count_uplinks_or_merge_asynchronously(inner):
    attacked = {"name": "adversarial", "attack": {"name": "sign_flip"}, "share": 0.25}
    attacked["inner"] = {"name": inner, "local": LOCAL}
    check_strategy(Robust, {"inner": attacked, "aggregator": {"name": "median"}})
