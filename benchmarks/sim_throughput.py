"""Simulator throughput on a fixed reference workload: vectorised against loop backend.

Run: ``python benchmarks/sim_throughput.py [--data-dir DIR] [--rounds 30] [--threads 1,2]``.

The workload, defined so that other systems can be measured on it:

- data: MovieLens-100K; one device per user (943); label ``rating >= 4``; each user's ratings
  sorted by (timestamp, item id), the first ``floor(0.8 n)`` train, the rest test;
- model: ``concat(Embedding(1682, 16)[item], side[49]) -> Linear(65, 32) -> ReLU ->
  Linear(32, 1)`` (29,057 parameters), side = age bucket (7), gender (2), occupation (21)
  one-hots and the item's 19 genre flags; PyTorch default init after ``torch.manual_seed(0)``;
- training: FedAvg weighted by training rows, 30 rounds, 100 devices a round drawn as
  ``sorted(rng.choice(943, 100, replace=False))`` from ``rng = numpy.random.default_rng(42)``;
  on each device 1 epoch of plain SGD (lr 1.0, batch 32) on BCE with logits;
- quality: global test AUC about 0.632 and mean per-user AUC about 0.60 after 30 rounds.

Row order: round ``r`` shuffles device ``c``'s rows with
``numpy.random.default_rng([1234, r, c]).permutation(n)``, exactly as the spec says, through
the simulator's ``shuffle`` hook (``SpecShuffle``: drawn before the rounds, like the
cohorts, and the same for both backends). ``--hash-shuffle`` uses the simulator's built-in
counter-based hash instead, for comparison.

ups = device updates (selected devices x rounds) per second of wall time spent in the rounds,
excluding data loading and evaluation; each backend first runs one untimed warm-up round, then
``--repeats`` timed runs (5), of which the fastest counts. Both backends run in one process with
the same seeds, each with 1 and with 2 torch threads (the 2 cores the bar names), and each is
reported at its faster setting.

The two backends run the same ``local_train``: the vectorised one trains each round's cohort
as one step-major block (the 100 devices' steps batched, each device leaving the batch once its
rows are done) and, as the CTR loss stacks, takes every batched step as one forward and one
autograd backward pass over the stacked weights; the loop backend runs ``local`` device by
device, each step with ``torch.func.grad``.

For context the table also has ``plain_torch``: the same workload as a plain per-device PyTorch
loop (``nn.Module`` + ``torch.optim.SGD``, the same row order), which is what a Flower-style
client runs. It is not a coevo backend and not in the headline: the ``loop`` backend (the
functional reference the vectorised backend is tested against) costs about twice the plain
loop per step.
The last line is machine-readable: ``sim_throughput: vectorized_ups=... loop_ups=... ratio=...
auc_vectorized=... auc_loop=... peak_rss_mib=...``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Literal

import numpy as np
import torch

from coevo.sim.simulator import simulate
from coevo.strategies.fedavg import FedAvg
from coevo.strategies.local_training import LocalTraining
from coevo.tasks.ctr import RatingCTRTask
from coevo.tasks.movielens import load_movielens_100k
from coevo.tasks.recommendation import state_of
from coevo.types import CloudState

BACKENDS: tuple[Literal["vectorized", "loop"], ...] = ("vectorized", "loop")
DEVICES_PER_ROUND = 100


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kibibytes, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def cohorts(num_devices: int, rounds: int) -> list[torch.Tensor]:
    """The spec's device sample of every round, drawn once so both backends see the same."""
    rng = np.random.default_rng(42)
    return [
        torch.tensor(sorted(rng.choice(num_devices, DEVICES_PER_ROUND, replace=False).tolist()))
        for _ in range(rounds)
    ]


class SpecShuffle:
    """The spec's row order: in round ``r`` device ``c`` visits its ``n`` training rows in the
    order ``numpy.random.default_rng([1234, r, c]).permutation(n)`` (one epoch).

    Like the cohorts, the permutations of the sampled devices are drawn before the rounds, so
    that neither backend's timing includes numpy's generator setup (about 20 us a device).
    """

    def __init__(self, selected: list[torch.Tensor], counts: torch.Tensor) -> None:
        self.keys = {
            (round, device): np.argsort(
                np.random.default_rng([1234, round, device]).permutation(int(counts[device]))
            )
            for round, cohort in enumerate(selected)
            for device in cohort.tolist()
        }

    def __call__(
        self, devices: torch.Tensor, counts: torch.Tensor, round: int, epoch: int
    ) -> torch.Tensor:
        keys = [self.keys[round, device] for device in devices.tolist()]
        return torch.from_numpy(np.concatenate(keys)) if keys else torch.zeros(0, dtype=torch.long)


def run_backend(
    task: RatingCTRTask,
    backend: Literal["vectorized", "loop"],
    rounds: int,
    block_size: int,
    *,
    evaluate: bool = True,
    hash_shuffle: bool = False,
) -> dict[str, float]:
    """Train the reference workload with ``backend``; wall time covers the rounds only."""
    config = FedAvg.Config.model_validate(
        {
            "rounds": rounds,
            "server_lr": 1.0,
            "private": [],
            "local": LocalTraining(epochs=1, lr=1.0, batch_size=32, optimizer="sgd"),
        }
    )
    torch.manual_seed(0)
    initial = CloudState(state_of(task.device_model()))
    selected = cohorts(task.num_devices, rounds)
    _, offsets = task.device_rows("device")
    shuffle = None if hash_shuffle else SpecShuffle(selected, offsets[1:] - offsets[:-1])
    strategy = FedAvg(task, config)
    started = time.perf_counter()
    result = simulate(
        strategy,
        torch.Generator().manual_seed(0),
        backend=backend,
        block_size=block_size,
        cloud=initial,
        select=lambda round: selected[round],
        shuffle=shuffle,
    )
    wall_s = time.perf_counter() - started
    updates = sum(len(cohort) for cohort in selected)
    metrics = task.evaluate(dict(result.cloud.tensors)) if evaluate else {}
    return {"wall_s": wall_s, "ups": updates / wall_s, **metrics}


def run_plain_torch(task: RatingCTRTask, rounds: int, *, evaluate: bool = True) -> dict[str, float]:
    """The same workload as a plain per-device PyTorch loop, outside the simulator.

    What a straightforward federated client does (and what Flower-style simulators run per
    client): load the global weights into an ``nn.Module``, iterate the device's rows in the
    spec's order in batches of 32 with ``torch.optim.SGD`` on ``BCEWithLogitsLoss``, send the
    new weights; the server averages them weighted by training rows. No codecs, no byte
    accounting, no virtual clock: a lower bound on what one Python call per device costs.
    """
    torch.manual_seed(0)
    model = task.device_model()
    global_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    selected = cohorts(task.num_devices, rounds)
    rows, offsets = task.device_rows("device")
    counts = offsets[1:] - offsets[:-1]
    shuffle = SpecShuffle(selected, counts)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    started = time.perf_counter()
    for round, cohort in enumerate(selected):
        total = {k: torch.zeros_like(v) for k, v in global_weights.items()}
        weight_sum = 0
        for device in cohort.tolist():
            model.load_state_dict(global_weights)
            optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
            start, end = int(offsets[device]), int(offsets[device + 1])
            order = torch.argsort(shuffle(torch.tensor([device]), counts, round, 0))
            data = task.gather(rows[start:end][order])
            for batch in range(0, end - start, 32):
                part = slice(batch, batch + 32)
                optimizer.zero_grad()
                loss = loss_fn(model(data["item"][part], data["side"][part]), data["label"][part])
                loss.backward()
                optimizer.step()
            for k, v in model.state_dict().items():
                total[k] += (end - start) * v
            weight_sum += end - start
        global_weights = {k: v / weight_sum for k, v in total.items()}
    wall_s = time.perf_counter() - started
    updates = sum(len(cohort) for cohort in selected)
    metrics = task.evaluate(global_weights) if evaluate else {}
    return {"wall_s": wall_s, "ups": updates / wall_s, **metrics}


def _fastest(repeats: int, run: Callable[[], dict[str, float]]) -> dict[str, float]:
    """The fastest of ``repeats`` identical runs (same seeds, so the same model each time)."""
    return min((run() for _ in range(repeats)), key=lambda r: r["wall_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="folder holding ml-100k/ (or $COEVO_DATA)")
    parser.add_argument("--rounds", type=int, default=30)
    # Every timed run is repeated and the fastest kept, for every backend alike: the
    # machines are noisy, and a vectorised run of 30 rounds lasts under a second.
    parser.add_argument("--repeats", type=int, default=5)
    # Most devices per vectorised block (the cohort of 100 is one block by default).
    parser.add_argument("--block-size", type=int, default=128)
    # Each backend runs with each of these thread counts; each is reported at its best (the
    # loop is fastest on one thread, the vectorised backend can use both cores).
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument(
        "--hash-shuffle", action="store_true", help="coevo's built-in row order, not the spec's"
    )
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    task = RatingCTRTask.from_log(load_movielens_100k(args.data_dir))
    runs: dict[tuple[str, int], dict[str, float]] = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for backend in BACKENDS:
            # One untimed round first, so that one-off costs (lazy kernel loading, the first
            # functorch trace, the allocator's first large blocks) fall on no timed run.
            options = {"hash_shuffle": args.hash_shuffle}
            run_backend(task, backend, 1, args.block_size, evaluate=False, **options)
            timed = partial(run_backend, task, backend, args.rounds, args.block_size, **options)
            runs[(backend, threads)] = _fastest(args.repeats, timed)
        if not args.hash_shuffle:
            run_plain_torch(task, 1, evaluate=False)
            by_hand = partial(run_plain_torch, task, args.rounds)
            runs[("plain_torch", threads)] = _fastest(args.repeats, by_hand)
    print(
        f"{'backend':<11} {'threads':>7} {'rounds':>6} {'wall_s':>8} {'ups':>8} {'auc':>7} "
        f"{'user_auc':>8}"
    )
    for (backend, threads), row in runs.items():
        print(
            f"{backend:<11} {threads:>7} {args.rounds:>6} {row['wall_s']:>8.2f} "
            f"{row['ups']:>8.1f} {row['auc']:>7.4f} {row['user_auc']:>8.4f}"
        )
    best = {
        backend: max((r for (b, _), r in runs.items() if b == backend), key=lambda r: r["ups"])
        for backend in BACKENDS
    }
    vectorized, loop = best["vectorized"], best["loop"]
    plain = [r for (b, _), r in runs.items() if b == "plain_torch"]
    if plain:
        fastest = max(plain, key=lambda r: r["ups"])
        print(
            f"plain PyTorch per-device loop (context, not a coevo backend): "
            f"ups={fastest['ups']:.1f} auc={fastest['auc']:.4f}; "
            f"vectorized is {vectorized['ups'] / fastest['ups']:.2f}x it"
        )
    print(
        f"block_size={args.block_size} "
        f"test_rows={loop['test_rows']} user_auc_users={loop['user_auc_users']} "
        f"gauc_row_weighted={loop['gauc']:.4f}; each backend at its best thread count"
    )
    print(
        "row order: "
        + ("coevo's counter-based hash" if args.hash_shuffle else "the spec's numpy permutation")
    )
    print(
        f"sim_throughput: vectorized_ups={vectorized['ups']:.1f} loop_ups={loop['ups']:.1f} "
        f"ratio={vectorized['ups'] / loop['ups']:.2f} auc_vectorized={vectorized['auc']:.4f} "
        f"auc_loop={loop['auc']:.4f} peak_rss_mib={_peak_rss_mib():.0f}"
    )


if __name__ == "__main__":
    main()
