"""Request policies in the service: a device asks the cloud exactly when its Policy says so,
and makes the same decisions, requests and served quality as the streaming simulator."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save_file
from serve_helpers import NUM_DEVICES, asgi_client, make_app, tiny_config
from typer.testing import CliRunner

from coevo.cli import app as cli_app
from coevo.policies import (
    FEATURE_NAMES,
    Always,
    IntellectReq,
    Never,
    Periodic,
    Policy,
    RandomBudget,
)
from coevo.serve.device import DeviceRuntime
from coevo.serve.policy import USER_PATH, StreamReport, build_policy, fresh_user, stream_model
from coevo.sim.streaming import (
    QUALITY,
    CloudUserModel,
    device_stream,
    replay_examples,
    replay_stream,
    simulate_stream,
)

SESSIONS = 5
DEVICES = (0, 3, 7, 12)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    """The app, its coordinator, and the folder of the devices' state files (kept across
    tests, so a device registers once)."""
    folder = tmp_path_factory.mktemp("policy")
    return (*make_app(tiny_config(folder / "db")), folder)


def stream_devices(
    app: Any, coordinator: Any, policy: Policy, folder: Path, devices: tuple[int, ...] = DEVICES
) -> tuple[dict[int, StreamReport], dict[int, list[str]]]:
    """Each device's stream report, and the paths it requested after its setup."""
    calls: dict[int, list[str]] = {}

    async def one(index: int) -> StreamReport:
        sent: list[str] = []

        async def log(request: httpx.Request) -> None:
            sent.append(f"{request.method} {request.url.path}")

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", event_hooks={"request": [log]}
        ) as client:
            runtime = DeviceRuntime(
                client,
                index,
                folder / f"device-{index}.safetensors",
                service=coordinator.service,
                infer="none",
            )
            report = await runtime.serve_sessions(policy, SESSIONS)
        # Setup: register, state, catalogue and the first representation.
        first = sent.index(f"POST {USER_PATH}")
        calls[index] = sent[first + 1 :]
        return report

    async def every() -> list[StreamReport]:
        return [await one(index) for index in devices]

    reports = asyncio.run(every())
    return dict(zip(devices, reports, strict=True)), calls


def simulated(coordinator: Any, policy: Policy) -> Any:
    split = coordinator.task.split
    return simulate_stream(policy, stream_model(coordinator), split, device_stream(split, SESSIONS))


def inference_calls(paths: list[str]) -> int:
    return sum(path in (f"POST {USER_PATH}", "POST /v1/infer") for path in paths)


def test_never_asks_nothing_after_setup_and_always_asks_once_per_session(served):
    app, coordinator, folder = served
    _, never = stream_devices(app, coordinator, Never(), folder)
    assert all(inference_calls(paths) == 0 for paths in never.values())
    reports, always = stream_devices(app, coordinator, Always(), folder)
    for index, paths in always.items():
        assert inference_calls(paths) == SESSIONS == reports[index].requests
        assert reports[index].actions == [True] * SESSIONS


def test_periodic_asks_every_kth_session(served):
    app, coordinator, folder = served
    reports, calls = stream_devices(app, coordinator, Periodic(Periodic.Config(every=2)), folder)
    for index, report in reports.items():
        # Parameters from setup are 2 sessions old before session 2, then again before 4.
        assert report.actions == [False, False, True, False, True]
        assert inference_calls(calls[index]) == report.requests == 2


def _intellectreq(coordinator: Any) -> IntellectReq:
    split = coordinator.task.split
    features, gain = replay_examples(stream_model(coordinator), split, replay_stream(split, 3))
    trained = IntellectReq.fit(features, gain, torch.Generator().manual_seed(0))
    return trained.with_threshold(float(trained.predict(features).median()))


@pytest.mark.parametrize("name", ["always", "never", "periodic", "random", "intellectreq"])
def test_decisions_requests_and_quality_equal_the_simulator(served, name):
    app, coordinator, folder = served
    policy: Policy = {
        "always": Always(),
        "never": Never(),
        "periodic": Periodic(Periodic.Config(every=3)),
        "random": RandomBudget(RandomBudget.Config(budget=0.5, seed=4)),
        "intellectreq": _intellectreq(coordinator) if name == "intellectreq" else Never(),
    }[name]
    reports, calls = stream_devices(app, coordinator, policy, folder)
    expected = simulated(coordinator, policy)
    for index, report in reports.items():
        assert report.actions == expected.actions[:, index].tolist()
        assert report.requests == int(expected.requests[index])
        assert inference_calls(calls[index]) == report.requests
        assert report.events == int(expected.events[index])
        for metric in QUALITY:
            assert report.quality[metric] == pytest.approx(
                float(expected.quality[metric][index]), abs=1e-5
            )
    if name in ("random", "intellectreq"):
        # Mixed decisions, so parity is not met by asking always or never.
        assert 0 < sum(r.requests for r in reports.values()) < SESSIONS * len(DEVICES)


@pytest.fixture(scope="module")
def headers(served: tuple[Any, Any, Path]) -> dict[str, str]:
    """A registered device's (index 19, not streamed above) authorization header."""

    token = post(served[0], "/v1/devices", {"device_index": 19}, {}).json()["token"]
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        ("/v1/infer", {"history": ["x"], "candidates": [1]}, "history"),
        ("/v1/infer", {"history": [1]}, "candidates"),
        ("/v1/infer", {"history": [1], "candidates": [10_000]}, "candidates: item 10000"),
        (USER_PATH, {"history": [1, 10_000]}, "history: item 10000"),
        (USER_PATH, {"history": list(range(50))}, "history: 50 items exceeds"),
        (USER_PATH, {"items": [1]}, "items"),
        (USER_PATH, {}, "history"),
    ],
)
def test_a_malformed_inference_request_gets_a_4xx_naming_the_field(
    served, headers, path, body, named
):
    response = post(served[0], path, body, headers)
    assert response.status_code == 422
    assert named in response.json()["detail"]


def test_a_fresh_representation_needs_a_token(served, headers):
    refused = post(served[0], USER_PATH, {"history": [1]}, {})
    assert refused.status_code == 401 and "Authorization" in refused.json()["detail"]
    answered = post(served[0], USER_PATH, {"history": [1]}, headers)
    assert answered.status_code == 200 and len(answered.json()["user"]) > 0


def post(app: Any, path: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
    async def send() -> Any:
        async with asgi_client(app) as client:
            return await client.post(path, json=body, headers=headers)

    return asyncio.run(send())


def test_policy_settings_are_checked_by_name():
    assert build_policy("periodic", '{"every": 4}').config.every == 4
    with pytest.raises(ValueError, match="every"):
        build_policy("periodic", '{"every": 0}')
    with pytest.raises(ValueError, match="not JSON"):
        build_policy("periodic", "{every")
    with pytest.raises(KeyError, match="sometimes"):
        build_policy("sometimes")


def test_a_learned_policy_travels_as_a_weights_file(served, tmp_path):
    trained = _intellectreq(served[1])
    save_file(trained.parameters(), tmp_path / "policy.safetensors")
    settings = json.dumps({"threshold": trained.config.threshold})
    loaded = build_policy("intellectreq", settings, tmp_path / "policy.safetensors")
    features = {
        name: torch.randn(30, generator=torch.Generator().manual_seed(1)) for name in FEATURE_NAMES
    }
    assert torch.equal(loaded.predict(features), trained.predict(features))
    with pytest.raises(ValueError, match="no detector"):
        build_policy("intellectreq")


def test_a_device_streams_under_its_policy_after_training(tmp_path):
    # A one-round FedAvg run of all 20 devices, each then serving its sessions under Periodic:
    # the representations come from the trained model, and decisions match the simulator's.
    app, coordinator = make_app(
        tiny_config(tmp_path / "db", strategies=[{"name": "fedavg", "rounds": 1}])
    )
    policy = Periodic(Periodic.Config(every=2))

    async def fleet() -> list[Any]:
        async with asgi_client(app) as client:
            runtimes = [
                DeviceRuntime(
                    client,
                    index,
                    tmp_path / f"d{index}.st",
                    service=coordinator.service,
                    infer="none",
                    policy=policy,
                    sessions=SESSIONS,
                )
                for index in range(NUM_DEVICES)
            ]
            return await asyncio.gather(*(runtime.run() for runtime in runtimes))

    reports = asyncio.run(fleet())
    assert coordinator.version == 1
    expected = simulated(coordinator, policy)
    for report in reports:
        assert report.rounds_trained == [0]
        assert report.stream is not None
        assert report.stream.actions == expected.actions[:, report.device_index].tolist()
        for metric in QUALITY:
            assert report.stream.quality[metric] == pytest.approx(
                float(expected.quality[metric][report.device_index]), abs=1e-5
            )


def test_the_cloud_pads_a_request_history_as_the_simulator_does(served):
    # The transformer cloud model is order- and position-sensitive, unlike a mean pool.
    _, coordinator, _ = served
    task = coordinator.task
    model = CloudUserModel(task.cloud_model(), dict(task.cloud_model().named_parameters()))
    split = task.split
    rows = device_stream(split, SESSIONS).starts[:6, 2]
    histories = split.history(rows, model.history_len)
    expected = model.user_vectors(histories)
    for history, user in zip(histories, expected, strict=True):
        real = history[history < split.num_items].tolist()
        torch.testing.assert_close(fresh_user(model, split.num_items, real), user)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--policy", "sometimes"], "unknown policy 'sometimes'"),
        (["--policy", "periodic", "--policy-settings", '{"every": 0}'], "every"),
        (["--policy", "random", "--policy-settings", '{"budget": 2}'], "budget"),
        (["--policy", "never", "--sessions", "0"], "--sessions"),
        (["--policy", "intellectreq"], "no detector"),
    ],
)
def test_the_device_command_checks_its_policy_before_connecting(tmp_path, options, named):
    # Port 9 (discard) is never served: a refusal here comes from the checks, not the network.
    arguments = ["device", "--server", "http://127.0.0.1:9", "--index", "0"]
    arguments += ["--state", str(tmp_path / "d.st"), *options]
    result = CliRunner().invoke(cli_app, arguments)
    assert result.exit_code == 2
    assert named in result.output
    # The launcher takes the same options and checks them before starting any process.
    launcher = ["devices", "--server", "http://127.0.0.1:9", "-n", "2", *options]
    result = CliRunner().invoke(cli_app, [*launcher, "--state-dir", str(tmp_path / "many")])
    assert result.exit_code == 2
    assert named in result.output
