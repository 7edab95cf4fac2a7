"""How a device's optimiser steps run: `scan`, a loop a simulator may take over.

A device's ``local`` runs its steps through `scan`
(`coevo.strategies.local_training.local_train` does): ``step(const, carry, x)`` maps the carry
(weights, optimiser moments, loss sums) to the next one, reading the step's slice ``x`` of
``xs`` and the per-device constants ``const``. On its own, `scan` is a plain loop over every
step. Inside `step_runner`, the installed runner runs the steps instead: the vectorised
executor (`coevo.sim.executor`) lifts them out of the per-device ``vmap`` and steps a whole
block, dropping each device from the batch once its ``live`` steps are done, so that devices
with few steps cost nothing while long ones finish.

``const``, ``carry`` and ``xs`` are trees: nested dicts whose leaves are tensors. ``step``
must be a pure function of its three arguments, closing over no tensor of the device's (those
belong in ``const``), and a step that is not live must leave the carry unchanged: then skipping
it and running it give the same result, which is what lets a runner skip it. A carry leaf may
be shared by every device of a block on entry (the downloaded weights), so a step updates the
carry out of place, except a leaf it made itself (a gathered copy).

A step may also offer ``step.stacked``: the same step over trees with a leading device axis on
every leaf, computed for a whole block at once (`coevo.strategies.local_training.TrainStep`
does, for a loss that stacks); a runner then calls it instead of ``vmap(step)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

Tree = Mapping[str, Any]
"""A nested dict whose leaves are tensors."""
Step = Callable[[Tree, Tree, Tree], Tree]
"""``step(const, carry, x) -> carry``."""
Runner = Callable[[Step, Tree, Tree, Tree, torch.Tensor], Tree]
"""``runner(step, const, carry, xs, live) -> final carry``."""

_RUNNER: ContextVar[Runner | None] = ContextVar("coevo_step_runner", default=None)


def scan(step: Step, const: Tree, carry: Tree, xs: Tree, live: torch.Tensor) -> Tree:
    """``carry`` after ``step`` over every step of ``xs`` (leaves ``[steps, ...]``).

    Args:
        step: ``step(const, carry, x) -> carry`` (see the module docstring for its rules).
        const: the device's constants, passed to every step unchanged.
        carry: the state the steps update.
        xs: the per-step inputs; step ``s`` gets every leaf's slice ``[s]``.
        live: bool ``[steps]``: False for a step that leaves the carry unchanged (padding).

    Example:
        >>> def add(const, carry, x):
        ...     return {"total": carry["total"] + const["scale"] * x["value"]}
        >>> xs = {"value": torch.tensor([1.0, 2.0, 0.0])}
        >>> scan(add, {"scale": torch.tensor(2.0)}, {"total": torch.tensor(0.0)}, xs,
        ...      torch.tensor([True, True, False]))
        {'total': tensor(6.)}
    """
    runner = _RUNNER.get()
    if runner is not None:
        return runner(step, const, carry, xs, live)
    structure, leaves = flatten(xs)
    for index in range(len(live)):
        carry = step(const, carry, unflatten(structure, [leaf[index] for leaf in leaves]))
    return carry


@contextmanager
def step_runner(runner: Runner) -> Iterator[None]:
    """Let ``runner`` run every `scan` called inside the block (in this thread or task)."""
    token = _RUNNER.set(runner)
    try:
        yield
    finally:
        _RUNNER.reset(token)


def flatten(tree: Any) -> tuple[Any, list[torch.Tensor]]:
    """``(structure, leaves)`` of a tree: its nested keys, and its tensors in key order."""
    if not isinstance(tree, Mapping):
        return None, [tree]
    structure, leaves = {}, []
    for key, value in tree.items():
        structure[key], more = flatten(value)
        leaves.extend(more)
    return structure, leaves


def unflatten(structure: Any, leaves: Sequence[torch.Tensor]) -> Any:
    """Inverse of `flatten`."""
    return _build(structure, iter(leaves))


def _build(node: Any, rest: Iterator[torch.Tensor]) -> Any:
    # A module-level recursion: a nested recursive function would sit in a reference cycle
    # with the leaves, keeping them alive until the cyclic garbage collector runs.
    return next(rest) if node is None else {key: _build(sub, rest) for key, sub in node.items()}
