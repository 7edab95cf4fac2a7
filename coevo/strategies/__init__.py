"""Strategies: one way each for devices and the cloud to collaborate in training."""

from coevo.aggregators.robust import Robust
from coevo.attacks.adversarial import Adversarial
from coevo.config.registry import Registry
from coevo.privacy.dp_fedavg import DPFedAvg
from coevo.strategies.base import DeviceBatch, Strategy
from coevo.strategies.cloud_only import CloudOnly
from coevo.strategies.dccl import Dccl
from coevo.strategies.device_only import DeviceOnly
from coevo.strategies.distill import Distill
from coevo.strategies.ditto import Ditto
from coevo.strategies.duet import Duet
from coevo.strategies.fedadagrad import FedAdagrad
from coevo.strategies.fedadam import FedAdam
from coevo.strategies.fedavg import FedAvg
from coevo.strategies.fedavgm import FedAvgM
from coevo.strategies.fedbuff import FedBuff
from coevo.strategies.fedper import FedPer
from coevo.strategies.fedprox import FedProx
from coevo.strategies.fedrep import FedRep
from coevo.strategies.fedyogi import FedYogi
from coevo.strategies.finetune import Finetune
from coevo.strategies.local_training import local_train
from coevo.strategies.mpda import Mpda
from coevo.strategies.oracle import CentralOracle
from coevo.strategies.popularity import Popularity
from coevo.strategies.scaffold import Scaffold
from coevo.strategies.slowfast import SlowFast

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
    FedPer,
    FedRep,
    Ditto,
    Distill,
    Mpda,
    Duet,
    Dccl,
    DPFedAvg,
    Robust,
    Adversarial,
    SlowFast,
):
    STRATEGIES.register(_strategy.name)(_strategy)

__all__ = [
    "STRATEGIES",
    "Adversarial",
    "CentralOracle",
    "CloudOnly",
    "DPFedAvg",
    "Dccl",
    "DeviceBatch",
    "DeviceOnly",
    "Distill",
    "Ditto",
    "Duet",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedBuff",
    "FedPer",
    "FedProx",
    "FedRep",
    "FedYogi",
    "Finetune",
    "Mpda",
    "Popularity",
    "Robust",
    "Scaffold",
    "SlowFast",
    "Strategy",
    "local_train",
]
