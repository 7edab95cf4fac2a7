"""Policies: run-time decisions on a device, such as when to ask the cloud for fresh parameters."""

from coevo.config.registry import Registry
from coevo.policies.always import Always
from coevo.policies.base import FEATURE_NAMES, Actions, Policy, Requests
from coevo.policies.intellectreq import IntellectReq
from coevo.policies.never import Never
from coevo.policies.periodic import Periodic
from coevo.policies.random_budget import RandomBudget

POLICIES: Registry[type[Policy]] = Registry("policy")
for _policy in (Always, Never, Periodic, RandomBudget, IntellectReq):
    POLICIES.register(_policy.name)(_policy)

__all__ = [
    "FEATURE_NAMES",
    "POLICIES",
    "Actions",
    "Always",
    "IntellectReq",
    "Never",
    "Periodic",
    "Policy",
    "RandomBudget",
    "Requests",
]
