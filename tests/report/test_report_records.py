from pathlib import Path

import numpy as np
import pytest
import torch

import coevo.report
from coevo.report import StrategyResult, to_plain


def test_per_device_length_must_match_group():
    with pytest.raises(ValueError, match=r"per_device\['ndcg@10'\] has shape \(2,\)"):
        StrategyResult("pop", 0, {}, {"ndcg@10": np.zeros(2)}, np.array([0, 1, 2]))


def test_group_codes_must_name_a_group():
    with pytest.raises(ValueError, match="group codes"):
        StrategyResult("pop", 0, {}, {}, np.array([0, 3]))


def test_to_plain_turns_numpy_and_torch_into_python():
    value = {
        "loss": np.float32(0.5),
        "round": np.int64(3),
        "bytes": torch.tensor(8.0),
        "per_device": np.array([1.0, 2.0]),
        "dims": (64, 32),
        "path": Path("runs/a"),
    }

    plain = to_plain(value)

    assert plain == {
        "loss": 0.5,
        "round": 3,
        "bytes": 8.0,
        "per_device": [1.0, 2.0],
        "dims": [64, 32],
        "path": "runs/a",
    }
    assert type(plain["loss"]) is float
    assert type(plain["round"]) is int


def test_to_plain_refuses_unknown_objects():
    with pytest.raises(TypeError, match="object"):
        to_plain({"model": object()})


def test_all_is_sorted_and_importable():
    names = coevo.report.__all__

    def isort_key(name):
        kind = 0 if name.isupper() else 1 if name[0].isupper() else 2
        return kind, name

    assert names == sorted(names, key=isort_key)
    assert len(set(names)) == len(names)
    for name in names:
        assert hasattr(coevo.report, name), name
