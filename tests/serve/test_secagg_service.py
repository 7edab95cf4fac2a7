"""Secure aggregation in the service: the server stores only masked vectors, and its merge is
the plain FedAvg merge of the same updates, with and without a device dropping out."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from serve_helpers import NUM_DEVICES, asgi_client, make_app, tiny_config
from test_parity import assert_same_model, simulated

from coevo.codecs.secagg import SecAggClient, decode_fixed, encode_fixed
from coevo.serve import DeviceRuntime, encode_payload
from coevo.serve.secagg_http import client_from_join, secagg_vector
from coevo.types import Payload

COHORT = 5
TIMEOUT_S = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Cohort:
    """An in-process secure-aggregation server with a round of COHORT devices, each driving
    the protocol by hand with its own ``SecAggClient`` (so that a test decides who drops)."""

    def __init__(self, folder: Path) -> None:
        self.database = folder / "serve.sqlite"
        config = tiny_config(
            self.database,
            **{
                "simulation.devices_per_round": COHORT,
                "serve.secagg": {"phase_timeout_s": TIMEOUT_S},
            },
        )
        self.clock = Clock()
        self.app, self.coordinator = make_app(config, clock=self.clock)
        self.secagg = self.coordinator.secagg
        self.tokens: dict[int, str] = {}
        self.clients: dict[int, SecAggClient] = {}
        generator = torch.Generator().manual_seed(7)
        template = self.coordinator.uplink_template
        self.updates = {
            i: {k: 0.1 * torch.randn(s.shape, generator=generator) for k, s in template.items()}
            for i in range(COHORT)
        }
        self.weights = {i: 3 + 2 * i for i in range(COHORT)}
        self.vectors = {i: secagg_vector(self.updates[i], self.weights[i]) for i in range(COHORT)}

    def auth(self, index: int) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[index]}"}

    async def start(self, client: Any) -> None:
        for index in range(COHORT):
            answer = await client.post("/v1/devices", json={"device_index": index})
            self.tokens[index] = answer.json()["token"]
            checked = await client.post("/v1/checkin", headers=self.auth(index))
            assert checked.json()["action"] == "train"
        for index in range(COHORT):
            joined = (await client.post("/v1/secagg/0/join", headers=self.auth(index))).json()
            self.clients[index] = client_from_join(joined)

    async def phase(self, client: Any, phase: str, messages: dict[int, bytes]) -> dict[int, Any]:
        """Every device in ``messages`` sends its message; then each asks for the answer."""
        for index, message in messages.items():
            sent = await client.put(
                f"/v1/secagg/0/{phase}",
                content=message,
                headers={**self.auth(index), "Content-Type": "application/octet-stream"},
            )
            assert sent.status_code == 200, sent.text
        return {
            index: await client.get(f"/v1/secagg/0/{phase}", headers=self.auth(index))
            for index in messages
        }

    async def run(self, client: Any, survivors: list[int]) -> dict[int, Any]:
        """The protocol, with the devices outside ``survivors`` dropping after sharing."""
        keys = await self.phase(client, "keys", {i: c.advertise() for i, c in self.clients.items()})
        shares = await self.phase(
            client,
            "shares",
            {i: self.clients[i].share_keys(keys[i].content) for i in self.clients},
        )
        masked = await self.phase(
            client,
            "masked",
            {
                i: self.clients[i].masked_input(self.vectors[i], shares[i].content)
                for i in survivors
            },
        )
        if len(survivors) < COHORT:
            # Waiting for the dropped devices' vectors until the phase times out.
            assert all(answer.status_code == 202 for answer in masked.values())
            self.clock.now += TIMEOUT_S + 1
            masked = {
                i: await client.get("/v1/secagg/0/masked", headers=self.auth(i)) for i in survivors
            }
        return await self.phase(
            client, "unmask", {i: self.clients[i].unmask(masked[i].content) for i in survivors}
        )


def stored_blobs(database: Path) -> dict[str, list[bytes]]:
    """Every binary value of every table of the server's SQLite file."""
    blobs: dict[str, list[bytes]] = {}
    with sqlite3.connect(database) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in db.execute(f"SELECT * FROM {table}"):
                blobs.setdefault(table, []).extend(v for v in row if isinstance(v, bytes))
    return blobs


@pytest.mark.parametrize("dropped", [[], [4]], ids=["all", "one-drops-after-sharing"])
def test_server_stores_only_masked_vectors_and_merges_the_plain_fedavg_aggregate(
    tmp_path: Path, dropped: list[int]
) -> None:
    cohort = Cohort(tmp_path)
    survivors = [i for i in range(COHORT) if i not in dropped]
    cloud_before = cohort.coordinator.cloud

    async def scenario() -> dict[int, Any]:
        async with asgi_client(cohort.app) as client:
            await cohort.start(client)
            # A plain upload is refused: updates only arrive masked.
            body, _ = encode_payload(Payload(cohort.updates[0]), None, num_examples=3)
            plain = await client.put("/v1/rounds/0/update", content=body, headers=cohort.auth(0))
            assert plain.status_code == 409 and "serve.secagg" in plain.json()["detail"]
            return await cohort.run(client, survivors)

    final = asyncio.run(scenario())
    assert all(answer.status_code == 200 for answer in final.values())
    assert cohort.coordinator.version == 1
    params = cohort.secagg.params

    # Exact on the fixed-point values: the unmasked sum is the ring sum of the survivors'.
    ring_sum = np.zeros(params.vector_len, dtype=params.dtype)
    for i in survivors:
        np.add(ring_sum, encode_fixed(cohort.vectors[i], params), out=ring_sum)
    assert np.array_equal(cohort.secagg.last_total(0), decode_fixed(ring_sum, params))

    # On floats: the merged model is the plain FedAvg merge of the survivors' updates.
    stacked = {k: torch.stack([cohort.updates[i][k] for i in survivors]) for k in cohort.updates[0]}
    weights = torch.tensor([float(cohort.weights[i]) for i in survivors])
    expected = cohort.coordinator.strategy.merge(cloud_before, Payload(stacked), weights)
    assert_same_model(cohort.coordinator.cloud, expected)

    # The database holds masked vectors of the survivors only, and nothing close to an update.
    blobs = stored_blobs(cohort.database)
    masked = blobs.pop("secagg_masked")
    assert len(masked) == len(survivors)
    assert "updates" not in blobs  # no plain update row at all
    plain_bytes = [
        chunk
        for i in range(COHORT)
        for chunk in (
            encode_fixed(cohort.vectors[i], params).tobytes(),
            *(t.numpy().tobytes() for t in cohort.updates[i].values()),
        )
    ]
    for blob in masked:
        values = np.frombuffer(blob, dtype=params.dtype)
        decoded = decode_fixed(values.copy(), params)
        for i in range(COHORT):
            assert np.abs(decoded - cohort.vectors[i]).max() > 1e3
        # A masked vector looks uniform in the ring: about half the values have the top bit.
        top = (values >> np.uint64(params.ring_bits - 1)).astype(float).mean()
        assert abs(top - 0.5) < 5 / np.sqrt(len(values))
    for table, values in blobs.items():
        for blob in values:
            for chunk in plain_bytes:
                assert chunk[:64] not in blob, table


def test_too_many_dropouts_fail_the_round_with_the_threshold_named(tmp_path: Path) -> None:
    cohort = Cohort(tmp_path)
    threshold = cohort.secagg.params.threshold
    survivors = list(range(threshold - 1))

    async def scenario() -> tuple[dict[int, Any], Any]:
        async with asgi_client(cohort.app) as client:
            await cohort.start(client)
            final = await cohort.run(client, survivors)
            again = await client.post("/v1/secagg/0/join", headers=cohort.auth(0))
            return final, again

    final, again = asyncio.run(scenario())
    for answer in final.values():
        assert answer.status_code == 409
        detail = answer.json()["detail"]
        assert f"threshold is {threshold}" in detail and "too many devices dropped" in detail
    assert cohort.coordinator.version == 0
    # The assigned devices can start a new attempt of the same round.
    assert again.status_code == 200 and again.json()["attempt"] == 1


@pytest.mark.parametrize("groups", [1, 2])
def test_device_runtimes_with_secure_aggregation_match_the_simulator(
    tmp_path: Path, groups: int
) -> None:
    """20 device runtimes, 3 rounds, every update masked, in one or two SecAgg+ groups (the
    device side is the same): the served model equals plain FedAvg's simulated one (fixed
    point at 2^-24 keeps it within the parity tolerance)."""
    config = tiny_config(tmp_path / "serve.sqlite", **{"serve.secagg": {"groups": groups}})
    app, coordinator = make_app(config)

    async def run_fleet() -> list:
        async with asgi_client(app) as client:
            fleet = [
                DeviceRuntime(
                    client,
                    i,
                    tmp_path / f"d{i}.st",
                    service=coordinator.service,
                    infer="none",
                    secagg=True,
                )
                for i in range(NUM_DEVICES)
            ]
            return await asyncio.gather(*(device.run() for device in fleet))

    reports = asyncio.run(run_fleet())
    assert all(report.rounds_trained == [0, 1, 2] for report in reports), reports
    assert coordinator.version == 3
    assert sorted(coordinator.secagg.group_totals(2)) == list(range(groups))
    assert_same_model(coordinator.cloud, simulated([]))
    blobs = stored_blobs(tmp_path / "serve.sqlite")
    assert len(blobs["secagg_masked"]) == 3 * NUM_DEVICES
    assert "updates" not in blobs
