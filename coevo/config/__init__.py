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
    DataConfig,
    DeviceModelConfig,
    ModelsConfig,
    ProtocolConfig,
    RunConfig,
)

__all__ = [
    "CloudModelConfig",
    "ConfigError",
    "DataConfig",
    "DeviceModelConfig",
    "ModelsConfig",
    "ProtocolConfig",
    "Registry",
    "RunConfig",
    "UnknownNameError",
    "apply_overrides",
    "dump_config",
    "load_config",
    "load_yaml",
    "parse",
]
