"""Gaussian noise: local differential privacy on the device, and the cloud's DP-FedAvg noise.

On the device, ``GaussianNoise`` adds N(0, std²) to every floating value of an (already
clipped) update before it leaves; the cloud decodes the noisy update as it is. The same
generator, ``gaussian_noise``, gives the cloud-side noise of user-level DP-FedAvg: σ·C once per
round on the sum of clipped updates, or σ·C/√n on each of n devices (``device_share_std``) when
secure aggregation hides the individual updates and only their sum is ever seen.

The noise comes from a counter-based generator written in integer tensor ops (SplitMix64 over
the key, the round and each value's position, then Box–Muller), so ``encode`` stays a pure
function of its inputs and state that ``torch.func.vmap`` can run over a cohort.

References:
    Dwork and Roth, "The Algorithmic Foundations of Differential Privacy", 2014 (Gaussian
    mechanism). McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent
    Language Models", ICLR 2018 (DP-FedAvg). Steele, Lea and Flood, "Fast Splittable
    Pseudorandom Number Generators", OOPSLA 2014 (SplitMix64).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from coevo.codecs.base import Codec, Tensors


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_BITS_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: Tensor) -> Tensor:
    """SplitMix64's finaliser on int64 tensors: a bijective, well-mixed hash of 64 bits."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def _name_salt(name: str) -> int:
    """A fixed 63-bit number per tensor name, so that tensors draw from disjoint streams."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1


def standard_normal(
    key: Tensor,
    shape: torch.Size | tuple[int, ...],
    salt: int = 0,
    device: torch.device | None = None,
) -> Tensor:
    """float64 N(0, 1) draws of ``shape`` on ``device``: a pure function of ``key`` and ``salt``."""
    count = math.prod(shape)
    counters = torch.arange(count, dtype=torch.int64, device=device) * 2 + salt
    base = mix64(key.to(torch.int64))
    first = mix64(base + counters)
    second = mix64(base + counters + 1)
    scale = 2.0**-53
    uniform_open = (_shift_right(first, 11).double() + 1.0) * scale  # in (0, 1]
    angle = _shift_right(second, 11).double() * scale
    normal = torch.sqrt(-2.0 * torch.log(uniform_open)) * torch.cos(2.0 * math.pi * angle)
    return normal.reshape(shape)


def content_hash(tensors: Mapping[str, Tensor]) -> Tensor:
    """An int64 hash of the bits of every floating tensor (0 when there is none)."""
    total = torch.zeros((), dtype=torch.int64)
    for name, tensor in sorted(tensors.items()):
        if not tensor.is_floating_point():
            continue
        bits = tensor.contiguous().view(_BITS_OF[tensor.element_size()]).to(torch.int64)
        positions = torch.arange(bits.numel(), dtype=torch.int64, device=bits.device)
        total = total + mix64(bits.reshape(-1) ^ (positions + _name_salt(name))).sum()
    return total


def gaussian_noise(template: Mapping[str, Tensor], std: float, key: Tensor) -> Tensors:
    """N(0, std²) noise shaped like each floating tensor of ``template``, drawn from ``key``.

    Args:
        template: the tensors to draw noise for (only names, shapes and dtypes are read).
        std: standard deviation of every value, ≥ 0.
        key: an int64 0-d tensor; the same key gives the same noise.
    """
    return {
        name: (standard_normal(key, t.shape, _name_salt(name), t.device) * std).to(t.dtype)
        for name, t in template.items()
        if t.is_floating_point()
    }


def device_share_std(noise_multiplier: float, clip_norm: float, num_devices: int) -> float:
    """Each of ``num_devices`` devices' noise std so that their sum carries σ·C: ``σ·C/√n``.

    Under secure aggregation the cloud sees only the sum, so the Gaussian noise of DP-FedAvg can
    be split: independent N(0, (σC)²/n) on every device add up to N(0, (σC)²) on the sum, as long
    as all n report (each dropout removes 1/n of the variance).
    """
    if num_devices < 1:
        raise ValueError(f"num_devices must be at least 1, got {num_devices}")
    return noise_multiplier * clip_norm / math.sqrt(num_devices)


@dataclass(frozen=True)
class GaussianNoise(Codec):
    """Adds N(0, ``std``²) to every floating value on the device: local DP for a clipped update.

    Chain it after ``ClipNorm(C)``: with ``std = σ·C`` each upload alone is (ε, δ)-DP for the
    Gaussian mechanism with sensitivity C (local DP); with ``std = device_share_std(σ, C, n)``
    and secure aggregation, the sum carries DP-FedAvg's σ·C. Bytes do not change.

    The state is ``key`` (int64) and ``round`` (int64, one more after every ``encode``). Each
    round's noise is keyed by the key, the round and a hash of the update's bits, so devices
    that start from one shared state (a simulator's) still draw different noise. A deployed
    device keeps ``seed=None``: its key is then drawn from the operating system's randomness.

        >>> import torch
        >>> codec = GaussianNoise(std=0.5, seed=7)
        >>> update = {"w": torch.zeros(10_000)}
        >>> wire, state = codec.encode(update, codec.init_state(update))
        >>> round(float(wire["w"].std()), 1), int(state["round"])
        (0.5, 1)

    Args:
        std: the noise standard deviation, ≥ 0.
        seed: the key every ``init_state`` gives (reproducible runs); ``None`` draws a fresh
            secret key per call.

    Raises:
        ValueError: when ``std`` is negative or not finite.
    """

    std: float
    seed: int | None = 0

    name: ClassVar[str] = "gaussian"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.std) and self.std >= 0):
            raise ValueError(f"GaussianNoise.std must be finite and >= 0, got {self.std!r}")

    def init_state(self, template: Mapping[str, Tensor]) -> Tensors:
        key = secrets.randbits(63) if self.seed is None else self.seed
        return {
            "key": torch.tensor(key, dtype=torch.int64),
            "round": torch.zeros((), dtype=torch.int64),
        }

    def encode(
        self, tensors: Mapping[str, Tensor], state: Mapping[str, Tensor]
    ) -> tuple[Tensors, Tensors]:
        key = mix64(mix64(state["key"] ^ state["round"]) ^ content_hash(tensors))
        noise = gaussian_noise(tensors, self.std, key)
        wire = {name: t + noise[name] if name in noise else t for name, t in tensors.items()}
        return wire, {"key": state["key"], "round": state["round"] + 1}

    def decode(self, wire: Mapping[str, Tensor], template: Mapping[str, Tensor]) -> Tensors:
        return {name: wire[name] for name in template}
