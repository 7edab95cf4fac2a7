"""ONNX Runtime int8 against PyTorch eager fp32 for the recommendation device model.

1. The device model is pretrained the way the finetune strategy does it (central training on
   the cloud-period rows, early-stopped on validation HR@10), with the settings of
   configs/baselines_ml100k.yaml, on MovieLens-100K under P1 (the synthetic world when the
   data is absent).
2. It is exported to ONNX (fp32) and quantised to int8 with ONNX Runtime.
3. Per-request latency (one user, 100 candidates: the P1 test candidates of each user in
   turn) for every engine, one thread each, requests interleaved across engines so that load
   from other processes falls on all alike; model bytes; NDCG@10 under P1 with each engine.

    OMP_NUM_THREADS=1 python benchmarks/export_latency.py --data-dir ../shared/data [--quick]

The last line is ``export_latency: p50_ratio=… size_ratio=… ndcg10_drop=…`` with
p50_ratio = PyTorch p50 / int8 p50 (> 1: int8 is faster), size_ratio = fp32 ONNX bytes /
int8 ONNX bytes, ndcg10_drop = NDCG@10 of PyTorch minus that of int8.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save as save_safetensors

from coevo.config import RunConfig, apply_overrides, load_yaml, parse
from coevo.export import DeviceScorer, OnnxScorer, quantize_int8, to_onnx
from coevo.export.onnx import with_params
from coevo.sim.experiment import build_task
from coevo.strategies.finetune import Finetune, FinetuneConfig
from coevo.tasks.log import DatasetError, InteractionLog
from coevo.tasks.movielens import load_movielens_100k
from coevo.tasks.recommendation import RecommendationTask
from coevo.tasks.synthetic import SyntheticConfig, make_world

CONFIG = Path(__file__).parents[1] / "configs" / "baselines_ml100k.yaml"
Engine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def load_data(data_dir: str | None, seed: int, console: Console) -> InteractionLog:
    try:
        return load_movielens_100k(data_dir)
    except DatasetError as error:
        console.print(f"MovieLens-100K not found ({error}); using the synthetic world")
        return make_world(SyntheticConfig(), seed)


def pretrain(task: RecommendationTask, spec: dict, seed: int) -> dict[str, torch.Tensor]:
    """The device model's weights after the finetune strategy's cloud pretraining."""
    strategy = Finetune(task, parse(FinetuneConfig, spec))
    return dict(strategy.init(torch.Generator().manual_seed(seed)).tensors)


def latencies(
    engines: dict[str, Engine], history: torch.Tensor, candidates: torch.Tensor, warmup: int
) -> dict[str, np.ndarray]:
    """Seconds per request of each engine; request ``i`` is user ``i % num_users``."""
    times = {name: [] for name in engines}
    users = len(history)
    with torch.inference_mode():
        for index in range(warmup + len(history)):
            user = index % users
            h, c = history[user : user + 1], candidates[user : user + 1]
            for name, engine in engines.items():
                started = time.perf_counter()
                engine(h, c)
                if index >= warmup:
                    times[name].append(time.perf_counter() - started)
    return {name: np.asarray(values) for name, values in times.items()}


def ndcg10(task: RecommendationTask, engine: Engine, seed: int) -> tuple[float, float]:
    """Sampled NDCG@10 (P1's headline) and full-ranking NDCG@10 on the test targets."""

    def scorer(devices, history, candidates):
        return engine(history, candidates)

    summary = task.evaluate(scorer, "test", full_ranking=True, seed=seed)[1]
    return summary["ndcg@10"], summary["full_ndcg@10"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", default=None, help="folder holding ml-100k/ (else $COEVO_DATA)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--requests", type=int, default=5000, help="timed requests per engine")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="10 pretraining epochs, 1000 requests")
    args = parser.parse_args()
    console = Console(width=160)
    torch.set_num_threads(1)
    config = parse(RunConfig, load_yaml(CONFIG), source=str(CONFIG))
    spec = next(dict(s) for s in config.strategies if s["name"] == "finetune")
    if args.quick:
        spec = apply_overrides(spec, ["pretrain.epochs=10"])
        args.requests = min(args.requests, 1000)
    log = load_data(args.data_dir, args.seed, console)
    task = build_task(log, config, args.seed)
    started = time.perf_counter()
    params = pretrain(task, spec, args.seed)
    console.print(f"pretrained the device model in {time.perf_counter() - started:.0f} s")
    model = with_params(task.device_model(), params)
    fp32 = to_onnx(model)
    int8 = quantize_int8(fp32)
    ort_fp32, ort_int8 = OnnxScorer(fp32, threads=1), OnnxScorer(int8, threads=1)
    folded = DeviceScorer(model).eval()
    engines: dict[str, Engine] = {
        "PyTorch eager fp32": model,
        "PyTorch eager fp32, folded tables": folded,
        "ONNX Runtime fp32": lambda h, c: torch.from_numpy(ort_fp32.score(h, c)),
        "ONNX Runtime int8": lambda h, c: torch.from_numpy(ort_int8.score(h, c)),
    }
    sizes = {
        "PyTorch eager fp32": len(
            save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()})
        )
        + sum(b.numel() * b.element_size() for b in model.buffers()),
        "PyTorch eager fp32, folded tables": sum(
            t.numel() * t.element_size() for t in folded.state_dict().values()
        ),
        "ONNX Runtime fp32": len(fp32),
        "ONNX Runtime int8": len(int8),
    }
    split = task.split
    rows = split.target_rows("test")
    history = split.history(rows, task.shapes.device_history)
    candidates = split.candidates("test")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed))
    repeats = -(-args.requests // len(rows))
    order = order.repeat(repeats)[: args.requests]
    timed = latencies(engines, history[order], candidates[order], args.warmup)
    quality = {name: ndcg10(task, engine, args.seed) for name, engine in engines.items()}
    table = Table(title=f"{log.name}: one user, {candidates.shape[1]} candidates, 1 thread")
    for column in ("engine", "p50 µs", "p99 µs", "model bytes", "NDCG@10", "full NDCG@10"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    for name in engines:
        p50, p99 = np.percentile(timed[name], [50, 99]) * 1e6
        sampled, full = quality[name]
        table.add_row(
            name, f"{p50:.1f}", f"{p99:.1f}", f"{sizes[name]:,}", f"{sampled:.4f}", f"{full:.4f}"
        )
    console.print(table)
    torch_p50 = float(np.percentile(timed["PyTorch eager fp32"], 50))
    int8_p50 = float(np.percentile(timed["ONNX Runtime int8"], 50))
    drop = quality["PyTorch eager fp32"][0] - quality["ONNX Runtime int8"][0]
    print(
        f"export_latency: p50_ratio={torch_p50 / int8_p50:.2f} "
        f"size_ratio={len(fp32) / len(int8):.2f} ndcg10_drop={drop:.4f}"
    )


if __name__ == "__main__":
    main()
