"""The Service's durable state in SQLite (WAL): devices, rounds, accepted updates, model versions.

Every write is one transaction committed with ``synchronous=FULL``, so a row the server has
acknowledged is on disk before the acknowledgement leaves. Model versions are whole cloud
states stored as safetensors blobs beside their sha256, checked on every load. Aggregation
state (the open round, who was assigned, which updates are waiting to be merged) is rows in
these tables, so a restarted server rebuilds it by reading them.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from coevo.types import CloudState

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device_index INTEGER PRIMARY KEY,
    token_sha256 TEXT NOT NULL,
    registered_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    version INTEGER PRIMARY KEY,
    sha256 TEXT NOT NULL,
    state BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    round INTEGER NOT NULL,
    device_index INTEGER NOT NULL,
    base_version INTEGER NOT NULL,
    assigned_at REAL NOT NULL,
    PRIMARY KEY (round, device_index)
);
CREATE TABLE IF NOT EXISTS updates (
    round INTEGER NOT NULL,
    device_index INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    body BLOB NOT NULL,
    num_examples INTEGER NOT NULL,
    base_version INTEGER NOT NULL,
    receipt TEXT NOT NULL,
    received_at REAL NOT NULL,
    merged_into INTEGER,
    PRIMARY KEY (device_index, round)
);
CREATE INDEX IF NOT EXISTS updates_pending ON updates (merged_into, round);
"""


class IntegrityError(RuntimeError):
    """A stored blob does not match its recorded sha256 (disk corruption or tampering)."""


@dataclass(frozen=True)
class StoredUpdate:
    """One accepted update as the store holds it."""

    round: int
    device_index: int
    sha256: str
    body: bytes
    num_examples: int
    base_version: int
    receipt: str
    merged_into: int | None = None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Store:
    """One SQLite database file, used by one server process (its writes are serialised).

    Args:
        path: the database file; created with its tables when missing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsync'd at every commit, so a committed row survives power loss.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic, durable write: committed on success, rolled back on any error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _one(self, sql: str, args: tuple = ()) -> tuple | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # meta
    def get_meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else str(row[0])

    def set_meta(self, db: sqlite3.Connection, key: str, value: str) -> None:
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # devices
    def add_device(self, device_index: int, token_sha256: str) -> bool:
        """Register ``device_index``; False when it is already registered (nothing changes)."""
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO devices (device_index, token_sha256, registered_at) "
                "VALUES (?, ?, ?)",
                (device_index, token_sha256, time.time()),
            )
            return cursor.rowcount == 1

    def token_hash(self, device_index: int) -> str | None:
        row = self._one("SELECT token_sha256 FROM devices WHERE device_index = ?", (device_index,))
        return None if row is None else str(row[0])

    def num_devices(self) -> int:
        row = self._one("SELECT COUNT(*) FROM devices")
        return int(row[0]) if row else 0

    # models
    def add_model(self, db: sqlite3.Connection, version: int, cloud: CloudState) -> str:
        blob = cloud.to_bytes()
        digest = sha256_hex(blob)
        db.execute(
            "INSERT INTO models (version, sha256, state, created_at) VALUES (?, ?, ?, ?)",
            (version, digest, blob, time.time()),
        )
        return digest

    def latest_model(self) -> tuple[int, CloudState, str] | None:
        """``(version, cloud state, sha256)`` of the newest model, checksum verified."""
        row = self._one("SELECT version, sha256, state FROM models ORDER BY version DESC LIMIT 1")
        if row is None:
            return None
        return int(row[0]), self._verified(row[1], row[2], f"model version {row[0]}"), str(row[1])

    def model(self, version: int) -> CloudState:
        row = self._one("SELECT sha256, state FROM models WHERE version = ?", (version,))
        if row is None:
            raise KeyError(f"model version {version} is not stored")
        return self._verified(row[0], row[1], f"model version {version}")

    @staticmethod
    def _verified(digest: str, blob: bytes, what: str) -> CloudState:
        if sha256_hex(blob) != digest:
            raise IntegrityError(f"{what}: stored weights do not match their sha256 {digest}")
        return CloudState.from_bytes(blob)

    # assignments
    def assign(self, round: int, device_index: int, base_version: int, assigned_at: float) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO assignments (round, device_index, base_version, "
                "assigned_at) VALUES (?, ?, ?, ?)",
                (round, device_index, base_version, assigned_at),
            )

    def assignment(self, round: int, device_index: int) -> tuple[int, float] | None:
        """``(base_version, assigned_at)`` of a device's assignment to ``round``."""
        row = self._one(
            "SELECT base_version, assigned_at FROM assignments "
            "WHERE round = ? AND device_index = ?",
            (round, device_index),
        )
        return None if row is None else (int(row[0]), float(row[1]))

    def assignments(self, round: int) -> list[tuple[int, float]]:
        """``(device_index, assigned_at)`` of every device assigned to ``round``."""
        rows = self._all(
            "SELECT device_index, assigned_at FROM assignments "
            "WHERE round = ? ORDER BY assigned_at",
            (round,),
        )
        return [(int(d), float(t)) for d, t in rows]

    def open_assignments(self, since: float) -> list[tuple[int, int]]:
        """``(round, device_index)`` assigned after ``since`` with no update yet (in flight)."""
        rows = self._all(
            "SELECT a.round, a.device_index FROM assignments a LEFT JOIN updates u "
            "ON u.round = a.round AND u.device_index = a.device_index "
            "WHERE u.sha256 IS NULL AND a.assigned_at >= ?",
            (since,),
        )
        return [(int(r), int(d)) for r, d in rows]

    def last_assignment(self, device_index: int) -> tuple[int, int] | None:
        """``(round, base_version)`` of the device's newest assignment."""
        row = self._one(
            "SELECT round, base_version FROM assignments WHERE device_index = ? "
            "ORDER BY round DESC LIMIT 1",
            (device_index,),
        )
        return None if row is None else (int(row[0]), int(row[1]))

    def max_round_assigned(self) -> int:
        row = self._one("SELECT MAX(round) FROM assignments")
        return -1 if row is None or row[0] is None else int(row[0])

    # updates
    def add_updates(self, updates: list[StoredUpdate]) -> None:
        """Persist accepted updates durably, in one transaction (one fsync for all of them);
        the caller acknowledges them only after this returns."""
        if not updates:
            return
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO updates (round, device_index, sha256, body, num_examples, "
                "base_version, receipt, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        u.round,
                        u.device_index,
                        u.sha256,
                        u.body,
                        u.num_examples,
                        u.base_version,
                        u.receipt,
                        now,
                    )
                    for u in updates
                ],
            )

    def update(self, device_index: int, round: int) -> StoredUpdate | None:
        rows = self._updates("WHERE device_index = ? AND round = ?", (device_index, round))
        return rows[0] if rows else None

    def pending_updates(self, round: int | None = None) -> list[StoredUpdate]:
        """Updates not merged yet (of ``round`` only, when given), in arrival order."""
        if round is None:
            return self._updates("WHERE merged_into IS NULL ORDER BY received_at, rowid", ())
        return self._updates(
            "WHERE merged_into IS NULL AND round = ? ORDER BY received_at, rowid", (round,)
        )

    def all_updates(self) -> list[StoredUpdate]:
        return self._updates("ORDER BY received_at, rowid", ())

    def reported(self, round: int) -> list[int]:
        """Devices whose update for ``round`` is stored, merged or not."""
        rows = self._all("SELECT device_index FROM updates WHERE round = ?", (round,))
        return [int(r[0]) for r in rows]

    def count_pending(self, round: int | None = None) -> int:
        if round is None:
            row = self._one("SELECT COUNT(*) FROM updates WHERE merged_into IS NULL")
        else:
            row = self._one(
                "SELECT COUNT(*) FROM updates WHERE merged_into IS NULL AND round = ?", (round,)
            )
        return int(row[0]) if row else 0

    def _updates(self, where: str, args: tuple) -> list[StoredUpdate]:
        rows = self._all(
            "SELECT round, device_index, sha256, body, num_examples, base_version, receipt, "
            f"merged_into FROM updates {where}",
            args,
        )
        return [
            StoredUpdate(
                int(r), int(d), str(s), bytes(b), int(n), int(v), str(rc), None if m is None else m
            )
            for r, d, s, b, n, v, rc, m in rows
        ]

    def commit_merge(
        self,
        version: int,
        cloud: CloudState,
        merged: list[tuple[int, int]],
        meta: dict[str, str],
    ) -> None:
        """Store model ``version``, mark ``merged`` (device, round) updates as counted in it and
        set ``meta`` keys, all in one transaction: a crash leaves all of it or none."""
        with self.transaction() as db:
            self.add_model(db, version, cloud)
            db.executemany(
                "UPDATE updates SET merged_into = ? WHERE device_index = ? AND round = ? "
                "AND merged_into IS NULL",
                [(version, device, round) for device, round in merged],
            )
            for key, value in meta.items():
                self.set_meta(db, key, value)

    def snapshot(self) -> dict[str, object]:
        """Row counts and digests of every table, to assert that a request changed nothing."""
        return {
            "meta": self._all("SELECT key, value FROM meta ORDER BY key"),
            "devices": self._all("SELECT device_index, token_sha256 FROM devices ORDER BY 1"),
            "models": self._all("SELECT version, sha256 FROM models ORDER BY 1"),
            "assignments": self._all(
                "SELECT round, device_index, base_version FROM assignments ORDER BY 1, 2"
            ),
            "updates": self._all(
                "SELECT round, device_index, sha256, merged_into FROM updates ORDER BY 1, 2"
            ),
        }
