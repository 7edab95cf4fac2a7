"""Quality against privacy: NDCG@10 of user-level DP-FedAvg for ε ∈ {1, 2, 4, 8, ∞}.

FedAvg on the recommendation task under protocol P1 (MovieLens-100K, one device per user;
the synthetic world when the data is missing), ``--devices-per-round`` devices a round for
``--rounds`` rounds, every device's update clipped to ``--clip``. For each ε the noise
multiplier σ is calibrated with the RDP accountant so that the run spends at most ε at
δ = 1 / num_devices (sampling rate q = devices per round / devices); ε = ∞ is clipping without
noise. Each run starts from the same seed, so runs differ only in their noise. Writes a table,
a curve (``privacy.png``) and ``privacy.json`` into ``--output``; the last line is
``privacy: ndcg10_eps8=… ndcg10_inf=… ndcg10_eps1=…``.

    python benchmarks/privacy.py --data-dir ../shared/data          # about 15 minutes, 1 thread
    python benchmarks/privacy.py --quick                            # a couple of minutes
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from coevo.config import RunConfig, parse
from coevo.privacy import DPFedAvg, PrivacyAccountant, calibrate_noise
from coevo.sim.experiment import build_task, load_log
from coevo.sim.simulator import simulate
from coevo.strategies import FedAvg
from coevo.tasks.movielens import DatasetError, find_movielens_100k
from coevo.tasks.recommendation import RecommendationTask

EPSILONS = (1.0, 2.0, 4.0, 8.0, math.inf)


def load_task(data_dir: str | None, seed: int) -> tuple[RecommendationTask, str]:
    """ML-100K under P1 when it can be found, else the synthetic world."""
    data: dict = {"name": "synthetic"}
    try:
        folder = find_movielens_100k(data_dir)
    except DatasetError:
        folder = None
    if folder is not None:
        data = {"name": "movielens-100k", "data_dir": str(folder)}
    config = parse(
        RunConfig,
        {
            "name": "privacy",
            "data": data,
            "models": {"device": {"dim": 32, "history_len": 20}},
            "strategies": [{"name": "fedavg"}],
        },
    )
    return build_task(load_log(config, seed), config, seed), data["name"]


def train_and_score(
    task: RecommendationTask, sigma: float, args: argparse.Namespace
) -> dict[str, float]:
    """One DP-FedAvg run with noise multiplier ``sigma``; test metrics under P1."""
    local = {"epochs": args.epochs, "lr": args.lr, "optimizer": "adam"}
    inner = FedAvg(task, FedAvg.Config(rounds=args.rounds, local=local))
    strategy = DPFedAvg.wrap(inner, clip_norm=args.clip, noise_multiplier=sigma, seed=args.seed)
    result = simulate(
        strategy, torch.Generator().manual_seed(args.seed), devices_per_round=args.devices_per_round
    )

    def scorer(devices, history, candidates):
        block = type(result.devices)({k: v[devices] for k, v in result.devices.tensors.items()})
        return strategy.score(result.cloud, block, history, candidates)

    _, summary = task.evaluate(scorer, "test", full_ranking=False, seed=args.seed)
    return summary


def plot(rows: list[dict], path: Path, dataset: str) -> None:
    figure = Figure(figsize=(5.5, 4.0), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    finite = [r for r in rows if math.isfinite(r["epsilon"])]
    axes.plot([r["epsilon"] for r in finite], [r["ndcg@10"] for r in finite], "o-", label="DP")
    for r in rows:
        if not math.isfinite(r["epsilon"]):
            axes.axhline(r["ndcg@10"], color="grey", linestyle="--", label="ε = ∞ (clip only)")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("ε at δ = 1/devices (user level)")
    axes.set_ylabel("test NDCG@10 (P1, 1 + 99 candidates)")
    axes.set_title(f"DP-FedAvg on {dataset}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", default=None, help="folder holding ml-100k/ (else $COEVO_DATA)"
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--devices-per-round", type=int, default=200)
    parser.add_argument("--clip", type=float, default=2.0, help="clip norm C of each update")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--lr", type=float, default=0.01, help="local Adam step size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path("runs/privacy"))
    parser.add_argument("--quick", action="store_true", help="5 rounds of 100 devices")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.devices_per_round = 5, 100
    torch.set_num_threads(args.threads)
    task, dataset = load_task(args.data_dir, args.seed)
    num_devices = task.num_devices
    delta, rate = 1.0 / num_devices, min(1.0, args.devices_per_round / num_devices)
    print(
        f"{dataset}: {num_devices} devices, {args.devices_per_round} a round (q = {rate:.3f}), "
        f"{args.rounds} rounds, C = {args.clip}, δ = {delta:.2e}"
    )
    rows = []
    for target in EPSILONS:
        sigma = calibrate_noise(target, delta, rate, args.rounds)
        spent = PrivacyAccountant(sigma, rate, delta).epsilon(args.rounds)
        started = time.perf_counter()
        metrics = train_and_score(task, sigma, args)
        rows.append(
            {
                "epsilon": target,
                "epsilon_spent": spent,
                "noise_multiplier": sigma,
                "ndcg@10": metrics["ndcg@10"],
                "hr@10": metrics["hr@10"],
                "seconds": time.perf_counter() - started,
            }
        )
        print(
            f"ε target {target:>4} spent {spent:8.3f}  σ {sigma:7.3f}  NDCG@10 "
            f"{metrics['ndcg@10']:.4f}  HR@10 {metrics['hr@10']:.4f}  {rows[-1]['seconds']:.0f} s",
            flush=True,
        )
    args.output.mkdir(parents=True, exist_ok=True)
    plot(rows, args.output / "privacy.png", dataset)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.output / "privacy.json").write_text(
        json.dumps({"dataset": dataset, "settings": settings, "rows": rows}, indent=2) + "\n"
    )
    print("\n| ε target | ε spent | σ | NDCG@10 | HR@10 |\n|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['epsilon']} | {r['epsilon_spent']:.3f} | {r['noise_multiplier']:.3f} | "
            f"{r['ndcg@10']:.4f} | {r['hr@10']:.4f} |"
        )
    print(f"curve: {args.output / 'privacy.png'}")
    ndcg = {r["epsilon"]: r["ndcg@10"] for r in rows}
    print(
        f"privacy: ndcg10_eps8={ndcg[8.0]:.4f} ndcg10_inf={ndcg[math.inf]:.4f} "
        f"ndcg10_eps1={ndcg[1.0]:.4f}"
    )


if __name__ == "__main__":
    main()
