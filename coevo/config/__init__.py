"""Configuration: pydantic schemas, YAML loading with dotted overrides, name registries."""

from coevo.config.loading import (
    ConfigError,
    apply_overrides,
    dump_config,
    load_config,
    load_yaml,
    parse,
)
from coevo.config.registry import Registry, UnknownNameError
from coevo.config.schema import (
    CloudModelConfig,
    CodecSpec,
    DataConfig,
    DeviceModelConfig,
    EarlyStoppingConfig,
    FleetConfig,
    ModelsConfig,
    ProtocolConfig,
    RunConfig,
    SimulationConfig,
)

__all__ = [
    "CloudModelConfig",
    "CodecSpec",
    "ConfigError",
    "DataConfig",
    "DeviceModelConfig",
    "EarlyStoppingConfig",
    "FleetConfig",
    "ModelsConfig",
    "ProtocolConfig",
    "Registry",
    "RunConfig",
    "SimulationConfig",
    "UnknownNameError",
    "apply_overrides",
    "dump_config",
    "load_config",
    "load_yaml",
    "parse",
]
