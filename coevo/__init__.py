"""coevo: device-cloud collaborative learning.

A large model in the cloud and small models on many devices learn from each other. coevo
simulates the ways they can collaborate, measures them under one protocol, and runs them.
"""

from coevo.config import RunConfig, load_config
from coevo.sim import run, simulate
from coevo.strategies import STRATEGIES, Strategy
from coevo.tasks import RecommendationTask, load_movielens_100k, make_world, split_p1
from coevo.types import CloudState, DeviceState, Payload

__version__ = "0.1.0"

__all__ = [
    "STRATEGIES",
    "CloudState",
    "DeviceState",
    "Payload",
    "RecommendationTask",
    "RunConfig",
    "Strategy",
    "load_config",
    "load_movielens_100k",
    "make_world",
    "run",
    "simulate",
    "split_p1",
]
