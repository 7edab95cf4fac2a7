"""Secure aggregation in the Service: SecAgg+ rounds over HTTP, the server holding only masks.

Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020,
run with ``coevo.codecs.secagg``'s ``SecAggClient`` (device) and ``SecAggServer`` (cloud).

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

Cloud: a phase closes when every device still in has sent its message, or after
``serve.secagg.phase_timeout_s`` without the missing ones (they have dropped). The masked
vectors are written to SQLite (table ``secagg_masked``) before they are acknowledged; no
plain update, share or key is stored. After the unmasking phase the server rebuilds the
self-mask seeds of the survivors and the mask keys of devices that dropped after sharing,
removes their masks, and merges ``sum(w·u) / sum(w)`` as the round's update, which for the
FedAvg family equals the plain merge of the survivors' updates (exactly on the fixed-point
values). Too many drop-outs fail the round with the library's error naming the threshold;
the assigned devices then start a new attempt of the same round. Protocol state is in memory:
a server restart mid-round starts a new attempt.

Wire, per device and round: as ``secagg_cost`` (64 bytes of keys up, about 160 bytes per
neighbour each way, the masked vector, 4 round trips plus the join).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import torch
from fastapi import Header, Request, Response
from fastapi.concurrency import run_in_threadpool

from coevo.codecs.secagg import (
    CIPHER_BYTES,
    ID_BYTES,
    PUBLIC_BYTES,
    SHARE_BYTES,
    SecAggClient,
    SecAggError,
    SecAggParams,
    SecAggServer,
    neighbour_degree,
    neighbour_graph,
    neighbour_threshold,
)
from coevo.serve.rounds import Coordinator, Rejected
from coevo.serve.settings import SecAggSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from coevo.serve.device import DeviceRuntime
    from coevo.types import Payload

Phase = Literal["keys", "shares", "masked", "unmask"]
PHASES: tuple[Phase, ...] = ("keys", "shares", "masked", "unmask")
_ENTRY_BYTES = {"shares": ID_BYTES + CIPHER_BYTES, "unmask": ID_BYTES + SHARE_BYTES}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS secagg_masked (
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    device_index INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (round, attempt, slot)
)
"""


def secagg_vector(tensors: Mapping[str, torch.Tensor], num_examples: int) -> np.ndarray:
    """What a device masks: its update's tensors in name order, flattened and times its merge
    weight, then the weight itself (float64)."""
    parts = [tensors[k].detach().double().reshape(-1) * num_examples for k in sorted(tensors)]
    weight = torch.tensor([float(num_examples)], dtype=torch.float64)
    return torch.cat([*parts, weight]).numpy()


@dataclass
class _Attempt:
    """One try at a round's secure aggregation (a failed try is followed by a new one)."""

    round: int
    number: int
    params: SecAggParams
    graph: np.ndarray
    server: SecAggServer
    phase_started: float
    phase: int = 0
    slots: dict[int, int] = field(default_factory=dict)
    expected: set[int] | None = None
    inbox: dict[int, bytes] = field(default_factory=dict)
    outbox: dict[str, dict[int, bytes]] = field(default_factory=dict)
    error: str | None = None
    total: np.ndarray | None = None

    @property
    def phase_name(self) -> str:
        return PHASES[self.phase] if self.phase < len(PHASES) else "merged"


class SecAggRounds:
    """The server side of secure-aggregation rounds, driven by the ``/v1/secagg`` endpoints.

    Args:
        coordinator: the synchronous round state machine; its rounds merge through here.
        settings: fixed point, ring, neighbour degree and phase timeout.

    Raises:
        ValueError: for an asynchronous strategy, an uplink codec, fewer than two devices per
            round, or a degree the round size does not allow (the message names the field).
    """

    def __init__(self, coordinator: Coordinator, settings: SecAggSettings) -> None:
        if coordinator.asynchronous:
            raise ValueError("serve.secagg: secure aggregation runs synchronous rounds only")
        if coordinator.service.uplink_codec is not None:
            raise ValueError(
                "serve.secagg: the masked vector is the uplink's encoding; remove "
                "simulation.uplink_codecs"
            )
        template = coordinator.uplink_template
        if any(not spec.meta().is_floating_point() for spec in template.values()):
            raise ValueError("serve.secagg: every uplink tensor must be floating point")
        n = coordinator.capacity
        if n < 2:
            raise ValueError(f"serve.secagg: needs at least 2 devices per round, got {n}")
        degree = settings.degree or neighbour_degree(n, settings.dropout)
        degree = min(degree, n - 1)
        self.coordinator, self.settings = coordinator, settings
        self.names = sorted(template)
        self.params = SecAggParams(
            num_devices=n,
            degree=degree,
            threshold=min(neighbour_threshold(degree), degree),
            vector_len=sum(template[k].meta().numel() for k in self.names) + 1,
            clip_range=settings.clip_range,
            scale_bits=settings.scale_bits,
            ring_bits=settings.ring_bits,
        )
        self._lock = threading.RLock()
        self._attempts: dict[int, _Attempt] = {}
        self._numbers: dict[int, int] = {}
        with coordinator.store.transaction() as db:
            db.execute(_SCHEMA)

    # state
    def reported(self, round: int, device_index: int) -> bool:
        """Whether the device's masked vector of ``round`` is in (it then waits at check-in)."""
        attempt = self._attempts.get(round)
        if attempt is None or attempt.error is not None:
            return False
        slot = attempt.slots.get(device_index)
        return slot is not None and slot in attempt.server.masked

    def last_total(self, round: int) -> np.ndarray | None:
        """The unmasked sum ``[sum(w·u), sum(w)]`` of ``round`` (once merged)."""
        attempt = self._attempts.get(round)
        return None if attempt is None else attempt.total

    def _new_attempt(self, round: int) -> _Attempt:
        number = self._numbers.get(round, -1) + 1
        self._numbers[round] = number
        graph = neighbour_graph(self.params.num_devices, self.params.degree, secrets.randbits(62))
        attempt = _Attempt(
            round,
            number,
            self.params,
            graph,
            SecAggServer(self.params, graph),
            self.coordinator.clock(),
        )
        # The previous round's attempt stays: its slow devices still ask for its last answer.
        self._attempts = {r: a for r, a in self._attempts.items() if r >= round - 1}
        self._attempts[round] = attempt
        return attempt

    def _open(self, device_index: int, round: int) -> None:
        coordinator = self.coordinator
        if coordinator.finished:
            raise Rejected(409, f"round: training finished after {coordinator.rounds} rounds")
        if round != coordinator.version:
            state = "closed" if round < coordinator.version else "not open yet"
            raise Rejected(
                409, f"round: {round} is {state}; the open round is {coordinator.version}"
            )
        if coordinator.store.assignment(round, device_index) is None:
            raise Rejected(
                409, f"round: device {device_index} is not assigned to round {round}; check in"
            )

    def _attempt(self, round: int) -> _Attempt:
        attempt = self._attempts.get(round)
        if attempt is None:
            raise Rejected(409, f"secagg: round {round} has no secure aggregation open; join")
        return attempt

    def _slot(self, attempt: _Attempt, device_index: int) -> int:
        slot = attempt.slots.get(device_index)
        if slot is None:
            raise Rejected(
                409,
                f"secagg: device {device_index} has not joined attempt {attempt.number} of "
                f"round {attempt.round}; join",
            )
        return slot

    # endpoints
    def join(self, device_index: int, round: int) -> dict[str, Any]:
        """The device's slot, neighbours and the public parameters of the round's attempt."""
        with self._lock:
            self._open(device_index, round)
            attempt = self._attempts.get(round)
            if attempt is not None:
                self._advance(attempt)
            if attempt is None or attempt.error is not None:
                attempt = self._new_attempt(round)
            slot = attempt.slots.get(device_index)
            if slot is None:
                if attempt.phase > 0 or len(attempt.slots) >= self.params.num_devices:
                    raise Rejected(
                        409,
                        f"secagg: attempt {attempt.number} of round {round} is past joining "
                        f"(phase {attempt.phase_name}, {len(attempt.slots)} of "
                        f"{self.params.num_devices} slots taken); check in later",
                    )
                slot = len(attempt.slots)
                attempt.slots[device_index] = slot
            params = self.params
            return {
                "round": round,
                "attempt": attempt.number,
                "slot": slot,
                "neighbours": [int(v) for v in attempt.graph[slot]],
                "num_devices": params.num_devices,
                "degree": params.degree,
                "threshold": params.threshold,
                "vector_len": params.vector_len,
                "clip_range": params.clip_range,
                "scale_bits": params.scale_bits,
                "ring_bits": params.ring_bits,
                "phase_timeout_s": self.settings.phase_timeout_s,
            }

    def put(self, device_index: int, round: int, phase: Phase, body: bytes) -> dict[str, Any]:
        """Take the device's message of ``phase`` (the masked vector is stored before this
        returns); ``Rejected`` naming the problem otherwise."""
        with self._lock:
            self._open(device_index, round)
            attempt = self._attempt(round)
            self._advance(attempt)
            if attempt.error is not None:
                raise Rejected(409, f"secagg: attempt {attempt.number} failed: {attempt.error}")
            slot = self._slot(attempt, device_index)
            if attempt.phase_name != phase:
                raise Rejected(
                    409,
                    f"secagg: phase {phase} of round {round} is not open (the open phase is "
                    f"{attempt.phase_name})",
                )
            if attempt.expected is not None and slot not in attempt.expected:
                raise Rejected(
                    409,
                    f"secagg: device {device_index} dropped out of round {round} before {phase}",
                )
            known = attempt.inbox.get(slot)
            if known is not None:
                if known != body:
                    raise Rejected(
                        409, f"secagg: device {device_index} already sent a different {phase}"
                    )
                return {"status": "accepted", "phase": phase, "slot": slot}
            self._check_message(phase, body, attempt, slot)
            if phase == "masked":
                with self.coordinator.store.transaction() as db:
                    db.execute(
                        "INSERT INTO secagg_masked (round, attempt, slot, device_index, body) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (round, attempt.number, slot, device_index, body),
                    )
            attempt.inbox[slot] = body
            self._advance(attempt)
            return {"status": "accepted", "phase": phase, "slot": slot}

    def get(self, device_index: int, round: int, phase: Phase) -> bytes | None:
        """The server's answer to ``phase`` for the device; ``None`` while the phase is open."""
        with self._lock:
            attempt = self._attempts.get(round)
            if attempt is None or attempt.round != round:
                self._open(device_index, round)
                attempt = self._attempt(round)
            self._advance(attempt)
            slot = self._slot(attempt, device_index)
            if attempt.error is not None:
                raise Rejected(409, f"secagg: attempt {attempt.number} failed: {attempt.error}")
            if phase not in attempt.outbox:
                return None
            answer = attempt.outbox[phase].get(slot)
            if answer is None:
                raise Rejected(
                    409, f"secagg: device {device_index} dropped out of round {round} at {phase}"
                )
            return answer

    def tick(self) -> None:
        """Close phases whose devices are all in or whose timeout passed."""
        with self._lock:
            for attempt in list(self._attempts.values()):
                self._advance(attempt)

    # protocol
    def _check_message(self, phase: Phase, body: bytes, attempt: _Attempt, slot: int) -> None:
        if phase == "keys" and len(body) != PUBLIC_BYTES:
            raise Rejected(400, f"body: public keys are {PUBLIC_BYTES} bytes, got {len(body)}")
        if phase == "masked":
            size = self.params.vector_len * np.dtype(self.params.dtype).itemsize
            if len(body) != size:
                raise Rejected(
                    400,
                    f"body: a masked vector is {size} bytes ({self.params.vector_len} values of "
                    f"{self.params.ring_bits} bits), got {len(body)}",
                )
        if phase in _ENTRY_BYTES:
            step = _ENTRY_BYTES[phase]
            if len(body) % step:
                raise Rejected(400, f"body: {phase} is a list of {step}-byte entries")
            allowed = set(attempt.graph[slot].tolist())
            ids = {
                int.from_bytes(body[i : i + ID_BYTES], "little") for i in range(0, len(body), step)
            }
            if not ids <= allowed or len(ids) != len(body) // step:
                raise Rejected(
                    400, f"body: {phase} names devices that are not this device's neighbours"
                )

    def _advance(self, attempt: _Attempt) -> None:
        """Close the open phase while it is complete or timed out (possibly several)."""
        while attempt.error is None and attempt.phase < len(PHASES):
            expected = (
                set(range(self.params.num_devices))
                if attempt.expected is None
                else attempt.expected
            )
            complete = expected <= set(attempt.inbox)
            late = self.coordinator.clock() >= attempt.phase_started + self.settings.phase_timeout_s
            if not complete and not late:
                return
            self._close(attempt)

    def _close(self, attempt: _Attempt) -> None:
        phase, inbox, server = attempt.phase_name, attempt.inbox, attempt.server
        try:
            if len(inbox) < 2:
                raise SecAggError(
                    f"phase {phase}: {len(inbox)} device(s) took part; at least 2 are needed"
                )
            if phase == "keys":
                attempt.outbox[phase] = server.advertise(inbox)
            elif phase == "shares":
                attempt.outbox[phase] = server.share(inbox)
            elif phase == "masked":
                attempt.outbox[phase] = server.collect(inbox)
            else:
                attempt.total = server.unmask(inbox)
        except SecAggError as error:
            attempt.error = str(error)
            return
        attempt.expected = set(inbox)
        attempt.inbox = {}
        attempt.phase += 1
        attempt.phase_started = self.coordinator.clock()
        if attempt.total is not None:
            attempt.outbox["unmask"] = {slot: b"" for slot in attempt.expected}
            self._merge(attempt, attempt.total)

    def _merge(self, attempt: _Attempt, total: np.ndarray) -> None:
        weight = float(total[-1])
        if not weight > 0:
            attempt.error = f"the unmasked merge weight is {weight}; nothing to merge"
            return
        mean = torch.from_numpy(total[:-1] / weight)
        template = self.coordinator.uplink_template
        update, start = {}, 0
        for name in self.names:
            spec = template[name]
            size = spec.meta().numel()
            update[name] = mean[start : start + size].reshape(spec.shape).to(spec.meta().dtype)
            start += size
        self.coordinator.merge_aggregate(attempt.round, update, weight)


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
    import asyncio

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
    joined = response.json()
    params = SecAggParams(
        num_devices=joined["num_devices"],
        degree=joined["degree"],
        threshold=joined["threshold"],
        vector_len=joined["vector_len"],
        clip_range=joined["clip_range"],
        scale_bits=joined["scale_bits"],
        ring_bits=joined["ring_bits"],
    )
    client = SecAggClient(joined["slot"], params, np.array(joined["neighbours"]))
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
