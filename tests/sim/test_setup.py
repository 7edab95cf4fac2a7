"""Config sections become simulator parts: the codec chain, including the privacy codecs."""

import math

import pytest
import torch

from coevo.codecs import Chain, ClipNorm, GaussianNoise, Int8
from coevo.config import CodecSpec
from coevo.config.loading import ConfigError, parse
from coevo.config.schema import RunConfig
from coevo.sim.setup import build_codec


def test_clip_noise_and_int8_chain_in_the_listed_order():
    codec = build_codec(
        [
            CodecSpec(name="clip", max_norm=2.0),
            CodecSpec(name="gaussian", std=0.0),
            CodecSpec(name="int8"),
        ]
    )
    assert isinstance(codec, Chain)
    assert [type(c) for c in codec.codecs] == [ClipNorm, GaussianNoise, Int8]
    update = {"w": torch.full((8, 8), 3.0)}
    wire, _ = codec.encode(update, codec.init_state(update))
    decoded = codec.decode(wire, update)
    norm = float(torch.linalg.vector_norm(decoded["w"]))
    # Clipped to 2 (24 before), then int8 rounding of a constant tensor: exact.
    assert math.isclose(norm, 2.0, rel_tol=1e-2)


def test_codec_fields_are_validated_with_their_path():
    data = {
        "name": "x",
        "data": {"name": "synthetic"},
        "strategies": [{"name": "fedavg"}],
        "simulation": {"uplink_codecs": [{"name": "clip", "max_norm": -1}]},
    }
    with pytest.raises(ConfigError, match=r"simulation\.uplink_codecs\.0\.max_norm"):
        parse(RunConfig, data, source="run.yaml")


def test_a_private_strategy_reports_epsilon_in_rounds_and_results(tmp_path):
    from coevo.report.callbacks import Callback
    from coevo.sim.experiment import run

    class Collect(Callback):
        def __init__(self):
            self.records = []

        def on_round_end(self, record):
            self.records.append(dict(record))

    data = {
        "name": "dp",
        "seeds": [0],
        "data": {"name": "synthetic", "synthetic": {"num_devices": 40, "num_items": 500}},
        "strategies": [
            {
                "name": "dp_fedavg",
                "inner": {"name": "fedavg", "rounds": 3},
                "clip_norm": 1.0,
                "noise_multiplier": 1.0,
            }
        ],
        "simulation": {"devices_per_round": 10},
    }
    config = parse(RunConfig, data, source="dp.yaml")
    collect = Collect()
    (result,) = run(config, tmp_path, collect)
    spent = [r["epsilon"] for r in collect.records if "round" in r and "phase" not in r]
    assert len(spent) == 3 and spent[0] < spent[1] < spent[2]
    assert result.metrics["epsilon"] == pytest.approx(spent[-1])


def test_labels_tell_two_settings_of_one_strategy_apart(tmp_path):
    from coevo.report.callbacks import Callback
    from coevo.sim.experiment import run

    data = {
        "name": "labels",
        "seeds": [0],
        "data": {"name": "synthetic", "synthetic": {"num_devices": 30, "num_items": 500}},
        "strategies": [
            {"name": "finetune", "pretrain": {"epochs": 1}, "local": {"epochs": 1}},
            {
                "name": "finetune",
                "label": "finetune_head",
                "mode": "head",
                "pretrain": {"epochs": 1},
                "local": {"epochs": 1},
            },
        ],
    }

    class Collect(Callback):
        def __init__(self):
            self.names = set()

        def on_round_end(self, record):
            self.names.add(record["strategy"])

    collect = Collect()
    full, head = run(parse(RunConfig, data, source="labels.yaml"), tmp_path, collect)
    assert (full.strategy, head.strategy) == ("finetune", "finetune_head")
    assert collect.names == {"finetune", "finetune_head"}


@pytest.mark.parametrize(
    ("strategies", "message"),
    [
        ([{"name": "finetune"}, {"name": "finetune", "mode": "head"}], r"appear more than once"),
        ([{"name": "finetune", "label": "a b"}], r"label 'a b': 1 to 64 letters"),
    ],
)
def test_repeated_or_malformed_labels_are_refused(strategies, message):
    data = {"name": "x", "data": {"name": "synthetic"}, "strategies": strategies}
    with pytest.raises(ConfigError, match=message):
        parse(RunConfig, data, source="labels.yaml")
