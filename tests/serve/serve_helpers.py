"""Helpers of the service tests: the tiny task's config, in-process apps, real servers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from coevo.serve import Coordinator, ServeConfig, Service, Store, create_app, parse_serve_config
from coevo.serve.settings import build_service

NUM_DEVICES = 20


def tiny_config(database: str | Path, **changes: Any) -> dict[str, Any]:
    """A serve config whose task is ``coevo.testing.tiny_task(20)`` (same world, split, shapes)."""
    config: dict[str, Any] = {
        "seeds": [0],
        "data": {
            "synthetic": {
                "num_devices": NUM_DEVICES,
                "num_items": 150,
                "min_interactions": 10,
                "mean_interactions": 16,
                "max_interactions": 40,
            }
        },
        "models": {
            "device": {"dim": 8, "history_len": 5},
            "cloud": {"dim": 8, "history_len": 8, "layers": 1},
        },
        "strategies": [{"name": "fedavg", "rounds": 3}],
        "serve": {"database": str(database), "retry_after_s": 0.1},
    }
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if name:
            config.setdefault(section, {})[name] = value
        else:
            config[section] = value
    return config


def make_app(config: dict[str, Any], clock: Any = time.time) -> tuple[Any, Coordinator]:
    """An in-process app over the config's database; returns ``(app, coordinator)``."""
    parsed: ServeConfig = parse_serve_config(config)
    service = build_service(parsed.run)
    return app_for(parsed, service, clock)


def app_for(
    parsed: ServeConfig, service: Service, clock: Any = time.time
) -> tuple[Any, Coordinator]:
    simulation = parsed.run.simulation
    coordinator = Coordinator(
        service,
        parsed.serve,
        Store(parsed.serve.database),
        fingerprint=parsed.fingerprint(),
        devices_per_round=simulation.devices_per_round,
        over_selection=simulation.over_selection,
        clock=clock,
    )
    return create_app(coordinator, parsed.run.model_dump(mode="json")), coordinator


def asgi_client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cli(*args: str) -> list[str]:
    """The ``coevo`` command line, run with this interpreter."""
    return [sys.executable, "-c", "from coevo.cli import app; app()", *args]


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


class ServerProcess:
    """``coevo serve`` in a subprocess on a free loopback port; killed by ``stop``."""

    def __init__(
        self, config: dict[str, Any], folder: Path, name: str = "server", port: int | None = None
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.log = folder / f"{name}-{self.port}.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                cli("serve", str(path), "--set", f"serve.port={self.port}"),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env(),
            )
        self._wait_healthy()

    def _wait_healthy(self, timeout_s: float = 90.0) -> None:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not come up in {timeout_s} s:\n{self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, as in a power cut or an OOM kill."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        self.kill()


def launch_devices(url: str, first: int, count: int, folder: Path) -> subprocess.Popen:
    """``coevo devices`` in its own process group (``stop_group`` ends it and its children)."""
    return subprocess.Popen(
        cli(
            "devices",
            "--server",
            url,
            "-n",
            str(count),
            "--first",
            str(first),
            "--state-dir",
            str(folder / "devices"),
            "--infer",
            "none",
            "--give-up-s",
            "120",
        ),
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def stop_group(process: subprocess.Popen) -> None:
    """SIGKILL a launcher started by ``launch_devices`` and every device process it forked."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)


@contextmanager
def running_server(
    config: dict[str, Any], folder: Path, name: str = "server", port: int | None = None
) -> Iterator[ServerProcess]:
    server = ServerProcess(config, folder, name, port)
    try:
        yield server
    finally:
        server.stop()
