"""Secure aggregation over HTTP: the server's ``/v1/secagg`` endpoints and the device's side.

The protocol is Bell et al.'s SecAgg+ (``coevo.codecs.secagg``); the server's round state is
``coevo.serve.secagg.SecAggRounds``.

Device: trains as usual, then sends, instead of its update, the vector ``[w·u, w]`` (its
update's tensors in name order, times its merge weight ``w = num_examples``, then ``w``)
encoded in fixed point and masked. Four phases, each a ``PUT`` of the device's message and a
``GET`` of the server's answer once the phase has closed (``202`` with ``Retry-After`` until
then): ``keys`` (two X25519 public keys; answer: the neighbours' keys), ``shares`` (Shamir
shares of its self-mask seed and its mask key, each encrypted with AES-GCM to the neighbour
it is for: the server routes ciphertexts it cannot read; answer: the shares addressed to the
device), ``masked`` (the masked vector; answer: which neighbours' secrets to reveal) and
``unmask`` (one share per neighbour: of the self-mask seed of a neighbour whose vector
arrived, of the mask key of one that dropped). ``POST .../join`` gives the device its slot
in the round's neighbour graph and the public parameters first.

Wire, per device and round: as ``secagg_cost`` (64 bytes of keys up, about 160 bytes per
neighbour each way, the masked vector, 4 round trips plus the join).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import torch
from fastapi import Header, Request, Response
from fastapi.concurrency import run_in_threadpool

from coevo.codecs.secagg import SecAggClient, SecAggError, SecAggParams
from coevo.serve.rounds import Rejected
from coevo.serve.secagg import Phase, SecAggRounds

if TYPE_CHECKING:
    from fastapi import FastAPI

    from coevo.serve.device import DeviceRuntime
    from coevo.types import Payload


def secagg_vector(tensors: Mapping[str, torch.Tensor], num_examples: int) -> np.ndarray:
    """What a device masks: its update's tensors in name order, flattened and times its merge
    weight, then the weight itself (float64)."""
    parts = [tensors[k].detach().double().reshape(-1) * num_examples for k in sorted(tensors)]
    weight = torch.tensor([float(num_examples)], dtype=torch.float64)
    return torch.cat([*parts, weight]).numpy()


def client_from_join(joined: Mapping[str, Any]) -> SecAggClient:
    """A device's protocol side for the round it joined (the ``POST .../join`` answer: its id,
    neighbours and the public parameters of its group)."""
    fields = ("num_devices", "degree", "threshold", "vector_len", "clip_range", "scale_bits")
    params = SecAggParams(**{k: joined[k] for k in fields}, ring_bits=joined["ring_bits"])
    return SecAggClient(joined["slot"], params, np.array(joined["neighbours"]))


def add_routes(app: FastAPI, rounds: SecAggRounds, authenticate: Any) -> None:
    """The ``/v1/secagg/{round}/...`` endpoints of ``rounds`` on ``app``."""
    binary = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    limit = rounds.coordinator.settings.max_body_bytes

    @app.post("/v1/secagg/{round}/join")
    async def join(
        round: int, authorization: Annotated[str | None, Header()] = None
    ) -> dict[str, Any]:
        device_index = authenticate(authorization)
        return await run_in_threadpool(rounds.join, device_index, round)

    @app.put(
        "/v1/secagg/{round}/{phase}",
        openapi_extra={"requestBody": {"required": True, "content": binary}},
    )
    async def put(
        round: int,
        phase: Phase,
        request: Request,
        authorization: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        device_index = authenticate(authorization)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise Rejected(413, f"body: {declared} bytes exceeds the limit of {limit} bytes")
        body = await request.body()
        if len(body) > limit:
            raise Rejected(413, f"body: {len(body)} bytes exceeds the limit of {limit} bytes")
        return await run_in_threadpool(rounds.put, device_index, round, phase, body)

    @app.get("/v1/secagg/{round}/{phase}", responses={200: {"content": binary}, 202: {}})
    async def get(
        round: int, phase: Phase, authorization: Annotated[str | None, Header()] = None
    ) -> Response:
        device_index = authenticate(authorization)
        answer = await run_in_threadpool(rounds.get, device_index, round, phase)
        if answer is None:
            wait = rounds.coordinator.settings.retry_after_s
            return Response(
                status_code=202,
                headers={"Retry-After": str(max(1, round_up(wait))), "X-Retry-After-S": str(wait)},
            )
        return Response(answer, media_type="application/octet-stream")


def round_up(seconds: float) -> int:
    return int(-(-seconds // 1))


async def secagg_upload(
    runtime: DeviceRuntime,
    round: int,
    uplink: Payload,
    num_examples: int,
    headers: dict[str, str],
) -> bool:
    """Send one round's update through secure aggregation; ``False`` when the server dropped
    the device from the round (its reason is in the runtime's report)."""

    base = f"/v1/secagg/{round}"

    async def refused(response: Any) -> bool:
        if response.status_code == 409:
            runtime.report.refused.append(response.json().get("detail", ""))
            return True
        runtime._check(response, "secagg")
        return False

    response = await runtime.request("POST", f"{base}/join", headers=headers)
    if await refused(response):
        return False
    client = client_from_join(response.json())
    params = client.params
    vector = secagg_vector(uplink.tensors, num_examples)
    if vector.shape != (params.vector_len,):
        raise SecAggError(f"update has {vector.size} values, the round expects {params.vector_len}")
    binary = {**headers, "Content-Type": "application/octet-stream"}
    message = client.advertise()
    steps = (
        ("keys", client.share_keys),
        ("shares", lambda answer: client.masked_input(vector, answer)),
        ("masked", client.unmask),
    )
    for phase, respond in (*steps, ("unmask", None)):
        response = await runtime.request("PUT", f"{base}/{phase}", content=message, headers=binary)
        if await refused(response):
            return False
        while True:
            response = await runtime.request("GET", f"{base}/{phase}", headers=headers)
            if response.status_code != 202:
                break
            await asyncio.sleep(float(response.headers.get("x-retry-after-s", "1")))
        if await refused(response):
            return False
        if respond is not None:
            message = respond(response.content)
    return True
