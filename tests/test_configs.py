from pathlib import Path

import pytest

from coevo.config import RunConfig, load_config
from coevo.sim.experiment import model_shapes, strategy_configs

SHIPPED = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(RunConfig, path)
    assert strategy_configs(config)
    model_shapes(config)
