"""Dead letters: frames the gateway refused, kept with their raw bytes and the reason."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gateway import db

STORE = "deadletter"
# Bounded like every queue: the oldest letters go first (a flooding node must not fill
# the SD card). `prune()` runs periodically from the service.
DEFAULT_MAX_ROWS = 100_000

_STEPS = (
    """
    CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY,
        device TEXT NOT NULL,
        at REAL NOT NULL,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        raw BLOB NOT NULL
    );
    CREATE INDEX dead_letters_device ON dead_letters(device, id);
    """,
)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    device: str
    at: float
    reason: str
    detail: str
    raw: bytes


# (device, at, reason, detail, raw)
Row = tuple[str, float, str, str, bytes]


def migrate(conn: sqlite3.Connection) -> None:
    db.apply(conn, STORE, _STEPS)


def add_many(conn: sqlite3.Connection, rows: Iterable[Row]) -> None:
    """Insert inside the caller's transaction."""
    conn.executemany(
        "INSERT INTO dead_letters(device, at, reason, detail, raw) VALUES (?, ?, ?, ?, ?)", rows
    )


def add(conn: sqlite3.Connection, device: str, reason: str, raw: bytes, detail: str = "",
        at: float | None = None) -> None:
    add_many(conn, [(device, time.time() if at is None else at, reason, detail, bytes(raw))])


def list_recent(conn: sqlite3.Connection, device: str | None = None, limit: int = 50) -> list[DeadLetter]:
    if device is None:
        rows: Sequence[tuple[int, str, float, str, str, bytes]] = conn.execute(
            "SELECT id, device, at, reason, detail, raw FROM dead_letters ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
    else:
        rows = conn.execute(
            "SELECT id, device, at, reason, detail, raw FROM dead_letters WHERE device=? "
            "ORDER BY id DESC LIMIT ?",
            (device, limit),
        ).fetchall()
    return [DeadLetter(*r) for r in rows]


def count(conn: sqlite3.Connection, device: str | None = None, reason: str | None = None) -> int:
    sql = "SELECT count(*) FROM dead_letters WHERE 1=1"
    args: list[str] = []
    if device is not None:
        sql += " AND device=?"
        args.append(device)
    if reason is not None:
        sql += " AND reason=?"
        args.append(reason)
    return int(conn.execute(sql, args).fetchone()[0])


def prune(conn: sqlite3.Connection, max_rows: int = DEFAULT_MAX_ROWS) -> int:
    """Delete the oldest letters beyond `max_rows`; returns how many went."""
    top = conn.execute("SELECT max(id) FROM dead_letters").fetchone()[0]
    if top is None:
        return 0
    cur = conn.execute("DELETE FROM dead_letters WHERE id <= ?", (int(top) - max_rows,))
    return int(cur.rowcount)
