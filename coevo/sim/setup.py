"""Build the simulator's parts from a validated config: fleet, codecs, early stopping."""

from __future__ import annotations

from collections.abc import Callable

import torch

from coevo.codecs import Chain, ClipNorm, Codec, Float16, GaussianNoise, Int8, TopK
from coevo.config import CodecSpec, ConfigError, EarlyStoppingConfig, FleetConfig
from coevo.fleet import always_available, diurnal_availability, load_trace, sample_profiles
from coevo.sim.clock import Fleet
from coevo.types import CloudState, DeviceState


def build_codec(specs: list[CodecSpec]) -> Codec | None:
    """The chain a config lists, or None for an empty list (payloads sent as they are)."""
    codecs: list[Codec] = []
    for spec in specs:
        if spec.name == "fp16":
            codecs.append(Float16())
        elif spec.name == "int8":
            codecs.append(Int8(per_channel=spec.per_channel))
        elif spec.name == "clip":
            codecs.append(ClipNorm(spec.max_norm))
        elif spec.name == "gaussian":
            codecs.append(GaussianNoise(spec.std))
        else:
            codecs.append(TopK(spec.fraction, error_feedback=spec.error_feedback))
    if not codecs:
        return None
    return codecs[0] if len(codecs) == 1 else Chain(codecs)


def build_fleet(config: FleetConfig | None, num_devices: int, seed: int) -> Fleet | None:
    if config is None:
        return None
    if config.trace is not None:
        profiles = load_trace(config.trace)
        if len(profiles) != num_devices:
            raise ConfigError(
                [f"simulation.fleet.trace: {len(profiles)} devices, the task has {num_devices}"]
            )
    else:
        try:
            profiles = sample_profiles(num_devices, config.mix, seed)
        except ValueError as error:
            raise ConfigError([f"simulation.fleet.mix: {error}"]) from None
    if config.availability == "diurnal":
        availability = diurnal_availability(
            num_devices, seed, window_h=config.window_h, dropout_rate=config.dropout_rate
        )
    elif profiles.availability is not None:
        availability = profiles.availability
    else:
        availability = always_available(num_devices, dropout_rate=config.dropout_rate)
    return Fleet(profiles, availability)


class EarlyStopping:
    """Stop when a validation score has not improved for ``patience`` checks.

    Args:
        validate: ``validate(cloud, devices) -> score`` (higher is better).
        config: how often to check and how long to wait.
    """

    def __init__(
        self, validate: Callable[[CloudState, DeviceState], float], config: EarlyStoppingConfig
    ) -> None:
        self.validate = validate
        self.config = config
        self.best = -float("inf")
        self.stale = 0
        self.history: list[tuple[int, float]] = []

    def __call__(self, round: int, cloud: CloudState, devices: DeviceState) -> bool:
        if (round + 1) % self.config.every:
            return False
        with torch.no_grad():
            score = self.validate(cloud, devices)
        self.history.append((round, score))
        if score > self.best:
            self.best, self.stale = score, 0
        else:
            self.stale += 1
        return self.stale >= self.config.patience
