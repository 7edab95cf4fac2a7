"""The run configuration: what ``coevo run CONFIG.yaml`` reads, validated with pydantic.

Strategies are listed by registry name with their own settings; each strategy's settings are
validated against that strategy's ``Config`` when the run is built.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from coevo.tasks.synthetic import SyntheticConfig

_FROZEN = ConfigDict(extra="forbid", frozen=True)


class DataConfig(BaseModel):
    model_config = _FROZEN
    # "synthetic" needs nothing on disk; "movielens-100k" reads DATA_DIR/ml-100k/.
    name: Literal["synthetic", "movielens-100k"] = "synthetic"
    # Folder with one sub-folder per dataset; falls back to $COEVO_DATA.
    data_dir: str | None = None
    # Knobs of the synthetic world (ignored for real data).
    synthetic: SyntheticConfig = SyntheticConfig()


class ProtocolConfig(BaseModel):
    model_config = _FROZEN
    # P1: every rating is a positive; P1+: only ratings >= 4 (fewer, cleaner positives).
    variant: Literal["P1", "P1+"] = "P1"
    # Sampled evaluation negatives per device; 99 makes numbers comparable with NCF-style papers.
    num_negatives: int = Field(99, ge=1, le=10_000)
    # Also rank every item (slower, but sampled metrics alone can reorder methods).
    full_ranking: bool = True


class DeviceModelConfig(BaseModel):
    model_config = _FROZEN
    # Embedding width: quality against on-device memory and FLOPs.
    dim: int = Field(32, ge=2, le=1024)
    # Recent items pooled into the user vector: longer is steadier, shorter reacts faster.
    history_len: int = Field(20, ge=1, le=1000)


class CloudModelConfig(BaseModel):
    model_config = _FROZEN
    # Embedding width of the cloud model.
    dim: int = Field(64, ge=2, le=4096)
    # Items of history the cloud model attends over (and a request carries up).
    history_len: int = Field(50, ge=2, le=2000)
    # Self-attention blocks: capacity against training time.
    layers: int = Field(2, ge=1, le=48)
    # Attention heads; must divide dim.
    heads: int = Field(2, ge=1, le=64)
    # Dropout during cloud training; regularises sparse data.
    dropout: float = Field(0.2, ge=0.0, lt=1.0)


class ModelsConfig(BaseModel):
    model_config = _FROZEN
    device: DeviceModelConfig = DeviceModelConfig()
    cloud: CloudModelConfig = CloudModelConfig()


class CodecSpec(BaseModel):
    """One codec of a chain, by name: fp16, int8 (per_channel), topk (fraction,
    error_feedback), clip (max_norm), gaussian (std: local DP noise)."""

    model_config = _FROZEN
    name: Literal["fp16", "int8", "topk", "clip", "gaussian"]
    # int8 only: one scale per output channel (more accurate, a few more bytes).
    per_channel: bool = False
    # topk only: share of entries sent per tensor.
    fraction: float = Field(0.1, gt=0, le=1)
    # topk only: carry what was not sent into the next round (per-device state).
    error_feedback: bool = True
    # clip only: the L2 bound C on one device's update.
    max_norm: float = Field(1.0, gt=0)
    # gaussian only: noise standard deviation added on the device (sigma * C for local DP).
    std: float = Field(0.0, ge=0)


class FleetConfig(BaseModel):
    model_config = _FROZEN
    # Tier shares (low_end_phone, mid_phone, flagship_phone, iot_camera, car, laptop); null
    # uses the default mix.
    mix: dict[str, float] | None = None
    # A CSV trace of real devices instead of a sampled mix (columns in coevo/fleet/profiles.py).
    trace: str | None = None
    # always: every device every round; diurnal: a nightly window in the device's time zone.
    availability: Literal["always", "diurnal"] = "always"
    # Hours per day a device is idle, charging and on Wi-Fi (diurnal only).
    window_h: float = Field(8.0, gt=0, le=24)
    # Chance a device that started a round drops out before reporting.
    dropout_rate: float = Field(0.0, ge=0, le=1)

    @field_validator("mix")
    @classmethod
    def _known_tiers(cls, mix: dict[str, float] | None) -> dict[str, float] | None:
        from coevo.fleet import TIERS

        for tier, weight in (mix or {}).items():
            if tier not in TIERS:
                raise ValueError(f"unknown tier {tier!r}; choose from {', '.join(sorted(TIERS))}")
            if weight < 0:
                raise ValueError(f"tier {tier!r} has a negative share {weight}")
        return mix


class EarlyStoppingConfig(BaseModel):
    model_config = _FROZEN
    # Rounds between validation checks (HR@10 on the validation targets).
    every: int = Field(5, ge=1)
    # Checks without improvement before the run stops.
    patience: int = Field(3, ge=1)


class SimulationConfig(BaseModel):
    model_config = _FROZEN
    # vectorized: blocks of devices trained together, step by step; loop: one device at a time
    # (the reference).
    backend: Literal["vectorized", "loop"] = "vectorized"
    # Devices per vectorised block: larger is faster until memory runs short.
    block_size: int = Field(128, ge=1, le=1_000_000)
    # Account every round as SecAgg+ (masked uplinks, key and share exchange, extra round trips).
    secure_aggregation: bool = False
    # With secure_aggregation and a robust strategy: SecAgg+ groups per round; the robust
    # aggregator combines the group means (at least 3; the cloud learns one sum per group).
    secure_groups: int = Field(1, ge=1, le=10_000)
    # Keep per-device state in memory-mapped files under the run folder (huge fleets).
    memory_map_state: bool = False
    # Devices merged per round (null: all); fewer is cheaper per round, noisier.
    devices_per_round: int | None = Field(None, ge=1)
    # Select this many times devices_per_round and keep the fastest (stragglers dropped).
    over_selection: float = Field(1.0, ge=1.0, le=10.0)
    # Virtual seconds after which a device's report is discarded (null: wait for all).
    deadline_s: float | None = Field(None, gt=0)
    # Simulated hardware, networks and availability (null: instant, always available).
    fleet: FleetConfig | None = None
    # Codecs applied in order to each device's uplink, and to the downlink.
    uplink_codecs: list[CodecSpec] = Field(default_factory=list)
    downlink_codecs: list[CodecSpec] = Field(default_factory=list)
    # Stop federated training when validation stops improving (null: run every round).
    early_stopping: EarlyStoppingConfig | None = None


class RunConfig(BaseModel):
    """One experiment: data, protocol, models, the strategies to compare and the seeds."""

    model_config = _FROZEN
    # Title of the report and prefix of the run folder.
    name: str = "run"
    # Each seed redraws the tie-break, the negatives and every initialisation.
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, max_length=100)
    data: DataConfig = DataConfig()
    protocol: ProtocolConfig = ProtocolConfig()
    models: ModelsConfig = ModelsConfig()
    # Strategies by registry name with their settings, e.g. {name: finetune, mode: head}; an
    # optional `label` names the results (to compare settings of one strategy).
    strategies: list[dict[str, Any]] = Field(
        default_factory=lambda: [
            {"name": "popularity"},
            {"name": "device_only"},
            {"name": "cloud_only"},
            {"name": "finetune"},
            {"name": "central_oracle"},
        ],
        min_length=1,
    )
    simulation: SimulationConfig = SimulationConfig()
    # Where run folders are created.
    output_dir: str = "runs"
    # Torch threads; 1 avoids oversubscription on small machines.
    threads: int = Field(1, ge=1, le=256)

    @field_validator("strategies")
    @classmethod
    def _named(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for spec in value:
            if not isinstance(spec.get("name"), str):
                raise ValueError("each strategy needs a 'name' (a registered strategy)")
            label = spec.get("label", spec["name"])
            if not isinstance(label, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", label):
                raise ValueError(
                    f"label {label!r}: 1 to 64 letters, digits, '_', '.' or '-' (it names "
                    "the strategy's results and files)"
                )
        labels = [spec.get("label", spec["name"]) for spec in value]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(
                f"strategies {repeated} appear more than once: give each a distinct 'label'"
            )
        return value
