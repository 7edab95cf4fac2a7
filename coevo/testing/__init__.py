"""Test support: fixtures that build small data, shared by coevo's tests and users' plug-ins."""

from coevo.testing.conformance import check_codec, check_strategy
from coevo.testing.fixtures import make_log, tiny_task
from coevo.testing.policy import check_policy

__all__ = ["check_codec", "check_policy", "check_strategy", "make_log", "tiny_task"]
