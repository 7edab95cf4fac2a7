"""The device runtime: one device's side of a served strategy, over HTTP.

It registers (keeping its token in a small local state file), fetches the run config and
builds the same task, strategy and codecs as the server, then loops: check in; when told to
train, download the model version named (ETag-cached), build its batch exactly as the
simulator does (``cohort_batch`` for a block of one device), run the strategy's own ``local``
through the simulator's ``run_block``, encode the uplink with the uplink codec and upload it.
Private state (personal weights, codec residuals) changes only once the server acknowledged
the update, as in the simulator, where only reporters' state changes. Every request is
retried with exponential backoff and full jitter while the server is down, so a device rides
out a server restart. When training is done it scores its own test candidates, with ONNX
Runtime when ``coevo.export`` is installed (PyTorch otherwise).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import torch
from safetensors.torch import load_file, save_file

from coevo.config import RunConfig
from coevo.policies import Policy
from coevo.serve.attack import DeviceAttack
from coevo.serve.policy import StreamReport, serve_stream
from coevo.serve.settings import Service, build_service
from coevo.serve.wire import decode_payload, encode_payload
from coevo.sim.batching import cohort_batch
from coevo.sim.executor import run_block
from coevo.types import CloudState, DeviceState, Payload

_RETRIED = {429, 500, 502, 503, 504}
InferMode = Literal["onnx", "torch", "none"]


class DeviceError(RuntimeError):
    """The server refused the device for good (its message says why) or stayed unreachable."""


@dataclass
class DeviceReport:
    """What a device did: rounds trained, refused uploads, and its own test-request result."""

    device_index: int
    rounds_trained: list[int] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    retries: int = 0
    inference: str = "none"
    hit_at_10: bool | None = None
    test_scores: list[float] = field(default_factory=list)
    stream: StreamReport | None = None


@dataclass
class LocalState:
    """What a device keeps on its own disk between runs: token, private and codec state."""

    token: str | None = None
    private: dict[str, torch.Tensor] | None = None
    codec: dict[str, torch.Tensor] = field(default_factory=dict)
    rounds: list[int] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> LocalState:
        if not path.exists():
            return cls()
        tensors = load_file(path)
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            meta = json.loads(handle.read(length)).get("__metadata__", {})
        private = {k[8:]: v for k, v in tensors.items() if k.startswith("private/")}
        codec = {k[6:]: v for k, v in tensors.items() if k.startswith("codec/")}
        has_private = meta.get("has_private") == "1"
        return cls(
            meta.get("token") or None,
            private if has_private else None,
            codec,
            json.loads(meta.get("rounds", "[]")),
        )

    def save(self, path: Path) -> None:
        """Write atomically (temporary file, fsync, rename): a crash keeps the old state."""
        tensors = {f"private/{k}": v.contiguous() for k, v in (self.private or {}).items()}
        tensors |= {f"codec/{k}": v.contiguous() for k, v in self.codec.items()}
        meta = {
            "token": self.token or "",
            "has_private": "1" if self.private is not None else "0",
            "rounds": json.dumps(self.rounds),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        save_file(tensors, temporary, metadata=meta)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)


class DeviceRuntime:
    """One device talking to a coevo server.

    Args:
        client: an httpx client whose ``base_url`` is the server (an ``ASGITransport`` client
            runs a device against an in-process app).
        device_index: the device's index in the task (which rows are its own data).
        state_file: where token and private state persist between runs.
        service: the task, strategy and codecs, if already built from the server's config.
        data_dir: where the run's dataset lives on this device (real data only).
        give_up_s: how long the server may stay unreachable before the device gives up.
        backoff_s: first and largest backoff delay, in seconds.
        infer: score the device's test request when done: ``"onnx"`` (ONNX Runtime when
            ``coevo.export`` is installed, else PyTorch), ``"torch"``, or ``"none"``.
        rng: jitter of the backoff.
        attack: run this attack instead of the honest ``local`` (a malicious device).
        secagg: take part in secure-aggregation rounds (masked uploads) instead of plain ones.
        policy: when done training, serve the device period as ``sessions`` sessions locally,
            asking the cloud for a fresh user representation before each session this request
            policy picks (``coevo.serve.policy``).
        sessions: sessions of the device period served under ``policy``.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        device_index: int,
        state_file: str | Path,
        *,
        service: Service | None = None,
        data_dir: str | None = None,
        give_up_s: float = 120.0,
        backoff_s: tuple[float, float] = (0.05, 5.0),
        infer: InferMode = "onnx",
        rng: random.Random | None = None,
        attack: DeviceAttack | None = None,
        secagg: bool = False,
        policy: Policy | None = None,
        sessions: int = 5,
    ) -> None:
        if sessions < 1:
            raise ValueError(f"sessions: {sessions} must be >= 1")
        self.policy = policy
        self.sessions = sessions
        self.infer = infer
        self.attack = attack
        self.secagg = secagg
        self.client = client
        self.device_index = device_index
        self.state_file = Path(state_file)
        self.service = service
        self.data_dir = data_dir
        self.give_up_s = give_up_s
        self.backoff_s = backoff_s
        self.rng = rng or random.Random(device_index)
        self.report = DeviceReport(device_index)
        self._models: dict[int, tuple[str, bytes]] = {}

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request, retried with exponential backoff and full jitter on transport errors,
        429 and 5xx (honouring ``Retry-After``), for up to ``give_up_s`` seconds."""
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                response = await self.client.request(method, url, **kwargs)
                if response.status_code not in _RETRIED:
                    return response
                problem = f"HTTP {response.status_code}"
                hinted = response.headers.get("retry-after", "")
            except httpx.TransportError as error:
                problem, hinted = f"{type(error).__name__}: {error}", ""
            if time.monotonic() - started > self.give_up_s:
                raise DeviceError(f"{method} {url}: gave up after {self.give_up_s:g} s ({problem})")
            base, cap = self.backoff_s
            delay = self.rng.uniform(0, min(cap, base * 2**attempt))
            if hinted.isdigit():
                delay = max(delay, float(hinted))
            attempt += 1
            self.report.retries += 1
            await asyncio.sleep(delay)

    def _auth(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    @staticmethod
    def _check(response: httpx.Response, what: str) -> httpx.Response:
        if response.status_code >= 400:
            raise DeviceError(f"{what}: HTTP {response.status_code}: {response.text}")
        return response

    async def _setup(self, state: LocalState) -> Service:
        if state.token is None:
            response = await self.request(
                "POST", "/v1/devices", json={"device_index": self.device_index}
            )
            state.token = self._check(response, "register").json()["token"]
            state.save(self.state_file)
        if self.service is None:
            response = self._check(await self.request("GET", "/v1/config"), "config")
            run = RunConfig.model_validate(response.json()["run"])
            self.service = build_service(run, self.data_dir)
        if state.private is None:
            url = f"/v1/devices/{self.device_index}/state"
            response = self._check(
                await self.request("GET", url, headers=self._auth(state.token)), "state"
            )
            payload, _ = decode_payload(response.content, None)
            state.private = dict(payload.tensors)
            state.save(self.state_file)
        return self.service

    async def _model(self, version: int) -> Payload:
        cached = self._models.get(version)
        headers = {"If-None-Match": cached[0]} if cached else {}
        response = await self.request(
            "GET", "/v1/model", params={"version": version}, headers=headers
        )
        if response.status_code != 304:
            self._check(response, "model")
            cached = (response.headers.get("etag", ""), response.content)
            self._models = {version: cached}
        assert cached is not None
        assert self.service is not None
        payload, _ = decode_payload(cached[1], self.service.downlink_codec)
        return payload

    def infer_now(self, mode: InferMode) -> DeviceReport:
        """Score the device's test request again with ``mode`` (its last model and state)."""
        assert self.service is not None
        self.infer = mode
        self._infer(self.service, LocalState.load(self.state_file))
        return self.report

    async def run(self) -> DeviceReport:
        """Take part until the server says training is done; then score the test request."""
        state = LocalState.load(self.state_file)
        service = await self._setup(state)
        assert state.token is not None and state.private is not None
        headers = self._auth(state.token)
        while True:
            response = self._check(
                await self.request("POST", "/v1/checkin", headers=headers), "check-in"
            )
            answer = response.json()
            if answer["action"] == "done":
                break
            if answer["action"] == "wait":
                await asyncio.sleep(float(answer["retry_after_s"]))
                continue
            await self._train(service, state, answer, headers)
        self._infer(service, state)
        if self.policy is not None:
            self.report.stream = await serve_stream(self, self.policy, self.sessions, headers)
        return self.report

    async def serve_sessions(self, policy: Policy, sessions: int) -> StreamReport:
        """Register if needed, then serve ``sessions`` sessions under ``policy`` (no training)."""
        state = LocalState.load(self.state_file)
        await self._setup(state)
        assert state.token is not None
        report = await serve_stream(self, policy, sessions, self._auth(state.token))
        self.report.stream = report
        return report

    async def _train(
        self, service: Service, state: LocalState, answer: dict[str, Any], headers: dict[str, str]
    ) -> None:
        round = int(answer["round"])
        payload = await self._model(int(answer["model_version"]))
        strategy, task = service.strategy, service.task
        local = strategy.config.local
        assert strategy.local_period is not None, "the server assigns training only when it trains"
        rows, offsets = task.device_rows(strategy.local_period)
        block = torch.tensor([self.device_index])
        batch = cohort_batch(
            task,
            rows,
            offsets,
            block,
            epochs=local.epochs,
            batch_size=local.batch_size,
            seed=int(answer["batch_seed"]),
            round=round,
        )
        private = DeviceState({k: v[None] for k, v in (state.private or {}).items()})
        trainer = (
            strategy
            if self.attack is None
            else self.attack.strategy(strategy, self.device_index, round)
        )
        up, new, metrics = run_block(trainer, payload, private, batch)
        uplink = Payload(
            {k: v[0] for k, v in up.items()},
            metrics={k: float(v[0]) for k, v in metrics.items()},
        )
        num_examples = int(offsets[self.device_index + 1] - offsets[self.device_index])
        if self.secagg:
            from coevo.serve.secagg_http import secagg_upload

            if not await secagg_upload(self, round, uplink, num_examples, headers):
                return
            self._acknowledged(state, new, state.codec, round)
            return
        body, codec_state = encode_payload(
            uplink,
            service.uplink_codec,
            state.codec or None,
            num_examples=num_examples,
            round=round,
        )
        response = await self.request(
            "PUT",
            f"/v1/rounds/{round}/update",
            content=body,
            headers={**headers, "Content-Type": "application/octet-stream"},
        )
        if response.status_code == 409:
            # Too late (the round merged without us) or already counted: state stays as is.
            self.report.refused.append(response.json().get("detail", ""))
            return
        self._check(response, "upload")
        self._acknowledged(state, new, codec_state, round)

    def _acknowledged(
        self,
        state: LocalState,
        new: dict[str, torch.Tensor],
        codec_state: dict[str, torch.Tensor],
        round: int,
    ) -> None:
        """The server took this round's update: keep the new private and codec state."""
        state.private = {k: v[0] for k, v in new.items()}
        state.codec = codec_state
        state.rounds.append(round)
        state.save(self.state_file)
        self.report.rounds_trained.append(round)

    def _infer(self, service: Service, state: LocalState) -> None:
        """Score this device's test candidates with its final model; record hit@10."""
        cached = next(iter(self._models.values()), None)
        if cached is None or not service.strategy.rounds or self.infer == "none":
            return
        strategy, task = service.strategy, service.task
        payload, _ = decode_payload(cached[1], service.downlink_codec)
        split = task.split
        row = split.target_rows("test")[self.device_index : self.device_index + 1]
        history = split.history(row, task.history_len)
        candidates = split.candidates("test")[self.device_index : self.device_index + 1]
        model = task.device_model()
        names = {name for name, _ in model.named_parameters()}
        params = {
            k: v for k, v in {**payload.tensors, **(state.private or {})}.items() if k in names
        }
        try:
            if self.infer != "onnx":
                raise ImportError("PyTorch inference asked for")
            from coevo import export

            scorer = export.OnnxScorer(export.to_onnx(model, params))
            scores = torch.as_tensor(scorer.score(history.numpy(), candidates.numpy()))
            self.report.inference = "onnxruntime"
        except ImportError:
            private = DeviceState({k: v[None] for k, v in (state.private or {}).items()})
            # The downlink holds the cloud weights the device model reads (FedAvg family).
            cloud = CloudState(dict(payload.tensors))
            with torch.no_grad():
                scores = strategy.score(cloud, private, history, candidates)
            self.report.inference = "torch"
        self.report.test_scores = scores[0].tolist()
        rank = int((scores[0] > scores[0, 0]).sum())
        self.report.hit_at_10 = rank < 10


async def run_device(
    server: str,
    device_index: int,
    state_file: str | Path,
    *,
    service: Service | None = None,
    data_dir: str | None = None,
    give_up_s: float = 120.0,
    infer: InferMode = "onnx",
    attack: DeviceAttack | None = None,
    secagg: bool = False,
    policy: Any = None,
    sessions: int = 5,
) -> DeviceReport:
    """Run one device against ``server`` (a URL) until training is done (then, with a request
    ``policy``, serve ``sessions`` sessions under it)."""
    async with httpx.AsyncClient(base_url=server, timeout=60.0) as client:
        runtime = DeviceRuntime(
            client,
            device_index,
            state_file,
            service=service,
            data_dir=data_dir,
            give_up_s=give_up_s,
            infer=infer,
            attack=attack,
            secagg=secagg,
            policy=policy,
            sessions=sessions,
        )
        return await runtime.run()
