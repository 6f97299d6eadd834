"""TLS-PSK session keys: one row per device that has one or is being sent one
(docs/session-keys.md). This module owns the `session_keys` table; nothing else writes it.

A key is QUEUED while its install_psk command waits in the downlink queue (the broker
does not know it yet), ACTIVE once the node has stored it (the broker's psk_file holds
it), STALE when the node's HELLO names another key (still on the broker until the node
sleeps), UNSUPPORTED when the node's firmware does not know the command (asked again
later).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.store import db
from gateway.store import devices as registry

STORE = "session_keys"

QUEUED = "queued"
ACTIVE = "active"
STALE = "stale"  # the node says it holds another key: withdrawn once the node sleeps
UNSUPPORTED = "unsupported"
STATES = (QUEUED, ACTIVE, STALE, UNSUPPORTED)
ON_BROKER = (ACTIVE, STALE)

_STEPS = (
    """
    CREATE TABLE session_keys (
        device TEXT PRIMARY KEY,
        key_id INTEGER NOT NULL,
        key BLOB NOT NULL,
        state TEXT NOT NULL,
        command_id INTEGER,
        created_at REAL NOT NULL,
        active_at REAL,
        expires_at REAL
    );
    """,
)


@dataclass(frozen=True, slots=True)
class SessionKey:
    device: str
    key_id: int
    key: bytes
    state: str
    command_id: int | None
    created_at: float
    active_at: float | None
    expires_at: float | None

    def days_left(self, now: float) -> float | None:
        return None if self.expires_at is None else (self.expires_at - now) / 86400.0


_COLS = "device, key_id, key, state, command_id, created_at, active_at, expires_at"


def _row(r: Sequence[Any]) -> SessionKey:
    return SessionKey(r[0], int(r[1]), bytes(r[2]), r[3], r[4], float(r[5]), r[6], r[7])


def migrate(conn: sqlite3.Connection) -> None:
    db.apply(conn, STORE, _STEPS)


def get(conn: sqlite3.Connection, device: str) -> SessionKey | None:
    r = conn.execute(f"SELECT {_COLS} FROM session_keys WHERE device=?", (device,)).fetchone()
    return None if r is None else _row(r)


def every(conn: sqlite3.Connection) -> list[SessionKey]:
    return [_row(r) for r in conn.execute(f"SELECT {_COLS} FROM session_keys ORDER BY device")]


def queued(conn: sqlite3.Connection, device: str, key_id: int, key: bytes, command_id: int,
           now: float) -> None:
    """A new key for `device`, its install_psk queued: replaces whatever row it had."""
    conn.execute(
        "INSERT OR REPLACE INTO session_keys(device, key_id, key, state, command_id, "
        "created_at, active_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, NULL, NULL)",
        (device, key_id, key, QUEUED, command_id, now))


def activate(conn: sqlite3.Connection, device: str, now: float, expires_at: float) -> None:
    conn.execute("UPDATE session_keys SET state=?, active_at=?, expires_at=? WHERE device=?",
                 (ACTIVE, now, expires_at, device))


def stale(conn: sqlite3.Connection, device: str) -> None:
    conn.execute("UPDATE session_keys SET state=? WHERE device=? AND state=?",
                 (STALE, device, ACTIVE))


def unsupported(conn: sqlite3.Connection, device: str, retry_at: float) -> None:
    """The node does not know install_psk: no key, asked again after `retry_at`."""
    conn.execute("UPDATE session_keys SET state=?, key=x'', expires_at=? WHERE device=?",
                 (UNSUPPORTED, retry_at, device))


def remove(conn: sqlite3.Connection, device: str) -> bool:
    return conn.execute("DELETE FROM session_keys WHERE device=?", (device,)).rowcount > 0


def broker_keys(conn: sqlite3.Connection) -> dict[str, bytes]:
    """What the broker's psk_file must hold: the ACTIVE and STALE keys of served devices (a revoked
    or quarantined device's key opens nothing, whatever its row says)."""
    status = registry.statuses(conn)
    rows = conn.execute("SELECT device, key FROM session_keys WHERE state IN (?, ?)", ON_BROKER)
    return {r[0]: bytes(r[1]) for r in rows if status.get(r[0]) in registry.SERVED}
