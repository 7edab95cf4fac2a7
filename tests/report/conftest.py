"""Hand-made results: three strategies, two seeds, six devices (two per activity group)."""

from __future__ import annotations

import numpy as np
import pytest

from coevo.report import RunInfo, StrategyResult

GROUP = np.array([0, 0, 1, 1, 2, 2])


def _result(strategy: str, seed: int, hr: float, ndcg: float, note: str = "") -> StrategyResult:
    per_device_ndcg = np.array([0.1, 0.2, 0.4, 0.5, 0.7, 0.8]) + ndcg - 0.45
    metrics = {
        "hr@10": hr,
        "ndcg@10": ndcg,
        "gauc": 0.9,
        "mrr": 0.35,
        "full_hr@10": 0.1,
        "full_ndcg@10": 0.05,
        "ndcg@10/tail": float(per_device_ndcg[:2].mean()),
        "ndcg@10/mid": float(per_device_ndcg[2:4].mean()),
        "ndcg@10/head": float(per_device_ndcg[4:].mean()),
        "ndcg@10/head_minus_tail": 0.6,
        "ndcg@10/std": float(per_device_ndcg.std()),
        "val_hr@10": hr + 0.01,
    }
    if strategy != "finetune":
        # finetune lacks full-ranking recall, so tables must show it as missing.
        metrics["full_recall@20"] = 0.2
    return StrategyResult(
        strategy=strategy,
        seed=seed,
        metrics=metrics,
        per_device={
            "ndcg@10": per_device_ndcg,
            "hr@10": (per_device_ndcg > 0.3).astype(float),
        },
        group=GROUP,
        cost={
            "bytes_up_per_device": 12_300.0,
            "bytes_down_per_device": 2_500_000.0,
            "device_params": 56_000.0,
            "device_flops_per_prediction": 1.2e6,
            "train_seconds": 3.0 + seed,
        },
        note=note,
    )


@pytest.fixture
def results() -> list[StrategyResult]:
    return [
        _result("cloud_only", 0, hr=0.60, ndcg=0.40),
        _result("cloud_only", 1, hr=0.64, ndcg=0.46),
        _result("finetune", 0, hr=0.70, ndcg=0.50),
        _result("finetune", 1, hr=0.70, ndcg=0.52),
        _result("central_oracle", 0, hr=0.72, ndcg=0.55, note="privacy-free upper bound"),
        _result("central_oracle", 1, hr=0.74, ndcg=0.57, note="privacy-free upper bound"),
    ]


@pytest.fixture
def run_info(tmp_path):
    return RunInfo(
        run_dir=tmp_path / "runs" / "demo",
        config={
            "task": {"name": "movielens", "protocol": "P1"},
            "strategies": [{"name": "finetune", "lr": 0.01}, {"name": "cloud_only"}],
            "seeds": [0, 1],
        },
        dataset={
            "users": 6,
            "items": 40,
            "interactions": 120,
            "device_period_size": {"p20": 7, "p50": 16, "p80": 43},
            "protocol": "P1",
            "seeds": [0, 1],
        },
        models={
            "device": {"params": 56_000, "flops_per_prediction": 1.2e5},
            "cloud": {"params": 2_400_000, "flops_per_prediction": 3.1e7},
        },
    )
