"""Request policies in the service: a device asks the cloud only when its Policy says so.

The served form of ``coevo.sim.streaming``. A device serves its device-period interactions as
sessions, scoring each event locally by a dot product between the user representation it
holds and the catalogue it downloaded once. Before each session its ``Policy`` decides, from
the features ``coevo.sim.streaming.device_features`` computes out of what the device holds,
whether to send its history up and get a fresh representation back. The cloud computes that
representation with the streaming simulator's model classes (``CloudUserModel`` when the
strategy's cloud state holds the cloud model, else the device model's user tower) from the
current model version. Decisions, request counts and served quality equal the simulator's
for the same device, data, model and policy.

Endpoints (added to the app by ``add_routes``):

- ``GET /v1/stream/items``: the catalogue vectors the device scores with (safetensors);
- ``POST /v1/stream/user``: ``{"history": [item ids, oldest first]}`` -> the fresh user vector.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
from fastapi import FastAPI, Header, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file

from coevo.policies import FEATURE_NAMES, POLICIES, Policy, Requests
from coevo.serve.rounds import Coordinator, Rejected
from coevo.sim.streaming import (
    QUALITY,
    CloudUserModel,
    Stream,
    StreamModel,
    device_features,
    device_stream,
    session_quality,
)
from coevo.tasks.models import DeviceModel
from coevo.types import DeviceState, Payload

if TYPE_CHECKING:
    from coevo.serve.device import DeviceRuntime

ITEMS_PATH = "/v1/stream/items"
USER_PATH = "/v1/stream/user"


class DeviceUserModel:
    """The device model's user tower as the cloud's user representation (``StreamModel``)."""

    def __init__(self, model: DeviceModel, params: dict[str, torch.Tensor]) -> None:
        self.model = model.eval()
        with torch.no_grad():
            for name, parameter in self.model.named_parameters():
                parameter.copy_(params[name])
        self.history_len = model.history_len

    def user_vectors(self, history: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model.user_vector(history)

    def item_vectors(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model.item_vectors(torch.arange(self.model.num_items))


def stream_model(coordinator: Coordinator) -> StreamModel:
    """The cloud's representation model at the coordinator's current version.

    The cloud model when the strategy's cloud state holds all its weights (cloud-side
    strategies), else the device model from the shared weights, completed by the initial
    personal weights (the cloud never holds a device's trained personal ones).
    """
    task, cloud = coordinator.task, coordinator.cloud.tensors
    big = task.cloud_model()
    names = [name for name, _ in big.named_parameters()]
    if all(name in cloud for name in names):
        return CloudUserModel(big, {name: cloud[name] for name in names})
    small = task.device_model()
    initial = coordinator.device_state(0).tensors
    params = {}
    for name, _ in small.named_parameters():
        if name not in cloud and name not in initial:
            raise Rejected(404, f"stream: the served strategy has no weight {name!r}")
        params[name] = cloud[name] if name in cloud else initial[name]
    return DeviceUserModel(small, params)


class _Models:
    """The stream model of the latest version, built once per version."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self._lock = threading.Lock()
        self._cached: tuple[int, StreamModel] | None = None

    def current(self) -> tuple[int, StreamModel]:
        with self._lock:
            version = self.coordinator.version
            if self._cached is None or self._cached[0] != version:
                self._cached = (version, stream_model(self.coordinator))
            return self._cached


class UserRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    history: list[int] = Field(description="The real items of the device's history, oldest first.")


class UserAnswer(BaseModel):
    user: list[float]
    model_version: int


def fresh_user(model: StreamModel, num_items: int, history: list[int]) -> torch.Tensor:
    """The user vector ``[dim]`` after ``history``, left-padded as the simulator pads it."""
    length = model.history_len
    if len(history) > length:
        raise Rejected(422, f"history: {len(history)} items exceeds the limit of {length}")
    bad = [i for i in history if not 0 <= i < num_items]
    if bad:
        raise Rejected(422, f"history: item {bad[0]} is outside [0, {num_items})")
    padded = torch.full((1, length), num_items, dtype=torch.long)
    if history:
        padded[0, length - len(history) :] = torch.tensor(history)
    return model.user_vectors(padded)[0]


def add_routes(
    app: FastAPI,
    coordinator: Coordinator,
    authenticate: Callable[[str | None], int],
    count: Callable[[str], None],
) -> None:
    """Add the stream endpoints; ``count(name)`` advances a Prometheus counter."""
    models = _Models(coordinator)

    @app.get(ITEMS_PATH, responses={200: {"content": {"application/octet-stream": {}}}})
    async def stream_items(authorization: Annotated[str | None, Header()] = None) -> Response:
        authenticate(authorization)
        version, model = await run_in_threadpool(models.current)
        body = Payload({"items": model.item_vectors().contiguous()}).to_bytes()
        count("stream_catalogue_downloads_total")
        headers = {"X-Model-Version": str(version), "X-History-Len": str(model.history_len)}
        return Response(body, media_type="application/octet-stream", headers=headers)

    @app.post(USER_PATH, response_model=UserAnswer)
    async def stream_user(
        body: UserRequest, authorization: Annotated[str | None, Header()] = None
    ) -> UserAnswer:
        authenticate(authorization)

        def answer() -> UserAnswer:
            version, model = models.current()
            user = fresh_user(model, coordinator.task.num_items, body.history)
            return UserAnswer(user=user.tolist(), model_version=version)

        result = await run_in_threadpool(answer)
        count("stream_user_requests_total")
        return result


def build_policy(
    name: str, settings: str | dict[str, Any] | None = None, weights: str | Path | None = None
) -> Policy:
    """The Policy ``name`` of ``coevo.policies.POLICIES``, configured and with its weights.

    Args:
        name: a registered policy (always, never, periodic, random, intellectreq).
        settings: its config fields, as a dict or a JSON object string.
        weights: a safetensors file of its shared parameters (learned policies).

    Raises:
        UnknownNameError: no policy is registered as ``name``.
        ValueError: naming the field at fault (settings, or weights a learned policy lacks).
    """
    cls = POLICIES.get(name)
    if isinstance(settings, str):
        try:
            settings = json.loads(settings) if settings.strip() else {}
        except json.JSONDecodeError as error:
            raise ValueError(f"policy settings: not JSON ({error})") from None
    if not isinstance(settings, dict | type(None)):
        raise ValueError("policy settings: expected a JSON object")
    try:
        config = cls.Config.model_validate(settings or {})
    except ValidationError as error:
        raise ValueError(f"policy settings of {name}: {error}") from None
    try:
        parameters = load_file(str(weights)) if weights is not None else None
        policy = cls(config, parameters)
        # One decision on neutral features: a learned policy without weights fails here.
        zero = torch.zeros(1, dtype=torch.long)
        probe = Requests(zero, zero, {name: torch.zeros(1) for name in FEATURE_NAMES})
        policy.decide(probe, policy.init_state(1))
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"policy weights of {name}: {error}") from None
    return policy


@dataclass
class StreamReport:
    """What a device did over its stream of sessions.

    Attributes:
        actions: per session, whether the device asked the cloud before it.
        requests: requests made (setup's first representation not counted).
        events: events served locally.
        quality: mean of each ``QUALITY`` metric over the events served.
    """

    policy: str
    actions: list[bool] = field(default_factory=list)
    requests: int = 0
    events: int = 0
    quality: dict[str, float] = field(default_factory=dict)


async def serve_stream(
    runtime: DeviceRuntime, policy: Policy, num_sessions: int, headers: dict[str, str]
) -> StreamReport:
    """Serve the device's sessions, asking the cloud before each one the policy picks.

    Mirrors ``coevo.sim.streaming.simulate_stream`` for a batch of one device.
    """
    service = runtime.service
    assert service is not None
    split, index = service.task.split, runtime.device_index
    full = device_stream(split, num_sessions)
    stream = Stream(full.starts[index : index + 1], full.negatives[index : index + 1])
    response = runtime._check(await runtime.request("GET", ITEMS_PATH, headers=headers), "items")
    window = int(response.headers["x-history-len"])
    items = Payload.from_bytes(response.content).tensors["items"]

    async def fresh(row: torch.Tensor) -> torch.Tensor:
        history = split.history(row, window)[0]
        sent = {"history": history[history < split.num_items].tolist()}
        answer = await runtime.request("POST", USER_PATH, json=sent, headers=headers)
        return torch.tensor([runtime._check(answer, "user").json()["user"]])

    trigger = stream.starts[:, 0].clone()
    user = await fresh(trigger)
    age = torch.zeros(1, dtype=torch.long)
    state = policy.init_state(1)
    device = torch.tensor([index])
    report = StreamReport(policy.name)
    sums = dict.fromkeys(QUALITY, 0.0)
    for session in range(num_sessions):
        current = stream.starts[:, session]
        features = device_features(items, split, user, trigger, current, age, window)
        decided = policy.decide(Requests(device, torch.tensor([session]), features), state)
        state = DeviceState(dict(decided.state.tensors))
        asked = bool(decided.request[0])
        if asked:
            user, trigger, age = await fresh(current), current.clone(), torch.zeros_like(age)
            report.requests += 1
        report.actions.append(asked)
        served, counts = session_quality(items, split, stream, user, session)
        for name in QUALITY:
            sums[name] += float(served[name][0])
        report.events += int(counts[0])
        age = age + 1
    report.quality = {name: value / max(report.events, 1) for name, value in sums.items()}
    return report
