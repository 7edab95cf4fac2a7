"""Secure aggregation in the Service: SecAgg+ rounds over HTTP, the server holding only masks.

Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020,
run with ``coevo.codecs.secagg``'s ``SecAggClient`` (device) and ``SecAggServer`` (cloud).

Device: ``coevo.serve.secagg_http`` (the endpoints and the device's side of the four phases).

Cloud: a phase closes when every device still in has sent its message, or after
``serve.secagg.phase_timeout_s`` without the missing ones (they have dropped). The masked
vectors are written to SQLite (table ``secagg_masked``) before they are acknowledged; no
plain update, share or key is stored. After the unmasking phase the server rebuilds the
self-mask seeds of the survivors and the mask keys of devices that dropped after sharing,
removes their masks, and merges ``sum(w·u) / sum(w)`` as the round's update, which for the
FedAvg family equals the plain merge of the survivors' updates (exactly on the fixed-point
values). Too many drop-outs fail the round with the library's error naming the threshold;
the assigned devices then start a new attempt of the same round. Protocol state is in memory:
a server restart mid-round starts a new attempt (numbered after the stored ones).

Grouped secure aggregation (``serve.secagg.groups = G``), after SHARE (Velicheti, Xia and
Koyejo, "Secure Byzantine-Robust Distributed Learning via Clustering", arXiv 2110.02940): a
round's slots (join order) are split into G independent SecAgg+ sessions, each with its own
keys, graph, threshold, phases and drop-out recovery. Each block of G consecutive slots goes
to the G groups in a random order drawn for the attempt: sizes differ by at most one however
many devices join, and no device can choose its group. The join answer gives the device its
id, neighbours and parameters inside its group, so the device side is unchanged. Once every
group has unmasked its sum or failed, the round merges once: each surviving group's mean
``sum(w·u) / sum(w)`` is one row weighted by ``sum(w)``, so FedAvg still gets the cohort's
mean while a robust strategy's aggregator runs over the G group means. A failed group is
left out (``group_errors``); the round fails only when all do. The price: the server learns
G sums of about ``n / G`` devices each instead of one sum of n.
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from coevo.aggregators.robust import Robust
from coevo.codecs.secagg import (
    CIPHER_BYTES,
    ID_BYTES,
    PUBLIC_BYTES,
    SHARE_BYTES,
    SecAggError,
    SecAggParams,
    SecAggServer,
    neighbour_degree,
    neighbour_graph,
    neighbour_threshold,
)
from coevo.serve.rounds import Coordinator, Rejected
from coevo.serve.settings import SecAggSettings

Phase = Literal["keys", "shares", "masked", "unmask"]
PHASES: tuple[Phase, ...] = ("keys", "shares", "masked", "unmask")
_log = logging.getLogger(__name__)
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


@dataclass
class _Group:
    """One SecAgg+ session of a round attempt: its own graph, threshold, phases and sum."""

    index: int
    params: SecAggParams
    graph: np.ndarray
    server: SecAggServer
    phase_started: float
    phase: int = 0
    expected: set[int] | None = None
    inbox: dict[int, bytes] = field(default_factory=dict)
    outbox: dict[str, dict[int, bytes]] = field(default_factory=dict)
    error: str | None = None
    total: np.ndarray | None = None

    @property
    def phase_name(self) -> str:
        return PHASES[self.phase] if self.phase < len(PHASES) else "merged"

    @property
    def done(self) -> bool:
        return self.error is not None or self.total is not None


@dataclass
class _Attempt:
    """One try at a round's secure aggregation (a failed try is followed by a new one).

    ``slots`` maps a device to its slot in the round, in join order. Slots come in blocks of
    ``len(groups)``; slot ``s`` is member ``s // len(groups)`` of group
    ``layout[s // len(groups)][s % len(groups)]``, each block a random permutation of groups.
    """

    round: int
    number: int
    groups: list[_Group]
    layout: list[list[int]]
    slots: dict[int, int] = field(default_factory=dict)
    error: str | None = None
    total: np.ndarray | None = None

    def member(self, slot: int) -> tuple[_Group, int]:
        """The group of round slot ``slot`` and the slot's id inside that group."""
        block, offset = divmod(slot, len(self.groups))
        return self.groups[self.layout[block][offset]], block


class SecAggRounds:
    """The server side of secure-aggregation rounds, driven by the ``/v1/secagg`` endpoints.

    Args:
        coordinator: the synchronous round state machine; its rounds merge through here.
        settings: fixed point, ring, neighbour degree, groups and phase timeout.

    Raises:
        ValueError: for an asynchronous strategy, an uplink codec, fewer than two devices per
            round or per group, or a degree the group size does not allow (the message names
            the field).
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
        if n // settings.groups < 2:
            raise ValueError(
                f"serve.secagg.groups: each group needs at least 2 devices; a round of {n} "
                f"devices allows at most {n // 2} groups, got {settings.groups}"
            )
        if isinstance(coordinator.strategy, Robust) and settings.groups < 3:
            raise ValueError(
                f"serve.secagg.groups: a robust strategy's aggregator sees one mean per group, "
                f"so it needs at least 3 groups to outvote one, got {settings.groups}"
            )
        self.coordinator, self.settings = coordinator, settings
        self.names = sorted(template)
        vector_len = sum(template[k].meta().numel() for k in self.names) + 1
        self.capacity = n
        self.group_params = [
            self._group_params(len(range(g, n, settings.groups)), vector_len)
            for g in range(settings.groups)
        ]
        self.params = self.group_params[0]
        """The parameters of group 0, the largest (all of them when ``groups`` is 1)."""
        self._lock = threading.RLock()
        self._attempts: dict[int, _Attempt] = {}
        self._numbers: dict[int, int] = {}
        with coordinator.store.transaction() as db:
            db.execute(_SCHEMA)

    def _group_params(self, size: int, vector_len: int) -> SecAggParams:
        settings = self.settings
        degree = settings.degree or neighbour_degree(size, settings.dropout)
        degree = min(degree, size - 1)
        return SecAggParams(
            num_devices=size,
            degree=degree,
            threshold=min(neighbour_threshold(degree), degree),
            vector_len=vector_len,
            clip_range=settings.clip_range,
            scale_bits=settings.scale_bits,
            ring_bits=settings.ring_bits,
        )

    # state
    def reported(self, round: int, device_index: int) -> bool:
        """Whether the device has nothing left to send in ``round``'s attempt (it then waits at
        check-in): its masked vector is in, or its group failed while other groups go on."""
        attempt = self._attempts.get(round)
        if attempt is None or attempt.error is not None:
            return False
        slot = attempt.slots.get(device_index)
        if slot is None:
            return False
        group, member = attempt.member(slot)
        return group.error is not None or member in group.server.masked

    def last_total(self, round: int) -> np.ndarray | None:
        """The unmasked sum ``[sum(w·u), sum(w)]`` of ``round`` over its merged groups."""
        attempt = self._attempts.get(round)
        return None if attempt is None else attempt.total

    def group_totals(self, round: int) -> dict[int, np.ndarray]:
        """Each merged group's unmasked sum ``[sum(w·u), sum(w)]`` in ``round``'s latest attempt."""
        attempt = self._attempts.get(round)
        if attempt is None:
            return {}
        return {g.index: g.total for g in attempt.groups if g.error is None and g.total is not None}

    def group_errors(self, round: int) -> dict[int, str]:
        """Why each group of ``round``'s latest attempt that failed was left out of its merge."""
        attempt = self._attempts.get(round)
        if attempt is None:
            return {}
        return {g.index: g.error for g in attempt.groups if g.error is not None}

    def _new_attempt(self, round: int) -> _Attempt:
        # Attempts stored before a restart keep their numbers: a new one never reuses a key.
        with self.coordinator.store.transaction() as db:
            row = db.execute(
                "SELECT MAX(attempt) FROM secagg_masked WHERE round = ?", (round,)
            ).fetchone()
        stored = -1 if row is None or row[0] is None else int(row[0])
        number = max(self._numbers.get(round, -1), stored) + 1
        self._numbers[round] = number
        now = self.coordinator.clock()
        groups = []
        for index, params in enumerate(self.group_params):
            graph = neighbour_graph(params.num_devices, params.degree, secrets.randbits(62))
            groups.append(_Group(index, params, graph, SecAggServer(params, graph), now))
        # Each block of G consecutive slots covers G groups (the last block the first few) in a
        # random order: groups stay balanced however many join, and a device cannot pick its
        # group by timing its join.
        count, draw = len(groups), secrets.SystemRandom()
        layout = [
            draw.sample(range(min(count, self.capacity - start)), min(count, self.capacity - start))
            for start in range(0, self.capacity, count)
        ]
        attempt = _Attempt(round, number, groups, layout)
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

    def _member(self, attempt: _Attempt, device_index: int) -> tuple[_Group, int]:
        """The device's group and its id there; ``Rejected`` when the attempt or the group
        failed or the device has not joined."""
        if attempt.error is not None:
            raise Rejected(409, f"secagg: attempt {attempt.number} failed: {attempt.error}")
        slot = attempt.slots.get(device_index)
        if slot is None:
            raise Rejected(
                409,
                f"secagg: device {device_index} has not joined attempt {attempt.number} of "
                f"round {attempt.round}; join",
            )
        group, member = attempt.member(slot)
        if group.error is not None:
            raise Rejected(
                409,
                f"secagg: group {group.index} of attempt {attempt.number} failed: "
                f"{group.error}; round {attempt.round} merges without it",
            )
        return group, member

    # endpoints
    def join(self, device_index: int, round: int) -> dict[str, Any]:
        """The device's slot and neighbours in its group, and the group's public parameters."""
        with self._lock:
            self._open(device_index, round)
            attempt = self._attempts.get(round)
            if attempt is not None:
                self._advance(attempt)
            if attempt is None or attempt.error is not None:
                attempt = self._new_attempt(round)
            slot = attempt.slots.get(device_index)
            if slot is None:
                slot = len(attempt.slots)
                phase = attempt.member(min(slot, self.capacity - 1))[0].phase_name
                if slot >= self.capacity or phase != "keys":
                    raise Rejected(
                        409,
                        f"secagg: attempt {attempt.number} of round {round} is past joining "
                        f"(phase {phase}, {len(attempt.slots)} of {self.capacity} slots "
                        "taken); check in later",
                    )
                attempt.slots[device_index] = slot
            group, member = attempt.member(slot)
            params = group.params
            return {
                "round": round,
                "attempt": attempt.number,
                "slot": member,
                "neighbours": [int(v) for v in group.graph[member]],
                "num_devices": params.num_devices,
                "degree": params.degree,
                "threshold": params.threshold,
                "vector_len": params.vector_len,
                "clip_range": params.clip_range,
                "scale_bits": params.scale_bits,
                "ring_bits": params.ring_bits,
                "phase_timeout_s": self.settings.phase_timeout_s,
                "group": group.index,
                "groups": len(attempt.groups),
            }

    def put(self, device_index: int, round: int, phase: Phase, body: bytes) -> dict[str, Any]:
        """Take the device's message of ``phase`` (the masked vector is stored before this
        returns); ``Rejected`` naming the problem otherwise."""
        with self._lock:
            self._open(device_index, round)
            attempt = self._attempt(round)
            self._advance(attempt)
            group, member = self._member(attempt, device_index)
            if group.phase_name != phase:
                raise Rejected(
                    409,
                    f"secagg: phase {phase} of round {round} is not open (the open phase is "
                    f"{group.phase_name})",
                )
            if group.expected is not None and member not in group.expected:
                raise Rejected(
                    409,
                    f"secagg: device {device_index} dropped out of round {round} before {phase}",
                )
            known = group.inbox.get(member)
            if known is not None:
                if known != body:
                    raise Rejected(
                        409, f"secagg: device {device_index} already sent a different {phase}"
                    )
                return {"status": "accepted", "phase": phase, "slot": member}
            self._check_message(phase, body, group, member)
            if phase == "masked":
                with self.coordinator.store.transaction() as db:
                    db.execute(
                        "INSERT INTO secagg_masked (round, attempt, slot, device_index, body) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (round, attempt.number, attempt.slots[device_index], device_index, body),
                    )
            group.inbox[member] = body
            self._advance(attempt)
            return {"status": "accepted", "phase": phase, "slot": member}

    def get(self, device_index: int, round: int, phase: Phase) -> bytes | None:
        """The server's answer to ``phase`` for the device; ``None`` while the phase is open."""
        with self._lock:
            attempt = self._attempts.get(round)
            if attempt is None or attempt.round != round:
                self._open(device_index, round)
                attempt = self._attempt(round)
            self._advance(attempt)
            group, member = self._member(attempt, device_index)
            if phase not in group.outbox:
                return None
            answer = group.outbox[phase].get(member)
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
    def _check_message(self, phase: Phase, body: bytes, group: _Group, member: int) -> None:
        params = group.params
        if phase == "keys" and len(body) != PUBLIC_BYTES:
            raise Rejected(400, f"body: public keys are {PUBLIC_BYTES} bytes, got {len(body)}")
        if phase == "masked":
            size = params.vector_len * np.dtype(params.dtype).itemsize
            if len(body) != size:
                raise Rejected(
                    400,
                    f"body: a masked vector is {size} bytes ({params.vector_len} values of "
                    f"{params.ring_bits} bits), got {len(body)}",
                )
        if phase in _ENTRY_BYTES:
            step = _ENTRY_BYTES[phase]
            if len(body) % step:
                raise Rejected(400, f"body: {phase} is a list of {step}-byte entries")
            allowed = set(group.graph[member].tolist())
            ids = {
                int.from_bytes(body[i : i + ID_BYTES], "little") for i in range(0, len(body), step)
            }
            if not ids <= allowed or len(ids) != len(body) // step:
                raise Rejected(
                    400, f"body: {phase} names devices that are not this device's neighbours"
                )

    def _advance(self, attempt: _Attempt) -> None:
        """Close every group's open phase while it is complete or timed out (possibly several);
        once every group is done, merge the round from the groups that succeeded."""
        for group in attempt.groups:
            self._advance_group(attempt, group)
        if attempt.error is None and attempt.total is None and all(g.done for g in attempt.groups):
            self._merge(attempt)

    def _advance_group(self, attempt: _Attempt, group: _Group) -> None:
        while group.error is None and group.phase < len(PHASES):
            expected = (
                set(range(group.params.num_devices)) if group.expected is None else group.expected
            )
            complete = expected <= set(group.inbox)
            late = self.coordinator.clock() >= group.phase_started + self.settings.phase_timeout_s
            if not complete and not late:
                return
            self._close(attempt, group)

    def _close(self, attempt: _Attempt, group: _Group) -> None:
        phase, inbox, server = group.phase_name, group.inbox, group.server
        try:
            if len(inbox) < 2:
                raise SecAggError(
                    f"phase {phase}: {len(inbox)} device(s) took part; at least 2 are needed"
                )
            if phase == "keys":
                group.outbox[phase] = server.advertise(inbox)
            elif phase == "shares":
                group.outbox[phase] = server.share(inbox)
            elif phase == "masked":
                group.outbox[phase] = server.collect(inbox)
            else:
                group.total = server.unmask(inbox)
                weight = float(group.total[-1])
                if not weight > 0:
                    raise SecAggError(f"the unmasked merge weight is {weight}; nothing to merge")
        except SecAggError as error:
            group.error = str(error)
            if len(attempt.groups) > 1:
                _log.warning(
                    "secagg: round %d, attempt %d: group %d failed and is left out: %s",
                    attempt.round,
                    attempt.number,
                    group.index,
                    group.error,
                )
            return
        group.expected = set(inbox)
        group.inbox = {}
        group.phase += 1
        group.phase_started = self.coordinator.clock()
        if group.total is not None:
            group.outbox["unmask"] = {slot: b"" for slot in group.expected}

    def _merge(self, attempt: _Attempt) -> None:
        """One merge per round: each surviving group's mean update as one row, weighted by the
        group's total merge weight (a robust strategy aggregates over these rows)."""
        merged = [group for group in attempt.groups if group.error is None]
        if not merged:
            errors = [f"group {g.index}: {g.error}" for g in attempt.groups]
            attempt.error = attempt.groups[0].error if len(errors) == 1 else "; ".join(errors)
            return
        totals = [group.total for group in merged if group.total is not None]
        attempt.total = totals[0] if len(totals) == 1 else np.sum(totals, axis=0)
        template = self.coordinator.uplink_template
        rows: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}
        for total in totals:
            mean = torch.from_numpy(total[:-1] / float(total[-1]))
            start = 0
            for name in self.names:
                spec = template[name]
                size = spec.meta().numel()
                piece = mean[start : start + size].reshape(spec.shape).to(spec.meta().dtype)
                rows[name].append(piece)
                start += size
        stacked = {name: torch.stack(pieces) for name, pieces in rows.items()}
        weights = torch.tensor([float(total[-1]) for total in totals])
        self.coordinator.merge_aggregates(attempt.round, stacked, weights)
