import importlib

import pytest

from coevo.attacks import ATTACKS, Adversarial
from coevo.testing import check_strategy

LOCAL = {"epochs": 1, "lr": 0.5, "optimizer": "sgd"}


@pytest.mark.parametrize("name", ATTACKS.names())
def test_adversarial_fedavg_passes_the_strategy_conformance_checks(name):
    attack = {"name": name, **({"trigger": 1, "target": 2} if name == "backdoor" else {})}
    settings = {"inner": {"name": "fedavg", "local": LOCAL}, "attack": attack, "share": 0.3}
    check_strategy(Adversarial, {**settings, "start_round": 1})


def test_adversarial_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"attack[\s\S]*unknown attack 'sign_flop'"):
        Adversarial.Config.model_validate({"attack": {"name": "sign_flop"}})
    with pytest.raises(ValueError, match=r"share[\s\S]*less than or equal to 1"):
        Adversarial.Config.model_validate({"share": 1.5})


@pytest.mark.parametrize("name", ["coevo.attacks", "coevo.aggregators"])
def test_all_is_sorted_and_importable(name):
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert exported == sorted(exported, key=lambda s: (not s.isupper(), not s[:1].isupper(), s))
    assert all(hasattr(module, symbol) for symbol in exported)
