"""Alerts raised by the edge rules (gateway.pipeline.rules): the `alerts` table and the
rules engine's reading cursor.

An alert is open from `raise_alert` until `clear_alert`; at most one alert per (rule,
subject) is open at a time (a unique partial index), so a condition that stays true raises
once, and clearing it twice does nothing the second time. Cleared alerts are kept as
history, the oldest pruned past a bound.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from dataclasses import dataclass
from typing import Any, Final

from gateway.store import db

STORE: Final = "alerts"
_STEPS: Final = (
    """
    CREATE TABLE alerts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        rule TEXT NOT NULL,
        kind TEXT NOT NULL,              -- the rule's condition: threshold, overdue, battery...
        subject TEXT NOT NULL,           -- a device id, campaign:<id> or credential:<name>
        device TEXT,                     -- the device concerned, when one is
        severity TEXT NOT NULL,
        message TEXT NOT NULL,
        value REAL,
        raised_at REAL NOT NULL,
        cleared_at REAL,
        clear_message TEXT NOT NULL DEFAULT ''
    );
    CREATE UNIQUE INDEX alerts_open ON alerts(rule, subject) WHERE cleared_at IS NULL;
    CREATE INDEX alerts_device ON alerts(device, id);
    CREATE TABLE alert_cursors (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
    """,
)
# Cleared alerts kept at most (open ones are never pruned).
MAX_CLEARED: Final = 100_000

_COLUMNS: Final = ("id, rule, kind, subject, device, severity, message, value, raised_at, "
                   "cleared_at, clear_message")


@dataclass(frozen=True, slots=True)
class Alert:
    id: int
    rule: str
    kind: str
    subject: str
    device: str | None
    severity: str
    message: str
    value: float | None
    raised_at: float
    cleared_at: float | None = None
    clear_message: str = ""

    @property
    def open(self) -> bool:
        return self.cleared_at is None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in self.__slots__}
        out["state"] = "open" if self.open else "cleared"
        return out


def migrate(conn: sqlite3.Connection) -> None:
    db.apply(conn, STORE, _STEPS)


def raise_alert(conn: sqlite3.Connection, *, rule: str, kind: str, subject: str,
                device: str | None, severity: str, message: str, value: float | None,
                now: float) -> Alert | None:
    """Open an alert in the caller's transaction; None when one is open already for
    (rule, subject): an alert is raised once."""
    cur = conn.execute(
        "INSERT OR IGNORE INTO alerts(rule, kind, subject, device, severity, message, value, "
        "raised_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (rule, kind, subject, device, severity, message, value, now))
    if not cur.rowcount:
        return None
    return Alert(int(cur.lastrowid or 0), rule, kind, subject, device, severity, message,
                 value, now)


def clear_alert(conn: sqlite3.Connection, rule: str, subject: str, *, message: str,
                now: float) -> Alert | None:
    """Clear the open alert of (rule, subject) in the caller's transaction; None when
    there is none: an alert is cleared once."""
    row = conn.execute(f"SELECT {_COLUMNS} FROM alerts WHERE rule=? AND subject=? AND "
                       "cleared_at IS NULL", (rule, subject)).fetchone()
    if row is None:
        return None
    conn.execute("UPDATE alerts SET cleared_at=?, clear_message=? WHERE id=?",
                 (now, message, row[0]))
    return dataclasses.replace(Alert(*row), cleared_at=now, clear_message=message)


def open_alerts(conn: sqlite3.Connection, rule: str | None = None) -> list[Alert]:
    if rule is None:
        rows = conn.execute(f"SELECT {_COLUMNS} FROM alerts WHERE cleared_at IS NULL ORDER BY id")
    else:
        rows = conn.execute(f"SELECT {_COLUMNS} FROM alerts WHERE cleared_at IS NULL AND rule=? "
                            "ORDER BY id", (rule,))
    return [Alert(*r) for r in rows]


def ever_raised(conn: sqlite3.Connection, rule: str, subject: str) -> bool:
    """Whether (rule, subject) has an alert, open or cleared, still on record."""
    return conn.execute("SELECT 1 FROM alerts WHERE rule=? AND subject=? LIMIT 1",
                        (rule, subject)).fetchone() is not None


def operator_clear(conn: sqlite3.Connection, alert_id: int, *, now: float,
                   message: str = "cleared by the operator") -> Alert | None:
    """Clear an open alert by its id (the operator has dealt with it); None when it is not
    open. A condition that still holds raises a new alert at its next evaluation, except
    for one-off conditions (an aborted campaign), which are told once."""
    row = conn.execute(f"SELECT {_COLUMNS} FROM alerts WHERE id=? AND cleared_at IS NULL",
                       (alert_id,)).fetchone()
    if row is None:
        return None
    conn.execute("UPDATE alerts SET cleared_at=?, clear_message=? WHERE id=?",
                 (now, message, alert_id))
    return dataclasses.replace(Alert(*row), cleared_at=now, clear_message=message)


def open_devices(conn: sqlite3.Connection) -> dict[str, int]:
    """device id -> how many alerts are open for it."""
    return {r[0]: int(r[1]) for r in conn.execute(
        "SELECT device, count(*) FROM alerts WHERE cleared_at IS NULL AND device IS NOT NULL "
        "GROUP BY device")}


def count_open(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM alerts WHERE cleared_at IS NULL").fetchone()[0])


def page(conn: sqlite3.Connection, *, state: str | None = None, device: str | None = None,
         rule: str | None = None, offset: int = 0, limit: int = 50) -> tuple[list[Alert], int]:
    """Alerts newest first, filtered by state ("open" or "cleared"), device and rule; and
    how many match in all."""
    where: list[str] = []
    params: list[Any] = []
    if state == "open":
        where.append("cleared_at IS NULL")
    elif state == "cleared":
        where.append("cleared_at IS NOT NULL")
    if device is not None:
        where.append("device=?")
        params.append(device)
    if rule is not None:
        where.append("rule=?")
        params.append(rule)
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    total = int(conn.execute("SELECT count(*) FROM alerts" + clause, params).fetchone()[0])
    rows = conn.execute(f"SELECT {_COLUMNS} FROM alerts{clause} ORDER BY id DESC LIMIT ? "
                        "OFFSET ?", (*params, limit, offset)).fetchall()
    return [Alert(*r) for r in rows], total


def prune(conn: sqlite3.Connection, keep_cleared: int = MAX_CLEARED) -> int:
    """Delete the oldest cleared alerts beyond `keep_cleared`, in the caller's transaction."""
    cur = conn.execute(
        "DELETE FROM alerts WHERE cleared_at IS NOT NULL AND id <= (SELECT id FROM alerts "
        "WHERE cleared_at IS NOT NULL ORDER BY id DESC LIMIT 1 OFFSET ?)", (keep_cleared,))
    return max(cur.rowcount, 0)


def get_cursor(conn: sqlite3.Connection, name: str) -> int | None:
    row = conn.execute("SELECT value FROM alert_cursors WHERE name=?", (name,)).fetchone()
    return None if row is None else int(row[0])


def set_cursor(conn: sqlite3.Connection, name: str, value: int) -> None:
    conn.execute("INSERT INTO alert_cursors(name, value) VALUES (?, ?) ON CONFLICT(name) "
                 "DO UPDATE SET value=excluded.value", (name, value))
