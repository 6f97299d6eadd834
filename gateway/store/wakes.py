"""Owns the `downlink_wakes` table: each node's wakes as the gateway saw them (when it
next listens, what it was sent, whether a stay_awake keeps it listening now)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from gateway.store import db

STORE = "downlink"  # the migration history's name for this table's owner
_STEPS = (
    """
    CREATE TABLE downlink_wakes (
        device TEXT PRIMARY KEY,
        wakes INTEGER NOT NULL DEFAULT 0,
        missed_wakes INTEGER NOT NULL DEFAULT 0,
        last_hello_at REAL,
        expected_at REAL,
        interval_s INTEGER,
        window_ms INTEGER,
        delivered_total INTEGER NOT NULL DEFAULT 0,
        last_delivered INTEGER NOT NULL DEFAULT 0,
        max_delivered INTEGER NOT NULL DEFAULT 0,
        last_left INTEGER NOT NULL DEFAULT 0,
        last_bytes INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    """,
    # A stay_awake delivered: until then the node listens, and items go at once.
    "ALTER TABLE downlink_wakes ADD COLUMN awake_until REAL;",
)


def migrate(conn: sqlite3.Connection) -> None:
    db.apply(conn, STORE, _STEPS)


@dataclass(frozen=True, slots=True)
class WakeStats:
    device: str
    wakes: int
    missed_wakes: int
    last_hello_at: float | None
    expected_at: float | None
    interval_s: int | None
    window_ms: int | None
    delivered_total: int
    last_delivered: int
    max_delivered: int
    last_left: int
    last_bytes: int
    awake_until: float | None = None

    @property
    def listen_window(self) -> tuple[float, float] | None:
        """(from, until): when the node is next expected to listen for downlink."""
        if self.expected_at is None:
            return None
        return self.expected_at, self.expected_at + (self.window_ms or 0) / 1000.0

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def missed_wakes(expected_at: float | None, interval_s: int | None, now: float,
                 grace_s: float) -> int:
    """Wakes the node was expected at (expected_at, + interval, ...) up to now - grace."""
    if expected_at is None or not interval_s or now <= expected_at + grace_s:
        return 0
    return int((now - grace_s - expected_at) // interval_s) + 1


def overdue(conn: sqlite3.Connection, now: float, grace_s: float) -> tuple[int, int]:
    """(active devices past their expected wake + grace, wakes they have missed so far),
    counted as `missed_wakes()` counts them, over the whole fleet in one query."""
    # The wakes table is filtered first and a device's status looked up only for the nodes
    # that are late: in a healthy fleet that is a scan of one narrow table.
    row = conn.execute(
        "SELECT count(*), coalesce(sum(CAST((? - ? - w.expected_at) / w.interval_s AS INTEGER)"
        " + 1), 0) FROM downlink_wakes w WHERE w.expected_at < ? AND w.interval_s > 0 "
        "AND (SELECT status FROM devices WHERE id = w.device) = 'active'",
        (now, grace_s, now - grace_s)).fetchone()
    return int(row[0]), int(row[1])


def wake_stats(conn: sqlite3.Connection, device: str) -> WakeStats | None:
    row = conn.execute(
        "SELECT device, wakes, missed_wakes, last_hello_at, expected_at, interval_s, window_ms,"
        " delivered_total, last_delivered, max_delivered, last_left, last_bytes, awake_until "
        "FROM downlink_wakes WHERE device=?", (device,)).fetchone()
    return WakeStats(*row) if row else None


def expected(conn: sqlite3.Connection, device: str) -> tuple[float | None, int | None] | None:
    """(expected_at, interval_s) from the node's last wake, or None before its first."""
    row = conn.execute("SELECT expected_at, interval_s FROM downlink_wakes WHERE device=?",
                       (device,)).fetchone()
    return None if row is None else (row[0], row[1])


def record(conn: sqlite3.Connection, device: str, *, missed: int, now: float,
           expected_at: float | None, interval_s: int | None, window_ms: int,
           delivered: int, left: int, spent: int, awake_until: float | None) -> None:
    """Count one wake and what it was sent."""
    conn.execute(
        "INSERT INTO downlink_wakes(device, wakes, missed_wakes, last_hello_at, expected_at,"
        " interval_s, window_ms, delivered_total, last_delivered, max_delivered, last_left,"
        " last_bytes, awake_until) VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(device) DO "
        "UPDATE SET wakes=wakes+1, missed_wakes=missed_wakes+excluded.missed_wakes, "
        "last_hello_at=excluded.last_hello_at, expected_at=excluded.expected_at, "
        "interval_s=excluded.interval_s, window_ms=excluded.window_ms, "
        "delivered_total=delivered_total+excluded.delivered_total, "
        "last_delivered=excluded.last_delivered, "
        "max_delivered=max(max_delivered, excluded.max_delivered), "
        "last_left=excluded.last_left, last_bytes=excluded.last_bytes, "
        "awake_until=excluded.awake_until",
        (device, missed, now, expected_at, interval_s, window_ms, delivered, delivered,
         delivered, left, spent, awake_until))


def awake(conn: sqlite3.Connection, now: float) -> list[str]:
    """The nodes a stay_awake keeps listening at `now`."""
    return [str(r[0]) for r in conn.execute(
        "SELECT device FROM downlink_wakes WHERE awake_until > ?", (now,)).fetchall()]


def extend_awake(conn: sqlite3.Connection, device: str, until: float) -> None:
    """The node listens at least until `until`."""
    conn.execute("UPDATE downlink_wakes SET awake_until=max(awake_until, ?) WHERE device=?",
                 (until, device))


def set_awake(conn: sqlite3.Connection, device: str, until: float | None) -> None:
    """The node listens until `until` (None: only in its own windows)."""
    conn.execute("UPDATE downlink_wakes SET awake_until=? WHERE device=?", (until, device))
