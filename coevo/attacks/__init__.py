"""Attacks: malicious device behaviours, to test defences in simulation and in the service.

Each attack is one file; ``Adversarial`` wraps any strategy so that a seeded share of its
devices runs one. Configs pick attacks by name from ``ATTACKS``.
"""

from coevo.attacks.adversarial import Adversarial
from coevo.attacks.backdoor import Backdoor, backdoor_success, insert_trigger
from coevo.attacks.base import Attack, malicious_local, mix, normal, uniform
from coevo.attacks.free_ride import FreeRide
from coevo.attacks.label_flip import LabelFlip
from coevo.attacks.noise import Noise
from coevo.attacks.scaling import Scaling
from coevo.attacks.sign_flip import SignFlip
from coevo.config.registry import Registry

ATTACKS: Registry[type[Attack]] = Registry("attack")
for _attack in (SignFlip, Scaling, Noise, LabelFlip, Backdoor, FreeRide):
    ATTACKS.register(_attack.name)(_attack)

__all__ = [
    "ATTACKS",
    "Adversarial",
    "Attack",
    "Backdoor",
    "FreeRide",
    "LabelFlip",
    "Noise",
    "Scaling",
    "SignFlip",
    "backdoor_success",
    "insert_trigger",
    "malicious_local",
    "mix",
    "normal",
    "uniform",
]
