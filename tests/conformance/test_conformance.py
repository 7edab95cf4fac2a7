"""Every registered strategy and every shipped codec passes the conformance checks, and the
checks catch plug-ins that break the contract."""

import re

import pytest
import torch

from coevo.codecs import Chain, Codec, Float16, Int8, TopK
from coevo.strategies import STRATEGIES, FedAvg, Popularity
from coevo.testing import tiny_task
from coevo.testing.conformance import check_codec, check_strategy

"""Registered strategies that fail a property today: the failure is asserted, so that fixing
the strategy turns its test red until its entry here is removed."""


@pytest.fixture(scope="module")
def task():
    return tiny_task()


def fast_config(strategy_cls):
    """The strategy's defaults with one epoch of every kind of training, for speed."""
    settings = strategy_cls.Config().model_dump()
    for part in ("train", "pretrain"):
        if part in settings:
            settings[part].update(epochs=1, eval_every=1)
    if "local" in settings:
        settings["local"]["epochs"] = 1
    return settings


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_registered_strategy_conforms(name, task):
    strategy_cls = STRATEGIES.get(name)
    check_strategy(strategy_cls, fast_config(strategy_cls), task=task, rounds=2)


def test_partial_participation_counts_only_the_rounds_a_device_took_part_in(task):
    check_strategy(FedAvg, fast_config(FedAvg), task=task, rounds=3, devices_per_round=7)


TEMPLATE = {
    "w": torch.randn(4, 5, generator=torch.Generator().manual_seed(0)),
    "b": torch.linspace(-2.0, 3.0, 5),
    "s": torch.tensor(0.75),
    "ids": torch.arange(3),
}
CODECS = [Float16(), Int8(), Int8(per_channel=True), TopK(0.25), Chain([TopK(0.25), Int8()])]


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_shipped_codec_conforms(codec):
    check_codec(codec, TEMPLATE)


class MutatingFedAvg(FedAvg):
    """Halves the downloaded weights in place, so later devices train from altered weights."""

    name = "mutating_fedavg"

    def local(self, payload, device_state, batch):
        result = super().local(payload, device_state, batch)
        for tensor in payload.tensors.values():
            tensor.mul_(0.5)
        return result


class NoisyPopularity(Popularity):
    """Adds noise from the global RNG, which the run's seed does not control."""

    name = "noisy_popularity"

    def init(self, rng):
        cloud = super().init(rng)
        return cloud.with_tensors(counts=cloud["counts"] + torch.rand(cloud["counts"].shape))


@pytest.mark.parametrize(
    ("strategy_cls", "prop"),
    [(MutatingFedAvg, "no input mutation"), (NoisyPopularity, "determinism")],
)
def test_check_strategy_catches_a_broken_strategy(strategy_cls, prop, task):
    with pytest.raises(AssertionError, match=f"strategy '{strategy_cls.name}' fails '{prop}'"):
        check_strategy(strategy_cls, fast_config(strategy_cls), task=task)


class DroppingInt8(Int8):
    """Decodes every tensor but the first: the cloud would silently lose a parameter."""

    def decode(self, wire, template):
        decoded = super().decode(wire, template)
        del decoded[next(iter(template))]
        return decoded


class OverconfidentInt8(Int8):
    """Claims an exact round trip that rounding to 255 levels cannot keep."""

    def bound(self, tensors):
        return {name: torch.zeros(tensor.shape) for name, tensor in tensors.items()}


class SideChannel(Codec):
    """Sends a one-number marker and hands the real tensors to ``decode`` through ``self``."""

    name = "side_channel"

    def __init__(self):
        self.last = {}

    def encode(self, tensors, state):
        self.last = dict(tensors)
        return {"marker": torch.zeros(())}, {}

    def decode(self, wire, template):
        return {name: self.last[name] for name in template}


@pytest.mark.parametrize(
    ("codec", "prop"),
    [
        (DroppingInt8(), "decoded like the template"),
        (OverconfidentInt8(), "error bound"),
        (SideChannel(), "bytes reported"),
    ],
    ids=["dropping_int8", "overconfident_int8", "side_channel"],
)
def test_check_codec_catches_a_broken_codec(codec, prop):
    with pytest.raises(AssertionError, match=rf"codec {re.escape(repr(codec))} fails '{prop}'"):
        check_codec(codec, TEMPLATE)
