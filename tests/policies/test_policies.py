"""Request policies: the fixed rules request exactly as stated, the random one at its budget,
the learned one less as its threshold rises and better than random where staleness matters;
every registered policy passes check_policy."""

import itertools

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from coevo.policies import (
    FEATURE_NAMES,
    POLICIES,
    Always,
    IntellectReq,
    Never,
    Periodic,
    RandomBudget,
    Requests,
)
from coevo.sim.streaming import (
    RecentMean,
    device_stream,
    replay_examples,
    replay_stream,
    simulate_stream,
)
from coevo.tasks.protocol import split_p1
from coevo.testing import check_policy, make_log
from coevo.testing.policy import stream_world


@pytest.fixture(scope="module")
def world():
    return stream_world(num_devices=40)


def run(policy, world, num_sessions=5):
    split, model = world
    return simulate_stream(policy, model, split, device_stream(split, num_sessions))


def test_never_requests_nothing_and_sends_nothing(world):
    result = run(Never(), world)
    assert not result.actions.any()
    assert result.bytes_up.sum() == result.bytes_down.sum() == 0


def test_always_requests_before_every_session(world):
    result = run(Always(), world)
    assert result.actions.all()
    assert torch.equal(result.requests, torch.full((40,), 5))
    assert (result.bytes_up > 0).all() and (result.bytes_down > 0).all()


@pytest.mark.parametrize(("every", "num_sessions", "expected"), [(2, 7, 3), (3, 7, 2), (1, 4, 3)])
def test_periodic_requests_once_its_parameters_are_every_sessions_old(
    world, every, num_sessions, expected
):
    result = run(Periodic(Periodic.Config(every=every)), world, num_sessions)
    assert torch.equal(result.requests, torch.full((40,), expected))
    # The first request comes at session `every`, when the parameters are that old.
    assert result.actions[every].all() and not result.actions[:every].any()


@pytest.mark.parametrize("budget", [0.1, 0.3, 0.7])
def test_random_requests_at_its_budget(budget):
    split = stream_world(num_devices=200)[0]
    devices = torch.arange(split.num_devices).repeat(10)
    sessions = torch.arange(10).repeat_interleave(split.num_devices)
    requests = Requests(devices, sessions, {})
    policy = RandomBudget(RandomBudget.Config(budget=budget, seed=3))
    share = policy.decide(requests, policy.init_state(len(devices))).request.float().mean()
    assert abs(float(share) - budget) < 0.03
    other = RandomBudget(RandomBudget.Config(budget=budget, seed=4))
    assert not torch.equal(
        other.decide(requests, other.init_state(len(devices))).request,
        policy.decide(requests, policy.init_state(len(devices))).request,
    )


def staleness_world(num_users=160, seed=0):
    """Users click inside one of four item clusters and sometimes switch cluster: a
    representation from before a switch ranks the wrong cluster first."""
    rng = np.random.default_rng(seed)
    num_items, clusters, length = 200, 4, 40
    sequences = {}
    for user in range(num_users):
        cluster, used, sequence = int(rng.integers(clusters)), set(), []
        for position in range(length):
            if position > 4 and rng.random() < 0.12:
                cluster = int((cluster + rng.integers(1, clusters)) % clusters)
            pool = [i for i in range(cluster, num_items, clusters) if i not in used]
            item = int(rng.choice(pool))
            used.add(item)
            sequence.append(item)
        sequences[user] = sequence
    split = split_p1(make_log(sequences, num_items), seed)
    items = torch.nn.functional.one_hot(torch.arange(num_items) % clusters, clusters).float()
    items = items + 0.1 * torch.randn(
        num_items, clusters, generator=torch.Generator().manual_seed(0)
    )
    return split, RecentMean(items, history_len=3)


@pytest.fixture(scope="module")
def stale():
    split, model = staleness_world()
    features, gain = replay_examples(model, split, replay_stream(split, 5))
    policy = IntellectReq.fit(features, gain, torch.Generator().manual_seed(0))
    return split, model, policy


def test_intellectreq_requests_less_as_its_threshold_rises(stale):
    split, model, policy = stale
    stream = device_stream(split, 5)
    shares = [
        float(
            simulate_stream(policy.with_threshold(t), model, split, stream).actions.float().mean()
        )
        for t in (-0.05, 0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    ]
    assert all(a >= b for a, b in itertools.pairwise(shares))
    assert shares[0] > 0.5 and shares[-1] == 0.0


def test_intellectreq_beats_random_at_the_same_budget_where_staleness_matters(stale):
    split, model, policy = stale
    stream = device_stream(split, 5)
    learned = simulate_stream(policy.with_threshold(0.05), model, split, stream)
    share = float(learned.actions.float().mean())
    assert 0.05 < share < 0.4
    random = simulate_stream(RandomBudget(RandomBudget.Config(budget=share)), model, split, stream)
    assert abs(float(random.actions.float().mean()) - share) < 0.05
    never = simulate_stream(Never(), model, split, stream).summary()["gauc"]
    gained = learned.summary()["gauc"] - never
    assert gained > 1.5 * (random.summary()["gauc"] - never) > 0


@pytest.mark.parametrize("name", POLICIES.names())
def test_registered_policy_conforms(name, stale):
    policy = stale[2] if name == "intellectreq" else POLICIES.get(name)()
    check_policy(policy)


def test_intellectreq_refuses_to_decide_without_its_detector_or_features(stale):
    requests = Requests(torch.arange(2), torch.zeros(2, dtype=torch.long), {})
    with pytest.raises(ValueError, match=r"IntellectReq\.fit"):
        IntellectReq().decide(requests, IntellectReq().init_state(2))
    with pytest.raises(ValueError, match="lacks"):
        stale[2].decide(requests, stale[2].init_state(2))
    with pytest.raises(ValueError, match="parameters"):
        IntellectReq(parameters={"w": torch.zeros(1)})
    assert (
        set(stale[2].parameters()) and len(FEATURE_NAMES) == stale[2].parameters()["mean"].numel()
    )


def test_configs_reject_out_of_range_settings():
    with pytest.raises(ValidationError, match="every"):
        Periodic.Config(every=0)
    with pytest.raises(ValidationError, match="budget"):
        RandomBudget.Config(budget=1.5)
    with pytest.raises(ValidationError, match="threshold"):
        IntellectReq.Config(threshold=-1.5)


def test_the_public_api_is_sorted_and_importable():
    import coevo.policies

    exported = coevo.policies.__all__
    order = sorted(exported, key=lambda s: (not s.isupper(), not s[:1].isupper(), s))
    assert list(exported) == order
    assert all(hasattr(coevo.policies, name) for name in exported)
