"""Malicious devices against the service: attacks through the device runtime, robust merges,
and a hostile device that tries to overwrite, replay or crash."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from serve_helpers import (
    NUM_DEVICES,
    asgi_client,
    child_env,
    cli,
    make_app,
    running_server,
    tiny_config,
)
from typer.testing import CliRunner

from coevo.attacks import Adversarial, SignFlip
from coevo.cli import app
from coevo.serve import DeviceRuntime, Store, encode_payload
from coevo.serve.attack import AttackSpec, DeviceAttack, malicious_indices
from coevo.sim.simulator import simulate
from coevo.strategies.fedavg import FedAvg, FedAvgConfig
from coevo.testing import tiny_task
from coevo.types import CloudState, Payload

FEDAVG = {"name": "fedavg", "rounds": 3}
MEDIAN = {"name": "robust", "aggregator": {"name": "median"}, "inner": FEDAVG}
ATTACKERS = malicious_indices(list(range(NUM_DEVICES)), 0.2, seed=0)


def served(
    folder: Path, name: str, strategy: dict[str, Any], attack: DeviceAttack | None
) -> CloudState:
    """The final global model after 3 in-process rounds of 20 devices, ATTACKERS attacking."""
    app, coordinator = make_app(tiny_config(folder / f"{name}.sqlite", strategies=[strategy]))

    async def run_fleet() -> list:
        async with asgi_client(app) as client:
            fleet = [
                DeviceRuntime(
                    client,
                    i,
                    folder / f"{name}-{i}.st",
                    service=coordinator.service,
                    infer="none",
                    attack=attack if i in ATTACKERS else None,
                )
                for i in range(NUM_DEVICES)
            ]
            return await asyncio.gather(*(device.run() for device in fleet))

    reports = asyncio.run(run_fleet())
    assert all(report.rounds_trained == [0, 1, 2] for report in reports)
    assert coordinator.version == 3
    return coordinator.cloud


def distance(a: CloudState, b: CloudState) -> float:
    return math.sqrt(sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a.tensors))


def test_attack_spec_builds_the_simulators_attacks_and_names_bad_options() -> None:
    attack = AttackSpec("sign_flip", scale=3.0, start_round=1, seed=5).build(num_items=10)
    assert isinstance(attack.attack, SignFlip) and attack.attack.config.factor == 3.0
    assert not attack.active(0) and attack.active(1)
    assert AttackSpec("noise", scale=0.5).build().attack.config.sigma == 0.5
    with pytest.raises(ValueError, match=r"--attack: .*nope"):
        AttackSpec("nope").build()
    with pytest.raises(ValueError, match="--attack-scale: attack 'label_flip' has no"):
        AttackSpec("label_flip", scale=2.0).build()
    with pytest.raises(ValueError, match="--malicious-share: must be in"):
        malicious_indices([0, 1], 1.5, seed=0)
    # The command line names the bad option before any process starts.
    runner = CliRunner()
    for args, problem in [
        (["--attack", "nope"], "--attack:"),
        (["--attack", "label_flip", "--attack-scale", "2"], "has no magnitude knob"),
        (["--attack", "sign_flip", "--malicious-share", "2"], "--malicious-share: must be in"),
        (["--attack-scale", "2"], "--attack-scale: needs --attack"),
    ]:
        result = runner.invoke(app, ["devices", "--server", "http://127.0.0.1:9", "-n", "2", *args])
        assert result.exit_code == 2 and problem in result.output, result.output
    # The same devices as the simulator's Adversarial wrapper picks.
    wrapped = Adversarial.wrap(FedAvg(tiny_task(NUM_DEVICES)), SignFlip(), share=0.2, seed=0)
    flags = wrapped.malicious_devices(NUM_DEVICES)
    assert {int(i) for i in flags.nonzero()} == ATTACKERS and len(ATTACKERS) == 4


def test_robust_aggregation_resists_attacking_device_runtimes(tmp_path: Path) -> None:
    """4 of 20 served devices send their update sign-flipped and scaled by 10. Plain FedAvg
    ends far from where it ends without them; the Robust wrapper (coordinate-wise median,
    trimmed mean) barely moves. The served attackers send what the simulator's Adversarial
    devices send: the attacked FedAvg run equals the simulated one."""
    attack = AttackSpec("sign_flip", scale=10.0).build()
    drift = {}
    for name, strategy in {
        "fedavg": FEDAVG,
        "median": MEDIAN,
        "trimmed": {
            "name": "robust",
            "aggregator": {"name": "trimmed_mean", "trim": 0.25},
            "inner": FEDAVG,
        },
    }.items():
        clean = served(tmp_path, f"{name}-clean", strategy, None)
        attacked = served(tmp_path, f"{name}-attacked", strategy, attack)
        drift[name] = distance(attacked, clean)
        if name == "fedavg":
            simulated = simulate(
                Adversarial.wrap(
                    FedAvg(tiny_task(NUM_DEVICES), FedAvgConfig(rounds=3)),
                    SignFlip({"factor": 10.0}),
                    share=0.2,
                ),
                torch.Generator().manual_seed(0),
            ).cloud
            for key, tensor in simulated.tensors.items():
                torch.testing.assert_close(attacked[key], tensor, atol=1e-6, rtol=1e-5)
    print(f"drift under attack: {drift}")
    assert drift["fedavg"] > 0.05, drift
    assert drift["median"] < 0.25 * drift["fedavg"], drift
    assert drift["trimmed"] < 0.25 * drift["fedavg"], drift


def test_malicious_device_processes_against_a_real_server(tmp_path: Path) -> None:
    """`coevo devices --malicious-share 0.2 --attack sign_flip` against `coevo serve` with a
    median merge: the four attacker processes run the attack (they say so), the run
    finishes, and it ends where the same attack ends in process."""
    config = tiny_config(tmp_path / "serve.sqlite", strategies=[MEDIAN])
    with running_server(config, tmp_path) as server:
        launched = subprocess.run(
            cli(
                "devices",
                "--server",
                server.url,
                "-n",
                str(NUM_DEVICES),
                "--state-dir",
                str(tmp_path / "devices"),
                "--infer",
                "none",
                "--malicious-share",
                "0.2",
                "--attack",
                "sign_flip",
                "--attack-scale",
                "10",
            ),
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert launched.returncode == 0, launched.stdout + launched.stderr
        health = httpx.get(f"{server.url}/health", timeout=10).json()
        assert health["status"] == "ok" and health["finished"]
    out = launched.stdout
    assert out.count("[malicious (sign_flip)]: trained rounds [0, 1, 2]") == len(ATTACKERS)
    assert out.count("[honest]: trained rounds [0, 1, 2]") == NUM_DEVICES - len(ATTACKERS)
    for index in ATTACKERS:
        assert f"device {index} [malicious" in out
    latest = Store(tmp_path / "serve.sqlite").latest_model()
    assert latest is not None and latest[0] == 3
    in_process = served(tmp_path, "reference", MEDIAN, AttackSpec("sign_flip", 10.0).build())
    for key, tensor in in_process.tensors.items():
        torch.testing.assert_close(latest[1][key], tensor, atol=1e-6, rtol=1e-5)


class Hostile:
    """An in-process server with a 2-device round; device 2 is the malicious one."""

    def __init__(self, folder: Path) -> None:
        config = tiny_config(
            folder / "db",
            **{"simulation.devices_per_round": 2, "serve.max_body_bytes": 64 * 1024},
        )
        self.app, self.coordinator = make_app(config)
        self.store = self.coordinator.store
        self.tokens: dict[int, str] = {}

    def auth(self, index: int, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.tokens[index]}"}

    def body(self, value: float, **info: Any) -> bytes:
        tensors = {
            k: torch.full(s.shape, value) for k, s in self.coordinator.uplink_template.items()
        }
        data, _ = encode_payload(Payload(tensors), None, **{"num_examples": 4, **info})
        return data


def test_a_device_cannot_overwrite_or_read_another_devices_update(tmp_path: Path) -> None:
    hostile = Hostile(tmp_path)

    honest = hostile.body(0.01, round=0)

    async def scenario() -> None:
        async with asgi_client(hostile.app) as client:
            for index in (0, 1, 2):
                answer = await client.post("/v1/devices", json={"device_index": index})
                hostile.tokens[index] = answer.json()["token"]
            for index in (0, 2):
                checked = await client.post("/v1/checkin", headers=hostile.auth(index))
                assert checked.json()["action"] == "train"
            put = await client.put("/v1/rounds/0/update", content=honest, headers=hostile.auth(0))
            assert put.status_code == 200, put.text
            before = hostile.store.snapshot()

            # Its own secret under device 0's index; then registering device 0 anew.
            secret = hostile.tokens[2].split(".", 1)[1]
            put = await client.put(
                "/v1/rounds/0/update",
                content=hostile.body(-5.0),
                headers=hostile.auth(2, f"0.{secret}"),
            )
            assert put.status_code == 401 and "token rejected" in put.json()["detail"]
            again = await client.post("/v1/devices", json={"device_index": 0})
            assert again.status_code == 409 and "already registered" in again.json()["detail"]
            stolen = await client.get("/v1/devices/0/state", headers=hostile.auth(2))
            assert stolen.status_code == 403 and "cannot read device 0" in stolen.json()["detail"]
            # Device 0's own slot cannot be rewritten with different bytes either.
            put = await client.put(
                "/v1/rounds/0/update", content=hostile.body(-5.0, round=0), headers=hostile.auth(0)
            )
            assert put.status_code == 409 and "already sent a different update" in put.text
            assert hostile.store.snapshot() == before
            # Device 2 uploading device 0's exact bytes stores them as its own update only.
            put = await client.put("/v1/rounds/0/update", content=honest, headers=hostile.auth(2))
            assert put.status_code == 200 and put.json()["device_index"] == 2

    asyncio.run(scenario())
    stored = hostile.store.update(0, 0)
    assert stored is not None and stored.body == honest
    assert hostile.coordinator.version == 1  # the round merged both updates, once each
    assert [(d, m) for r, d, _, m in hostile.store.snapshot()["updates"]] == [(0, 1), (2, 1)]


def test_an_old_rounds_update_cannot_be_replayed(tmp_path: Path) -> None:
    hostile = Hostile(tmp_path)

    async def scenario() -> None:
        async with asgi_client(hostile.app) as client:
            for index in (0, 1, 2):
                answer = await client.post("/v1/devices", json={"device_index": index})
                hostile.tokens[index] = answer.json()["token"]
            round_0 = {i: hostile.body(0.01 * (i + 1), round=0) for i in (0, 1)}
            for index in (0, 1):
                await client.post("/v1/checkin", headers=hostile.auth(index))
                put = await client.put(
                    "/v1/rounds/0/update", content=round_0[index], headers=hostile.auth(index)
                )
                assert put.status_code == 200, put.text
            assert hostile.coordinator.version == 1
            checked = await client.post("/v1/checkin", headers=hostile.auth(0))
            assert checked.json()["round"] == 1 and checked.json()["action"] == "train"
            before = hostile.store.snapshot()
            # The round-0 update replayed into round 1, where device 0 is assigned.
            replay = await client.put(
                "/v1/rounds/1/update", content=round_0[0], headers=hostile.auth(0)
            )
            assert replay.status_code == 409
            assert "made for round 0" in replay.json()["detail"]
            assert "replayed into round 1" in replay.json()["detail"]
            # A new update sent into the closed round 0 (by a device that did not send one).
            late = await client.put(
                "/v1/rounds/0/update",
                content=hostile.body(0.5, round=0),
                headers=hostile.auth(2),
            )
            assert late.status_code == 409
            assert "round: 0 is closed; the open round is 1" in late.json()["detail"]
            # The identical round-0 bytes get their receipt back and are not counted again.
            resent = await client.put(
                "/v1/rounds/0/update", content=round_0[1], headers=hostile.auth(1)
            )
            assert resent.status_code == 200 and json.loads(resent.text)["round"] == 0
            assert hostile.store.snapshot() == before

    asyncio.run(scenario())
    assert hostile.coordinator.version == 1
    assert hostile.store.count_pending(1) == 0


def test_a_barrage_of_hostile_uploads_leaves_the_server_healthy(tmp_path: Path) -> None:
    """While an honest device uploads, a malicious one floods the server with oversized,
    truncated, NaN, huge-norm, wrongly-typed and garbage bodies at once: every one is a 4xx,
    /health answers, the honest update is stored and nothing else is."""
    hostile = Hostile(tmp_path)
    good = hostile.body(0.01, round=0)
    nan = hostile.body(math.nan, round=0)
    header = good[:8] + b"{" * 100
    bad_bodies = [
        bytes(70 * 1024),
        good[: len(good) // 2],
        nan,
        hostile.body(1e6, round=0),
        hostile.body(0.01, round="zero"),
        header,
        b"\xff" * 64,
        b"",
    ]

    async def scenario() -> list[Any]:
        async with asgi_client(hostile.app) as client:
            for index in (0, 2):
                answer = await client.post("/v1/devices", json={"device_index": index})
                hostile.tokens[index] = answer.json()["token"]
                await client.post("/v1/checkin", headers=hostile.auth(index))
            attacks = [
                client.put("/v1/rounds/0/update", content=body, headers=hostile.auth(2))
                for body in bad_bodies * 3
            ]
            honest = client.put("/v1/rounds/0/update", content=good, headers=hostile.auth(0))
            answers = await asyncio.gather(honest, *attacks)
            health = await client.get("/health")
            assert health.status_code == 200 and health.json()["status"] == "ok"
            return answers

    honest, *attacked = asyncio.run(scenario())
    assert honest.status_code == 200, honest.text
    assert all(400 <= answer.status_code < 500 for answer in attacked), [
        (a.status_code, a.text) for a in attacked
    ]
    assert all(answer.json()["detail"] for answer in attacked)
    assert [(d, r) for r, d, _, _ in hostile.store.snapshot()["updates"]] == [(0, 0)]
    assert hostile.coordinator.version == 0
