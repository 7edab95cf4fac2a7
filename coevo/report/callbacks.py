"""Callbacks: how a run is measured and shown without the training code knowing about it.

The Simulator (or Service) calls the hooks in this order: ``on_run_start`` once; for each
(strategy, seed) any number of ``on_progress`` and ``on_round_end`` calls, then
``on_strategy_end``; finally ``on_run_end`` with every result.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.progress import Progress, TaskID

from coevo.report.records import RunInfo, StrategyResult


class Callback:
    """Base class with a no-op for every hook; override only the hooks you need.

    Example:
        >>> class CountRounds(Callback):
        ...     def __init__(self) -> None:
        ...         self.rounds = 0
        ...
        ...     def on_round_end(self, record):
        ...         self.rounds += 1
        >>> counter = CountRounds()
        >>> counter.on_round_end({"strategy": "fedavg", "seed": 0, "round": 1, "loss": 0.7})
        >>> counter.rounds
        1
    """

    def on_run_start(self, run: RunInfo) -> None:
        """Called once, before any strategy trains."""

    def on_round_end(self, record: Mapping[str, Any]) -> None:
        """Called after each round or training phase.

        Args:
            record: ``strategy``, ``seed``, ``round`` and the numbers measured in that round.
        """

    def on_progress(self, task: str, completed: int, total: int) -> None:
        """Called as a named piece of work advances, e.g. ``("finetune seed 0", 3, 20)``."""

    def on_strategy_end(self, result: StrategyResult) -> None:
        """Called once a strategy has trained and been evaluated with one seed."""

    def on_run_end(self, results: Sequence[StrategyResult]) -> None:
        """Called once, with every result of the run."""


class CallbackList(Callback):
    """Dispatches every hook to its callbacks, in the order given.

    Order matters when one callback reads what another wrote, so it is kept exactly.
    """

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks: list[Callback] = list(callbacks)

    def on_run_start(self, run: RunInfo) -> None:
        for callback in self.callbacks:
            callback.on_run_start(run)

    def on_round_end(self, record: Mapping[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_round_end(record)

    def on_progress(self, task: str, completed: int, total: int) -> None:
        for callback in self.callbacks:
            callback.on_progress(task, completed, total)

    def on_strategy_end(self, result: StrategyResult) -> None:
        for callback in self.callbacks:
            callback.on_strategy_end(result)

    def on_run_end(self, results: Sequence[StrategyResult]) -> None:
        for callback in self.callbacks:
            callback.on_run_end(results)


class RichProgress(Callback):
    """One ``rich`` progress bar per task name, created the first time that name reports.

    Args:
        console: where to draw; tests pass ``Console(file=io.StringIO())``. Defaults to stderr.
        transient: remove the bars from the terminal when the run ends.
    """

    def __init__(self, console: Console | None = None, transient: bool = False) -> None:
        self.console = console
        self.transient = transient
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def on_progress(self, task: str, completed: int, total: int) -> None:
        if self._progress is None:
            # Started lazily so that a run which never reports progress draws nothing.
            self._progress = Progress(console=self.console, transient=self.transient)
            self._progress.start()
        if task not in self._tasks:
            self._tasks[task] = self._progress.add_task(task, total=total, completed=completed)
        else:
            self._progress.update(self._tasks[task], completed=completed, total=total)

    def on_run_end(self, results: Sequence[StrategyResult]) -> None:
        self.close()

    def close(self) -> None:
        """Stops drawing; safe to call twice. A later ``on_progress`` starts fresh bars."""
        if self._progress is not None:
            self._progress.stop()
        self._progress = None
        self._tasks = {}
