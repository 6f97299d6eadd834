"""Owns the `gateway_status` table: the running service's heartbeat and figures, and the
status `torpor gateway status`, the web page and the tools read (with or without a
running gateway)."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from gateway.store import db, deadletter, devices, events, outbox, readings

STORE = "service"
_STEPS = (
    """
    CREATE TABLE gateway_status (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        pid INTEGER NOT NULL,
        started_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        state TEXT NOT NULL,
        interval_s REAL NOT NULL,
        detail TEXT NOT NULL
    );
    """,
)
SEEN_RECENTLY_S = 600.0


def migrate(conn: sqlite3.Connection) -> None:
    db.apply(conn, STORE, _STEPS)


@dataclass(frozen=True, slots=True)
class Status:
    """What `torpor gateway status` shows."""

    running: bool
    pid: int | None
    state: str
    started_at: float | None
    updated_at: float | None
    devices: dict[str, int]
    seen_recently: int
    last_seen: float | None
    readings_total: int
    readings_per_min: float
    dead_letters: int
    outbox_depth: int | None
    detail: dict[str, Any]
    # The newest expiry warnings and renewals (gateway.security.lifetimes), newest first.
    credential_events: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_status(conn: sqlite3.Connection, now: float | None = None) -> Status:
    """The gateway's state from the database alone (works while it runs or not)."""
    now = time.time() if now is None else now
    row = conn.execute(
        "SELECT pid, started_at, updated_at, state, interval_s, detail FROM gateway_status"
    ).fetchone()
    running = False
    detail: dict[str, Any] = {}
    pid = started = updated = None
    state = "never started"
    if row is not None:
        pid, started, updated, state, interval, text = row
        detail = json.loads(text)
        fresh = now - updated <= max(3 * interval, 5.0)
        running = state == "running" and fresh and _pid_alive(int(pid))
        if state == "running" and not running:
            state = "stopped (not shut down cleanly)"
    last_seen = devices.last_seen(conn)
    seen = devices.seen_since(conn, now - SEEN_RECENTLY_S)
    outbox_depth = outbox.count(conn)
    return Status(
        running=running, pid=pid, state=state, started_at=started, updated_at=updated,
        devices=devices.counts(conn), seen_recently=int(seen), last_seen=last_seen,
        readings_total=readings.total(conn),
        readings_per_min=float(detail.get("readings_per_min", 0.0)) if running else 0.0,
        dead_letters=deadletter.count(conn), outbox_depth=outbox_depth, detail=detail,
        credential_events=[e.as_dict() for e in events.recent(conn, 10)],
    )


def write(conn: sqlite3.Connection, *, pid: int, started_at: float, updated_at: float,
          state: str, interval_s: float, detail: dict[str, Any]) -> None:
    """The service's heartbeat row (one row, replaced)."""
    conn.execute(
        "INSERT INTO gateway_status(id, pid, started_at, updated_at, state, interval_s, "
        "detail) VALUES (1, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
        "pid=excluded.pid, started_at=excluded.started_at, updated_at=excluded.updated_at,"
        " state=excluded.state, interval_s=excluded.interval_s, detail=excluded.detail",
        (pid, started_at, updated_at, state, interval_s, json.dumps(detail, default=str)),
    )
