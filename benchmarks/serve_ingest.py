"""Update ingest of the real server: K devices upload int8 updates at once, beside /health.

For each K, a fresh ``coevo serve`` process (uvicorn, SQLite WAL with ``synchronous=FULL``)
runs FedAvg with the int8 uplink codec on the recommendation device model at MovieLens-100K's
size (1,682 items, dim 32, history 20; a synthetic world, as K = 1,000 exceeds ML-100K's 943
users). K simulated devices (one async httpx client on loopback) register and check in; then
all K upload their int8-encoded update at once (the K-th completes the round, so the merge is
inside the measured window). Reported: accepted updates/s over that window, p50/p99 latency
per upload, the server's peak RSS, and /health requests/s measured on the same server right
after (32 concurrent client tasks on the same httpx client: the server's rate for a request
that does no work, the baseline of ``ratio``; httpx itself slows down with hundreds of
concurrent tasks, which would flatter the ratio). ``lost`` counts uploads answered 200 whose
update is not in the database afterwards (must be 0). Client and server share the cores.

    OMP_NUM_THREADS=1 python benchmarks/serve_ingest.py [--ks 100,1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import yaml

from coevo.codecs import Int8
from coevo.serve import encode_payload
from coevo.types import Payload

HEALTH_CLIENTS = 32
HEALTH_REQUESTS = 3200


def _config(database: Path, port: int, num_devices: int) -> dict[str, Any]:
    return {
        "name": "serve-ingest",
        "data": {
            "synthetic": {
                "num_devices": num_devices,
                "num_items": 1682,
                "min_interactions": 20,
                "mean_interactions": 40,
                "max_interactions": 200,
            }
        },
        "models": {"device": {"dim": 32, "history_len": 20}},
        "strategies": [{"name": "fedavg", "rounds": 5}],
        "simulation": {"devices_per_round": num_devices, "uplink_codecs": [{"name": "int8"}]},
        "serve": {
            "database": str(database),
            "port": port,
            "retry_after_s": 1.0,
            "max_body_bytes": 1 << 20,
            "keep_alive_s": 600,
        },
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start_server(folder: Path, num_devices: int) -> tuple[subprocess.Popen, str, Path]:
    port = _free_port()
    database = folder / f"serve-{num_devices}.sqlite"
    path = folder / f"serve-{num_devices}.yaml"
    path.write_text(yaml.safe_dump(_config(database, port, num_devices)))
    log = open(folder / f"server-{num_devices}.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-c", "from coevo.cli import app; app()", "serve", str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    while True:
        if process.poll() is not None:
            raise RuntimeError((folder / f"server-{num_devices}.log").read_text())
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url, database
        except httpx.HTTPError:
            pass
        if time.monotonic() - started > 300:
            raise RuntimeError("server did not start in 300 s")
        time.sleep(0.2)


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _run(url: str, num_devices: int, health_per_client: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=num_devices, max_keepalive_connections=num_devices)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300.0) as client:
        semaphore = asyncio.Semaphore(64)

        async def register(index: int) -> dict[str, str]:
            async with semaphore:
                response = await client.post("/v1/devices", json={"device_index": index})
                auth = {"Authorization": f"Bearer {response.json()['token']}"}
                answer = (await client.post("/v1/checkin", headers=auth)).json()
                assert answer["action"] == "train", answer
                return auth

        model = await client.get("/v1/model")
        from coevo.serve import decode_payload

        template, _ = decode_payload(model.content, None)
        generator = torch.Generator().manual_seed(0)
        codec = Int8()
        bodies = []
        for _ in range(num_devices):
            update = {
                k: 0.01 * torch.randn(v.shape, generator=generator)
                for k, v in template.tensors.items()
            }
            body, _ = encode_payload(Payload(update), codec, num_examples=10)
            bodies.append(body)
        auths = await asyncio.gather(*(register(i) for i in range(num_devices)))

        async def upload(index: int) -> tuple[float, int, str]:
            started = time.perf_counter()
            response = await client.put(
                "/v1/rounds/0/update",
                content=bodies[index],
                headers={**auths[index], "Content-Type": "application/octet-stream"},
            )
            sha = response.json().get("sha256", "") if response.status_code == 200 else ""
            return time.perf_counter() - started, response.status_code, sha

        started = time.perf_counter()
        results = await asyncio.gather(*(upload(i) for i in range(num_devices)))
        upload_s = time.perf_counter() - started

        async def health() -> None:
            for _ in range(health_per_client):
                assert (await client.get("/health")).status_code == 200

        started = time.perf_counter()
        await asyncio.gather(*(health() for _ in range(HEALTH_CLIENTS)))
        health_s = time.perf_counter() - started
    latencies = np.array([r[0] for r in results]) * 1000
    acknowledged = [(i, r[2]) for i, r in enumerate(results) if r[1] == 200]
    return {
        "bytes": len(bodies[0]),
        "accepted": len(acknowledged),
        "refused": num_devices - len(acknowledged),
        "updates_per_s": len(acknowledged) / upload_s,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "health_rps": HEALTH_CLIENTS * health_per_client / health_s,
        "acknowledged": acknowledged,
    }


def _lost(database: Path, acknowledged: list[tuple[int, str]]) -> int:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        stored = set(db.execute("SELECT device_index, sha256 FROM updates WHERE round = 0"))
    return sum((index, sha) not in stored for index, sha in acknowledged)


def measure(num_devices: int, folder: Path) -> dict[str, Any]:
    process, url, database = _start_server(folder, num_devices)
    try:
        result = asyncio.run(_run(url, num_devices, HEALTH_REQUESTS // HEALTH_CLIENTS))
        result["peak_rss_mib"] = _peak_rss_mib(process.pid)
        status = httpx.get(f"{url}/health").json()
        result["merged"] = status["model_version"] == 1
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    result["lost"] = _lost(database, result.pop("acknowledged"))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="100,1000", help="comma-separated device counts")
    args = parser.parse_args()
    counts = [int(k) for k in args.ks.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for count in counts:
            rows.append((count, measure(count, Path(folder))))
    header = (
        f"{'K':>6} {'bytes/upd':>9} {'accepted':>8} {'refused':>7} {'upd/s':>8} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'health rps':>10} {'ratio':>6} {'RSS MiB':>8} {'merged':>6} {'lost':>4}"
    )
    print(header)
    for count, r in rows:
        print(
            f"{count:>6} {r['bytes']:>9} {r['accepted']:>8} {r['refused']:>7} "
            f"{r['updates_per_s']:>8.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
            f"{r['health_rps']:>10.1f} {r['updates_per_s'] / r['health_rps']:>6.3f} "
            f"{r['peak_rss_mib']:>8.1f} {r['merged']!s:>6} {r['lost']:>4}"
        )
    count, last = rows[-1]
    print(
        f"serve_ingest: k={count} updates_per_s={last['updates_per_s']:.1f} "
        f"p99_ms={last['p99_ms']:.1f} health_rps={last['health_rps']:.1f} "
        f"ratio={last['updates_per_s'] / last['health_rps']:.3f} lost={last['lost']}"
    )


if __name__ == "__main__":
    main()
