"""The upstream outbox: messages waiting for the upstream broker's PUBACK, in SQLite.

Ingest adds items with `enqueue` inside the transaction that commits the readings, so a
reading and its upstream copy are durable together; the relay reads them in order with
`Outbox.peek` and deletes each only after the upstream broker acknowledged it. The outbox
is bounded by item count and age; `enforce_bounds` drops past the bounds and counts what it
dropped in persistent counters (see docs/upstream.md).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from gateway.errors import ConfigError
from gateway.store import db

COUNTER_NAMES: Final = ("enqueued", "delivered", "dropped_full", "dropped_age")
DROP_POLICIES: Final = ("oldest", "newest")

STORE: Final = "outbox"
# Versioned steps (gateway.store.db.apply): step i brings the store to version i + 1.
_STEPS: Final = (
    # AUTOINCREMENT: ids never come back after the table empties, so order by id is the
    # order of arrival and a reader's "after id N" cursor stays valid.
    """
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        created REAL NOT NULL,
        device TEXT NOT NULL,
        kind TEXT NOT NULL
    );
    CREATE INDEX outbox_created ON outbox (created);
    CREATE TABLE outbox_counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO outbox_counters (name, value) VALUES
        ('enqueued', 0), ('delivered', 0), ('dropped_full', 0), ('dropped_age', 0);
    """,
    # Retained messages upstream (Home Assistant discovery and availability).
    "ALTER TABLE outbox ADD COLUMN retain INTEGER NOT NULL DEFAULT 0;",
)


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One upstream message: where it goes, its bytes, and whose it is (for logs and drops)."""

    topic: str
    payload: bytes
    created: float  # unix seconds; the age bound counts from here
    device: str
    kind: str  # "readings" or an event kind ("hello", "revoked", ...)
    retain: bool = False  # published with the MQTT retain flag


@dataclass(frozen=True, slots=True)
class Queued:
    """An item as stored, with the id that orders it and that `Outbox.delete` takes."""

    id: int
    item: OutboxItem


@dataclass(frozen=True, slots=True)
class Counters:
    """Persistent totals since the database was created."""

    enqueued: int
    delivered: int
    dropped_full: int
    dropped_age: int


@dataclass(frozen=True, slots=True)
class Dropped:
    """What one `enforce_bounds` call dropped."""

    age: int
    full: int


def migrate(conn: sqlite3.Connection) -> None:
    """Create or upgrade the outbox tables; safe to run on every start."""
    db.apply(conn, STORE, _STEPS)


def enqueue(conn: sqlite3.Connection, items: Iterable[OutboxItem]) -> int:
    """Add items in the caller's open transaction (no commit here); returns how many."""
    return len(enqueue_queued(conn, items))


def enqueue_queued(conn: sqlite3.Connection, items: Iterable[OutboxItem]) -> list[Queued]:
    """`enqueue`, returning the items with their ids (in order), so that the committer
    can hand them to the relay without the relay reading them back. The caller's
    transaction must hold the write lock (BEGIN IMMEDIATE): the ids follow the table's
    AUTOINCREMENT sequence, read here."""
    todo = list(items)
    if not todo:
        return []
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
    first = (int(row[0]) if row else 0) + 1
    conn.executemany(
        "INSERT INTO outbox (id, topic, payload, created, device, kind, retain) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(first + k, i.topic, bytes(i.payload), i.created, i.device, i.kind, int(i.retain))
         for k, i in enumerate(todo)],
    )
    _bump(conn, "enqueued", len(todo))
    return [Queued(first + k, i) for k, i in enumerate(todo)]


def _bump(conn: sqlite3.Connection, name: str, n: int) -> None:
    if n:
        conn.execute("UPDATE outbox_counters SET value = value + ? WHERE name = ?", (n, name))


def connect(db_path: str | Path) -> sqlite3.Connection:
    """A connection for the outbox's own use (the relay's): the gateway's pragmas, except
    synchronous=NORMAL. A power cut may then undo the last deletes, which only sends those
    messages upstream once more (at-least-once), and the relay's frequent small deletes
    cost no fsync each on the SD card. Enqueued items are as durable as the connection
    that committed them (ingest's, synchronous=FULL)."""
    conn = db.connect(db_path)
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class Outbox:
    """The outbox table seen by its reader: peek in order, delete after PUBACK, bounds."""

    def __init__(
        self,
        db: sqlite3.Connection | str | Path,
        *,
        max_items: int = 1_000_000,
        max_age_s: float = 7 * 86400.0,
        drop_policy: str = "oldest",
    ) -> None:
        if max_items < 1:
            raise ConfigError(f"upstream.outbox_max_items must be at least 1, not {max_items}")
        if max_age_s <= 0:
            raise ConfigError(f"upstream.outbox_max_age_s must be positive, not {max_age_s}")
        policy = drop_policy.removeprefix("drop_")
        if policy not in DROP_POLICIES:
            raise ConfigError(
                f"upstream.drop_policy must be one of {', '.join(DROP_POLICIES)}, not {drop_policy!r}"
            )
        self._own = not isinstance(db, sqlite3.Connection)
        self.conn = connect(db) if not isinstance(db, sqlite3.Connection) else db
        self.max_items = max_items
        self.max_age_s = max_age_s
        self.drop_policy = policy
        migrate(self.conn)

    def close(self) -> None:
        if self._own:
            self.conn.close()

    def put(self, items: Iterable[OutboxItem]) -> int:
        """`enqueue` in a transaction of its own (for callers with no readings to commit)."""
        with db.transaction(self.conn):
            return enqueue(self.conn, items)

    def peek(self, n: int, after: int = 0) -> list[Queued]:
        """Up to `n` items in arrival order, starting after id `after`; nothing is removed."""
        rows = self.conn.execute(
            "SELECT id, topic, payload, created, device, kind, retain FROM outbox"
            " WHERE id > ? ORDER BY id LIMIT ?",
            (after, n),
        ).fetchall()
        return [Queued(r[0], OutboxItem(r[1], bytes(r[2]), r[3], r[4], r[5], bool(r[6])))
                for r in rows]

    def delete(self, ids: Sequence[int]) -> int:
        """Remove delivered items (after their PUBACK); returns how many were still there."""
        if not ids:
            return 0
        with db.transaction(self.conn):
            cur = self.conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
            n = max(cur.rowcount, 0)
            _bump(self.conn, "delivered", n)
        return n

    def depth(self) -> int:
        (n,) = self.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(n)

    def oldest(self) -> float | None:
        """`created` of the oldest waiting item, or None when empty."""
        row = self.conn.execute("SELECT MIN(created) FROM outbox").fetchone()
        return None if row[0] is None else float(row[0])

    def counters(self) -> Counters:
        rows = dict(self.conn.execute("SELECT name, value FROM outbox_counters").fetchall())
        return Counters(*(int(rows.get(name, 0)) for name in COUNTER_NAMES))

    def enforce_bounds(self, now: float) -> Dropped:
        """Drop items older than `max_age_s`, then the oldest (or newest, per the policy)
        beyond `max_items`; both counted. One transaction."""
        with db.transaction(self.conn):
            cur = self.conn.execute(
                "DELETE FROM outbox WHERE created < ?", (now - self.max_age_s,)
            )
            aged = max(cur.rowcount, 0)
            _bump(self.conn, "dropped_age", aged)
            (depth,) = self.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()
            excess = int(depth) - self.max_items
            full = 0
            if excess > 0:
                order = "ASC" if self.drop_policy == "oldest" else "DESC"
                cur = self.conn.execute(
                    "DELETE FROM outbox WHERE id IN"
                    f" (SELECT id FROM outbox ORDER BY id {order} LIMIT ?)",
                    (excess,),
                )
                full = max(cur.rowcount, 0)
                _bump(self.conn, "dropped_full", full)
        return Dropped(aged, full)


def count(conn: sqlite3.Connection) -> int | None:
    """Items waiting in the outbox, or None where the table does not exist (a database
    from before the relay)."""
    try:
        return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
    except sqlite3.OperationalError:
        return None
