"""What the Home Assistant publisher (gateway.pipeline.hass) has announced upstream: one
row per device with discovery published, and its reading cursor.

The rows let a restarted gateway know which discovery configs are out there (to remove
them when a device is decommissioned), which `expire_after`, firmware version and model
they carry (to republish when those change) and whether the device was last said online.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Final

from gateway.store import db

STORE: Final = "hass"
_STEPS: Final = (
    """
    CREATE TABLE hass_devices (
        device TEXT PRIMARY KEY,
        expire_after INTEGER NOT NULL,
        fw_version INTEGER,
        schemas TEXT NOT NULL DEFAULT '',   -- reading schemas announced, comma-separated ids
        online INTEGER NOT NULL DEFAULT 1,
        problem INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE hass_cursors (
        name TEXT PRIMARY KEY,
        value REAL NOT NULL,
        text TEXT NOT NULL DEFAULT ''
    ) WITHOUT ROWID;
    """,
    # The device block's model (the device's board's name; NULL: the device class's).
    """
    ALTER TABLE hass_devices ADD COLUMN model TEXT;
    """,
)


@dataclass(frozen=True, slots=True)
class Announced:
    device: str
    expire_after: int
    fw_version: int | None
    schemas: tuple[int, ...]
    online: bool
    problem: bool
    updated_at: float
    model: str | None = None  # the board's name announced as the model (None: none known)


def migrate(conn: sqlite3.Connection) -> None:
    db.apply(conn, STORE, _STEPS)


def _row(r: tuple[object, ...]) -> Announced:
    text = str(r[3] or "")
    schemas = tuple(int(s) for s in text.split(",") if s)
    return Announced(str(r[0]), int(r[1]),  # type: ignore[call-overload]
                     None if r[2] is None else int(r[2]),  # type: ignore[call-overload]
                     schemas, bool(r[4]), bool(r[5]), float(r[6]),  # type: ignore[arg-type]
                     None if r[7] is None else str(r[7]))


def announced(conn: sqlite3.Connection) -> dict[str, Announced]:
    rows = conn.execute("SELECT device, expire_after, fw_version, schemas, online, problem, "
                        "updated_at, model FROM hass_devices")
    return {str(r[0]): _row(r) for r in rows}


def save(conn: sqlite3.Connection, a: Announced) -> None:
    conn.execute(
        "INSERT INTO hass_devices(device, expire_after, fw_version, schemas, online, problem, "
        "updated_at, model) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(device) DO UPDATE SET "
        "expire_after=excluded.expire_after, fw_version=excluded.fw_version, "
        "schemas=excluded.schemas, online=excluded.online, problem=excluded.problem, "
        "updated_at=excluded.updated_at, model=excluded.model",
        (a.device, a.expire_after, a.fw_version, ",".join(map(str, a.schemas)), int(a.online),
         int(a.problem), a.updated_at, a.model))


def forget(conn: sqlite3.Connection, device: str) -> None:
    conn.execute("DELETE FROM hass_devices WHERE device=?", (device,))


def get_cursor(conn: sqlite3.Connection, name: str) -> tuple[float, str] | None:
    row = conn.execute("SELECT value, text FROM hass_cursors WHERE name=?", (name,)).fetchone()
    return None if row is None else (float(row[0]), str(row[1]))


def set_cursor(conn: sqlite3.Connection, name: str, value: float, text: str = "") -> None:
    conn.execute("INSERT INTO hass_cursors(name, value, text) VALUES (?, ?, ?) ON CONFLICT(name) "
                 "DO UPDATE SET value=excluded.value, text=excluded.text", (name, value, text))
