"""Device groups: the `device_groups` table, one group name per device at most.

A group is what edge rules act on together (gateway.pipeline.rules): a rule's group holds
the devices given this name and those matching the group's id globs in the rules file.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Final

from gateway.errors import GatewayError
from gateway.store import db

STORE: Final = "groups"
_STEPS: Final = (
    """
    CREATE TABLE device_groups (
        device TEXT PRIMARY KEY,
        name TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX device_groups_name ON device_groups(name);
    """,
)
NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class GroupError(GatewayError):
    """A group name that cannot be one."""


def migrate(conn: sqlite3.Connection) -> None:
    db.apply(conn, STORE, _STEPS)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise GroupError(f"invalid group name {name!r}: use 1 to 64 of A-Z a-z 0-9 _ . -")
    return name


def set_group(conn: sqlite3.Connection, device: str, name: str | None) -> None:
    """Put `device` in group `name` (None: in none), in the caller's transaction or its own."""
    with db.atomic(conn):
        if name is None:
            conn.execute("DELETE FROM device_groups WHERE device=?", (device,))
        else:
            conn.execute("INSERT INTO device_groups(device, name) VALUES (?, ?) "
                         "ON CONFLICT(device) DO UPDATE SET name=excluded.name",
                         (device, check_name(name)))


def group_of(conn: sqlite3.Connection, device: str) -> str | None:
    row = conn.execute("SELECT name FROM device_groups WHERE device=?", (device,)).fetchone()
    return None if row is None else str(row[0])


def all_groups(conn: sqlite3.Connection) -> dict[str, str]:
    """device id -> group name, for every device in a group."""
    return {str(r[0]): str(r[1]) for r in conn.execute("SELECT device, name FROM device_groups")}
