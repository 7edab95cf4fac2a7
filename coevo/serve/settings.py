"""What ``coevo serve CONFIG`` reads: a run config (one strategy) plus a ``serve:`` section.

The run part is the same ``RunConfig`` a simulation reads (data, models, the strategy and its
settings, ``simulation.devices_per_round``, ``over_selection`` and the codecs), so a served
strategy is configured exactly as a simulated one; the ``serve`` part holds what only a real
server has: address, database file, wall-clock deadlines and input limits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from coevo.codecs import Codec
from coevo.config import ConfigError, RunConfig, apply_overrides, load_yaml, parse
from coevo.strategies import Strategy
from coevo.tasks.recommendation import RecommendationTask


class SecAggSettings(BaseModel):
    """The ``serve.secagg`` section: rounds run SecAgg+ (``coevo.codecs.secagg``), so the
    server only ever holds masked vectors and the unmasked sum."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Largest |value| of an update times its merge weight (num_examples); larger is clamped.
    clip_range: float = Field(1024.0, gt=0)
    # Fixed-point fractional bits: values are exact to 2^-scale_bits.
    scale_bits: int = Field(24, ge=1, le=48)
    # The ring Z_2^ring_bits the masked vectors live in.
    ring_bits: Literal[32, 64] = 64
    # Neighbours per device; None picks the smallest degree that survives `dropout`.
    degree: int | None = Field(None, ge=1)
    # Share of devices expected to drop out, for choosing the degree (< 0.5).
    dropout: float = Field(0.3, ge=0.0, lt=0.5)
    # Seconds each protocol phase waits for the devices still in; then it goes on without
    # the missing ones (they count as dropped).
    phase_timeout_s: float = Field(30.0, gt=0, le=86_400)
    # Independent SecAgg+ sessions per round: the devices of a round are split into `groups`
    # (each block of `groups` joiners spread over them in a random order); the server learns
    # only each group's sum, never one device's update, and the strategy merges the group
    # means, so a robust aggregator (`name: robust`) combines them. More groups: stronger
    # robustness, but each sum hides only ~capacity / groups devices (at least 2 per group).
    groups: int = Field(1, ge=1, le=10_000)


class ServeSettings(BaseModel):
    """The ``serve:`` section of a serve config."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Address uvicorn binds; 127.0.0.1 keeps the server off the network.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Seconds an idle keep-alive connection stays open; devices that pause between requests
    # (training) reconnect less often with more, at the price of idle sockets.
    keep_alive_s: float = Field(5.0, gt=0, le=3600)
    # SQLite file holding devices, rounds, updates and model versions (WAL mode).
    database: str = "coevo-serve.sqlite"
    # Wall seconds after a round's first assignment; then it merges with >= min_quorum reports.
    round_deadline_s: float | None = Field(None, gt=0)
    # Fewest reports a round merges after its deadline; below it the round waits for more.
    min_quorum: int = Field(1, ge=1)
    # Seconds a device is told to wait before checking in again (pace steering).
    retry_after_s: float = Field(1.0, gt=0, le=86_400)
    # Largest upload body accepted (413 above it).
    max_body_bytes: int = Field(16 << 20, ge=1024, le=1 << 32)
    # Largest L2 norm of a decoded update; larger updates are refused as hostile or broken.
    max_update_norm: float = Field(1e4, gt=0)
    # Largest merge weight (training rows) one update may claim.
    max_examples: int = Field(1_000_000, ge=1)
    # Most candidates one cloud inference request may score.
    max_candidates: int = Field(1000, ge=1, le=1_000_000)
    # Secure aggregation of every round's updates (synchronous FedAvg-family strategies).
    secagg: SecAggSettings | None = None


class ServeConfig(BaseModel):
    """A run config plus its serve section, as one validated object."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    run: RunConfig
    serve: ServeSettings = ServeSettings()

    def fingerprint(self) -> str:
        """The run part as canonical JSON: a server refuses a database made for another one."""
        return json.dumps(self.run.model_dump(mode="json"), sort_keys=True)


def parse_serve_config(data: dict[str, Any], source: str = "config") -> ServeConfig:
    """Validate a serve config dictionary; every problem is reported with its dotted field."""
    data = dict(data)
    serve = parse(ServeSettings, data.pop("serve", None) or {}, source=source, prefix="serve.")
    run = parse(RunConfig, data, source=source)
    if len(run.strategies) != 1:
        raise ConfigError(
            [f"{source}: strategies: a server runs exactly one strategy, got {len(run.strategies)}"]
        )
    return ServeConfig(run=run, serve=serve)


def load_serve_config(path: str | Path, overrides: list[str] | None = None) -> ServeConfig:
    data = apply_overrides(load_yaml(path), overrides or [])
    return parse_serve_config(data, source=str(path))


@dataclass(frozen=True)
class Service:
    """What both sides build from one run config: task, strategy, codecs and the seed."""

    task: RecommendationTask
    strategy: Strategy
    seed: int
    uplink_codec: Codec | None
    downlink_codec: Codec | None


def build_service(run: RunConfig, data_dir: str | None = None) -> Service:
    """The task (data of every device), strategy and codecs a run config describes.

    The device runtime calls this too, with the config the server hands out, so that both
    sides build the same model shapes, batches and codecs.
    """
    from coevo.sim.experiment import build_task, load_log, strategy_configs
    from coevo.sim.setup import build_codec

    if data_dir is not None:
        run = run.model_copy(update={"data": run.data.model_copy(update={"data_dir": data_dir})})
    seed = run.seeds[0]
    task = build_task(load_log(run, seed), run, seed)
    (cls, settings), *_ = strategy_configs(run)
    return Service(
        task=task,
        strategy=cls(task, settings),
        seed=seed,
        uplink_codec=build_codec(run.simulation.uplink_codecs),
        downlink_codec=build_codec(run.simulation.downlink_codecs),
    )
