"""Hostile input: every bad request is a 4xx naming the problem, and the store is unchanged."""

from __future__ import annotations

import asyncio
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors
from serve_helpers import asgi_client, make_app, tiny_config

from coevo.serve import encode_payload
from coevo.types import Payload

MAX_BODY = 64 * 1024


class Fleet:
    """An in-process server with device 0 assigned to round 0 and device 1 registered only."""

    def __init__(self, folder: Path) -> None:
        config = tiny_config(
            folder / "db", **{"serve.max_body_bytes": MAX_BODY, "serve.max_update_norm": 100.0}
        )
        self.app, self.coordinator = make_app(config)
        self.tokens: list[str] = []
        self.call(self._setup())

    async def _setup(self) -> None:
        async with asgi_client(self.app) as client:
            for index in (0, 1):
                response = await client.post("/v1/devices", json={"device_index": index})
                self.tokens.append(response.json()["token"])
            checked = await client.post("/v1/checkin", headers=self.auth(0))
            assert checked.json()["action"] == "train"

    def auth(self, index: int) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[index]}"}

    @staticmethod
    def call(coroutine: Any) -> Any:
        return asyncio.run(coroutine)

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        async def send() -> Any:
            async with asgi_client(self.app) as client:
                return await client.request(method, url, **kwargs)

        return self.call(send())

    def upload(self, body: bytes, index: int = 0, round: int = 0, **headers: str) -> Any:
        return self.request(
            "PUT",
            f"/v1/rounds/{round}/update",
            content=body,
            headers={**self.auth(index), **headers},
        )

    def template(self) -> dict[str, torch.Tensor]:
        return {k: torch.full(s.shape, 0.001) for k, s in self.coordinator.uplink_template.items()}

    def body(self, tensors: dict[str, torch.Tensor] | None = None, **info: Any) -> bytes:
        data, _ = encode_payload(
            Payload(tensors or self.template()), None, **(info or {"num_examples": 4})
        )
        return data


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path)


def _expect(response: Any, status: int, *phrases: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    for phrase in phrases:
        assert phrase in detail, detail


def _raw(header: dict[str, Any], data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _bad_uploads(fleet: Fleet) -> list[tuple[str, dict[str, Any], int, tuple[str, ...]]]:
    """(case, upload arguments, status, phrases the message must contain)."""
    good = fleet.template()
    name = sorted(good)[0]
    renamed = {("renamed" if k == name else k): v for k, v in good.items()}
    reshaped = {**good, name: torch.zeros(3, 3)}
    wider = {**good, name: good[name].double()}
    nan = {**good, name: good[name].clone().fill_(math.nan)}
    inf = {**good, name: good[name].clone().fill_(math.inf)}
    huge = {k: torch.full_like(v, 1e3) for k, v in good.items()}
    valid = fleet.body()
    wrong_secret = fleet.tokens[0].split(".")[0] + ".not-the-secret"
    return [
        ("no token", {"body": valid, "Authorization": ""}, 401, ("Authorization: missing",)),
        (
            "wrong token",
            {"body": valid, "Authorization": f"Bearer {wrong_secret}"},
            401,
            ("token rejected",),
        ),
        ("malformed token", {"body": valid, "Authorization": "Bearer x"}, 401, ("Authorization",)),
        ("wrong round", {"body": valid, "round": 1}, 409, ("round: 1 is not open yet",)),
        ("not assigned", {"body": valid, "index": 1}, 409, ("not assigned to round 0",)),
        ("tensor name", {"body": fleet.body(renamed)}, 400, ("tensors: missing", "renamed")),
        ("shape", {"body": fleet.body(reshaped)}, 400, (f"tensor {name!r}: shape [3, 3]",)),
        ("dtype", {"body": fleet.body(wider)}, 400, ("dtype F64, expected F32",)),
        ("NaN", {"body": fleet.body(nan)}, 400, ("NaN or Inf",)),
        ("Inf", {"body": fleet.body(inf)}, 400, ("NaN or Inf",)),
        ("norm", {"body": fleet.body(huge)}, 400, ("exceeds serve.max_update_norm = 100",)),
        (
            "oversized",
            {"body": b"\0" * (MAX_BODY + 1)},
            413,
            (f"exceeds the limit of {MAX_BODY} bytes", "serve.max_body_bytes"),
        ),
        ("truncated", {"body": valid[: len(valid) - 100]}, 400, ("truncated",)),
        ("too short", {"body": b"\x01\x02"}, 400, ("8-byte header length",)),
        (
            "header not JSON",
            {"body": struct.pack("<Q", 9) + b"{not json"},
            400,
            ("malformed safetensors header", "not JSON"),
        ),
        (
            "header length",
            {"body": struct.pack("<Q", 2**40) + b"{}"},
            400,
            ("malformed safetensors header", "exceeds the limit"),
        ),
        (
            "bad offsets",
            {"body": _raw({name: {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})},
            400,
            ("data_offsets span 4 bytes",),
        ),
        (
            "no examples",
            {"body": fleet.body(num_examples=-1)},
            400,
            ("metadata.info.num_examples",),
        ),
        (
            "metadata JSON",
            {"body": save_safetensors(good, metadata={"info": "{oops"})},
            400,
            ("metadata.info: malformed JSON",),
        ),
    ]


def test_each_bad_upload_is_refused_with_its_reason_and_changes_nothing(fleet: Fleet) -> None:
    before = fleet.coordinator.store.snapshot()
    for case, args, status, phrases in _bad_uploads(fleet):
        args = dict(args)
        body = args.pop("body")
        headers = {}
        if "Authorization" in args:
            headers["Authorization"] = args.pop("Authorization")
        if headers.get("Authorization") == "":
            response = fleet.request("PUT", "/v1/rounds/0/update", content=body)
        elif headers:
            response = fleet.request("PUT", "/v1/rounds/0/update", content=body, headers=headers)
        else:
            response = fleet.upload(body, **args)
        try:
            _expect(response, status, *phrases)
        except AssertionError as error:
            raise AssertionError(f"case {case!r}: {error}") from None
        assert fleet.coordinator.store.snapshot() == before, case
    # The same device can still send a good update afterwards.
    assert fleet.upload(fleet.body()).status_code == 200


def test_bad_registrations_and_requests_are_refused_with_their_reason(fleet: Fleet) -> None:
    before = fleet.coordinator.store.snapshot()
    cases = [
        (
            ("POST", "/v1/devices"),
            {"content": b"{bad json", "headers": {"Content-Type": "application/json"}},
            422,
            ("body", "JSON decode error"),
        ),
        (("POST", "/v1/devices"), {"json": {"device_index": 99}}, 422, ("outside [0, 20)",)),
        (("POST", "/v1/devices"), {"json": {"device_index": -1}}, 422, ("device_index",)),
        (("POST", "/v1/devices"), {"json": {"device_index": "a"}}, 422, ("device_index",)),
        (("POST", "/v1/devices"), {"json": {"device_index": 0}}, 409, ("already registered",)),
        (("POST", "/v1/devices"), {"json": {"index": 2}}, 422, ("device_index", "index")),
        (("POST", "/v1/checkin"), {}, 401, ("Authorization: missing",)),
        (("GET", "/v1/model"), {"params": {"version": 7}}, 404, ("version: 7 is not stored",)),
        (
            ("GET", "/v1/devices/1/state"),
            {"headers": fleet.auth(0)},
            403,
            ("cannot read device 1",),
        ),
        (
            ("POST", "/v1/infer"),
            {"json": {"history": [1], "candidates": [150]}, "headers": fleet.auth(0)},
            422,
            ("candidates: item 150 is outside [0, 150)",),
        ),
        (
            ("POST", "/v1/infer"),
            {"json": {"history": list(range(9)), "candidates": [1]}, "headers": fleet.auth(0)},
            422,
            ("history: 9 items exceeds the limit of 8",),
        ),
    ]
    for (method, url), kwargs, status, phrases in cases:
        _expect(fleet.request(method, url, **kwargs), status, *phrases)
        assert fleet.coordinator.store.snapshot() == before, (url, kwargs)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    body=st.one_of(
        st.binary(max_size=2048),
        st.builds(
            lambda header, tail: _raw(header, tail),
            st.dictionaries(
                st.text(max_size=8),
                st.one_of(
                    st.text(max_size=8),
                    st.integers(),
                    st.dictionaries(
                        st.sampled_from(["dtype", "shape", "data_offsets"]),
                        st.one_of(
                            st.sampled_from(["F32", "I8", "F64", "XX"]),
                            st.lists(st.integers(-2, 10**6), max_size=3),
                        ),
                    ),
                ),
                max_size=4,
            ),
            st.binary(max_size=256),
        ),
    ),
)
def test_fuzzed_uploads_never_break_the_server(fleet: Fleet, body: bytes) -> None:
    before = fleet.coordinator.store.snapshot()
    response = fleet.upload(body)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["detail"]
    assert fleet.coordinator.store.snapshot() == before


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    cut=st.integers(min_value=0, max_value=10_000),
    flip=st.integers(min_value=0, max_value=255),
)
def test_mutated_valid_uploads_are_accepted_whole_or_refused_cleanly(
    fleet: Fleet, cut: int, flip: int
) -> None:
    valid = fleet.body()
    position = cut % len(valid)
    mutated = valid[:position] + bytes([valid[position] ^ (flip or 1)]) + valid[position + 1 :]
    before = fleet.coordinator.store.snapshot()
    response = fleet.upload(mutated)
    assert response.status_code < 500, response.text
    if response.status_code == 200:
        # A flip inside the float data can leave a valid update: then it is stored, once.
        assert fleet.coordinator.store.update(0, 0) is not None
    else:
        assert fleet.coordinator.store.snapshot() == before


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    payload=st.one_of(
        st.binary(max_size=64),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=12), inner, max_size=3)
            ),
            max_leaves=6,
        ).map(lambda value: json.dumps(value).encode()),
        st.integers(-5, 40).map(lambda index: json.dumps({"device_index": index}).encode()),
    )
)
def test_fuzzed_registrations_never_break_the_server(fleet: Fleet, payload: bytes) -> None:
    before = fleet.coordinator.store.snapshot()
    response = fleet.request(
        "POST", "/v1/devices", content=payload, headers={"Content-Type": "application/json"}
    )
    assert response.status_code < 500, response.text
    if response.status_code == 201:
        index = response.json()["device_index"]
        assert fleet.coordinator.store.token_hash(index) is not None
    else:
        assert 400 <= response.status_code < 500
        assert response.json()["detail"]
        assert fleet.coordinator.store.snapshot() == before
