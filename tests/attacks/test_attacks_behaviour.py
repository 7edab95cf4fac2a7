import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import vmap

from coevo.attacks import (
    ATTACKS,
    Adversarial,
    Backdoor,
    FreeRide,
    LabelFlip,
    Noise,
    Scaling,
    SignFlip,
    backdoor_success,
    normal,
    uniform,
)
from coevo.sim.batching import cohort_batch
from coevo.sim.executor import run_block
from coevo.strategies import FedAvg
from coevo.strategies.base import DeviceBatch
from coevo.testing import tiny_task
from coevo.types import DeviceState

LOCAL = {"epochs": 1, "lr": 0.5, "optimizer": "sgd", "batch_size": 4}


@pytest.fixture(scope="module")
def task():
    return tiny_task()


def _fedavg(task):
    return FedAvg(task, FedAvg.Config.model_validate({"rounds": 3, "local": LOCAL}))


def _cohort_uplinks(strategy, round, seed=0):
    """Every device's uplink in ``round`` (one vectorised block), and the honest ones."""
    task = strategy.task
    cloud = strategy.init(torch.Generator().manual_seed(0))
    devices = strategy.init_devices(cloud, task.num_devices)
    rows, offsets = task.device_rows("device")
    everyone = torch.arange(task.num_devices)
    batch = cohort_batch(
        task, rows, offsets, everyone, epochs=1, batch_size=4, seed=seed, round=round
    )
    payload = strategy.downlink(cloud, round)
    attacked = run_block(strategy, payload, devices, batch)[0]
    honest_state = DeviceState(
        {k: v for k, v in devices.tensors.items() if not k.startswith("attack/")}
    )
    honest = run_block(strategy.inner, payload, honest_state, batch)[0]
    return attacked, honest, devices["attack/malicious"]


def _rows_equal(a, b):
    return torch.stack([(a[k] == b[k]).flatten(1).all(1) for k in a]).all(0)


def test_sign_flip_negates_the_update_of_exactly_the_malicious_devices_from_start_round(task):
    strategy = Adversarial.wrap(_fedavg(task), SignFlip(), share=0.25, start_round=1, seed=3)
    before, honest, malicious = _cohort_uplinks(strategy, round=0)
    assert bool(_rows_equal(before, honest).all())
    attacked, honest, malicious = _cohort_uplinks(strategy, round=1)
    assert int(malicious.sum()) == round(0.25 * task.num_devices)
    assert bool(_rows_equal(attacked, honest)[~malicious].all())
    negated = {k: -v for k, v in honest.items()}
    assert bool(_rows_equal(attacked, negated)[malicious].all())


def test_scaling_multiplies_the_update(task):
    strategy = Adversarial.wrap(_fedavg(task), Scaling({"factor": 7.0}), share=0.5)
    attacked, honest, malicious = _cohort_uplinks(strategy, round=0)
    for k in honest:
        assert torch.allclose(attacked[k][malicious], 7.0 * honest[k][malicious])
        assert torch.equal(attacked[k][~malicious], honest[k][~malicious])


def test_free_riding_sends_back_exactly_the_received_model(task):
    strategy = Adversarial.wrap(_fedavg(task), FreeRide(), share=0.5)
    attacked, honest, malicious = _cohort_uplinks(strategy, round=0)
    for k in honest:
        assert bool((attacked[k][malicious] == 0).all())
        assert bool((honest[k][malicious] != 0).any())


def test_only_the_seeded_share_is_malicious_and_the_seed_picks_which(task):
    cloud = _fedavg(task).init(torch.Generator().manual_seed(0))
    flags = {}
    for seed in (0, 0, 1):
        strategy = Adversarial.wrap(_fedavg(task), SignFlip(), share=0.3, seed=seed)
        flags.setdefault(seed, []).append(strategy.init_devices(cloud, 40)["attack/malicious"])
    assert [int(f.sum()) for f in (*flags[0], *flags[1])] == [12, 12, 12]
    assert torch.equal(flags[0][0], flags[0][1])
    assert not torch.equal(flags[0][0], flags[1][0])
    none = Adversarial.wrap(_fedavg(task), SignFlip(), share=0.0)
    assert not bool(none.init_devices(cloud, 40)["attack/malicious"].any())


def test_label_flip_maps_targets_through_one_permutation_and_keeps_the_rest():
    attack = LabelFlip({"seed": 5}, num_items=30)
    assert torch.equal(torch.sort(attack.permutation).values, torch.arange(30))
    history = torch.randint(0, 30, (2, 3, 4))
    target = torch.randint(0, 30, (2, 3))
    batch = DeviceBatch({"history": history, "target": target}, torch.ones(2, 3))
    flipped = attack.poison(batch, torch.tensor(0))
    assert torch.equal(flipped.inputs["target"], attack.permutation[target])
    assert torch.equal(flipped.inputs["history"], history)
    assert bool((flipped.inputs["target"] != target).any())


def test_backdoor_appends_the_trigger_and_sets_the_target_in_about_its_fraction():
    attack = Backdoor({"trigger": 7, "target": 9, "fraction": 0.3}, num_items=20)
    history = torch.randint(0, 20, (40, 50, 5))
    target = torch.randint(0, 7, (40, 50))
    batch = DeviceBatch({"history": history, "target": target}, torch.ones(40, 50))
    poisoned = attack.poison(batch, torch.tensor(123))
    chosen = poisoned.inputs["target"] == 9
    assert abs(float(chosen.float().mean()) - 0.3) < 0.03
    assert bool((poisoned.inputs["history"][chosen][:, -1] == 7).all())
    assert torch.equal(poisoned.inputs["history"][chosen][:, :-1], history[chosen][:, 1:])
    assert torch.equal(poisoned.inputs["history"][~chosen], history[~chosen])
    assert torch.equal(poisoned.inputs["target"][~chosen], target[~chosen])


def test_backdoor_rejects_items_outside_the_catalogue():
    with pytest.raises(ValueError, match=r"backdoor\.target: item 50 >= num_items 20"):
        Backdoor({"trigger": 1, "target": 50}, num_items=20)


def test_backdoor_success_counts_users_whose_top_k_holds_the_target(task):
    target = 3

    def promotes(devices, history, candidates):
        return (candidates == target).float() * (history[:, -1:] == 5).float()

    def buries(devices, history, candidates):
        return -(candidates == target).float()

    assert backdoor_success(promotes, task, trigger=5, target=target) == 1.0
    assert backdoor_success(promotes, task, trigger=6, target=target) < 1.0
    assert backdoor_success(buries, task, trigger=5, target=target) == 0.0


@settings(max_examples=30, deadline=None)
@given(key=st.integers(-(2**62), 2**62), salt=st.integers(0, 100))
def test_keyed_draws_are_reproducible_uniform_and_equal_under_vmap(key, salt):
    keys = torch.tensor([key, key + 1])
    draws = uniform(keys[0], (4096,), salt)
    assert torch.equal(draws, uniform(keys[0], (4096,), salt))
    assert bool(((draws > 0) & (draws < 1)).all())
    assert abs(float(draws.mean()) - 0.5) < 0.03
    batched = vmap(lambda k: normal(k, (3, 5), salt))(keys)
    assert torch.equal(batched[1], normal(keys[1], (3, 5), salt))
    assert not torch.equal(batched[0], batched[1])


def test_noise_replaces_the_update_with_gaussian_noise_of_sigma():
    attack = Noise({"sigma": 0.5})
    update = {"w": torch.ones(200, 100), "ids": torch.arange(4)}
    noisy = attack.tamper(update, {}, torch.tensor(11))
    assert math.isclose(float(noisy["w"].std()), 0.5, rel_tol=0.03)
    assert abs(float(noisy["w"].mean())) < 0.01
    assert torch.equal(noisy["ids"], update["ids"])
    added = Noise({"sigma": 0.5, "additive": True}).tamper(update, {}, torch.tensor(11))
    assert torch.allclose(added["w"] - 1.0, noisy["w"], atol=1e-6)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_attack_changes_what_a_malicious_device_sends(task, name):
    config = {"trigger": 1, "target": 2, "fraction": 1.0} if name == "backdoor" else {}
    attack = ATTACKS.get(name)(config, num_items=task.num_items)
    strategy = Adversarial.wrap(_fedavg(task), attack, share=0.5)
    attacked, honest, malicious = _cohort_uplinks(strategy, round=0)
    assert bool(_rows_equal(attacked, honest)[~malicious].all())
    assert not bool(_rows_equal(attacked, honest)[malicious].any())
