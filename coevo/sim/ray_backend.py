"""The Ray backend: a round's device blocks sharded over Ray actors.

Each actor holds one copy of the strategy and runs the in-process vectorised backend
(``run_block(..., backend="vectorized")``, one ``vmap`` call per block) on its shard of the
round's blocks; the merge stays in the driver, done once per round by the simulator::

    with RayExecutor(num_actors=4) as executor:
        result = simulate(strategy, rng, executor=executor)

Without ``address`` it starts a private local Ray instance and shuts it down on ``close``.
To use an existing Ray cluster, pass its address: ``RayExecutor(address="auto")`` in a
process on one of the cluster's nodes (after ``ray start --head`` there), or a Ray Client
address such as ``RayExecutor(address="ray://head:10001")`` from outside it (Ray Client needs
``pip install 'ray[client]'``). Every node must have the same ``coevo`` version installed,
since actors import it to unpickle the strategy. A Ray instance already initialised in this
process (``ray.init`` called by the user) is used as it is and left running.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from coevo.sim.executor import Job, Stacked, run_block
from coevo.strategies.base import Strategy
from coevo.types import Payload

Result = tuple[Stacked, Stacked, Stacked]


class _BlockRunner:
    """One actor's side: keeps the current strategy and runs the blocks it is sent."""

    def __init__(self) -> None:
        import torch

        # Several actors share a node's cores; torch's default pool per actor oversubscribes.
        torch.set_num_threads(1)
        self.strategy: Strategy | None = None

    def set_strategy(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def run(self, payload: Payload, jobs: Sequence[Job]) -> list[Result]:
        if self.strategy is None:
            raise RuntimeError("the strategy was not sent to this actor before its blocks")
        return [
            run_block(self.strategy, payload, state, batch, "vectorized") for state, batch in jobs
        ]


class RayExecutor:
    """An ``Executor`` that runs a round's blocks on Ray actors, blocks dealt round-robin.

    Args:
        num_actors: actors to start; each receives every ``num_actors``-th block.
        cpus_per_actor: CPUs Ray reserves for each actor. Keep the total below the cluster's
            CPUs: Ray needs spare capacity for its own tasks, or ``ray.get`` can hang.
        address: an existing cluster (``"auto"`` or ``"ray://host:10001"``); ``None`` starts
            a local instance with this machine's CPUs (more if the actors need them).
        timeout_s: seconds one call waits for all its actors' results.

    Raises:
        ImportError: Ray is not installed.
    """

    def __init__(
        self,
        num_actors: int = 2,
        *,
        cpus_per_actor: float = 0.5,
        address: str | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        try:
            import ray
        except ImportError as error:
            raise ImportError("RayExecutor needs Ray: pip install 'coevo[ray]'") from error
        if num_actors < 1:
            raise ValueError(f"num_actors must be at least 1, got {num_actors}")
        if cpus_per_actor <= 0 or timeout_s <= 0:
            raise ValueError("cpus_per_actor and timeout_s must be positive")
        self._ray = ray
        self.num_actors = num_actors
        self.cpus_per_actor = cpus_per_actor
        self.address = address
        self.timeout_s = timeout_s
        self._started_ray = False
        self._actors: list[Any] = []
        # The strategy object itself is kept, not only its id, so the id cannot be reused.
        self._strategy: Strategy | None = None

    def __enter__(self) -> RayExecutor:
        self._start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _start(self) -> None:
        ray = self._ray
        if self._actors:
            return
        if not ray.is_initialized():
            quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
            if self.address is None:
                # Logical CPUs: enough for every actor to start even past the core count.
                needed = math.ceil(self.num_actors * self.cpus_per_actor)
                num_cpus = max(os.cpu_count() or 1, needed)
                ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet)
            else:
                ray.init(address=self.address, **quiet)
            self._started_ray = True
        actor_class = ray.remote(num_cpus=self.cpus_per_actor)(_BlockRunner)
        self._actors = [actor_class.remote() for _ in range(self.num_actors)]

    def close(self) -> None:
        """Stop the actors, and Ray itself if this executor started it."""
        if self._ray.is_initialized():
            for actor in self._actors:
                self._ray.kill(actor)
        self._actors, self._strategy = [], None
        if self._started_ray:
            self._ray.shutdown()
            self._started_ray = False

    def __call__(self, strategy: Strategy, payload: Payload, jobs: Sequence[Job]) -> list[Result]:
        """``run_block`` for every job on the actors; results in the order of ``jobs``."""
        ray = self._ray
        self._start()
        pending: list[list[Any]] = [[] for _ in self._actors]
        if strategy is not self._strategy:
            strategy_ref = ray.put(strategy)
            for actor, refs in zip(self._actors, pending, strict=True):
                refs.append(actor.set_strategy.remote(strategy_ref))
            self._strategy = strategy
        payload_ref = ray.put(payload)
        shards = [list(jobs[i :: self.num_actors]) for i in range(self.num_actors)]
        runs = [
            actor.run.remote(payload_ref, shard) if shard else None
            for actor, shard in zip(self._actors, shards, strict=True)
        ]
        shard_results: list[list[Result]] = [[] for _ in self._actors]
        # One deadline for the whole call: actors work in parallel, so waiting ``timeout_s``
        # per actor in turn would let a stuck round run for ``num_actors * timeout_s``.
        deadline = time.monotonic() + self.timeout_s
        for index, (run, refs) in enumerate(zip(runs, pending, strict=True)):
            waited = refs + ([run] if run is not None else [])
            if not waited:
                continue
            try:
                answers = ray.get(waited, timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError as error:
                # The strategy may not have arrived; send it again on the next call.
                self._strategy = None
                raise TimeoutError(
                    f"Ray actor {index} of {self.num_actors} (holding {len(shards[index])} "
                    f"blocks) did not answer within {self.timeout_s} s"
                ) from error
            except Exception:
                self._strategy = None
                raise
            if run is not None:
                shard_results[index] = answers[-1]
        # Job ``i`` went to actor ``i % num_actors`` as that actor's ``i // num_actors``-th block.
        return [shard_results[i % self.num_actors][i // self.num_actors] for i in range(len(jobs))]
