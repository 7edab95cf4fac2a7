import importlib.util
import sys
from pathlib import Path

import torch

from coevo.sim import simulate
from coevo.strategies import STRATEGIES
from coevo.testing import tiny_task

EXAMPLE = Path(__file__).parents[2] / "examples" / "head_only.py"


def test_the_example_strategy_registers_and_personalises_heads():
    if "my_head_only" not in STRATEGIES:
        spec = importlib.util.spec_from_file_location("head_only_example", EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # pydantic resolves annotations through it
        spec.loader.exec_module(module)
    cls = STRATEGIES.get("my_head_only")
    task = tiny_task()
    result = simulate(cls(task), torch.Generator().manual_seed(0))
    heads = result.devices["head.weight"]
    assert heads.shape[0] == task.num_devices
    assert not torch.equal(heads[0], heads[1])
    assert result.bytes_up.sum() == 0
