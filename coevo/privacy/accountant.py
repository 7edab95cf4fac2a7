"""User-level privacy accounting for DP-FedAvg: ε at δ after each round, and σ for a target ε.

Each round samples a share ``q`` of the devices and releases their clipped sum with Gaussian
noise σ·C: the sampled Gaussian mechanism with noise multiplier σ, once per round. Rényi DP
composes it over rounds (Opacus' ``RDPAccountant``); ε at δ follows from the RDP curve.
The unit of privacy is the device (user), not the example.

The analysis assumes Poisson sampling of devices at rate ``q``; a simulator that draws a fixed
number of devices per round is accounted at ``q = devices_per_round / num_devices``, the usual
approximation (as in Opacus and TensorFlow Federated).

References:
    Mironov, "Rényi Differential Privacy", CSF 2017. Mironov, Talwar and Zhang, "Rényi
    Differential Privacy of the Sampled Gaussian Mechanism", 2019. McMahan et al., "Learning
    Differentially Private Recurrent Language Models", ICLR 2018.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

ORDERS = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *range(12, 64),
    *(80, 96, 128, 192, 256, 512, 1024),
)
"""Rényi orders searched for the tightest ε: Opacus' defaults, extended upwards so that small
budgets over many rounds (whose best order exceeds 63) are not reported looser than they are."""


@contextmanager
def _quiet_order_warning() -> Iterator[None]:
    """Silences Opacus' note that the best order is the largest searched, which only says that a
    tighter ε may exist: the reported ε stays a valid upper bound."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def _check_rate_and_delta(sampling_rate: float, delta: float) -> None:
    if not 0.0 < sampling_rate <= 1.0:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


@functools.lru_cache(maxsize=4096)
def rdp_epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """ε at ``delta`` after ``rounds`` rounds of the sampled Gaussian mechanism (Opacus RDP).

    Returns 0 for no rounds and ``inf`` for a zero noise multiplier.
    """
    _check_rate_and_delta(sampling_rate, delta)
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    # Opacus is imported here: it takes seconds to import and most runs never account privacy.
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sampling_rate, rounds)]
    with _quiet_order_warning():
        return float(accountant.get_epsilon(delta=delta, alphas=list(ORDERS)))


def calibrate_noise(
    target_epsilon: float, delta: float, sampling_rate: float, rounds: int, tolerance: float = 0.01
) -> float:
    """The noise multiplier σ whose ``rounds`` rounds spend at most ``target_epsilon`` at ``delta``.

    A bisection (Opacus' ``get_noise_multiplier``) that returns the upper end of its bracket, so
    ``rdp_epsilon(σ, sampling_rate, rounds, delta) <= target_epsilon`` always holds and is
    within ``tolerance`` of it. ``target_epsilon = inf`` gives σ = 0.

    Raises:
        ValueError: when ``target_epsilon`` is not positive or ``rounds`` < 1.
    """
    _check_rate_and_delta(sampling_rate, delta)
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be positive, got {target_epsilon!r}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if math.isinf(target_epsilon):
        return 0.0
    from opacus.accountants.utils import get_noise_multiplier

    with _quiet_order_warning():
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sampling_rate,
                steps=rounds,
                accountant="rdp",
                epsilon_tolerance=tolerance,
                alphas=list(ORDERS),
            )
        )


@dataclass(frozen=True)
class PrivacyAccountant:
    """User-level (ε, δ) of a DP-FedAvg run, round by round.

    Example:
        >>> accountant = PrivacyAccountant(noise_multiplier=1.0, sampling_rate=0.01, delta=1e-5)
        >>> round(accountant.epsilon(1000), 1)
        2.1

    Args:
        noise_multiplier: σ, the noise std on the round's sum divided by the clip bound C.
        sampling_rate: q, the share of devices taking part in a round, in (0, 1].
        delta: δ of the reported (ε, δ), in (0, 1); ``1 / num_devices`` is a common choice.
    """

    noise_multiplier: float
    sampling_rate: float
    delta: float

    def __post_init__(self) -> None:
        _check_rate_and_delta(self.sampling_rate, self.delta)
        if not self.noise_multiplier >= 0:
            raise ValueError(
                f"PrivacyAccountant.noise_multiplier must be >= 0, got {self.noise_multiplier!r}"
            )

    @classmethod
    def for_fleet(
        cls, noise_multiplier: float, devices_per_round: int, num_devices: int
    ) -> PrivacyAccountant:
        """``q = devices_per_round / num_devices`` and ``δ = 1 / num_devices``."""
        if not 1 <= devices_per_round <= num_devices:
            raise ValueError(
                f"devices_per_round must be in 1..{num_devices} (num_devices), "
                f"got {devices_per_round}"
            )
        return cls(noise_multiplier, devices_per_round / num_devices, 1.0 / num_devices)

    def epsilon(self, rounds: int) -> float:
        """ε at ``delta`` after ``rounds`` rounds (``inf`` when σ = 0)."""
        return rdp_epsilon(self.noise_multiplier, self.sampling_rate, rounds, self.delta)
