"""ε at δ reaches every round record of a private strategy, its result and the report."""

import math

import numpy as np
import pytest

from coevo.privacy import PrivacyAccountant, PrivacyReport, with_epsilon
from coevo.report import Callback, RunInfo, RunWriter, StrategyResult


class Collect(Callback):
    def __init__(self):
        self.records, self.results = [], []

    def on_round_end(self, record):
        self.records.append(dict(record))

    def on_strategy_end(self, result):
        self.results.append(result)


ACCOUNTANT = PrivacyAccountant(noise_multiplier=1.0, sampling_rate=0.1, delta=1e-3)


def result(strategy):
    return StrategyResult(
        strategy=strategy,
        seed=0,
        metrics={"hr@10": 0.5, "ndcg@10": 0.3},
        per_device={},
        group=np.zeros(0, dtype=np.int64),
    )


def test_round_records_and_results_carry_epsilon():
    inner = Collect()
    report = PrivacyReport(inner, {"dp_fedavg": ACCOUNTANT})
    for round in range(3):
        report.on_round_end({"strategy": "dp_fedavg", "seed": 0, "round": round, "loss": 1.0})
        report.on_round_end({"strategy": "fedavg", "seed": 0, "round": round, "loss": 1.0})
    report.on_round_end({"strategy": "dp_fedavg", "seed": 0, "phase": "evaluate", "hr@10": 0.5})
    report.on_strategy_end(result("dp_fedavg"))
    report.on_strategy_end(result("fedavg"))
    private = [r for r in inner.records if r["strategy"] == "dp_fedavg"]
    spent = [r["epsilon"] for r in private]
    assert spent[:3] == [ACCOUNTANT.epsilon(n) for n in (1, 2, 3)]
    assert spent[3] == spent[2] and all(r["delta"] == 1e-3 for r in private)
    assert all("epsilon" not in r for r in inner.records if r["strategy"] == "fedavg")
    assert inner.results[0].metrics["epsilon"] == pytest.approx(ACCOUNTANT.epsilon(3))
    assert "epsilon" not in inner.results[1].metrics


def test_the_report_shows_epsilon(tmp_path):
    report = PrivacyReport(RunWriter(title="dp"), {"dp_fedavg": ACCOUNTANT})
    report.on_run_start(RunInfo(run_dir=tmp_path / "run", config={"name": "dp"}))
    report.on_round_end({"strategy": "dp_fedavg", "seed": 0, "round": 0, "loss": 1.0})
    done = result("dp_fedavg")
    report.on_strategy_end(done)
    report.on_run_end([done])
    assert "epsilon" in (tmp_path / "run" / "report.md").read_text()
    assert '"epsilon"' in (tmp_path / "run" / "rounds.jsonl").read_text()


def test_the_round_hook_adds_epsilon():
    seen = []
    hook = with_epsilon(seen.append, PrivacyAccountant(0.0, 0.5, 1e-3))
    hook({"round": 0, "loss": 1.0})
    assert seen == [{"round": 0, "loss": 1.0, "epsilon": math.inf, "delta": 1e-3}]
