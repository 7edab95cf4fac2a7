"""The round state machine: who trains when, which updates count, and when the cloud merges.

Synchronous mode (every strategy without ``asynchronous``): round ``r`` trains from model
version ``r``. Devices check in; the first ``ceil(target * over_selection)`` are assigned
(over-selection), the rest are told when to come back (pace steering). The round merges when
``target`` updates are stored, or once its wall-clock deadline has passed with at least
``min_quorum`` of them; assignments older than the deadline free their slot for others.

Asynchronous buffered mode (FedBuff): any device checks in for a ticket while fewer than
``concurrency`` are in flight; each merge takes the ``buffer_size`` oldest waiting updates,
each scaled by the strategy's staleness weight, as the simulator's asynchronous driver does.

Everything that decides a merge is a row in the Store, so a restarted Coordinator resumes from
the database alone, and each stored update is merged exactly once (``merged_into``).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

import torch
from safetensors.torch import load as load_safetensors

from coevo.serve.settings import ServeSettings, Service
from coevo.serve.store import Store, StoredUpdate, sha256_hex
from coevo.serve.wire import (
    TensorSpec,
    WireError,
    encode_payload,
    parse_update,
    specs_of,
    template_from_json,
    template_json,
    wire_specs,
)
from coevo.sim.batching import cohort_batch
from coevo.sim.executor import run_block
from coevo.sim.wire import send_down
from coevo.types import DeviceState, Payload


def _declared_round(body: bytes) -> int | None:
    """The round an upload says it was trained for (``metadata.info.round``), if it says so.

    Called after ``parse_update`` accepted the body, so its header and ``info`` are valid JSON.
    """
    length = int.from_bytes(body[:8], "little")
    info = json.loads(json.loads(body[8 : 8 + length]).get("__metadata__", {}).get("info", "{}"))
    declared = info.get("round")
    if declared is None:
        return None
    if type(declared) is not int:
        raise Rejected(400, f"metadata.info.round: must be an integer, got {declared!r}")
    return declared


class Rejected(Exception):
    """A request the Coordinator refuses; ``status`` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class CheckIn:
    """The answer to a check-in: train (round, model version, batch seed), wait, or done."""

    action: Literal["train", "wait", "done"]
    round: int
    model_version: int
    batch_seed: int
    retry_after_s: float


@dataclass
class _Pending:
    """An update waiting for a group commit, and the answer it gets."""

    update: StoredUpdate
    error: Rejected | None = None
    twin: _Pending | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Model:
    """One model version's downlink as served: body bytes and their ETag."""

    version: int
    body: bytes
    etag: str


class Coordinator:
    """Drives one strategy's cloud side over a Store; thread-safe.

    Args:
        service: the task, strategy, codecs and seed (``build_service``).
        settings: deadlines, quorum, pace and input limits.
        store: the database; initialised with model version 0 when empty.
        fingerprint: the run config; a database made for another config is refused.
        devices_per_round: the round's target (every device of the task when ``None``).
        over_selection: devices assigned per round, as a multiple of the target.
        clock: wall-clock seconds (tests pass a fake one).
    """

    def __init__(
        self,
        service: Service,
        settings: ServeSettings,
        store: Store,
        *,
        fingerprint: str,
        devices_per_round: int | None = None,
        over_selection: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if getattr(service.strategy, "exchanges", False):
            raise ValueError(
                f"strategies: {service.strategy.name!r} exchanges a query and an answer before "
                "local work, which the service does not run; serve a strategy without exchanges"
            )
        self.service = service
        self.strategy = service.strategy
        self.task = service.task
        self.settings = settings
        self.store = store
        self.clock = clock
        self.trains = self.strategy.local_period is not None
        self.asynchronous = bool(getattr(self.strategy, "asynchronous", False))
        self.target = min(devices_per_round or self.task.num_devices, self.task.num_devices)
        self.capacity = math.ceil(self.target * over_selection)
        self._lock = threading.RLock()
        self._queue_lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._models: dict[int, Model] = {}
        self.merges = 0
        # Secure aggregation (``coevo.serve.secagg.SecAggRounds``) when serve.secagg is set:
        # updates then arrive masked through it, never as plain uploads.
        self.secagg: Any = None
        self._restore(fingerprint)
        self.device_states = self.strategy.init_devices(self.store.model(0), self.task.num_devices)
        self.uplink_template: dict[str, TensorSpec] = self._uplink_template() if self.trains else {}
        self.uplink_wire = wire_specs(service.uplink_codec, self.uplink_template)
        with self._lock:
            self._tick()

    # state
    def _restore(self, fingerprint: str) -> None:
        stored = self.store.get_meta("config")
        if stored is not None and stored != fingerprint:
            raise ValueError(
                f"serve.database: {self.store.path} was created for a different run config; "
                "point serve.database at a new file or start with the original config"
            )
        latest = self.store.latest_model()
        if latest is None:
            rng = torch.Generator().manual_seed(self.service.seed)
            cloud = self.strategy.init(rng)
            # The simulator draws its batch seed right after init: the same draw here makes
            # device batches identical to the simulated ones.
            batch_seed = int(torch.randint(0, 2**62, (1,), generator=rng))
            meta = {"config": fingerprint, "batch_seed": str(batch_seed)}
            self.store.commit_merge(0, cloud, [], meta)
            latest = (0, cloud, "")
        self.version, self.cloud, _ = latest
        self.batch_seed = int(self.store.get_meta("batch_seed") or 0)
        self.next_ticket = self.store.max_round_assigned() + 1

    @property
    def rounds(self) -> int:
        return self.strategy.rounds

    @property
    def finished(self) -> bool:
        return not self.trains or self.version >= self.rounds

    def _uplink_template(self) -> dict[str, TensorSpec]:
        """Names, shapes and dtypes of one device's uplink, from one real ``local`` call the
        first time (then kept in the database, so a restart does not pay for it again)."""
        stored = self.store.get_meta("uplink_template")
        if stored is not None:
            return template_from_json(stored)
        template = self._traced_uplink()
        with self.store.transaction() as db:
            self.store.set_meta(db, "uplink_template", template_json(template))
        return template

    def _traced_uplink(self) -> dict[str, TensorSpec]:
        payload, _ = send_down(self.service.downlink_codec, self.strategy.downlink(self.cloud, 0))
        local = self.strategy.config.local
        assert self.strategy.local_period is not None
        rows, offsets = self.task.device_rows(self.strategy.local_period)
        block = torch.tensor([0])
        state = DeviceState({k: v[block] for k, v in self.device_states.tensors.items()})
        batch = cohort_batch(
            self.task,
            rows,
            offsets,
            block,
            epochs=local.epochs,
            batch_size=local.batch_size,
            seed=self.batch_seed,
        )
        up, _, _ = run_block(self.strategy, payload, state, batch)
        return specs_of({k: v[0] for k, v in up.items()})

    # models
    def model(self, version: int | None = None) -> Model:
        """The downlink of ``version`` (the current one by default), encoded and cached."""
        with self._lock:
            version = self.version if version is None else version
            if not 0 <= version <= self.version:
                raise Rejected(
                    404, f"version: {version} is not stored; versions are 0..{self.version}"
                )
            if version not in self._models:
                cloud = self.cloud if version == self.version else self.store.model(version)
                body, _ = encode_payload(
                    self.strategy.downlink(cloud, version),
                    self.service.downlink_codec,
                    model_version=version,
                )
                if len(self._models) >= 4:
                    self._models.pop(min(self._models))
                self._models[version] = Model(version, body, f'"{sha256_hex(body)[:32]}"')
            return self._models[version]

    def device_state(self, device_index: int) -> DeviceState:
        """A device's initial private state (what the simulator's ``init_devices`` gives it)."""
        return DeviceState({k: v[device_index] for k, v in self.device_states.tensors.items()})

    # check-in
    def check_in(self, device_index: int) -> CheckIn:
        with self._lock:
            self._tick()
            if self.finished:
                return CheckIn("done", self.version, self.version, self.batch_seed, 0.0)
            if self.asynchronous:
                return self._check_in_async(device_index)
            round = self.version
            if self.store.assignment(round, device_index) is not None:
                if self.store.update(device_index, round) is not None or (
                    self.secagg is not None and self.secagg.reported(round, device_index)
                ):
                    return self._wait(round)
                return self._train(round, round)
            if self._live_assignments(round) < self.capacity:
                self.store.assign(round, device_index, round, self.clock())
                return self._train(round, round)
            return self._wait(round)

    def _check_in_async(self, device_index: int) -> CheckIn:
        last = self.store.last_assignment(device_index)
        if last is not None and self.store.update(device_index, last[0]) is None:
            return self._train(last[0], last[1])
        since = self._expiry()
        if len(self.store.open_assignments(since)) < self.strategy.config.concurrency:
            ticket = self.next_ticket
            self.next_ticket += 1
            self.store.assign(ticket, device_index, self.version, self.clock())
            return self._train(ticket, self.version)
        return self._wait(None)

    def _train(self, round: int, version: int) -> CheckIn:
        return CheckIn("train", round, version, self.batch_seed, 0.0)

    def _wait(self, round: int | None) -> CheckIn:
        wait = self.settings.retry_after_s
        deadline = self._deadline(round) if round is not None else None
        if deadline is not None and self.store.count_pending(round) < self.target:
            # Pace steering: nothing will open before the deadline, so come back then.
            wait = max(wait, deadline - self.clock())
        return CheckIn("wait", self.version, self.version, self.batch_seed, wait)

    def _expiry(self) -> float:
        deadline_s = self.settings.round_deadline_s
        return -math.inf if deadline_s is None else self.clock() - deadline_s

    def _live_assignments(self, round: int) -> int:
        """Assigned devices that reported or may still report before their assignment expires."""
        reported = set(self.store.reported(round))
        since = self._expiry()
        return sum(d in reported or t >= since for d, t in self.store.assignments(round))

    def _deadline(self, round: int) -> float | None:
        if self.settings.round_deadline_s is None:
            return None
        assigned = self.store.assignments(round)
        return assigned[0][1] + self.settings.round_deadline_s if assigned else None

    # upload
    def accept(self, device_index: int, round: int, body: bytes) -> str:
        """Validate, persist and (when it completes a round or buffer) merge one update.

        Returns the receipt (JSON); a re-sent identical body gets the stored receipt again.
        Raises ``Rejected`` with the HTTP status and a message naming the problem.
        """
        if self.secagg is not None:
            raise Rejected(
                409,
                f"round: this server aggregates securely (serve.secagg); send round {round}'s "
                "update masked, through /v1/secagg/{round}/...",
            )
        digest = sha256_hex(body)
        known = self._known(device_index, round, digest)
        if known is not None:
            return known
        with self._lock:
            self._check_round(device_index, round)
        try:
            upload = parse_update(body, self.uplink_wire, max_examples=self.settings.max_examples)
            update = self._decode(upload.wire)
        except WireError as error:
            raise Rejected(error.status, str(error)) from None
        made_for = _declared_round(body)
        if made_for is not None and made_for != round:
            raise Rejected(
                409,
                f"round: the update was made for round {made_for} "
                f"(metadata.info.round) and cannot be replayed into round {round}",
            )
        norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values()))
        if not norm <= self.settings.max_update_norm:
            raise Rejected(
                400,
                f"update: L2 norm {norm:.6g} exceeds serve.max_update_norm = "
                f"{self.settings.max_update_norm:g}",
            )
        receipt = json.dumps(
            {
                "status": "accepted",
                "device_index": device_index,
                "round": round,
                "sha256": digest,
                "num_examples": upload.num_examples,
            }
        )
        stored = StoredUpdate(round, device_index, digest, body, upload.num_examples, 0, receipt)
        return self._persist(_Pending(stored))

    def _persist(self, pending: _Pending) -> str:
        """Group commit: whoever holds the lock writes every queued update in one transaction
        (one fsync), then answers them all; the merge that may follow runs after the answers."""
        with self._queue_lock:
            self._queue.append(pending)
        while not pending.done.is_set():
            if not self._lock.acquire(timeout=0.002):
                continue
            try:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                if batch:
                    self._commit(batch)
                    self._tick()
            finally:
                self._lock.release()
        if pending.error is not None:
            raise pending.error
        return pending.update.receipt

    def _commit(self, batch: list[_Pending]) -> None:
        """Store the batch's valid updates in one transaction; settle every item's answer."""
        accepted: list[_Pending] = []
        seen: dict[tuple[int, int], _Pending] = {}
        room = self._room()
        for item in batch:
            update = item.update
            key = (update.device_index, update.round)
            try:
                twin = seen.get(key)
                if twin is not None:
                    if twin.update.sha256 != update.sha256:
                        raise self._conflict(update.device_index, update.round, twin.update.sha256)
                    item.twin = twin
                    continue
                known = self._known(update.device_index, update.round, update.sha256)
                if known is not None:
                    item.update = replace(update, receipt=known)
                    continue
                base_version = self._check_round(update.device_index, update.round)
                if room <= 0:
                    raise Rejected(409, f"round: {update.round} is full; its merge is under way")
                item.update = replace(update, base_version=base_version)
                seen[key] = item
                accepted.append(item)
                room -= 1
            except Rejected as error:
                item.error = error
        try:
            self.store.add_updates([item.update for item in accepted])
        except Exception as error:
            # Nothing of the batch was committed: each device is told to send again.
            for item in accepted:
                item.error = Rejected(503, f"store: the update was not saved ({error}); resend it")
        finally:
            for item in batch:
                if item.twin is not None:
                    item.update, item.error = item.twin.update, item.twin.error
                item.done.set()

    def _known(self, device_index: int, round: int, digest: str) -> str | None:
        stored = self.store.update(device_index, round)
        if stored is None:
            return None
        if stored.sha256 != digest:
            raise self._conflict(device_index, round, stored.sha256)
        return stored.receipt

    def _room(self) -> int:
        """Updates that may still be stored before the pending merges are full: every stored
        update is then merged (none is acknowledged and left over when training ends)."""
        if self.asynchronous:
            size = self.strategy.config.buffer_size
            return (self.rounds - self.version) * size - self.store.count_pending()
        return self.target - self.store.count_pending(self.version)

    @staticmethod
    def _conflict(device_index: int, round: int, digest: str) -> Rejected:
        return Rejected(
            409,
            f"round: device {device_index} already sent a different update for round "
            f"{round} (sha256 {digest}); one update per device and round",
        )

    def _check_round(self, device_index: int, round: int) -> int:
        """The base model version of the device's assignment to ``round``, or ``Rejected``."""
        if self.finished:
            raise Rejected(409, f"round: training finished after {self.rounds} rounds")
        if not self.asynchronous and round != self.version:
            state = "closed" if round < self.version else "not open yet"
            raise Rejected(409, f"round: {round} is {state}; the open round is {self.version}")
        assigned = self.store.assignment(round, device_index)
        if assigned is None:
            raise Rejected(
                409, f"round: device {device_index} is not assigned to round {round}; check in"
            )
        return assigned[0]

    def _decode(self, wire: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        codec = self.service.uplink_codec
        if codec is None:
            return wire
        decoded = codec.decode(wire, {k: s.meta() for k, s in self.uplink_template.items()})
        for name, tensor in decoded.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise WireError(f"tensor {name!r}: decodes to NaN or Inf values")
        return decoded

    # merge
    def tick(self) -> None:
        """Merge whatever is complete now (rounds past their deadline included)."""
        with self._lock:
            self._tick()

    def _tick(self) -> None:
        while not self.finished:
            if self.asynchronous:
                size = self.strategy.config.buffer_size
                if self.store.count_pending() < size:
                    return
                self._merge(self.store.pending_updates()[:size])
                continue
            waiting = self.store.count_pending(self.version)
            deadline = self._deadline(self.version)
            overdue = deadline is not None and self.clock() >= deadline
            if waiting >= self.target or (overdue and waiting >= self.settings.min_quorum):
                pending = self.store.pending_updates(self.version)
                self._merge(sorted(pending, key=lambda u: u.device_index))
                continue
            return

    def _merge(self, updates: list[StoredUpdate]) -> None:
        stacked = {
            k: torch.empty((len(updates), *s.shape), dtype=s.meta().dtype)
            for k, s in self.uplink_template.items()
        }
        for i, stored in enumerate(updates):
            for k, v in self._decode(load_safetensors(stored.body)).items():
                stacked[k][i] = v
        weights = torch.tensor([u.num_examples for u in updates]).float()
        if self.asynchronous:
            staleness = torch.tensor([self.version - u.base_version for u in updates])
            discount = cast(Any, self.strategy).staleness_weight(staleness).float()
            stacked = {k: v * discount.view(-1, *[1] * (v.ndim - 1)) for k, v in stacked.items()}
        cloud = self.strategy.merge(self.cloud, Payload(stacked), weights)
        merged = [(u.device_index, u.round) for u in updates]
        self.store.commit_merge(self.version + 1, cloud, merged, {})
        self.cloud, self.version = cloud, self.version + 1
        self.merges += 1

    def merge_aggregates(
        self, round: int, updates: dict[str, torch.Tensor], weights: torch.Tensor
    ) -> None:
        """Merge several weighted mean updates of a round, each aggregated outside the Store
        (the group sums of grouped secure aggregation), stacked ``[groups, ...]`` with their
        merge weights ``[groups]``: one row per group, as if one device per group had sent its
        group's mean. A robust strategy's aggregator then combines the group means.

        Raises ``Rejected`` when ``round`` is not open.
        """
        with self._lock:
            if self.finished or self.asynchronous or round != self.version:
                raise Rejected(409, f"round: {round} is not the open round ({self.version})")
            cloud = self.strategy.merge(self.cloud, Payload(updates), weights)
            self.store.commit_merge(self.version + 1, cloud, [], {})
            self.cloud, self.version = cloud, self.version + 1
            self.merges += 1

    def status(self) -> dict[str, Any]:
        """Numbers for /health and /metrics (no database reads beyond counts)."""
        return {
            "mode": "async" if self.asynchronous else "sync",
            "strategy": self.strategy.name,
            "model_version": self.version,
            "rounds": self.rounds,
            "finished": self.finished,
        }
