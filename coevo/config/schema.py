"""The run configuration: what ``coevo run CONFIG.yaml`` reads, validated with pydantic.

Strategies are listed by registry name with their own settings; each strategy's settings are
validated against that strategy's ``Config`` when the run is built.
"""

from __future__ import annotations

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
    # Strategies by registry name with their settings, e.g. {name: finetune, mode: head}.
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
    # vectorized: one vmapped call per block of devices; loop: one device at a time (reference).
    backend: Literal["vectorized", "loop"] = "vectorized"
    # Devices per vectorised block: larger is faster until memory runs short.
    block_size: int = Field(128, ge=1, le=1_000_000)
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
        return value
