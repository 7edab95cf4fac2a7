"""DP-FedAvg: user-level differential privacy around any strategy's merge.

McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent Language Models",
ICLR 2018. Device: runs the wrapped strategy's ``local`` and clips its whole uplink to L2 norm
C (``ClipNorm``); with ``noise_at="device"`` it also adds N(0, (σC)²/n) (secure aggregation
then hides everything but the sum, which carries σC). Cloud: the weights are capped (each device
counts at most ``weight_cap``), Gaussian noise of std σ·C·cap is added once to the weighted sum
(``noise_at="cloud"``), and the wrapped strategy merges as usual. Wire: the wrapped strategy's,
clipped (and noised on the device in the device variant); bytes do not change.

The noise vector z reaches the merge as ``z / Σw`` added to every uplink: a weighted mean then
yields ``mean + z / Σw`` (noise σC·cap on the sum), and any aggregator that commutes with a
common shift (median, trimmed mean, Krum) yields its own result plus ``z / Σw``; wrap a
``Robust`` strategy, not the reverse. The (ε, δ) of ``PrivacyAccountant`` covers the noised
weighted sum (sensitivity C·cap to one device); the cohort's total weight it is divided by is
treated as public, as most deployments do (McMahan et al. divide by a fixed expected total).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, Field, model_validator

from coevo.aggregators.wrapper import StrategyWrapper, WrapperSettings, spec_of
from coevo.codecs.clip import clip_update, update_norm
from coevo.codecs.gaussian import GaussianNoise, device_share_std, gaussian_noise, mix64
from coevo.privacy.accountant import PrivacyAccountant
from coevo.strategies.base import DeviceBatch, Strategy
from coevo.types import CloudState, DeviceState, Metrics, Payload

STATE_PREFIX = "dp/"
_KEY, _ROUND = f"{STATE_PREFIX}key", f"{STATE_PREFIX}round"
_DEVICE_SALT = 0x5DEECE66D
"""Separates the devices' noise keys from the cloud's, which start from the same seed."""


class DPFedAvgConfig(WrapperSettings):
    name: Literal["dp_fedavg"] = "dp_fedavg"
    # C: every device's uplink is clipped to this L2 norm; smaller is more private per unit of
    # noise but biases large updates.
    clip_norm: float = Field(1.0, gt=0)
    # σ: noise std on the round's sum over C; larger is more private and noisier.
    noise_multiplier: float = Field(1.0, ge=0)
    # The most one device's weight can be (its training rows otherwise); 1 weighs devices equally.
    weight_cap: float = Field(1.0, gt=0)
    # cloud: noise added once to the sum; device: split over devices (with secure aggregation).
    noise_at: Literal["cloud", "device"] = "cloud"
    # Devices per round n over which the device variant splits the noise (σC/√n each).
    devices_per_round: int | None = Field(None, ge=1)
    # Seed of the noise (runs are reproducible); the device variant derives each device's key.
    seed: int = 0
    # δ of the reported (ε, δ); null: 1 / num_devices.
    delta: float | None = Field(None, gt=0, lt=1)

    @model_validator(mode="after")
    def _consistent(self) -> DPFedAvgConfig:
        if self.noise_multiplier > 0 and math.isinf(self.clip_norm):
            raise ValueError("clip_norm must be finite when noise_multiplier > 0")
        if self.noise_multiplier > 0 and math.isinf(self.weight_cap):
            raise ValueError("weight_cap must be finite when noise_multiplier > 0")
        if self.noise_at == "device":
            if self.devices_per_round is None:
                raise ValueError("noise_at='device' needs devices_per_round (n in σC/√n)")
            if self.weight_cap != 1.0:
                raise ValueError("noise_at='device' weighs devices equally: weight_cap must be 1")
        return self


class DPFedAvg(StrategyWrapper):
    """Any strategy with user-level DP: clipped uplinks, Gaussian noise σC on the round's sum.

    Example:
        >>> from coevo.strategies import FedAvg
        >>> from coevo.testing import tiny_task
        >>> strategy = DPFedAvg.wrap(FedAvg(tiny_task()), clip_norm=0.5, noise_multiplier=1.1)
        >>> strategy.settings.noise_multiplier
        1.1
    """

    name = "dp_fedavg"
    Config: ClassVar[type[BaseModel]] = DPFedAvgConfig

    def __init__(self, task: Any, config: Any = None, *, inner: Strategy | None = None) -> None:
        super().__init__(task, config, inner=inner)
        if getattr(self.inner, "asynchronous", False):
            raise ValueError(f"DPFedAvg wraps synchronous strategies, not {self.inner.name!r}")

    @classmethod
    def wrap(cls, inner: Strategy, **settings: Any) -> DPFedAvg:
        """``inner`` made private with ``settings`` (fields of ``DPFedAvgConfig``)."""
        config = DPFedAvgConfig(**settings).model_copy(update={"inner": spec_of(inner)})
        return cls(inner.task, config, inner=inner)

    def accountant(self, devices_per_round: int | None) -> PrivacyAccountant:
        """The (ε, δ) accountant of this run: q = devices_per_round / num_devices (1 if None)."""
        num_devices = self.task.num_devices
        per_round = (
            num_devices if devices_per_round is None else min(devices_per_round, num_devices)
        )
        delta = self.settings.delta if self.settings.delta is not None else 1.0 / num_devices
        return PrivacyAccountant(self.settings.noise_multiplier, per_round / num_devices, delta)

    @property
    def device_noise(self) -> GaussianNoise | None:
        """The device variant's noise codec (std σC/√n), or None when the cloud adds the noise."""
        s = self.settings
        if s.noise_at != "device" or s.noise_multiplier == 0:
            return None
        std = device_share_std(s.noise_multiplier, s.clip_norm, s.devices_per_round)
        return GaussianNoise(std)

    def init(self, rng: torch.Generator) -> CloudState:
        cloud = self.inner.init(rng)
        key = mix64(torch.tensor(self.settings.seed, dtype=torch.int64))
        return cloud.with_tensors(**{_KEY: key, _ROUND: torch.zeros((), dtype=torch.int64)})

    def init_devices(self, cloud: CloudState, num_devices: int) -> DeviceState:
        devices = self.inner.init_devices(cloud, num_devices)
        if self.device_noise is None:
            return devices
        ids = torch.arange(num_devices, dtype=torch.int64)
        keys = mix64(mix64(cloud[_KEY] ^ _DEVICE_SALT) + ids)
        rounds = torch.zeros(num_devices, dtype=torch.int64)
        return devices.with_tensors(**{_KEY: keys, _ROUND: rounds})

    def local(
        self, payload: Payload, device_state: DeviceState, batch: DeviceBatch
    ) -> tuple[Payload, DeviceState, Metrics]:
        own = {k: v for k, v in device_state.tensors.items() if not k.startswith(STATE_PREFIX)}
        up, new_state, metrics = self.inner.local(payload, DeviceState(own), batch)
        norm = update_norm(up.tensors)
        clipped = clip_update(up.tensors, self.settings.clip_norm)
        noise = self.device_noise
        if noise is not None:
            state = {"key": device_state[_KEY], "round": device_state[_ROUND]}
            clipped, state = noise.encode(clipped, state)
            new_state = new_state.with_tensors(**{_KEY: state["key"], _ROUND: state["round"]})
        metrics = {**metrics, "update_norm": norm.to(torch.float32)}
        return Payload(clipped, up.metrics, up.config), new_state, metrics

    def merge(self, cloud: CloudState, uplinks: Payload, weights: torch.Tensor) -> CloudState:
        s = self.settings
        capped = weights.clamp(max=s.weight_cap)
        tensors = dict(uplinks.tensors)
        if s.noise_at == "cloud" and s.noise_multiplier > 0:
            template = {k: v[0] for k, v in tensors.items()}
            key = mix64(cloud[_KEY] ^ cloud[_ROUND])
            std = s.noise_multiplier * s.clip_norm * s.weight_cap
            noise = gaussian_noise(template, std, key)
            total = capped.sum().clamp(min=1e-12)
            tensors = {
                k: v + (noise[k] / total).to(v.dtype) if k in noise else v
                for k, v in tensors.items()
            }
        own = {k: v for k, v in cloud.tensors.items() if not k.startswith(STATE_PREFIX)}
        noisy = Payload(tensors, uplinks.metrics)
        merged = self.inner.merge(cloud.replace(tensors=own), noisy, capped)
        return merged.with_tensors(**{_KEY: cloud[_KEY], _ROUND: cloud[_ROUND] + 1})
