"""Run a strategy's ``local`` over a block of devices: vectorised, or one by one.

Vectorised, a block runs step-major. ``local`` is ``vmap``-ed over the block until it reaches
its first `coevo.strategies.scan.scan` (local training's steps), whose inputs come out of the
``vmap`` stacked; the steps then run one ``vmap``-ed step at a time over the devices that
still have live steps (devices are sorted by step count, so those are a shrinking tail); and
``local`` runs again with the finished scans answered from their results, on to its next scan
or its return. A block of devices with 1 to 19 steps thus costs 19 batched steps, each over
only the devices still training, rather than 19 steps over the whole padded block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
from torch.func import vmap

from coevo.strategies.base import DeviceBatch, Strategy
from coevo.strategies.scan import Step, Tree, flatten, step_runner, unflatten
from coevo.types import DeviceState, Payload

Backend = Literal["vectorized", "loop", "ray"]
Stacked = dict[str, torch.Tensor]
Job = tuple[DeviceState, DeviceBatch]
Executor = Callable[[Strategy, Payload, Sequence[Job]], Iterable[tuple[Stacked, Stacked, Stacked]]]
"""``executor(strategy, payload, jobs)``: ``run_block`` for every (state, batch) job, in order
(an iterable, so that a local executor can hand results over one block at a time)."""


def run_block(
    strategy: Strategy,
    payload: Payload,
    state: DeviceState,
    batch: DeviceBatch,
    backend: Backend = "vectorized",
) -> tuple[Stacked, Stacked, Stacked]:
    """``local`` for a block of devices: (stacked uplinks, stacked states, stacked metrics).

    ``vectorized`` runs the block step-major (see the module docstring): ``vmap`` over the
    block, each step over the devices still training; ``loop`` calls ``local`` per device (the
    reference: errors name the block position of the device).
    """

    def one(tensors: Stacked, groups: dict[str, Stacked]):
        device_batch = DeviceBatch.from_tensors(groups, batch.tables)
        up, new, metrics = strategy.local(payload, DeviceState(tensors), device_batch)
        return dict(up.tensors), dict(new.tensors), dict(metrics)

    if backend == "vectorized":
        return _step_major(one, dict(state.tensors), batch.tensors())
    outputs = []
    for i in range(len(batch.mask)):
        try:
            outputs.append(
                one({k: v[i] for k, v in state.tensors.items()}, batch.device(i).tensors())
            )
        except Exception as error:
            raise RuntimeError(
                f"{strategy.name}.local failed on block device {i}: {error}"
            ) from error
    uplinks, states, metrics = (
        {k: torch.stack([o[part][k] for o in outputs]) for k in outputs[0][part]}
        for part in range(3)
    )
    return uplinks, states, metrics


class _Scanned(BaseException):
    """Raised inside the ``vmap``-ed ``local`` at a scan not yet run: carries its inputs.

    A ``BaseException``, so that a ``local`` catching ``Exception`` does not swallow it.
    """

    def __init__(self, step: Step, trees: tuple[Tree, Tree, Tree, torch.Tensor]) -> None:
        super().__init__("scan")
        self.step, self.trees = step, trees


def _step_major(one: Callable, tensors: Stacked, groups: dict[str, Stacked]):
    """``vmap(one)(tensors, groups)``, with every scan inside ``one`` run by `_run_steps`."""
    finished: list[Tree] = []
    steps: list[Step] = []

    def staged(tensors: Stacked, groups: dict[str, Stacked], finished: list[Tree]):
        answers = iter(finished)

        def runner(step: Step, const: Tree, carry: Tree, xs: Tree, live: torch.Tensor) -> Tree:
            answer = next(answers, None)
            if answer is None:
                raise _Scanned(step, (const, carry, xs, live))
            return answer

        with step_runner(runner):
            try:
                return {"done": one(tensors, groups)}
            except _Scanned as scanned:
                steps.append(scanned.step)
                return {"scan": scanned.trees}

    while True:
        out = vmap(staged)(tensors, groups, finished)
        if "done" in out:
            return out["done"]
        finished.append(_run_steps(steps[-1], *out["scan"]))


def _run_steps(step: Step, const: Tree, carry: Tree, xs: Tree, live: torch.Tensor) -> Tree:
    """A scan of every device of a block: trees stacked ``[devices, ...]`` (``xs`` and
    ``live`` ``[devices, steps, ...]``); returns the stacked final carries.

    Step ``s`` runs ``vmap(step)`` over the devices with a live step at or after ``s``. Sorted
    by their last live step, those are a tail of the block that only shrinks: a device that
    leaves it is done, and its carry is set aside untouched. The trees cross ``vmap`` as flat
    tuples of tensors (nested pytrees cost ``vmap`` several times more to wrap and unwrap).
    """
    devices, num_steps = live.shape
    ends = torch.where(live, torch.arange(1, num_steps + 1), 0).amax(1)
    order = torch.argsort(ends, stable=True)
    shuffled = bool((order != torch.arange(devices)).any())
    layouts, (constants, state, inputs) = zip(
        *(flatten(t) for t in (const, carry, xs)), strict=True
    )
    if shuffled:
        constants, state, inputs = (
            [t if _shared(t) else t[order] for t in part] for part in (constants, state, inputs)
        )
    split = (len(constants), len(constants) + len(state))

    def flat_step(*leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        trees = (leaves[: split[0]], leaves[split[0] : split[1]], leaves[split[1] :])
        new = run(*(unflatten(layout, part) for layout, part in zip(layouts, trees, strict=True)))
        layout, out = flatten(new)
        if layout != layouts[1]:
            raise ValueError(f"a scan step returned a carry shaped {layout}, not {layouts[1]}")
        return tuple(out)

    def vmapped(*leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # A leaf every device shares (the downloaded weights before the first update) enters
        # unbatched, so that the step computes with it once rather than once per device.
        dims = tuple(None if _shared(t) else 0 for t in leaves)
        if all(dim is None for dim in dims):
            dims = (0,) * len(leaves)  # vmap needs one batched input to know the block size
        shared = (t[0] if dim is None else t for t, dim in zip(leaves, dims, strict=True))
        return vmap(flat_step, in_dims=dims)(*shared)

    # A step that can run a whole block at once does; any other is vmapped over the block.
    block_step = getattr(step, "stacked", None)
    run = step if block_step is None else block_step
    batched = flat_step if block_step is not None else vmapped
    ends_sorted = ends[order]
    longest = int(ends_sorted[-1]) if devices else 0
    # Before step s, the first firsts[s] devices (ends <= s) are done.
    firsts = torch.searchsorted(ends_sorted, torch.arange(longest), right=True).tolist()
    done, start = [], 0
    for index, first in enumerate(firsts):
        if first > start:
            done.append([t[: first - start] for t in state])
            state = [t[first - start :] for t in state]
            start = first
        ahead = [t[start:] for t in constants]
        now = [t[start:, index] for t in inputs]
        state = list(batched(*ahead, *state, *now))
    done.append(state)
    final = [parts[0] if len(parts) == 1 else torch.cat(parts) for parts in zip(*done, strict=True)]
    if shuffled:
        final = [t[torch.argsort(order)] for t in final]
    return unflatten(layouts[1], final)


def _shared(leaf: torch.Tensor) -> bool:
    """True for a leaf that ``vmap`` returned expanded: one value for every device."""
    return leaf.dim() > 0 and leaf.stride(0) == 0


def local_executor(backend: Backend) -> Executor:
    """An executor that runs every block in this process, one after the other."""
    if backend == "ray":
        raise ValueError("backend 'ray' needs a RayExecutor (coevo.sim.ray_backend)")

    def execute(strategy: Strategy, payload: Payload, jobs: Sequence[Job]):
        for state, batch in jobs:
            yield run_block(strategy, payload, state, batch, backend)

    return execute
