"""Start the server under uvicorn, or N device processes on this machine (demos and tests).

``launch_devices`` fetches the run config once, builds the task and strategy, then forks one
process per device: each child inherits the imported libraries and the built task instead of
paying for them again, and runs its own device runtime with its own state file.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from coevo.config import RunConfig
from coevo.serve.attack import AttackSpec, DeviceAttack
from coevo.serve.device import InferMode
from coevo.serve.settings import ServeConfig, Service, build_service


def app_from_config(config: ServeConfig, data_dir: str | None = None) -> FastAPI:
    """The FastAPI app a serve config describes, over its SQLite database."""
    from coevo.serve.app import create_app
    from coevo.serve.rounds import Coordinator
    from coevo.serve.store import Store

    service = build_service(config.run, data_dir)
    simulation = config.run.simulation
    coordinator = Coordinator(
        service,
        config.serve,
        Store(config.serve.database),
        fingerprint=config.fingerprint(),
        devices_per_round=simulation.devices_per_round,
        over_selection=simulation.over_selection,
    )
    return create_app(coordinator, config.run.model_dump(mode="json"))


def run_server(config: ServeConfig, data_dir: str | None = None) -> None:
    """Serve until interrupted (uvicorn, one process)."""
    import uvicorn

    app = app_from_config(config, data_dir)
    serve = config.serve
    uvicorn.run(
        app,
        host=serve.host,
        port=serve.port,
        log_level="warning",
        timeout_keep_alive=int(max(1, serve.keep_alive_s)),
    )


def _device_main(
    server: str,
    device_index: int,
    state_file: str,
    service: Service,
    give_up_s: float,
    infer: InferMode,
    attack: DeviceAttack | None = None,
    secagg: bool = False,
    policy: Any = None,
    sessions: int = 5,
) -> None:
    from coevo.serve.device import DeviceError, run_device

    try:
        report = asyncio.run(
            run_device(
                server,
                device_index,
                state_file,
                service=service,
                give_up_s=give_up_s,
                infer=infer,
                attack=attack,
                secagg=secagg,
                policy=policy,
                sessions=sessions,
            )
        )
    except DeviceError as error:
        print(f"device {device_index}: {error}", file=sys.stderr)
        sys.exit(1)
    role = f"malicious ({attack.attack.name})" if attack is not None else "honest"
    print(
        f"device {device_index} [{role}]: trained rounds {report.rounds_trained}, "
        f"retries {report.retries}, inference {report.inference}, hit@10 {report.hit_at_10}",
        flush=True,
    )


def launch_devices(
    server: str,
    indices: list[int],
    state_dir: str | Path,
    *,
    data_dir: str | None = None,
    give_up_s: float = 120.0,
    infer: InferMode = "onnx",
    attack: AttackSpec | None = None,
    malicious: set[int] | None = None,
    secagg: bool = False,
    policy: Any = None,
    sessions: int = 5,
) -> list[int]:
    """Run one device process per index until all finish; returns their exit codes.

    With ``attack``, the devices in ``malicious`` (all of them when ``None``) run it. With a
    request ``policy``, every device serves ``sessions`` sessions under it after training.
    """
    import torch

    torch.set_num_threads(1)
    run = _fetch_config(server, give_up_s)
    service = build_service(run, data_dir)
    adversary = attack.build(service.task.num_items) if attack is not None else None
    _warm_up(service if infer == "onnx" else None)
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(
            target=_device_main,
            args=(
                server,
                i,
                str(state / f"device-{i}.safetensors"),
                service,
                give_up_s,
                infer,
                adversary if malicious is None or i in malicious else None,
                secagg,
                policy,
                sessions,
            ),
            name=f"coevo-device-{i}",
        )
        for i in indices
    ]
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.join()
    finally:
        # Interrupted (Ctrl-C): end the children this launcher started, not only itself.
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=10)
    return [int(process.exitcode or 0) for process in processes]


def _warm_up(service: Service | None) -> None:
    """One-off setup done before forking, so that children inherit it instead of each paying
    seconds for it: torch.func's first ``vmap(grad(...))`` and, with a service, the ONNX trace
    of its device model (``coevo.export`` keeps traced graphs and only swaps weights)."""
    import torch
    from torch.func import grad, vmap

    def loss(weight: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return (torch.nn.functional.linear(inputs, weight) ** 2).sum()

    vmap(grad(loss))(torch.ones(2, 3, 4), torch.ones(2, 5, 4))
    if service is not None:
        try:
            from coevo import export
        except ImportError:
            return
        export.to_onnx(service.task.device_model())


def _fetch_config(server: str, give_up_s: float) -> RunConfig:
    """The server's run config, waiting for the server to come up (up to ``give_up_s``)."""
    import time

    started = time.monotonic()
    while True:
        try:
            response = httpx.get(f"{server}/v1/config", timeout=10.0)
            response.raise_for_status()
            return RunConfig.model_validate(response.json()["run"])
        except httpx.HTTPError:
            if time.monotonic() - started > give_up_s:
                raise
            time.sleep(0.2)
