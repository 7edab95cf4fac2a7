"""The HTTP surface: model ETags, device state, inference, health, metrics, OpenAPI, checksums."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch
from serve_helpers import asgi_client, make_app, tiny_config

from coevo.serve import Store, decode_payload
from coevo.serve.store import IntegrityError
from coevo.types import DeviceState


@pytest.fixture
def served(tmp_path: Path) -> tuple[Any, Any, dict[str, str]]:
    app, coordinator = make_app(tiny_config(tmp_path / "db"))
    token = call(app, "POST", "/v1/devices", json={"device_index": 3}).json()["token"]
    return app, coordinator, {"Authorization": f"Bearer {token}"}


def call(app: Any, method: str, url: str, **kwargs: Any) -> Any:
    async def send() -> Any:
        async with asgi_client(app) as client:
            return await client.request(method, url, **kwargs)

    return asyncio.run(send())


def test_model_download_is_the_downlink_with_an_etag(served) -> None:
    app, coordinator, _ = served
    response = call(app, "GET", "/v1/model")
    assert response.status_code == 200
    assert response.headers["x-model-version"] == "0"
    payload, info = decode_payload(response.content, None)
    expected = coordinator.strategy.downlink(coordinator.cloud, 0)
    assert sorted(payload.tensors) == sorted(expected.tensors)
    for name, tensor in expected.tensors.items():
        assert torch.equal(payload.tensors[name], tensor)
    assert info == {"model_version": 0}
    again = call(app, "GET", "/v1/model", headers={"If-None-Match": response.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def test_device_state_is_the_simulators_initial_row(served) -> None:
    app, coordinator, auth = served
    response = call(app, "GET", "/v1/devices/3/state", headers=auth)
    state, _ = decode_payload(response.content, None)
    initial = coordinator.strategy.init_devices(coordinator.cloud, coordinator.task.num_devices)
    assert sorted(state.tensors) == sorted(initial.tensors) != []
    for name, tensor in initial.tensors.items():
        assert torch.equal(state.tensors[name], tensor[3])


def test_cloud_inference_scores_like_the_strategy(served) -> None:
    app, coordinator, auth = served
    history, candidates = [5, 9, 2], [1, 7, 30, 149]
    response = call(
        app, "POST", "/v1/infer", json={"history": history, "candidates": candidates}, headers=auth
    )
    assert response.status_code == 200, response.text
    length, pad = coordinator.task.history_len, coordinator.task.num_items
    padded = torch.tensor([[pad] * (length - 3) + history])
    state = DeviceState({k: v[None] for k, v in coordinator.device_state(3).tensors.items()})
    expected = coordinator.strategy.score(
        coordinator.cloud, state, padded, torch.tensor([candidates])
    )[0]
    torch.testing.assert_close(torch.tensor(response.json()["scores"]), expected)


def test_health_metrics_and_openapi(served) -> None:
    app, _, auth = served
    assert call(app, "GET", "/health").json()["model_version"] == 0
    call(app, "POST", "/v1/checkin", headers=auth)
    call(app, "POST", "/v1/checkin")
    text = call(app, "GET", "/metrics").text
    lines = text.splitlines()
    assert 'coevo_checkins_total{action="train"} 1' in lines
    assert 'coevo_requests_rejected_total{status="401"} 1' in lines
    assert "coevo_devices_registered 1" in lines
    assert "# TYPE coevo_model_version gauge" in lines
    paths = call(app, "GET", "/openapi.json").json()["paths"]
    for path in (
        "/v1/devices",
        "/v1/model",
        "/v1/checkin",
        "/v1/rounds/{round}/update",
        "/v1/infer",
    ):
        assert path in paths
    assert (
        "application/octet-stream"
        in paths["/v1/rounds/{round}/update"]["put"]["requestBody"]["content"]
    )


def test_tokens_are_stored_hashed(served, tmp_path: Path) -> None:
    _, coordinator, auth = served
    secret = auth["Authorization"].split(".", 1)[1]
    with sqlite3.connect(tmp_path / "db") as db:
        dump = "\n".join(db.iterdump())
    assert secret not in dump
    assert coordinator.store.token_hash(3) is not None


def test_a_corrupted_model_blob_is_detected(tmp_path: Path) -> None:
    make_app(tiny_config(tmp_path / "db"))
    with sqlite3.connect(tmp_path / "db") as db:
        (blob,) = db.execute("SELECT state FROM models WHERE version = 0").fetchone()
        flipped = bytes(blob[:-1]) + bytes([blob[-1] ^ 1])
        db.execute("UPDATE models SET state = ? WHERE version = 0", (flipped,))
    with pytest.raises(IntegrityError, match="model version 0"):
        Store(tmp_path / "db").model(0)


def test_onnx_download_scores_like_pytorch(served) -> None:
    from coevo import export

    app, coordinator, _ = served
    response = call(app, "GET", "/v1/model", params={"format": "onnx"})
    assert response.status_code == 200, response.text
    scorer = export.OnnxScorer(response.content)
    history = torch.tensor([[150, 150, 150, 4, 8, 15, 16, 23]])
    candidates = torch.tensor([[1, 42, 99, 149]])
    state = DeviceState({k: v[None] for k, v in coordinator.device_state(0).tensors.items()})
    expected = coordinator.strategy.score(coordinator.cloud, state, history, candidates)
    torch.testing.assert_close(
        torch.as_tensor(scorer.score(history, candidates)), expected, atol=1e-5, rtol=1e-4
    )


def test_a_device_builds_its_task_from_the_servers_config(served, tmp_path: Path) -> None:
    from coevo.serve import DeviceRuntime
    from coevo.serve.device import LocalState

    app, coordinator, _ = served

    async def setup() -> Any:
        async with asgi_client(app) as client:
            device = DeviceRuntime(client, 5, tmp_path / "d5.st")
            return await device._setup(LocalState.load(device.state_file))

    service = asyncio.run(setup())
    assert torch.equal(service.task.split.items, coordinator.task.split.items)
    assert service.strategy.config == coordinator.strategy.config
    state = LocalState.load(tmp_path / "d5.st")
    assert state.token is not None and state.token.startswith("5.")
    assert sorted(state.private or {}) == sorted(coordinator.device_state(5).tensors)


def test_public_api_is_sorted_and_importable() -> None:
    import coevo.serve

    exported = coevo.serve.__all__
    assert list(exported) == sorted(exported, key=lambda s: (not s[:1].isupper(), s))
    assert all(hasattr(coevo.serve, name) for name in exported)
