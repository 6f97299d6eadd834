"""Owns the `credential_events` table: expiry warnings and renewals, newest kept.

What an event means and when one is raised is gateway.security.lifetimes' business; this
module stores and reads the rows.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.store import db

STORE = "lifetimes"  # the migration history's name for this table's owner
_STEPS = (
    """
    CREATE TABLE credential_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,               -- unix time it was raised
        kind TEXT NOT NULL,             -- expiring | renewed | renewal_failed
        credential TEXT NOT NULL,       -- Lifetime.key: name, subject, serial
        name TEXT NOT NULL,             -- root_ca issuing_ca server gateway control crl crl_root device
        subject TEXT NOT NULL,
        not_after TEXT NOT NULL,        -- ISO 8601 UTC (a CRL's nextUpdate)
        threshold_days INTEGER,         -- expiring: 30, 7 or 1
        days_left REAL NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE UNIQUE INDEX credential_events_once
        ON credential_events(credential, not_after, threshold_days) WHERE kind = 'expiring';
    """,
)
# The table keeps the newest rows only (a fleet's device warnings and years of renewals fit).
MAX_ROWS = 10_000
_COLUMNS = "kind, credential, name, subject, not_after, threshold_days, days_left, detail"


def migrate(conn: sqlite3.Connection) -> None:
    db.apply(conn, STORE, _STEPS)


@dataclass(frozen=True, slots=True)
class CredentialEvent:
    """One row of `credential_events` (also the upstream event's fields)."""

    kind: str
    credential: str
    name: str
    subject: str
    not_after: str
    threshold_days: int | None
    days_left: float
    detail: str = ""
    at: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def _row(ev: CredentialEvent) -> tuple[Any, ...]:
    return (ev.kind, ev.credential, ev.name, ev.subject, ev.not_after, ev.threshold_days,
            ev.days_left, ev.detail)


def failed_lately(conn: sqlite3.Connection, credential: str, since: float) -> bool:
    """Whether a failed renewal of `credential` was recorded after `since`."""
    return conn.execute(
        "SELECT 1 FROM credential_events WHERE kind = 'renewal_failed' AND "
        "credential = ? AND at > ?", (credential, since)).fetchone() is not None


def add_once(conn: sqlite3.Connection, ev: CredentialEvent, now: float) -> bool:
    """Store an event unless the same (credential, expiry, threshold) warning is there;
    whether it was new."""
    cur = conn.execute(
        f"INSERT OR IGNORE INTO credential_events(at, {_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
        (now, *_row(ev)))
    return bool(cur.rowcount)


def add(conn: sqlite3.Connection, events: Sequence[CredentialEvent], now: float) -> None:
    """Store events, then let the oldest go past MAX_ROWS."""
    conn.executemany(
        f"INSERT INTO credential_events(at, {_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
        [(now, *_row(ev)) for ev in events])


def trim(conn: sqlite3.Connection) -> None:
    """Keep the newest MAX_ROWS rows."""
    conn.execute("DELETE FROM credential_events WHERE id <= "
                 "(SELECT max(id) FROM credential_events) - ?", (MAX_ROWS,))


def recent(conn: sqlite3.Connection, limit: int = 20) -> list[CredentialEvent]:
    """The newest events first (an empty list before the gateway first ran)."""
    try:
        rows = conn.execute(
            f"SELECT {_COLUMNS}, at FROM credential_events ORDER BY id DESC LIMIT ?",
            (limit,)).fetchall()
    except sqlite3.OperationalError:
        return []
    return [CredentialEvent(*row) for row in rows]
