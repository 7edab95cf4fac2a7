"""The FastAPI app: a strategy's cloud side over HTTP, one Coordinator underneath.

Endpoints (all JSON unless said otherwise; errors are ``{"detail": "<field>: <problem>"}``):

- ``POST /v1/devices`` register a device index, answer its token (stored only as a sha256);
- ``GET /v1/config`` the run config both sides build the task and strategy from;
- ``GET /v1/model`` the downlink of a model version (safetensors; ``format=onnx`` for an
  inference model when ``coevo.export`` is installed), with an ETag;
- ``GET /v1/devices/{index}/state`` a device's initial private state (safetensors);
- ``POST /v1/checkin`` train, wait (``retry_after_s`` and ``Retry-After``) or done;
- ``PUT /v1/rounds/{round}/update`` one update (safetensors body), persisted before the 200;
- ``POST /v1/infer`` cloud inference: scores for candidates after a history;
- ``GET /v1/stream/items`` and ``POST /v1/stream/user``: the catalogue and a fresh user
  representation for devices that serve locally under a request policy (``coevo.serve.policy``);
- with ``serve.secagg``: ``POST /v1/secagg/{round}/join`` and ``PUT``/``GET``
  ``/v1/secagg/{round}/{keys,shares,masked,unmask}`` (``coevo.serve.secagg``);
- ``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /openapi.json``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import ClientDisconnect

from coevo.serve.inference import score_request
from coevo.serve.policy import add_routes as add_stream_routes
from coevo.serve.rounds import Coordinator, Rejected
from coevo.types import Payload

_DUMMY_HASH = hashlib.sha256(b"").hexdigest()


class Registration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device_index: int = Field(ge=0, description="The device's index in the task (its data).")


class Registered(BaseModel):
    device_index: int
    token: str = Field(description="Send as 'Authorization: Bearer <token>'; shown once.")


class CheckInAnswer(BaseModel):
    action: Literal["train", "wait", "done"]
    round: int
    model_version: int
    batch_seed: int
    retry_after_s: float


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    history: list[int] = Field(description="Item ids, oldest first.")
    candidates: list[int] = Field(description="Item ids to score.")


class InferenceAnswer(BaseModel):
    scores: list[float]
    model_version: int


class Metrics:
    """Prometheus counters, written out by hand in the text exposition format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            key = (name, tuple(sorted(labels.items())))
            self.counts[key] = self.counts.get(key, 0.0) + value

    def render(self, gauges: dict[str, float]) -> str:
        lines = []
        with self._lock:
            items = sorted(self.counts.items())
        seen: set[str] = set()
        for (name, labels), value in items:
            if name not in seen:
                lines.append(f"# TYPE coevo_{name} counter")
                seen.add(name)
            shown = ",".join(f'{k}="{v}"' for k, v in labels)
            label_text = f"{{{shown}}}" if shown else ""
            lines.append(f"coevo_{name}{label_text} {value:g}")
        for name, value in sorted(gauges.items()):
            lines += [f"# TYPE coevo_{name} gauge", f"coevo_{name} {value:g}"]
        return "\n".join(lines) + "\n"


def create_app(coordinator: Coordinator, run_config: dict[str, Any] | None = None) -> FastAPI:
    """The HTTP app of ``coordinator`` (``run_config`` is what ``GET /v1/config`` answers)."""
    app = FastAPI(
        title="coevo service",
        version="1",
        description="A coevo strategy's cloud side: registration, models, rounds, updates.",
    )
    app.state.coordinator = coordinator
    metrics = Metrics()
    app.state.metrics = metrics
    settings = coordinator.settings
    store = coordinator.store

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for item in error.errors():
            where = ".".join(str(p) for p in item["loc"])
            detail = item.get("ctx", {}).get("error", "") if item["type"] == "json_invalid" else ""
            problems.append(f"{where}: {item['msg']}{f' ({detail})' if detail else ''}")
        metrics.inc("requests_rejected_total", status="422")
        return JSONResponse({"detail": "; ".join(problems)}, status_code=422)

    @app.exception_handler(Rejected)
    async def _rejected(request: Request, error: Rejected) -> JSONResponse:
        metrics.inc("requests_rejected_total", status=str(error.status))
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    def authenticate(authorization: str | None) -> int:
        """The device index a bearer token belongs to; 401 naming what is wrong otherwise."""
        if not authorization:
            raise Rejected(401, "Authorization: missing; send 'Bearer <token>' from registration")
        scheme, _, token = authorization.partition(" ")
        index_text, dot, secret = token.strip().partition(".")
        if scheme.lower() != "bearer" or not dot or not index_text.isdigit() or not secret:
            raise Rejected(401, "Authorization: expected 'Bearer <device_index>.<secret>'")
        index = int(index_text)
        stored = store.token_hash(index) if index < 2**62 else None
        offered = hashlib.sha256(secret.encode()).hexdigest()
        # Compare even for an unknown device, so timing does not tell which indices exist.
        if not hmac.compare_digest(offered, stored or _DUMMY_HASH) or stored is None:
            raise Rejected(401, "Authorization: token rejected (unknown device or wrong secret)")
        return index

    @app.post("/v1/devices", status_code=201, response_model=Registered)
    async def register(body: Registration) -> Registered:
        if body.device_index >= coordinator.task.num_devices:
            raise Rejected(
                422,
                f"device_index: {body.device_index} is outside [0, {coordinator.task.num_devices})",
            )
        secret = secrets.token_urlsafe(32)
        digest = hashlib.sha256(secret.encode()).hexdigest()
        added = await run_in_threadpool(store.add_device, body.device_index, digest)
        if not added:
            raise Rejected(409, f"device_index: {body.device_index} is already registered")
        metrics.inc("devices_registered_total")
        return Registered(device_index=body.device_index, token=f"{body.device_index}.{secret}")

    @app.get("/v1/config")
    async def config() -> dict[str, Any]:
        return {"run": run_config or {}, "status": coordinator.status()}

    @app.get(
        "/v1/model",
        responses={200: {"content": {"application/octet-stream": {}}}, 304: {}},
    )
    async def model(
        request: Request,
        format: Literal["safetensors", "onnx"] = "safetensors",
        version: Annotated[int | None, Query(ge=0)] = None,
        quantize: Literal["none", "int8"] = "none",
    ) -> Response:
        if format == "onnx":
            return await run_in_threadpool(_onnx, coordinator, quantize)
        served = await run_in_threadpool(coordinator.model, version)
        headers = {"ETag": served.etag, "X-Model-Version": str(served.version)}
        if request.headers.get("if-none-match") == served.etag:
            return Response(status_code=304, headers=headers)
        metrics.inc("model_bytes_sent_total", len(served.body))
        return Response(served.body, media_type="application/octet-stream", headers=headers)

    @app.get(
        "/v1/devices/{device_index}/state",
        responses={200: {"content": {"application/octet-stream": {}}}},
    )
    async def device_state(
        device_index: int, authorization: Annotated[str | None, Header()] = None
    ) -> Response:
        own = authenticate(authorization)
        if own != device_index:
            raise Rejected(
                403, f"device_index: token of device {own} cannot read device {device_index}"
            )
        body = Payload(coordinator.device_state(device_index).tensors).to_bytes()
        return Response(body, media_type="application/octet-stream")

    @app.post("/v1/checkin", response_model=CheckInAnswer)
    async def check_in(
        response: Response, authorization: Annotated[str | None, Header()] = None
    ) -> CheckInAnswer:
        device_index = authenticate(authorization)
        answer = await run_in_threadpool(coordinator.check_in, device_index)
        metrics.inc("checkins_total", action=answer.action)
        if answer.action == "wait":
            response.headers["Retry-After"] = str(max(1, round(answer.retry_after_s)))
        return CheckInAnswer(**answer.__dict__)

    @app.put(
        "/v1/rounds/{round}/update",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        },
    )
    async def upload(
        round: int, request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> Response:
        device_index = authenticate(authorization)
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise Rejected(
                413,
                f"body: {declared} bytes exceeds the limit of {limit} bytes (serve.max_body_bytes)",
            )
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise Rejected(
                        413,
                        f"body: more than {limit} bytes exceeds the limit of {limit} bytes "
                        "(serve.max_body_bytes)",
                    )
                chunks.append(chunk)
        except ClientDisconnect:
            # The device went away mid-upload: nothing was stored, nothing is answered.
            metrics.inc("uploads_disconnected_total")
            return Response(status_code=400)
        body = b"".join(chunks)
        receipt = await run_in_threadpool(coordinator.accept, device_index, round, body)
        metrics.inc("updates_received_total")
        metrics.inc("update_bytes_received_total", len(body))
        return Response(receipt, media_type="application/json")

    @app.post("/v1/infer", response_model=InferenceAnswer)
    async def infer(
        body: InferenceRequest, authorization: Annotated[str | None, Header()] = None
    ) -> InferenceAnswer:
        device_index = authenticate(authorization)
        scores = await run_in_threadpool(
            score_request, coordinator, device_index, body.history, body.candidates
        )
        metrics.inc("inference_requests_total")
        return InferenceAnswer(scores=scores.tolist(), model_version=coordinator.version)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **coordinator.status()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        status = coordinator.status()
        gauges = {
            "model_version": float(status["model_version"]),
            "rounds_planned": float(status["rounds"]),
            "merges_since_start": float(coordinator.merges),
            "devices_registered": float(await run_in_threadpool(store.num_devices)),
        }
        return PlainTextResponse(
            metrics.render(gauges), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    add_stream_routes(app, coordinator, authenticate, lambda name: metrics.inc(name))

    if settings.secagg is not None:
        from coevo.serve.secagg import SecAggRounds
        from coevo.serve.secagg_http import add_routes

        if coordinator.secagg is None:
            coordinator.secagg = SecAggRounds(coordinator, settings.secagg)
        add_routes(app, coordinator.secagg, authenticate)
    return app


def _onnx(coordinator: Coordinator, quantize: str) -> Response:
    """The current model as ONNX for on-device inference (shared weights, initial personal)."""
    try:
        from coevo import export
    except ImportError:
        raise Rejected(404, "format: onnx needs coevo.export, which is not installed") from None
    model = coordinator.task.device_model()
    names = {name for name, _ in model.named_parameters()}
    params = {k: v for k, v in coordinator.cloud.tensors.items() if k in names}
    params |= {k: v for k, v in coordinator.device_state(0).tensors.items() if k in names}
    body = export.to_onnx(model, params)
    if quantize == "int8":
        body = export.quantize_int8(body)
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    headers = {"ETag": etag, "X-Model-Version": str(coordinator.version)}
    return Response(body, media_type="application/octet-stream", headers=headers)
