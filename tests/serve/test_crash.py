"""Crashes: a SIGKILLed server resumes from SQLite; re-sent and half-sent uploads are harmless."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn
from serve_helpers import (
    NUM_DEVICES,
    ServerProcess,
    asgi_client,
    free_port,
    launch_devices,
    make_app,
    running_server,
    stop_group,
    tiny_config,
)

from coevo.serve import Store, encode_payload
from coevo.sim.simulator import simulate
from coevo.strategies.fedavg import FedAvg, FedAvgConfig
from coevo.testing import tiny_task
from coevo.types import Payload


def _rows(database: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        return db.execute(sql).fetchall()


def test_sigkill_mid_round_loses_nothing_and_counts_each_update_once(tmp_path: Path) -> None:
    database = tmp_path / "serve.sqlite"
    config = tiny_config(database)
    port = free_port()
    first = ServerProcess(config, tmp_path, "first", port)
    early = late = None
    try:
        # 15 of the 20 devices report round 0, which needs all 20: the round stays open.
        early = launch_devices(first.url, 0, 15, tmp_path)
        deadline = time.monotonic() + 180
        while _rows(database, "SELECT COUNT(*) FROM updates")[0][0] < 15:
            assert early.poll() is None, early.communicate()[0]
            assert time.monotonic() < deadline, "devices did not report in time"
            time.sleep(0.2)
        first.kill()
        acknowledged = _rows(database, "SELECT device_index, sha256 FROM updates WHERE round = 0")
        assert sorted(d for d, _ in acknowledged) == list(range(15))
        assert _rows(database, "SELECT MAX(version) FROM models") == [(0,)]
        # The last five start while the server is down: they wait for it like the others.
        late = launch_devices(first.url, 15, 5, tmp_path)
        with running_server(config, tmp_path, "second", port):
            late_out, _ = late.communicate(timeout=240)
            early_out, _ = early.communicate(timeout=240)
        assert late.returncode == 0, late_out
        assert early.returncode == 0, early_out
    finally:
        first.kill()
        for launcher in (early, late):
            if launcher is not None:
                stop_group(launcher)
    # The early devices rode out the restart by retrying, then finished every round.
    assert early_out.count("trained rounds [0, 1, 2]") == 15
    assert any(f"retries {n}," in early_out for n in range(1, 10_000))
    # The acknowledged round-0 updates survived unchanged, and each update was merged once.
    after = _rows(database, "SELECT device_index, sha256 FROM updates WHERE round = 0")
    assert set(acknowledged) <= set(after)
    merged = _rows(database, "SELECT round, device_index, merged_into FROM updates ORDER BY 1, 2")
    assert merged == [(r, d, r + 1) for r in range(3) for d in range(NUM_DEVICES)]
    latest = Store(database).latest_model()
    assert latest is not None and latest[0] == 3
    reference = simulate(
        FedAvg(tiny_task(NUM_DEVICES), FedAvgConfig(rounds=3)), torch.Generator().manual_seed(0)
    ).cloud
    for name, tensor in reference.tensors.items():
        torch.testing.assert_close(latest[1][name], tensor, atol=1e-6, rtol=1e-5)


def _valid_update(coordinator, scale: float = 0.01) -> bytes:
    tensors = {k: torch.full(s.shape, scale) for k, s in coordinator.uplink_template.items()}
    body, _ = encode_payload(Payload(tensors), None, num_examples=3)
    return body


def test_resent_update_gets_the_same_answer_and_counts_once(tmp_path: Path) -> None:
    app, coordinator = make_app(tiny_config(tmp_path / "db", **{"simulation.devices_per_round": 2}))

    async def scenario() -> None:
        async with asgi_client(app) as client:
            tokens = []
            for index in (0, 1):
                registered = await client.post("/v1/devices", json={"device_index": index})
                tokens.append({"Authorization": f"Bearer {registered.json()['token']}"})
                assert (await client.post("/v1/checkin", headers=tokens[-1])).json()[
                    "action"
                ] == "train"
            body = _valid_update(coordinator)
            first = await client.put("/v1/rounds/0/update", content=body, headers=tokens[0])
            again = await client.put("/v1/rounds/0/update", content=body, headers=tokens[0])
            assert first.status_code == again.status_code == 200
            assert first.text == again.text
            assert coordinator.store.count_pending(0) == 1
            other = await client.put(
                "/v1/rounds/0/update", content=_valid_update(coordinator, 0.02), headers=tokens[0]
            )
            assert other.status_code == 409 and "already sent a different update" in other.text
            closing = await client.put("/v1/rounds/0/update", content=body, headers=tokens[1])
            assert closing.status_code == 200 and coordinator.version == 1
            # After the merge the re-send still gets its receipt, and nothing is merged twice.
            late = await client.put("/v1/rounds/0/update", content=body, headers=tokens[0])
            assert late.status_code == 200 and late.text == first.text
            assert coordinator.version == 1

    asyncio.run(scenario())
    updates = coordinator.store.snapshot()["updates"]
    assert [(r, d, m) for r, d, _, m in updates] == [(0, 0, 1), (0, 1, 1)]


class _ThreadServer:
    """uvicorn in a thread of this process, on a free loopback port."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_device_disconnecting_mid_upload_is_dropped_cleanly(tmp_path: Path) -> None:
    app, coordinator = make_app(tiny_config(tmp_path / "db", **{"simulation.devices_per_round": 2}))
    with _ThreadServer(app) as url:
        token = httpx.post(f"{url}/v1/devices", json={"device_index": 0}).json()["token"]
        auth = {"Authorization": f"Bearer {token}"}
        assert httpx.post(f"{url}/v1/checkin", headers=auth).json()["action"] == "train"
        before = coordinator.store.snapshot()
        body = _valid_update(coordinator)
        head = (
            f"PUT /v1/rounds/0/update HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}"
            f"\r\nContent-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as raw:
            raw.sendall(head.encode() + body[: len(body) // 2])
        deadline = time.monotonic() + 30
        while "uploads_disconnected_total" not in httpx.get(f"{url}/metrics").text:
            assert time.monotonic() < deadline, "the server never noticed the disconnect"
            time.sleep(0.05)
        assert coordinator.store.snapshot() == before
        # The device comes back and sends the whole update: accepted, once.
        response = httpx.put(f"{url}/v1/rounds/0/update", content=body, headers=auth)
        assert response.status_code == 200
        assert coordinator.store.count_pending(0) == 1
