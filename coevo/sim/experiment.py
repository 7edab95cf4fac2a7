"""An experiment: a validated RunConfig in, a run folder and StrategyResults out."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from coevo.config import ConfigError, RunConfig, parse
from coevo.report import Callback, RunInfo, StrategyResult, to_plain
from coevo.sim.setup import EarlyStopping, build_codec, build_fleet
from coevo.sim.simulator import SimulationResult, simulate
from coevo.sim.wire import wire_bytes
from coevo.strategies import STRATEGIES, Strategy
from coevo.tasks.log import InteractionLog, describe
from coevo.tasks.movielens import load_movielens_100k
from coevo.tasks.protocol import split_p1
from coevo.tasks.recommendation import ModelShapes, RecommendationTask
from coevo.tasks.synthetic import make_world
from coevo.types import CloudState, DeviceState


def load_log(config: RunConfig, seed: int) -> InteractionLog:
    """The dataset a run names (the synthetic world is drawn from the run's first seed)."""
    if config.data.name == "movielens-100k":
        return load_movielens_100k(config.data.data_dir)
    return make_world(config.data.synthetic, seed)


def model_shapes(config: RunConfig) -> ModelShapes:
    device, cloud = config.models.device, config.models.cloud
    if cloud.dim % cloud.heads:
        raise ConfigError(
            [f"models.cloud.heads: {cloud.heads} does not divide models.cloud.dim={cloud.dim}"]
        )
    return ModelShapes(
        device_dim=device.dim,
        device_history=device.history_len,
        cloud_dim=cloud.dim,
        cloud_history=cloud.history_len,
        cloud_layers=cloud.layers,
        cloud_heads=cloud.heads,
        cloud_dropout=cloud.dropout,
    )


def strategy_configs(
    config: RunConfig, source: str = "config"
) -> list[tuple[type[Strategy], BaseModel]]:
    """Each listed strategy's class and validated settings; every problem reported at once."""
    built: list[tuple[type[Strategy], BaseModel]] = []
    problems: list[str] = []
    for index, spec in enumerate(config.strategies):
        try:
            cls = STRATEGIES.get(spec["name"])
        except LookupError as error:
            problems.append(f"{source}: strategies.{index}.name: {error}")
            continue
        settings = {k: v for k, v in spec.items() if k != "label"}
        try:
            built.append(
                (cls, parse(cls.Config, settings, source=source, prefix=f"strategies.{index}."))
            )
        except ConfigError as error:
            problems.extend(str(error).splitlines())
    if problems:
        raise ConfigError(problems)
    return built


def simulation_options(
    config: RunConfig, task: RecommendationTask, strategy: Strategy, seed: int
) -> dict[str, Any]:
    """Keyword arguments of ``simulate`` that the config's ``simulation`` section sets."""
    sim = config.simulation
    options: dict[str, Any] = {
        "backend": sim.backend,
        "block_size": sim.block_size,
        "secure_aggregation": sim.secure_aggregation,
        "secure_groups": sim.secure_groups,
        "devices_per_round": sim.devices_per_round,
        "over_selection": sim.over_selection,
        "deadline_s": sim.deadline_s,
        "fleet": build_fleet(sim.fleet, task.num_devices, seed),
        "uplink_codec": build_codec(sim.uplink_codecs),
        "downlink_codec": build_codec(sim.downlink_codecs),
    }
    if sim.early_stopping is not None and strategy.rounds > 1:

        def validate(cloud: CloudState, devices: DeviceState) -> float:
            def scorer(block, history, candidates):
                state = DeviceState({k: v[block] for k, v in devices.tensors.items()})
                return strategy.score(cloud, state, history, candidates)

            return task.evaluate(scorer, "val", full_ranking=False, seed=seed)[1]["hr@10"]

        options["stop"] = EarlyStopping(validate, sim.early_stopping)
    return options


def build_task(log: InteractionLog, config: RunConfig, seed: int) -> RecommendationTask:
    split = split_p1(
        log, seed, variant=config.protocol.variant, num_negatives=config.protocol.num_negatives
    )
    return RecommendationTask(log, split, model_shapes(config))


def run_dir_for(config: RunConfig) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", config.name).strip("-") or "run"
    return Path(config.output_dir) / f"{slug}-{stamp}"


def _cost(strategy: Strategy, sim: SimulationResult, facts: dict) -> dict[str, float]:
    """Mean bytes per device for training plus serving one request, and on-device size."""
    task = strategy.task
    bytes_up = sim.bytes_up.double().mean().item()
    bytes_down = sim.bytes_down.double().mean().item()
    if strategy.serving == "cloud" or strategy.asks_cloud:
        split = task.split
        history = split.history(split.target_rows("test"), task.shapes.cloud_history)
        candidates = split.candidates("test")
        lengths = (history != split.num_items).sum(1)
        sizes = {
            int(n): wire_bytes(
                strategy.request(history[i, history.shape[1] - int(n) :], candidates[i])
            )
            for n, i in zip(*np.unique(lengths.numpy(), return_index=True), strict=False)
        }
        bytes_up += float(np.mean([sizes[int(n)] for n in lengths]))
        bytes_down += wire_bytes(strategy.response(candidates[0]))
    if strategy.serving == "cloud":
        device = {"device_params": 0.0, "device_flops_per_prediction": 0.0}
    else:
        device = {
            "device_params": facts["device"]["params"],
            "device_flops_per_prediction": facts["device"]["flops_per_prediction"],
        }
        own = getattr(strategy, "device_flops", None)
        if own is not None:
            device["device_flops_per_prediction"] = float(own()["forward"])
    # Serving from the cloud asks once per prediction (one test prediction per device under
    # P1); an exchanging strategy asks once per round it takes part in.
    requests = 1.0 if strategy.serving == "cloud" or strategy.asks_cloud else 0.0
    if sim.requests is not None:
        requests += sim.requests.double().mean().item()
    return {
        "bytes_up_per_device": bytes_up,
        "bytes_down_per_device": bytes_down,
        "requests_per_device": requests,
        **device,
        "train_seconds": sim.train_seconds,
    }


def run(
    config: RunConfig,
    run_dir: Path,
    callbacks: Callback,
    *,
    log: InteractionLog | None = None,
) -> list[StrategyResult]:
    """Run every strategy of ``config`` for every seed; report through ``callbacks``."""
    torch.set_num_threads(config.threads)
    strategies = strategy_configs(config)
    log = log if log is not None else load_log(config, config.seeds[0])
    facts = {**describe(log), "protocol": config.protocol.variant, "seeds": list(config.seeds)}
    first_task = build_task(log, config, config.seeds[0])
    model_facts = first_task.model_facts()
    callbacks.on_run_start(
        RunInfo(
            run_dir=run_dir,
            config=to_plain(config.model_dump(mode="json")),
            dataset=facts,
            models=model_facts,
        )
    )
    results: list[StrategyResult] = []
    total = len(config.seeds) * len(strategies)
    for seed_index, seed in enumerate(config.seeds):
        task = first_task if seed_index == 0 else build_task(log, config, seed)
        for strategy_index, (cls, settings) in enumerate(strategies):
            strategy = cls(task, settings)
            named = config.strategies[strategy_index].get("label", strategy.name)
            rng = torch.Generator().manual_seed(seed)
            label = f"{named} (seed {seed})"

            flops = {"forward": 0.0, "backward": 0.0}

            def record(
                values: dict[str, float],
                name: str = named,
                s: int = seed,
                flops: dict[str, float] = flops,
            ) -> None:
                for part in flops:
                    flops[part] += values.get(f"device_flops_{part}", 0.0)
                callbacks.on_round_end({"strategy": name, "seed": s, **values})

            on_round: Callable[[dict[str, float]], None] = record
            accountant = getattr(strategy, "accountant", None)
            spent = None
            if accountant is not None:
                from coevo.privacy.callback import with_epsilon

                spent = accountant(config.simulation.devices_per_round)
                on_round = with_epsilon(record, spent)

            def progress(done: int, of: int, label: str = label) -> None:
                callbacks.on_progress(label, done, of)

            started = time.perf_counter()
            sim = simulate(
                strategy,
                rng,
                on_round=on_round,
                on_progress=progress,
                **simulation_options(config, task, strategy, seed),
                device_state_dir=(
                    str(run_dir / "device_state" / f"{named}-{seed}")
                    if config.simulation.memory_map_state
                    else None
                ),
            )

            def scorer(devices, history, candidates, sim=sim, strategy=strategy):
                block = {k: v[devices] for k, v in sim.devices.tensors.items()}
                return strategy.score(sim.cloud, type(sim.devices)(block), history, candidates)

            per_device, summary = task.evaluate(
                scorer, "test", full_ranking=config.protocol.full_ranking, seed=seed
            )
            _, val = task.evaluate(scorer, "val", full_ranking=False, seed=seed)
            summary["val_hr@10"] = val["hr@10"]
            if spent is not None:
                summary["epsilon"] = spent.epsilon(sim.rounds)
            callbacks.on_round_end(
                {"strategy": named, "seed": seed, "phase": "evaluate", **summary}
            )
            result = StrategyResult(
                strategy=named,
                seed=seed,
                metrics=summary,
                per_device={k: v.numpy() for k, v in per_device.items()},
                group=task.split.group.numpy(),
                cost=_cost(strategy, sim, model_facts)
                | {
                    "device_train_flops_forward": flops["forward"] / task.num_devices,
                    "device_train_flops_backward": flops["backward"] / task.num_devices,
                    "seconds": time.perf_counter() - started,
                },
                note=strategy.note,
            )
            results.append(result)
            callbacks.on_strategy_end(result)
            callbacks.on_progress("run", seed_index * len(strategies) + strategy_index + 1, total)
    callbacks.on_run_end(results)
    return results
