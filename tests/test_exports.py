import importlib

import pytest

PACKAGES = [
    "coevo",
    "coevo.config",
    "coevo.report",
    "coevo.strategies",
    "coevo.tasks",
    "coevo.sim",
    "coevo.testing",
    "coevo.codecs",
    "coevo.fleet",
    "coevo.policies",
    "coevo.attacks",
    "coevo.aggregators",
    "coevo.privacy",
    "coevo.export",
    "coevo.serve",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_sorted_and_importable(name):
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(set(exported)) == len(exported)
    assert list(exported) == sorted(
        exported, key=lambda s: (not s.isupper(), not s[:1].isupper(), s)
    )
    for symbol in exported:
        assert hasattr(module, symbol), f"{name}.{symbol}"
