"""Grouped secure aggregation in the simulator: the cloud merges group means only."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coevo.aggregators import Median, Robust
from coevo.attacks import Adversarial
from coevo.attacks.scaling import Scaling
from coevo.sim import simulate
from coevo.sim.simulator import secure_group_means
from coevo.strategies import FedAvg
from coevo.testing import tiny_task

LOCAL = {"epochs": 1, "batch_size": 4, "lr": 0.3, "optimizer": "sgd"}


@pytest.fixture(scope="module")
def task():
    return tiny_task()


def _fedavg(task, rounds=2):
    return FedAvg(task, FedAvg.Config.model_validate({"rounds": rounds, "local": LOCAL}))


@settings(max_examples=40, deadline=None)
@given(count=st.integers(1, 30), groups=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_group_means_keep_the_cohorts_weighted_mean(count, groups, seed):
    generator = torch.Generator().manual_seed(seed)
    uplinks = {"w": torch.randn(count, 3, 2, generator=generator), "b": torch.randn(count)}
    weights = torch.randint(1, 50, (count,), generator=generator).float()
    means, totals = secure_group_means(uplinks, weights, groups, generator)
    assert len(totals) == min(groups, count)
    assert float(totals.sum()) == pytest.approx(float(weights.sum()))
    for name, tensor in uplinks.items():
        shape = (-1, *([1] * (tensor.dim() - 1)))
        expected = (tensor * weights.view(shape)).sum(0) / weights.sum()
        merged = (means[name] * totals.view(shape)).sum(0) / totals.sum()
        assert torch.allclose(merged, expected, atol=1e-5)


def test_groups_differ_in_size_by_at_most_one():
    ones = torch.ones(10)
    _, totals = secure_group_means({"x": torch.arange(10.0)}, ones, 3, torch.Generator())
    assert sorted(totals.tolist()) == [3.0, 3.0, 4.0]


def test_an_integer_uplink_cannot_be_securely_aggregated():
    with pytest.raises(ValueError, match=r"uplink 'device' is torch.int64"):
        secure_group_means({"device": torch.arange(4)}, torch.ones(4), 2, torch.Generator())


def test_a_robust_strategy_under_secure_aggregation_needs_three_groups(task):
    robust = Robust.wrap(_fedavg(task), Median())
    with pytest.raises(ValueError, match=r"simulation\.secure_groups: .*at least 3 groups, got 1"):
        simulate(robust, torch.Generator().manual_seed(0), secure_aggregation=True)
    with pytest.raises(ValueError, match=r"simulation\.secure_groups: groups serve a robust"):
        simulate(_fedavg(task), torch.Generator(), secure_aggregation=True, secure_groups=3)


def _distance(a, b, names):
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in names) ** 0.5


def test_median_of_group_means_resists_model_replacement_that_plain_secure_fedavg_takes(task):
    """A tenth of the devices scale their update 50x. Securely aggregated FedAvg (one sum) is
    dragged far; the median of 5 group means stays near the clean run."""
    attack = Scaling({"factor": 50.0})

    def run(strategy, **options):
        generator = torch.Generator().manual_seed(0)
        return simulate(strategy, generator, secure_aggregation=True, **options).cloud

    clean = run(_fedavg(task))
    start = _fedavg(task).init(torch.Generator().manual_seed(0))
    attacked = Adversarial.wrap(_fedavg(task), attack, share=0.1, seed=0)
    undefended = run(attacked)
    defended = run(Robust.wrap(attacked, Median()), secure_groups=5)
    shared = _fedavg(task).shared
    clean_move = _distance(clean, start, shared)
    damage = _distance(undefended, clean, shared)
    assert damage > 3 * clean_move
    # The median of group means is noisier than the mean, but nowhere near the attack's pull.
    assert _distance(defended, clean, shared) < min(2 * clean_move, damage / 5)
