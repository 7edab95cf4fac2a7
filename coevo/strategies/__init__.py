"""Strategies: one way each for devices and the cloud to collaborate in training."""

from coevo.config.registry import Registry
from coevo.strategies.base import DeviceBatch, Strategy, local_train
from coevo.strategies.cloud_only import CloudOnly
from coevo.strategies.device_only import DeviceOnly
from coevo.strategies.fedadagrad import FedAdagrad
from coevo.strategies.fedadam import FedAdam
from coevo.strategies.fedavg import FedAvg
from coevo.strategies.fedavgm import FedAvgM
from coevo.strategies.fedbuff import FedBuff
from coevo.strategies.fedprox import FedProx
from coevo.strategies.fedyogi import FedYogi
from coevo.strategies.finetune import Finetune
from coevo.strategies.oracle import CentralOracle
from coevo.strategies.popularity import Popularity
from coevo.strategies.scaffold import Scaffold

STRATEGIES: Registry[type[Strategy]] = Registry("strategy")
for _strategy in (
    Popularity,
    CloudOnly,
    CentralOracle,
    DeviceOnly,
    Finetune,
    FedAvg,
    FedProx,
    FedAvgM,
    FedAdam,
    FedYogi,
    FedAdagrad,
    Scaffold,
    FedBuff,
):
    STRATEGIES.register(_strategy.name)(_strategy)

__all__ = [
    "STRATEGIES",
    "CentralOracle",
    "CloudOnly",
    "DeviceBatch",
    "DeviceOnly",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedBuff",
    "FedProx",
    "FedYogi",
    "Finetune",
    "Popularity",
    "Scaffold",
    "Strategy",
    "local_train",
]
