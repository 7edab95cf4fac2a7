"""ε at δ in every round record and in the report, for the strategies a run makes private."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from coevo.privacy.accountant import PrivacyAccountant
from coevo.report.callbacks import Callback
from coevo.report.records import RunInfo, StrategyResult

RoundHook = Callable[[dict[str, float]], None]


def with_epsilon(on_round: RoundHook, accountant: PrivacyAccountant) -> RoundHook:
    """A ``simulate(on_round=...)`` hook adding ``epsilon`` and ``delta`` after each round.

    Round ``r`` (0-based) has spent ``r + 1`` rounds of the budget.
    """

    def hook(record: dict[str, float]) -> None:
        spent = accountant.epsilon(int(record["round"]) + 1)
        on_round({**record, "epsilon": spent, "delta": accountant.delta})

    return hook


class PrivacyReport(Callback):
    """Adds ``epsilon`` and ``delta`` to private strategies' round records and results.

    Wraps the callback that writes the run (``RunWriter``, a ``CallbackList``): each round
    record of a strategy named in ``accountants`` gains ε after that many rounds, the final
    ``phase: evaluate`` record and the strategy's result gain ε after all its rounds (so the
    report's metric tables show it). Records of other strategies pass through unchanged.

    Args:
        inner: the callback that receives the enriched records.
        accountants: per strategy name, the accountant of its noise, sampling and δ.
    """

    def __init__(self, inner: Callback, accountants: Mapping[str, PrivacyAccountant]) -> None:
        self.inner = inner
        self.accountants = dict(accountants)
        self._rounds: dict[tuple[str, int], int] = {}

    def _spent(self, strategy: str, seed: int) -> dict[str, float]:
        accountant = self.accountants[strategy]
        rounds = self._rounds.get((strategy, seed), 0)
        return {"epsilon": accountant.epsilon(rounds), "delta": accountant.delta}

    def on_run_start(self, run: RunInfo) -> None:
        self.inner.on_run_start(run)

    def on_round_end(self, record: Mapping[str, Any]) -> None:
        strategy, seed = record.get("strategy"), record.get("seed", 0)
        if strategy not in self.accountants:
            self.inner.on_round_end(record)
            return
        if "round" in record and record.get("phase") is None:
            done = int(record["round"]) + 1
            self._rounds[(strategy, seed)] = max(done, self._rounds.get((strategy, seed), 0))
        self.inner.on_round_end({**record, **self._spent(strategy, seed)})

    def on_progress(self, task: str, completed: int, total: int) -> None:
        self.inner.on_progress(task, completed, total)

    def on_strategy_end(self, result: StrategyResult) -> None:
        self.inner.on_strategy_end(self._with_epsilon(result))

    def on_run_end(self, results: Sequence[StrategyResult]) -> None:
        self.inner.on_run_end([self._with_epsilon(result) for result in results])

    def _with_epsilon(self, result: StrategyResult) -> StrategyResult:
        if result.strategy not in self.accountants or "epsilon" in result.metrics:
            return result
        spent = self._spent(result.strategy, result.seed)["epsilon"]
        return replace(result, metrics={**result.metrics, "epsilon": spent})
