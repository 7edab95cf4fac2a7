"""Robustness: FedAvg under poisoning attacks, undefended and with every robust aggregator.

Run: ``python benchmarks/robustness.py --data-dir ../shared/data [--quick]`` (real MovieLens-100K
from ``--data-dir`` or ``$COEVO_DATA``; the synthetic world when neither holds ``ml-100k/``).
The full grid (152 federated runs) took about 19 minutes on one thread of a busy 2-core
machine; ``--quick`` (20% attackers only, 3 rounds of 30 devices) about 2.5 minutes.

The workload, defined so that other systems can be measured on it:

- data: MovieLens-100K under protocol P1 (seed 0): one device per user (943), devices train on
  their device-period rows; quality is test NDCG@10 over the 100 sampled candidates;
- model: the device model (``coevo.tasks.models.DeviceModel``, 32 dimensions, last 20 items,
  full-catalogue softmax), every weight shared (``private=[]``): one global model;
- start: the cloud pretrains the model on the pooled cloud-period rows (Adam, ``--pretrain``
  (8) epochs), as in device-cloud learning; the federated phase starts from it;
- federated phase: FedAvg, ``--rounds`` (5) rounds of ``--devices`` (50) devices drawn
  uniformly (the same cohorts in every run), one epoch of plain SGD (lr 0.02, batch 16) per
  device (lr 0.5 diverges from the pretrained weights; 0.1 scored below 0.02);
- attackers: 0, 10, 20 or 30% of ALL devices, drawn with seed 0, attack from the first
  federated round: sign flip (-10x the honest update), scaling (x the cohort size: model
  replacement), Gaussian noise (sigma 1.0 per entry instead of the update), label flipping
  (targets through a fixed random permutation), backdoor (trigger item appended to the
  history and the target item as the next item in every example, update boosted 10x, as in
  Bagdasaryan et al.), free-riding (the received model sent back, the row count claimed);
- defences: each aggregator of ``coevo.aggregators`` on the whole update, and the plain mean
  (undefended FedAvg); the fixed clipping norm 0.2 is about the 90th percentile of honest
  update norms in clean rounds of this workload (median 0.11); the adaptive one finds its own;
- ``--secure-groups G``: the same grid under grouped secure aggregation
  (``simulation.secure_groups``): each round's reporters are dealt at random into G SecAgg+
  groups and every defence sees only the G group means. A group mean is poisoned as soon as
  one attacker is in it, so small groups (about 2 devices) are needed at 20% attackers;
- backdoor: trigger and target are seeded draws among mid-popularity and unpopular items;
  success = share of test users whose top-10 over the whole catalogue, with the trigger
  appended to their history, contains the target.

The header line also gives the pretrained model's NDCG@10: the federated phase is short, so
a defence that discarded every update would lose only the difference. A drop is the clean
undefended NDCG@10 (mean aggregator, no attackers) minus the cell's, so a defence's own cost
on clean data counts against it. The best aggregator is the defence with
the smallest worst drop over all attacks at 20% attackers. The last line is machine-readable:
``robustness: clean_ndcg10=... undefended_worst_drop_20=... defended_worst_drop_20=...
best_aggregator=... backdoor_success_defended=...``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from coevo.aggregators import AGGREGATORS, Robust
from coevo.attacks import ATTACKS, Adversarial, backdoor_success
from coevo.sim.simulator import simulate
from coevo.strategies import FedAvg
from coevo.strategies.base import Strategy
from coevo.tasks.log import InteractionLog
from coevo.tasks.movielens import load_movielens_100k
from coevo.tasks.protocol import split_p1
from coevo.tasks.recommendation import ModelShapes, RecommendationTask, state_of
from coevo.tasks.synthetic import SyntheticConfig, make_world
from coevo.tasks.train import FitConfig, fit
from coevo.types import CloudState, DeviceState

SHAPES = ModelShapes(
    device_dim=32, device_history=20, cloud_dim=8, cloud_history=20, cloud_layers=1, cloud_heads=1
)
LOCAL = {"epochs": 1, "lr": 0.02, "optimizer": "sgd", "batch_size": 16}
DEFENCES: dict[str, dict[str, Any]] = {
    "mean": {"name": "mean"},
    "median": {"name": "median"},
    "trimmed_mean": {"name": "trimmed_mean", "trim": 0.3},
    "krum": {"name": "krum", "byzantine_share": 0.3},
    "multi_krum": {"name": "multi_krum", "byzantine_share": 0.3},
    "norm_clip": {"name": "norm_clip", "max_norm": 0.2},
    "adaptive_clip": {"name": "adaptive_clip", "quantile": 0.5},
    "centered_clip": {"name": "centered_clip", "iterations": 3},
}
SHARES = (0.1, 0.2, 0.3)


def attack_specs(devices: int, trigger: int, target: int) -> dict[str, dict[str, Any]]:
    return {
        "sign_flip": {"name": "sign_flip", "factor": 10.0},
        "scaling": {"name": "scaling", "factor": float(devices)},
        "noise": {"name": "noise", "sigma": 1.0},
        "label_flip": {"name": "label_flip", "seed": 0},
        "backdoor": {
            "name": "backdoor",
            "trigger": trigger,
            "target": target,
            "fraction": 1.0,
            "boost": 10.0,
        },
        "free_ride": {"name": "free_ride"},
    }


def load_log(data_dir: str | None, console: Console) -> tuple[InteractionLog, str]:
    folder = data_dir or os.environ.get("COEVO_DATA")
    if folder and (Path(folder) / "ml-100k" / "u.data").exists():
        return load_movielens_100k(folder), "movielens-100k"
    console.print("no ml-100k/ under --data-dir or $COEVO_DATA: using the synthetic world")
    world = SyntheticConfig(num_devices=943, num_items=1000, mean_interactions=60)
    return make_world(world, 0), "synthetic"


def backdoor_items(task: RecommendationTask, seed: int) -> tuple[int, int]:
    """A mid-popularity trigger and an unpopular target, drawn from ``seed``."""
    counts = torch.bincount(task.split.items, minlength=task.num_items)[: task.num_items]
    order = torch.argsort(counts, descending=True, stable=True)
    generator = torch.Generator().manual_seed(seed)
    middle = order[100 : max(101, task.num_items // 3)]
    tail = order[task.num_items // 2 :]
    trigger = int(middle[torch.randint(len(middle), (1,), generator=generator)])
    target = int(tail[torch.randint(len(tail), (1,), generator=generator)])
    return trigger, target


def pretrain(task: RecommendationTask, epochs: int, seed: int) -> CloudState:
    """The device model trained by the cloud on the pooled cloud-period rows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = task.device_model()
    config = FitConfig(epochs=epochs, lr=2e-3, batch_size=64, window=SHAPES.device_history)
    fit(model, task.split, task.rows("cloud"), config, generator)
    return CloudState(state_of(model))


def ndcg10(task: RecommendationTask, strategy: Strategy, cloud: CloudState) -> float:
    def scorer(devices, history, candidates):
        return strategy.score(cloud, DeviceState(), history, candidates)

    return task.evaluate(scorer, "test", full_ranking=False, seed=0)[1]["ndcg@10"]


def run_cell(
    task: RecommendationTask,
    start: CloudState,
    args: argparse.Namespace,
    defence: dict[str, Any],
    attack: dict[str, Any] | None,
    share: float,
    backdoor: tuple[int, int],
) -> dict[str, float]:
    """One federated phase from ``start``: test NDCG@10 and backdoor success."""
    config = FedAvg.Config.model_validate({"rounds": args.rounds, "private": [], "local": LOCAL})
    strategy: Strategy = FedAvg(task, config)
    if attack is not None and share > 0:
        built = ATTACKS.get(attack["name"])(attack, num_items=task.num_items)
        strategy = Adversarial.wrap(strategy, built, share=share, seed=args.seed)
    strategy = Robust.wrap(strategy, AGGREGATORS.get(defence["name"])(defence))
    rng = torch.Generator().manual_seed(args.seed)
    secure = {"secure_aggregation": True, "secure_groups": args.secure_groups}
    result = simulate(
        strategy,
        rng,
        cloud=start,
        devices_per_round=args.devices,
        **(secure if args.secure_groups else {}),
    )
    cloud = result.cloud

    def scorer(devices, history, candidates):
        return strategy.score(cloud, DeviceState(), history, candidates)

    success = math.nan
    if attack is None or attack["name"] == "backdoor":
        success = backdoor_success(scorer, task, *backdoor)
    return {"ndcg10": ndcg10(task, strategy, cloud), "backdoor": success}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="folder holding ml-100k/")
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds per run")
    parser.add_argument("--devices", type=int, default=50, help="devices per round")
    parser.add_argument("--pretrain", type=int, default=8, help="cloud pretraining epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="20%% attackers only, 3 rounds")
    parser.add_argument(
        "--shares", default=",".join(map(str, SHARES)), help="attacker shares, comma-separated"
    )
    # Grouped secure aggregation (simulation.secure_groups): every defence then sees only
    # this many group means per round, never an individual update (0: no secure aggregation).
    parser.add_argument("--secure-groups", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.devices, args.pretrain = 3, 30, 4
    torch.set_num_threads(args.threads)
    console = Console(width=160)
    started = time.perf_counter()
    log, source = load_log(args.data_dir, console)
    task = RecommendationTask(log, split_p1(log, args.seed), SHAPES)
    start = pretrain(task, args.pretrain, args.seed)
    start_ndcg10 = ndcg10(task, FedAvg(task, FedAvg.Config(private=())), start)
    trigger, target = backdoor_items(task, args.seed)
    attacks = attack_specs(args.devices, trigger, target)
    shares = (0.2,) if args.quick else tuple(float(x) for x in args.shares.split(","))
    if 0.2 not in shares:
        parser.error("--shares must include 0.2 (the headline's share)")
    console.print(
        f"{source}: {task.num_devices} devices, {task.num_items} items; pretrained NDCG@10 "
        f"{start_ndcg10:.4f}; backdoor trigger "
        f"{trigger} -> target {target}; {args.rounds} rounds x {args.devices} devices"
        + (f"; secure aggregation in {args.secure_groups} groups" if args.secure_groups else "")
    )
    clean = {
        name: run_cell(task, start, args, spec, None, 0.0, (trigger, target))
        for name, spec in DEFENCES.items()
    }
    cells: dict[tuple[str, str, float], dict[str, float]] = {}
    for share in shares:
        for attack_name, attack in attacks.items():
            for name, spec in DEFENCES.items():
                cells[name, attack_name, share] = run_cell(
                    task, start, args, spec, attack, share, (trigger, target)
                )
            console.print(f"{attack_name} at {share:.0%}: {time.perf_counter() - started:.0f}s")
    report(console, clean, cells, attacks, shares, time.perf_counter() - started, start_ndcg10)


def report(
    console: Console,
    clean: dict[str, dict[str, float]],
    cells: dict[tuple[str, str, float], dict[str, float]],
    attacks: dict[str, dict[str, Any]],
    shares: tuple[float, ...],
    seconds: float,
    start_ndcg10: float,
) -> None:
    """One table per attacker share (NDCG@10 drop; backdoor success), then the headline."""
    base = clean["mean"]["ndcg10"]
    table = Table(title=f"NDCG@10 by defence; clean undefended {base:.4f} ({seconds:.0f}s)")
    table.add_column("attack")
    table.add_column("share", justify="right")
    for name in DEFENCES:
        table.add_column(name, justify="right")
    table.add_row("none", "0%", *(f"{clean[n]['ndcg10']:.4f}" for n in DEFENCES))
    table.add_row("backdoor hit", "0%", *(f"{clean[n]['backdoor']:.1%}" for n in DEFENCES))
    for share in shares:
        for attack_name in attacks:
            row = [f"{cells[n, attack_name, share]['ndcg10']:.4f}" for n in DEFENCES]
            table.add_row(attack_name, f"{share:.0%}", *row)
            if attack_name == "backdoor":
                hits = [f"{cells[n, attack_name, share]['backdoor']:.1%}" for n in DEFENCES]
                table.add_row("backdoor hit", f"{share:.0%}", *hits)
    console.print(table)

    def worst_drop(name: str, share: float) -> float:
        return max(base - cells[name, a, share]["ndcg10"] for a in attacks)

    share = 0.2
    defended = {n: worst_drop(n, share) for n in DEFENCES if n != "mean"}
    best = min(defended, key=defended.__getitem__)
    # What the federated phase is worth: a defence that discarded every update would keep the
    # pretrained start, so the share of the clean gain kept is the finer measure.
    gain = base - start_ndcg10
    kept = {n: (gain - defended[n]) / gain if gain > 0 else math.nan for n in defended}
    console.print(
        f"federated gain over the pretrained start {start_ndcg10:.4f}: {gain:+.4f}; share of it "
        f"kept under the worst attack at {share:.0%}: "
        + ", ".join(f"{n} {kept[n]:.0%}" for n in sorted(kept, key=kept.__getitem__, reverse=True))
    )
    print(
        f"robustness: clean_ndcg10={base:.4f} "
        f"undefended_worst_drop_20={worst_drop('mean', share):.4f} "
        f"defended_worst_drop_20={defended[best]:.4f} best_aggregator={best} "
        f"backdoor_success_defended={cells[best, 'backdoor', share]['backdoor']:.4f}"
    )


if __name__ == "__main__":
    main()
