"""Round rules: over-selection, deadline and quorum, pace steering, and the buffered mode."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from serve_helpers import asgi_client, make_app, tiny_config

from coevo.serve import encode_payload
from coevo.types import Payload


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Devices:
    """Registered devices talking to an in-process app, with hand-made updates."""

    def __init__(self, config: dict[str, Any], count: int, clock: Any = None) -> None:
        self.clock = clock or FakeClock()
        self.app, self.coordinator = make_app(config, clock=self.clock)
        self.tokens = [
            self.call("POST", "/v1/devices", json={"device_index": i}).json()["token"]
            for i in range(count)
        ]

    def call(self, method: str, url: str, **kwargs: Any) -> Any:
        async def send() -> Any:
            async with asgi_client(self.app) as client:
                return await client.request(method, url, **kwargs)

        return asyncio.run(send())

    def auth(self, index: int) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[index]}"}

    def check_in(self, index: int) -> dict[str, Any]:
        response = self.call("POST", "/v1/checkin", headers=self.auth(index))
        assert response.status_code == 200, response.text
        return response.json()

    def upload(self, index: int, round: int, value: float, num_examples: int = 1) -> Any:
        template = self.coordinator.uplink_template
        tensors = {k: torch.full(s.shape, value) for k, s in template.items()}
        body, _ = encode_payload(Payload(tensors), None, num_examples=num_examples)
        return self.call(
            "PUT", f"/v1/rounds/{round}/update", content=body, headers=self.auth(index)
        )

    def shared(self, version: int) -> dict[str, torch.Tensor]:
        cloud = self.coordinator.store.model(version)
        return {k: cloud[k] for k in self.coordinator.uplink_template}


def sync_config(folder: Path, **serve: Any) -> dict[str, Any]:
    config = tiny_config(folder / "db", **{"simulation.devices_per_round": 2})
    config["simulation"]["over_selection"] = 1.5
    config["serve"].update(serve)
    return config


def test_over_selection_assigns_three_for_two_and_merges_the_first_two(tmp_path: Path) -> None:
    devices = Devices(sync_config(tmp_path), 4)
    actions = [devices.check_in(i)["action"] for i in range(4)]
    assert actions == ["train", "train", "train", "wait"]
    assert devices.upload(0, 0, 1.0, num_examples=1).status_code == 200
    assert devices.upload(2, 0, 4.0, num_examples=3).status_code == 200
    assert devices.coordinator.version == 1
    for name, tensor in devices.shared(1).items():
        # Row-weighted mean update: (1 * 1.0 + 3 * 4.0) / 4 = 3.25.
        torch.testing.assert_close(tensor - devices.shared(0)[name], torch.full_like(tensor, 3.25))
    late = devices.upload(1, 0, 2.0)
    assert late.status_code == 409
    assert late.json()["detail"] == "round: 0 is closed; the open round is 1"


def test_deadline_merges_with_a_quorum_and_steers_the_pace(tmp_path: Path) -> None:
    devices = Devices(sync_config(tmp_path, round_deadline_s=10.0, min_quorum=1), 4)
    for i in range(3):
        devices.check_in(i)
    waiting = devices.check_in(3)
    # Nothing opens before the deadline, so the device is told to come back then.
    assert waiting["action"] == "wait" and waiting["retry_after_s"] == pytest.approx(10.0)
    assert devices.upload(1, 0, 2.0).status_code == 200
    assert devices.coordinator.version == 0
    devices.clock.now += 10.5
    assert devices.check_in(3)["action"] == "train"  # round 1, after the deadline's merge
    assert devices.coordinator.version == 1
    for name, tensor in devices.shared(1).items():
        torch.testing.assert_close(tensor - devices.shared(0)[name], torch.full_like(tensor, 2.0))


def test_below_quorum_the_round_waits_and_expired_slots_reopen(tmp_path: Path) -> None:
    devices = Devices(sync_config(tmp_path, round_deadline_s=10.0, min_quorum=2), 5)
    for i in range(3):
        assert devices.check_in(i)["action"] == "train"
    assert devices.upload(0, 0, 1.0).status_code == 200
    devices.clock.now += 11.0
    # One report is below the quorum of two: no merge; the silent devices' slots are free again.
    assert devices.check_in(3)["action"] == "train"
    assert devices.coordinator.version == 0
    assert devices.upload(3, 0, 3.0).status_code == 200
    assert devices.coordinator.version == 1
    assert [u[:2] for u in devices.coordinator.store.snapshot()["updates"]] == [(0, 0), (0, 3)]


def test_buffered_mode_merges_every_k_arrivals_with_staleness_weights(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "db")
    config["strategies"] = [{"name": "fedbuff", "rounds": 2, "buffer_size": 2, "concurrency": 3}]
    devices = Devices(config, 4)
    tickets = [devices.check_in(i) for i in range(4)]
    assert [t["action"] for t in tickets] == ["train", "train", "train", "wait"]
    assert [(t["round"], t["model_version"]) for t in tickets[:3]] == [(0, 0), (1, 0), (2, 0)]
    assert devices.upload(0, 0, 1.0, num_examples=1).status_code == 200
    assert devices.coordinator.version == 0
    assert devices.upload(1, 1, 3.0, num_examples=3).status_code == 200
    assert devices.coordinator.version == 1
    fourth = devices.check_in(3)
    assert (fourth["action"], fourth["round"], fourth["model_version"]) == ("train", 3, 1)
    # Device 2 trained from version 0 (staleness 1), device 3 from version 1 (staleness 0).
    assert devices.upload(2, 2, 2.0).status_code == 200
    assert devices.upload(3, 3, -1.0).status_code == 200
    assert devices.coordinator.version == 2
    assert devices.check_in(0)["action"] == "done"
    first = (1 * 1.0 + 3 * 3.0) / 4
    second = (2.0 * 2**-0.5 + -1.0) / 2
    for name, tensor in devices.shared(0).items():
        torch.testing.assert_close(devices.shared(1)[name] - tensor, torch.full_like(tensor, first))
        torch.testing.assert_close(
            devices.shared(2)[name] - devices.shared(1)[name], torch.full_like(tensor, second)
        )
    merged = [(r, d, m) for r, d, _, m in devices.coordinator.store.snapshot()["updates"]]
    assert merged == [(0, 0, 1), (1, 1, 1), (2, 2, 2), (3, 3, 2)]


def test_restart_rebuilds_the_round_from_the_database(tmp_path: Path) -> None:
    devices = Devices(sync_config(tmp_path), 3)
    for i in range(3):
        devices.check_in(i)
    assert devices.upload(0, 0, 1.0).status_code == 200
    devices.coordinator.store.close()
    # A new server process on the same file: same assignments, same pending update.
    restarted = Devices.__new__(Devices)
    restarted.clock = FakeClock()
    restarted.app, restarted.coordinator = make_app(sync_config(tmp_path))
    restarted.tokens = devices.tokens
    assert restarted.check_in(1)["action"] == "train"
    assert restarted.upload(1, 0, 3.0).status_code == 200
    assert restarted.coordinator.version == 1
    for name, tensor in restarted.shared(1).items():
        torch.testing.assert_close(tensor - restarted.shared(0)[name], torch.full_like(tensor, 2.0))


def test_a_database_for_another_config_is_refused(tmp_path: Path) -> None:
    make_app(tiny_config(tmp_path / "db"))
    other = tiny_config(tmp_path / "db")
    other["strategies"] = [{"name": "fedavg", "rounds": 4}]
    with pytest.raises(ValueError, match=r"serve\.database: .* different run config"):
        make_app(other)


def test_device_runtimes_in_buffered_mode_merge_every_update_once(tmp_path: Path) -> None:
    from coevo.serve import DeviceRuntime

    config = tiny_config(tmp_path / "db")
    config["strategies"] = [{"name": "fedbuff", "rounds": 4, "buffer_size": 3, "concurrency": 5}]
    app, coordinator = make_app(config)

    async def run_fleet() -> list:
        async with asgi_client(app) as client:
            fleet = [
                DeviceRuntime(
                    client, i, tmp_path / f"d{i}.st", service=coordinator.service, infer="none"
                )
                for i in range(8)
            ]
            return await asyncio.gather(*(device.run() for device in fleet))

    reports = asyncio.run(run_fleet())
    assert coordinator.version == 4
    updates = coordinator.store.snapshot()["updates"]
    merged = [m for _, _, _, m in updates if m is not None]
    # Every merge took exactly buffer_size updates; every stored update was merged.
    assert sorted(merged) == [v for v in (1, 2, 3, 4) for _ in range(3)]
    assert len(updates) == len(merged) == sum(len(r.rounds_trained) for r in reports)
