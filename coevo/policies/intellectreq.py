"""IntellectReq: a learned on-device detector of when stale parameters would mis-recommend.

Lv, Zhang, Chen, Zhang, Kuang, "Intelligent Model Update Strategy for Sequential
Recommendation" (IntellectReq, WWW 2024; arXiv 2302.07335). Cloud: replays streams on its own
cloud-period logs, measures for each (stale parameters, session) pair how much better fresh
parameters rank that session's items (the size of the stale ones' mis-recommendation), and
trains a small mis-recommendation detector (MRD) to predict it from device-side features plus
an uncertainty estimate. Device: runs the detector before each session and requests when the
predicted gain exceeds ``threshold``, so a threshold sweep trades requests for quality.
Wire: the detector once down (a few hundred floats); per request, the history up and fresh
parameters down.

Simplifications against the paper, stated in the report: the uncertainty is the normalised
entropy of the stale parameters' softmax over the catalogue (not the variance of a
conditional-VAE latent); the detector is an MLP on summary features of the current and
trigger sequences (not on their learned embeddings); and it regresses the GAUC gain instead
of classifying "stale wrong, fresh right" (on MovieLens-100K the regression kept more quality
at the same request share than a gain-weighted classifier).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from coevo.policies.base import FEATURE_NAMES, Actions, Policy, Requests, counted
from coevo.types import DeviceState

_PARAMETER_NAMES = (
    "mean",
    "std",
    "hidden.weight",
    "hidden.bias",
    "out.weight",
    "out.bias",
    "gain_scale",
)


class IntellectReqConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["intellectreq"] = "intellectreq"
    # Request when the predicted GAUC gain exceeds this: higher saves requests, risks quality.
    threshold: float = Field(0.01, ge=-1.0, le=1.0)
    # Hidden units of the detector: more fit finer patterns from the cloud's replay.
    hidden: int = Field(16, ge=1, le=1024)
    # Full-batch Adam steps of the detector's training in the cloud.
    steps: int = Field(400, ge=1, le=100_000)
    # Adam step size of that training.
    lr: float = Field(0.01, gt=0, le=1.0)


def _features(features: Mapping[str, torch.Tensor]) -> torch.Tensor:
    missing = [name for name in FEATURE_NAMES if name not in features]
    if missing:
        raise ValueError(f"requests.features lacks {missing}; IntellectReq needs {FEATURE_NAMES}")
    return torch.stack([features[name].float() for name in FEATURE_NAMES], dim=-1)


def predicted_gain(parameters: Mapping[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """The GAUC fresh parameters would gain, ``[batch]``, from ``[batch, len(FEATURE_NAMES)]``."""
    z = (features - parameters["mean"]) / parameters["std"]
    hidden = torch.tanh(F.linear(z, parameters["hidden.weight"], parameters["hidden.bias"]))
    out = F.linear(hidden, parameters["out.weight"], parameters["out.bias"]).squeeze(-1)
    return out * parameters["gain_scale"]


class IntellectReq(Policy):
    """Requests where the cloud-trained detector expects the stale parameters to mis-rank.

    Build one with ``IntellectReq.fit`` (the cloud's training), or from saved ``parameters``.
    """

    name = "intellectreq"
    Config = IntellectReqConfig

    def __init__(
        self,
        config: IntellectReqConfig | None = None,
        parameters: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(config, parameters)
        if self._parameters and set(self._parameters) != set(_PARAMETER_NAMES):
            raise ValueError(
                f"intellectreq parameters {sorted(self._parameters)} != {sorted(_PARAMETER_NAMES)}"
            )

    @classmethod
    def fit(
        cls,
        features: Mapping[str, torch.Tensor],
        gain: torch.Tensor,
        rng: torch.Generator,
        config: IntellectReqConfig | None = None,
    ) -> IntellectReq:
        """Train the detector in the cloud on replayed examples.

        Args:
            features: device-side features of each replayed (stale parameters, session) pair,
                float32 ``[examples]`` each, named as in ``FEATURE_NAMES``.
            gain: ``[examples]`` quality of fresh minus stale parameters on that session.
            rng: draws the initial weights.
            config: threshold and training settings.

        Returns:
            The policy with the trained detector.
        """
        config = config if config is not None else IntellectReqConfig()
        x = _features(features)
        if len(x) < 2:
            raise ValueError(f"IntellectReq.fit: needs >= 2 replayed examples, got {len(x)}")
        scale = gain.std().clamp(min=1e-6)
        params = {
            "mean": x.mean(0),
            "std": x.std(0).clamp(min=1e-6),
            "hidden.weight": torch.randn(config.hidden, x.shape[1], generator=rng) * 0.3,
            "hidden.bias": torch.zeros(config.hidden),
            "out.weight": torch.randn(1, config.hidden, generator=rng) * 0.3,
            "out.bias": torch.zeros(1),
            "gain_scale": scale,
        }
        fixed = ("mean", "std", "gain_scale")
        trained = {k: v.clone().requires_grad_(k not in fixed) for k, v in params.items()}
        optimizer = torch.optim.Adam([v for v in trained.values() if v.requires_grad], lr=config.lr)
        for _ in range(config.steps):
            loss = ((predicted_gain(trained, x) - gain) / scale).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return cls(config, {k: v.detach() for k, v in trained.items()})

    def predict(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The detector's predicted GAUC gain for each row of ``features``."""
        if not self._parameters:
            raise ValueError("intellectreq has no detector: build it with IntellectReq.fit")
        return predicted_gain(self._parameters, _features(features))

    def decide(self, requests: Requests, device_state: DeviceState) -> Actions:
        gain = self.predict(requests.features)
        request = gain > self.config.threshold
        return Actions(request, gain, counted(device_state, request))

    def with_threshold(self, threshold: float) -> IntellectReq:
        """The same detector with another threshold (a point of the quality/requests curve)."""
        values = self.config.model_dump() | {"threshold": threshold}
        return IntellectReq(IntellectReqConfig.model_validate(values), self._parameters)
