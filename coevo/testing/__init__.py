"""Test support: fixtures that build small data, shared by coevo's tests and users' plug-ins."""

from coevo.testing.fixtures import make_log, tiny_task

__all__ = ["make_log", "tiny_task"]
