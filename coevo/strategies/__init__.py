"""Strategies: one way each for devices and the cloud to collaborate in training."""

from coevo.config.registry import Registry
from coevo.strategies.base import DeviceBatch, Strategy, local_train
from coevo.strategies.cloud_only import CloudOnly
from coevo.strategies.device_only import DeviceOnly
from coevo.strategies.finetune import Finetune
from coevo.strategies.oracle import CentralOracle
from coevo.strategies.popularity import Popularity

STRATEGIES: Registry[type[Strategy]] = Registry("strategy")
for _strategy in (Popularity, CloudOnly, CentralOracle, DeviceOnly, Finetune):
    STRATEGIES.register(_strategy.name)(_strategy)

__all__ = [
    "STRATEGIES",
    "CentralOracle",
    "CloudOnly",
    "DeviceBatch",
    "DeviceOnly",
    "Finetune",
    "Popularity",
    "Strategy",
    "local_train",
]
