"""Simulator parity: FedAvg served to devices over HTTP ends where the simulator ends.

Tolerance: ``allclose(atol=1e-6, rtol=1e-5)``. Devices run the simulator's own ``run_block``
on batches from ``cohort_batch``, so the only admissible difference is float32 summation
order in the merge (the server stacks updates by device index, the simulator by step count).
"""

from __future__ import annotations

import asyncio
import importlib.util
import sqlite3
import subprocess
from pathlib import Path

import pytest
import torch
from serve_helpers import (
    NUM_DEVICES,
    app_for,
    asgi_client,
    child_env,
    cli,
    running_server,
    tiny_config,
)

from coevo.serve import DeviceRuntime, Store, parse_serve_config
from coevo.serve.settings import Service
from coevo.sim.simulator import simulate
from coevo.strategies.fedavg import FedAvg, FedAvgConfig
from coevo.testing import tiny_task
from coevo.types import CloudState

ATOL, RTOL = 1e-6, 1e-5


def simulated(uplink_codecs: list[dict]) -> CloudState:
    """The simulator's final cloud state on tiny_task(20), FedAvg, 3 rounds, seed 0."""
    from coevo.config import CodecSpec
    from coevo.sim.setup import build_codec

    strategy = FedAvg(tiny_task(NUM_DEVICES), FedAvgConfig(rounds=3))
    codec = build_codec([CodecSpec(**spec) for spec in uplink_codecs])
    return simulate(strategy, torch.Generator().manual_seed(0), uplink_codec=codec).cloud


def assert_same_model(served: CloudState, reference: CloudState) -> None:
    assert sorted(served.tensors) == sorted(reference.tensors)
    for name, tensor in reference.tensors.items():
        torch.testing.assert_close(served[name], tensor, atol=ATOL, rtol=RTOL, msg=name)


def test_config_task_is_tiny_task(tmp_path: Path) -> None:
    from coevo.serve.settings import build_service

    service = build_service(parse_serve_config(tiny_config(tmp_path / "db")).run)
    tiny = tiny_task(NUM_DEVICES)
    assert torch.equal(service.task.split.items, tiny.split.items)
    assert service.task.shapes == tiny.shapes


@pytest.mark.parametrize("uplink_codecs", [[], [{"name": "int8"}]], ids=["plain", "int8"])
def test_in_process_devices_match_simulator(tmp_path: Path, uplink_codecs: list[dict]) -> None:
    config = tiny_config(tmp_path / "serve.sqlite")
    config["simulation"] = {"uplink_codecs": uplink_codecs}
    parsed = parse_serve_config(config)
    task = tiny_task(NUM_DEVICES)
    strategy = FedAvg(task, FedAvgConfig(rounds=3))
    from coevo.sim.setup import build_codec

    codec = build_codec(parsed.run.simulation.uplink_codecs)
    service = Service(task, strategy, 0, codec, None)
    app, coordinator = app_for(parsed, service)

    async def run_fleet() -> list:
        async with asgi_client(app) as client:
            fleet = [
                DeviceRuntime(client, i, tmp_path / f"d{i}.st", service=service, infer="none")
                for i in range(NUM_DEVICES)
            ]
            return await asyncio.gather(*(device.run() for device in fleet))

    reports = asyncio.run(run_fleet())
    assert all(report.rounds_trained == [0, 1, 2] for report in reports)
    if not uplink_codecs and importlib.util.find_spec("coevo.export") is not None:
        # The device's own final model (global weights + its private head) scores its test
        # request alike in ONNX Runtime and in PyTorch.
        device = DeviceRuntime(None, 4, tmp_path / "d4.st", service=service)  # type: ignore[arg-type]
        device._models = {3: (coordinator.model(3).etag, coordinator.model(3).body)}
        onnx_scores = device.infer_now("onnx").test_scores
        assert device.report.inference == "onnxruntime"
        torch_scores = device.infer_now("torch").test_scores
        torch.testing.assert_close(
            torch.tensor(onnx_scores), torch.tensor(torch_scores), atol=1e-5, rtol=1e-4
        )
    assert coordinator.version == 3
    assert_same_model(coordinator.cloud, simulated(uplink_codecs))
    # Each round merged exactly the 20 devices' updates, each once.
    merged = Store(tmp_path / "serve.sqlite").snapshot()["updates"]
    assert sorted((r, d, m) for r, d, _, m in merged) == [
        (r, d, r + 1) for r in range(3) for d in range(NUM_DEVICES)
    ]


def test_real_server_and_device_processes_match_simulator(tmp_path: Path) -> None:
    codecs = [{"name": "int8"}]
    config = tiny_config(tmp_path / "serve.sqlite", **{"simulation": {"uplink_codecs": codecs}})
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
                "torch",
                "--give-up-s",
                "60",
            ),
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert launched.returncode == 0, launched.stdout + launched.stderr
        assert launched.stdout.count("trained rounds [0, 1, 2]") == NUM_DEVICES
    with sqlite3.connect(tmp_path / "serve.sqlite") as db:
        (count,) = db.execute(
            "SELECT COUNT(*) FROM updates WHERE merged_into IS NOT NULL"
        ).fetchone()
    assert count == 3 * NUM_DEVICES
    latest = Store(tmp_path / "serve.sqlite").latest_model()
    assert latest is not None and latest[0] == 3
    assert_same_model(latest[1], simulated(codecs))
