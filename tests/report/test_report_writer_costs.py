from pathlib import Path

import numpy as np

from coevo.report import RunInfo, RunWriter, StrategyResult


def _result(strategy: str, seed: int) -> StrategyResult:
    return StrategyResult(
        strategy=strategy,
        seed=seed,
        metrics={"hr@10": 0.5, "ndcg@10": 0.3},
        per_device={"ndcg@10": np.array([0.2, 0.4])},
        group=np.array([0, 2]),
        cost={"bytes_up_per_device": 10.0, "seconds": 1.5, "extra_cost": 2.0},
    )


def test_every_cost_key_is_one_column(tmp_path: Path) -> None:
    writer = RunWriter(title="costs")
    writer.on_run_start(RunInfo(run_dir=tmp_path / "run", config={}, dataset={}, models={}))
    results = [_result("a", 0), _result("a", 1), _result("b", 0)]
    for result in results:
        writer.on_strategy_end(result)
    writer.on_run_end(results)
    report = (tmp_path / "run" / "report.md").read_text()
    header = next(line for line in report.splitlines() if "bytes up per device" in line)
    cells = [cell.strip() for cell in header.strip("|").split("|")]
    assert len(cells) == len(set(cells))
    assert cells.count("seconds") == 1 and "extra cost" in " ".join(cells).replace("_", " ")
