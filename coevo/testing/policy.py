"""Conformance checks that every request Policy must pass, after river's ``check_estimator``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from functools import partial

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from coevo.policies.base import FEATURE_NAMES, Actions, Policy, Requests
from coevo.sim.streaming import (
    RecentMean,
    Stream,
    StreamModel,
    StreamResult,
    device_features,
    device_stream,
    request_payload,
    response_payload,
    simulate_stream,
)
from coevo.sim.wire import wire_bytes
from coevo.tasks.protocol import P1Split
from coevo.testing.conformance import _checking, _expect, _joined, _same, _unchanged
from coevo.testing.fixtures import tiny_task
from coevo.types import DeviceState

__all__ = ["check_policy", "stream_world"]


def stream_world(num_devices: int = 24, seed: int = 0) -> tuple[P1Split, StreamModel]:
    """A small split and a fixed representation model (recent-item means) to stream over."""
    split = tiny_task(num_devices=num_devices, seed=seed).split
    items = torch.randn(split.num_items, 8, generator=torch.Generator().manual_seed(seed))
    return split, RecentMean(items, history_len=5)


def _session_requests(split: P1Split, model: StreamModel, stream: Stream, session: int) -> Requests:
    """Every device's requests before ``session``, holding its parameters from session 0."""
    start, current = stream.starts[:, 0], stream.starts[:, session]
    user = model.user_vectors(split.history(start, model.history_len))
    age = torch.full((stream.num_devices,), session)
    features = device_features(
        model.item_vectors(), split, user, start, current, age, model.history_len
    )
    devices = torch.arange(stream.num_devices)
    return Requests(devices, torch.full((stream.num_devices,), session), features)


def _actions(actions: Actions, what: str, size: int) -> dict[str, Tensor]:
    _expect(actions.request.dtype == torch.bool, f"{what}: request is {actions.request.dtype}")
    for name, tensor in {"request": actions.request, "score": actions.score}.items():
        _expect(tuple(tensor.shape) == (size,), f"{what}: {name} of shape {list(tensor.shape)}")
    for name, tensor in actions.state.tensors.items():
        _expect(len(tensor) == size, f"{what}: state {name} of shape {list(tensor.shape)}")
    return _joined(
        out={"request": actions.request, "score": actions.score}, state=actions.state.tensors
    )


def _inputs(requests: Requests, state: DeviceState) -> dict[str, Mapping[str, Tensor]]:
    ids = {"devices": requests.devices, "session": requests.session}
    return {"requests": ids, "features": requests.features, "state": state.tensors}


def _per_device(policy: Policy, requests: Requests, state: DeviceState) -> dict[str, Tensor]:
    """``decide`` one device at a time, stacked back into a batch."""
    parts = []
    for i in range(len(requests)):
        one = DeviceState({k: v[i : i + 1] for k, v in state.tensors.items()})
        parts.append(_actions(policy.decide(requests.select(slice(i, i + 1)), one), "one", 1))
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def _result(run: StreamResult) -> dict[str, Tensor]:
    tensors = {f.name: getattr(run, f.name) for f in fields(run)}
    quality, state = tensors.pop("quality"), tensors.pop("policy_state")
    return _joined(run=tensors, quality=quality, state=state.tensors)


def _traffic(split: P1Split, model: StreamModel, stream: Stream, run: StreamResult) -> None:
    """Each device's requests and bytes, recounted from its recorded actions one by one."""
    response = wire_bytes(response_payload(model.item_vectors()[0]))
    up = torch.zeros(stream.num_devices, dtype=torch.long)
    for session, device in torch.nonzero(run.actions).tolist():
        row = stream.starts[device, session : session + 1]
        history = split.history(row, model.history_len)[0]
        up[device] += wire_bytes(request_payload(history, split.num_items))
    requests = run.actions.long().sum(0)
    want = {"requests": requests, "up": up, "down": requests * response}
    got = {"requests": run.requests, "up": run.bytes_up, "down": run.bytes_down}
    _same(got, want, "requests and bytes per device")
    if "requests" in run.policy_state:
        _same({"": run.policy_state["requests"]}, {"": requests}, "the policy's request count")


def check_policy(
    policy: Policy,
    *,
    world: tuple[P1Split, StreamModel] | None = None,
    num_sessions: int = 4,
    atol: float = 1e-5,
) -> None:
    """Checks a request policy's contract; raises AssertionError naming the property it breaks.

    Properties: well-formed actions, no input mutation, determinism, batch == per device
    (``decide`` on a batch equals it on each device alone), state and parameters round-trip
    through safetensors, and requests and bytes reported (a streaming run's counts equal its
    recorded actions, recounted device by device from the real payloads).

    Args:
        policy: the policy under test (learned ones already fitted).
        world: a split and representation model to stream over; ``stream_world()`` if None.
        num_sessions: sessions of the stream.
        atol: tolerance of batch == per device on the scores (batched float32 products
            round differently); the decisions and states must agree exactly.

    Example:
        >>> from coevo.policies import Periodic
        >>> check_policy(Periodic())
    """
    split, model = world if world is not None else stream_world()
    stream = device_stream(split, num_sessions)
    with _checking(f"policy {policy.name!r}") as checks:
        state = policy.init_state(stream.num_devices)
        for session in range(num_sessions):
            checks.where = f" (session {session})"
            requests = _session_requests(split, model, stream, session)
            _expect(set(requests.features) == set(FEATURE_NAMES), "features")
            checks.property = "no input mutation"
            call = partial(policy.decide, requests, state)
            actions = _unchanged("decide", call, **_inputs(requests, state))
            checks.property = "well-formed actions"
            out = _actions(actions, "decide", len(requests))
            checks.property = "determinism"
            _same(_actions(policy.decide(requests, state), "again", len(requests)), out, "again")
            checks.property = "batch == per device"
            alone = _per_device(policy, requests, state)
            _same({"": alone.pop("out/score")}, {"": out["out/score"]}, "scores alone", atol)
            _same(alone, {k: v for k, v in out.items() if k != "out/score"}, "decisions alone")
            checks.property = "state round-trip"
            saved = save_safetensors({k: v.contiguous() for k, v in actions.state.tensors.items()})
            restored = DeviceState(load_safetensors(saved))
            _same(restored.tensors, actions.state.tensors, "state through safetensors")
            upcoming = _session_requests(split, model, stream, (session + 1) % num_sessions)
            next_out = _actions(policy.decide(upcoming, actions.state), "next", len(upcoming))
            _same(
                _actions(policy.decide(upcoming, restored), "next", len(upcoming)),
                next_out,
                "next decide",
            )
            parameters = load_safetensors(save_safetensors(policy.parameters()))
            copy = type(policy)(policy.config, parameters)
            _same(
                _actions(copy.decide(requests, state), "copy", len(requests)),
                out,
                "a copy from its parameters",
            )
            state = actions.state
        checks.where = ""
        checks.property = "determinism"
        run = simulate_stream(policy, model, split, stream)
        _same(_result(simulate_stream(policy, model, split, stream)), _result(run), "a second run")
        checks.property = "requests and bytes reported"
        _traffic(split, model, stream, run)
