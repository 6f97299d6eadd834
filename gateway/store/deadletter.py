"""Dead letters: frames the gateway refused, kept with (the head of) their raw bytes and the
reason.

Bounded like every queue, in rows and in bytes: a letter keeps at most `raw_max` bytes of
its frame (its original length is recorded), and the oldest letters go first when the
table holds more than its byte or row bound. Frames refused only because of who sent
them (a quarantined, revoked or unknown device, a device over its rate) are counted per
device and reason in `dead_letter_counts`, and only sampled into `dead_letters` (see
gateway.pipeline.ingest), so a flooding node can neither fill the SD card nor hide its volume.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gateway.store import db

STORE = "deadletter"
DEFAULT_MAX_ROWS = 100_000
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_RAW_MAX = 256
# What a row costs beyond its text and bytes (rowid, time, lengths, index entry): counted
# in the byte bound, so the byte bound also bounds the rows.
ROW_OVERHEAD = 48

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
    # v2: raw is cut to a bound (raw_len: the frame's length as received; NULL in older
    # rows, whose raw is whole), and every refused frame is counted, stored or not.
    """
    ALTER TABLE dead_letters ADD COLUMN raw_len INTEGER;
    ALTER TABLE dead_letters ADD COLUMN size INTEGER;
    CREATE TABLE dead_letter_counts (
        device TEXT NOT NULL,
        reason TEXT NOT NULL,
        frames INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        stored INTEGER NOT NULL,
        first_at REAL NOT NULL,
        last_at REAL NOT NULL,
        PRIMARY KEY (device, reason)
    ) WITHOUT ROWID;
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
    raw_len: int  # the frame's length as received (raw may hold only its first bytes)

    @property
    def truncated(self) -> bool:
        return self.raw_len > len(self.raw)


@dataclass(frozen=True, slots=True)
class Count:
    """Every frame refused for one (device, reason), stored as a letter or not."""

    device: str
    reason: str
    frames: int
    bytes: int
    stored: int
    first_at: float
    last_at: float


# (device, at, reason, detail, raw)
Row = tuple[str, float, str, str, bytes]


def migrate(conn: sqlite3.Connection) -> None:
    db.apply(conn, STORE, _STEPS)


def row_size(device: str, reason: str, detail: str, kept: int) -> int:
    """What one letter counts against the byte bound."""
    return ROW_OVERHEAD + len(device) + len(reason) + len(detail) + kept


def add_many(conn: sqlite3.Connection, rows: Iterable[Row], raw_max: int = DEFAULT_RAW_MAX) -> int:
    """Insert inside the caller's transaction, each raw frame cut to `raw_max` bytes;
    returns the bytes added (as counted by the byte bound)."""
    added = 0
    out = []
    for device, at, reason, detail, raw in rows:
        kept = bytes(raw[:raw_max])
        size = row_size(device, reason, detail, len(kept))
        added += size
        out.append((device, at, reason, detail, kept, len(raw), size))
    conn.executemany(
        "INSERT INTO dead_letters(device, at, reason, detail, raw, raw_len, size) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)", out)
    return added


def add(conn: sqlite3.Connection, device: str, reason: str, raw: bytes, detail: str = "",
        at: float | None = None, raw_max: int = DEFAULT_RAW_MAX) -> None:
    add_many(conn, [(device, time.time() if at is None else at, reason, detail, bytes(raw))],
             raw_max)


def count_refused(conn: sqlite3.Connection,
                  counts: Iterable[tuple[str, str, int, int, int, float]]) -> None:
    """Add (device, reason, frames, bytes, stored, at) to the refusal counters, inside the
    caller's transaction."""
    conn.executemany(
        "INSERT INTO dead_letter_counts(device, reason, frames, bytes, stored, first_at, last_at)"
        " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6) ON CONFLICT(device, reason) DO UPDATE SET "
        "frames=frames+excluded.frames, bytes=bytes+excluded.bytes, "
        "stored=stored+excluded.stored, last_at=excluded.last_at",
        list(counts))


def refused(conn: sqlite3.Connection, device: str | None = None) -> list[Count]:
    """The refusal counters, a device's or all, most frames first."""
    sql = ("SELECT device, reason, frames, bytes, stored, first_at, last_at "
           "FROM dead_letter_counts")
    args: tuple[str, ...] = ()
    if device is not None:
        sql += " WHERE device=?"
        args = (device,)
    return [Count(*r) for r in conn.execute(sql + " ORDER BY frames DESC", args)]


_COLUMNS = "id, device, at, reason, detail, raw, coalesce(raw_len, length(raw))"


def list_recent(conn: sqlite3.Connection, device: str | None = None, limit: int = 50) -> list[DeadLetter]:
    if device is None:
        rows: Sequence[tuple[int, str, float, str, str, bytes, int]] = conn.execute(
            f"SELECT {_COLUMNS} FROM dead_letters ORDER BY id DESC LIMIT ?", (limit,),
        ).fetchall()
    else:
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM dead_letters WHERE device=? ORDER BY id DESC LIMIT ?",
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


_SIZE = (f"coalesce(size, {ROW_OVERHEAD} + length(device) + length(reason) + length(detail) "
         "+ length(raw))")


def totals(conn: sqlite3.Connection) -> tuple[int, int]:
    """(rows, bytes) held, bytes as counted by the byte bound."""
    rows, size = conn.execute(f"SELECT count(*), coalesce(sum({_SIZE}), 0) FROM dead_letters"
                              ).fetchone()
    return int(rows), int(size)


def prune(conn: sqlite3.Connection, max_rows: int = DEFAULT_MAX_ROWS,
          max_bytes: int | None = None) -> int:
    """Delete the oldest letters beyond `max_rows` and, when given, beyond `max_bytes`;
    returns how many went. Inside the caller's transaction."""
    top = conn.execute("SELECT max(id) FROM dead_letters").fetchone()[0]
    if top is None:
        return 0
    gone = int(conn.execute("DELETE FROM dead_letters WHERE id <= ?",
                            (int(top) - max_rows,)).rowcount)
    if max_bytes is not None:
        gone += trim(conn, max_bytes)
    return gone


def trim(conn: sqlite3.Connection, max_bytes: int, keep: float = 0.9) -> int:
    """Delete the oldest letters until at most `keep` of `max_bytes` is held, when more
    than `max_bytes` is; returns how many went. (Trimming below the bound spares the next
    few batches a trim of their own.)"""
    _, held = totals(conn)
    if held <= max_bytes:
        return 0
    excess = held - int(max_bytes * keep)
    freed = 0
    cutoff = None
    cur = conn.execute(f"SELECT id, {_SIZE} FROM dead_letters ORDER BY id")
    try:
        for rid, size in cur:
            freed += int(size)
            cutoff = int(rid)
            if freed >= excess:
                break
    finally:
        cur.close()
    if cutoff is None:
        return 0
    return int(conn.execute("DELETE FROM dead_letters WHERE id <= ?", (cutoff,)).rowcount)
