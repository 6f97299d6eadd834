"""The device registry: who may talk to the gateway, in what state, and what it last said.

A device is registered (`torpor device add`) as *provisioned*; its first HELLO makes it
*active*; the gateway *quarantines* a misbehaving one and `torpor device release` brings it
back; *revoked* and *decommissioned* devices are refused for good.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway import proto
from gateway.errors import GatewayError
from gateway.store import db

STORE = "registry"
# Device ids become MQTT usernames, certificate subjects and topic segments.
DEVICE_ID_MAX = 32
DEVICE_ID_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{DEVICE_ID_MAX}}}")

PROVISIONED = "provisioned"
ACTIVE = "active"
QUARANTINED = "quarantined"
REVOKED = "revoked"
DECOMMISSIONED = "decommissioned"
STATUSES = (PROVISIONED, ACTIVE, QUARANTINED, REVOKED, DECOMMISSIONED)
# States in which the gateway serves a device's frames.
SERVED = frozenset({PROVISIONED, ACTIVE})
CLASSES = tuple(proto.DEVICE_CLASSES)

_HELLO_COLUMNS = (
    "fw_version", "boot_cause", "battery_mv", "rssi", "free_mem", "queue_depth", "dropped",
    "next_wake_s", "awake_window_ms", "node_time", "config_version", "ota_state",
    "ota_reason", "safe_mode", "boots_without_send", "mcu_temp", "next_listen_s", "clock_unset",
)

_STEPS = (
    """
    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        class TEXT NOT NULL,
        cert_serial TEXT,
        status TEXT NOT NULL,
        status_reason TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        status_at REAL NOT NULL,
        last_seen REAL,
        last_hello_at REAL,
        next_wake_at REAL,
        awake_until REAL,
        fw_version INTEGER,
        boot_cause TEXT,
        battery_mv INTEGER,
        rssi INTEGER,
        free_mem INTEGER,
        queue_depth INTEGER,
        dropped INTEGER,
        next_wake_s INTEGER,
        awake_window_ms INTEGER,
        node_time INTEGER,
        config_version INTEGER,
        ota_state TEXT,
        ota_reason TEXT,
        safe_mode INTEGER,
        boots_without_send INTEGER,
        mcu_temp REAL
    ) WITHOUT ROWID;
    CREATE INDEX devices_status ON devices(status);
    """,
    # A counter that moves only when a device is added, removed or changes status, so a
    # cache of statuses (ingest's) can tell in one row read whether to reload, whatever
    # else other connections write (relay deletes, status, downlink).
    """
    CREATE TABLE registry_version (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL
    );
    INSERT INTO registry_version (id, version) VALUES (1, 0);
    CREATE TRIGGER devices_added AFTER INSERT ON devices
    BEGIN UPDATE registry_version SET version = version + 1 WHERE id = 1; END;
    CREATE TRIGGER devices_status_changed AFTER UPDATE OF status ON devices
    BEGIN UPDATE registry_version SET version = version + 1 WHERE id = 1; END;
    CREATE TRIGGER devices_removed AFTER DELETE ON devices
    BEGIN UPDATE registry_version SET version = version + 1 WHERE id = 1; END;
    """,
    # Protocol 1.2: when the node next connects, and whether its clock was set.
    """
    ALTER TABLE devices ADD COLUMN next_listen_s INTEGER;
    ALTER TABLE devices ADD COLUMN clock_unset INTEGER;
    """,
    # The device's board (a profile of boards/profiles.toml; NULL: not known, the
    # gateway's [energy] board stands in): its energy model and its model name upstream.
    """
    ALTER TABLE devices ADD COLUMN board TEXT;
    """,
)


class RegistryError(GatewayError):
    """A registry operation was refused (unknown device, bad state change...)."""


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    device_class: str
    cert_serial: str | None
    status: str
    status_reason: str
    created_at: float
    status_at: float
    last_seen: float | None = None
    last_hello_at: float | None = None
    next_wake_at: float | None = None
    awake_until: float | None = None
    fw_version: int | None = None
    boot_cause: str | None = None
    battery_mv: int | None = None
    rssi: int | None = None
    free_mem: int | None = None
    queue_depth: int | None = None
    dropped: int | None = None
    next_wake_s: int | None = None
    awake_window_ms: int | None = None
    node_time: int | None = None
    config_version: int | None = None
    ota_state: str | None = None
    ota_reason: str | None = None
    safe_mode: int | None = None
    boots_without_send: int | None = None
    mcu_temp: float | None = None
    next_listen_s: int | None = None
    clock_unset: int | None = None
    board: str | None = None

    @property
    def limits(self) -> proto.ClassLimits:
        return proto.DEVICE_CLASSES[self.device_class]

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


_SELECT = (
    "SELECT id, class, cert_serial, status, status_reason, created_at, status_at, last_seen, "
    "last_hello_at, next_wake_at, awake_until, " + ", ".join(_HELLO_COLUMNS) + ", board FROM devices"
)


def is_device_id(device_id: object) -> bool:
    return isinstance(device_id, str) and DEVICE_ID_RE.fullmatch(device_id) is not None


def bad_device_id(device_id: object) -> str:
    """What is wrong with an id `is_device_id` refused."""
    return (f"invalid device id {device_id!r}: use 1 to {DEVICE_ID_MAX} characters from "
            "A-Z a-z 0-9 _ -")


def migrate(conn: sqlite3.Connection) -> None:
    db.apply(conn, STORE, _STEPS)


def add(conn: sqlite3.Connection, device_id: str, device_class: str = "sensor",
        cert_serial: str | None = None, *, now: float | None = None,
        board: str | None = None) -> Device:
    """Register a device as provisioned. `board` is taken as given: the caller checks it
    against the board profiles (gateway.config.BoardModels.check)."""
    if not is_device_id(device_id):
        raise RegistryError(bad_device_id(device_id))
    if device_class not in proto.DEVICE_CLASSES:
        raise RegistryError(
            f"unknown device class {device_class!r}: one of {', '.join(CLASSES)}"
        )
    t = time.time() if now is None else now
    try:
        conn.execute(
            "INSERT INTO devices(id, class, cert_serial, status, created_at, status_at, board) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (device_id, device_class, cert_serial, PROVISIONED, t, t, board or None),
        )
    except sqlite3.IntegrityError:
        raise RegistryError(f"device {device_id!r} is already registered") from None
    return get(conn, device_id)


def add_missing(conn: sqlite3.Connection, serials: Mapping[str, str], device_class: str = "sensor",
                *, now: float | None = None, boards: Mapping[str, str] | None = None) -> int:
    """Register, in one transaction, the devices of `serials` (id -> certificate serial) that
    are not registered yet; returns how many were added. `boards` (id -> board) sets the
    board of those it names, registered now or before (a board flashed is a fact)."""
    added = 0
    boards = boards or {}
    with db.transaction(conn):
        for device_id, serial in serials.items():
            if find(conn, device_id) is None:
                add(conn, device_id, device_class, serial, now=now,
                    board=boards.get(device_id))
                added += 1
            elif boards.get(device_id):
                set_board(conn, device_id, boards[device_id])
    return added


def set_board(conn: sqlite3.Connection, device_id: str, board: str | None) -> Device:
    """Set (None: forget) the device's board, checked by the caller as for `add`."""
    cur = conn.execute("UPDATE devices SET board=? WHERE id=?", (board or None, device_id))
    if cur.rowcount == 0:
        raise RegistryError(f"no device {device_id!r} in the registry (see `torpor device list`)")
    return get(conn, device_id)


def find(conn: sqlite3.Connection, device_id: str) -> Device | None:
    row = conn.execute(_SELECT + " WHERE id=?", (device_id,)).fetchone()
    return Device(*row) if row else None


def get(conn: sqlite3.Connection, device_id: str) -> Device:
    dev = find(conn, device_id)
    if dev is None:
        raise RegistryError(f"no device {device_id!r} in the registry (see `torpor device list`)")
    return dev


def list_devices(conn: sqlite3.Connection, status: str | None = None) -> list[Device]:
    if status is not None and status not in STATUSES:
        raise RegistryError(f"unknown status {status!r}: one of {', '.join(STATUSES)}")
    if status is None:
        rows = conn.execute(_SELECT + " ORDER BY id").fetchall()
    else:
        rows = conn.execute(_SELECT + " WHERE status=? ORDER BY id", (status,)).fetchall()
    return [Device(*r) for r in rows]


def version(conn: sqlite3.Connection) -> int:
    """Moves whenever a device is added or removed or its status changes."""
    return int(conn.execute("SELECT version FROM registry_version WHERE id = 1").fetchone()[0])


def statuses(conn: sqlite3.Connection) -> dict[str, str]:
    """device id -> status, for the ingest path's cache."""
    return {r[0]: r[1] for r in conn.execute("SELECT id, status FROM devices")}


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    return {r[0]: int(r[1]) for r in conn.execute("SELECT status, count(*) FROM devices GROUP BY status")}


def lowest_battery(conn: sqlite3.Connection) -> int | None:
    """The lowest battery (mV) a served device reported in its last HELLO."""
    # `+status`: one pass over the table beats a lookup per row through the status index.
    row = conn.execute("SELECT min(battery_mv) FROM devices WHERE +status IN (?, ?)",
                       tuple(sorted(SERVED))).fetchone()
    return None if row[0] is None else int(row[0])


def set_status(conn: sqlite3.Connection, device_id: str, status: str, reason: str = "",
               *, now: float | None = None) -> Device:
    if status not in STATUSES:
        raise RegistryError(f"unknown status {status!r}: one of {', '.join(STATUSES)}")
    cur = conn.execute(
        "UPDATE devices SET status=?, status_reason=?, status_at=? WHERE id=?",
        (status, reason, time.time() if now is None else now, device_id),
    )
    if cur.rowcount == 0:
        raise RegistryError(f"no device {device_id!r} in the registry (see `torpor device list`)")
    return get(conn, device_id)


def release(conn: sqlite3.Connection, device_id: str) -> Device:
    """Quarantined -> active (the operator has looked at it)."""
    dev = get(conn, device_id)
    if dev.status != QUARANTINED:
        raise RegistryError(f"device {device_id!r} is {dev.status}, not quarantined")
    return set_status(conn, device_id, ACTIVE, "released by the operator")


def quarantine(conn: sqlite3.Connection, device_id: str, reason: str,
               *, now: float | None = None) -> None:
    conn.execute(
        "UPDATE devices SET status=?, status_reason=?, status_at=? WHERE id=? AND status IN (?, ?)",
        (QUARANTINED, reason, time.time() if now is None else now, device_id, PROVISIONED, ACTIVE),
    )


def touch_many(conn: sqlite3.Connection, seen: Iterable[tuple[float, str]]) -> None:
    """last_seen for (time, device) pairs, inside the caller's transaction."""
    conn.executemany("UPDATE devices SET last_seen=? WHERE id=?", seen)


def hello_row(device_id: str, hello: proto.Hello, now: float) -> tuple[Any, ...]:
    return (
        now, now, now + hello.next_wake_s, now + hello.awake_window_ms / 1000.0,
        hello.fw_version, hello.boot_cause.name.lower(), hello.battery_mv, hello.rssi,
        hello.free_mem, hello.queue_depth, hello.dropped, hello.next_wake_s,
        hello.awake_window_ms, hello.time, hello.config_version, hello.ota_state.name.lower(),
        hello.ota_reason.name.lower(), int(hello.safe_mode), hello.boots_without_send,
        hello.mcu_temp, hello.next_listen_s or None, int(hello.clock_unset), device_id,
    )


def clock_offsets(conn: sqlite3.Connection, devices: Iterable[str]) -> dict[str, float]:
    """Gateway receipt time minus node time of each device's last HELLO: what turns a
    reading stamped on the node's unset clock into gateway time."""
    out: dict[str, float] = {}
    for d in devices:
        row = conn.execute("SELECT last_hello_at - node_time FROM devices WHERE id=? AND "
                           "last_hello_at IS NOT NULL AND node_time IS NOT NULL", (d,)).fetchone()
        if row is not None:
            out[d] = float(row[0])
    return out


def record_hellos(conn: sqlite3.Connection, rows: Iterable[tuple[Any, ...]], now: float) -> None:
    """Store the HELLO fields (rows from hello_row) and make provisioned devices active,
    inside the caller's transaction. The awake window counts from the gateway's receipt."""
    rows = list(rows)
    conn.executemany(
        "UPDATE devices SET last_seen=?, last_hello_at=?, next_wake_at=?, awake_until=?, "
        + ", ".join(f"{c}=?" for c in _HELLO_COLUMNS) + " WHERE id=?",
        rows,
    )
    conn.executemany(
        "UPDATE devices SET status=?, status_reason='first HELLO', status_at=? "
        "WHERE id=? AND status=?",
        [(ACTIVE, now, r[-1], PROVISIONED) for r in rows],
    )


def heard_since(conn: sqlite3.Connection, since: float, after_id: str = "",
                limit: int = 1000) -> list[Device]:
    """Devices whose last HELLO came after (`since`, `after_id`), oldest HELLO first (then
    by id): a reader keeps the last device's (last_hello_at, id) as its cursor."""
    rows = conn.execute(_SELECT + " WHERE (last_hello_at, id) > (?, ?) "
                        "ORDER BY last_hello_at, id LIMIT ?", (since, after_id, limit)).fetchall()
    return [Device(*r) for r in rows]


@dataclass(frozen=True, slots=True)
class Schedule:
    """What a periodic check of the whole fleet needs of a device, and no more."""

    id: str
    status: str
    status_reason: str
    last_hello_at: float | None
    next_wake_s: int | None
    next_listen_s: int | None


def schedules(conn: sqlite3.Connection, *, statuses: Iterable[str] | None = None,
              late_at: float | None = None) -> list[Schedule]:
    """Devices' status and announced schedule, by id (cheaper than list_devices): every
    device, or those in `statuses`, or (`late_at`) those whose announced next connection
    (next_listen_s, else next_wake_s, after the last HELLO) is before `late_at`."""
    sql = ("SELECT id, status, status_reason, last_hello_at, next_wake_s, next_listen_s "
           "FROM devices")
    where: list[str] = []
    params: list[Any] = []
    if statuses is not None:
        wanted = list(statuses)
        where.append(f"status IN ({', '.join('?' * len(wanted))})")
        params += wanted
    if late_at is not None:
        where.append("last_hello_at + coalesce(nullif(next_listen_s, 0), next_wake_s) < ? "
                     "AND coalesce(nullif(next_listen_s, 0), next_wake_s) > 0")
        params.append(late_at)
    if where:
        sql += " WHERE " + " AND ".join(where)
    return [Schedule(*r) for r in conn.execute(sql + " ORDER BY id", params)]


def page_query(status: str | None = None, text: str = "") -> tuple[str, str, list[Any]]:
    """(SQL of one page of devices by id, SQL counting the devices that match, parameters):
    `status` and a substring of the id, status reason or firmware version filter them. The
    page's SQL ends in LIMIT ? OFFSET ?, whose values follow the parameters."""
    if status is not None and status not in STATUSES:
        raise RegistryError(f"unknown status {status!r}: one of {', '.join(STATUSES)}")
    where: list[str] = []
    params: list[Any] = []
    if status is not None:
        # With a text filter as well, the status index would only add a lookup per device
        # of that status (nearly all of them, usually) before the LIKE: "+status" keeps the
        # planner on one pass over the table in id order.
        where.append("+status=?" if text else "status=?")
        params.append(status)
    if text:
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where.append("(id LIKE ? ESCAPE '\\' OR status_reason LIKE ? ESCAPE '\\' "
                     "OR CAST(fw_version AS TEXT) = ?)")
        params += [pattern, pattern, text]
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    return (_SELECT + clause + " ORDER BY id LIMIT ? OFFSET ?",
            "SELECT count(*) FROM devices" + clause, params)


def page(conn: sqlite3.Connection, *, status: str | None = None, text: str = "",
         offset: int = 0, limit: int = 50) -> tuple[list[Device], int]:
    """One page of devices by id, filtered by status and by a substring of the id, status
    reason or firmware version; and how many devices match in all."""
    sql, count_sql, params = page_query(status, text)
    total = int(conn.execute(count_sql, params).fetchone()[0])
    rows = conn.execute(sql, (*params, limit, offset)).fetchall()
    return [Device(*r) for r in rows], total


# --- reads other modules need (the only SQL on `devices` lives here) ----------------------

def status_of(conn: sqlite3.Connection, device_id: str) -> str | None:
    """The device's status, or None for an unknown device."""
    row = conn.execute("SELECT status FROM devices WHERE id=?", (device_id,)).fetchone()
    return None if row is None else str(row[0])


def board_of(conn: sqlite3.Connection, device_id: str) -> str | None:
    """The device's board, or None for none or an unknown device."""
    row = conn.execute("SELECT board FROM devices WHERE id=?", (device_id,)).fetchone()
    return None if row is None or row[0] is None else str(row[0])


def class_of(conn: sqlite3.Connection, device_id: str) -> str | None:
    """The device's class, or None for an unknown device."""
    row = conn.execute("SELECT class FROM devices WHERE id=?", (device_id,)).fetchone()
    return None if row is None else str(row[0])


def announced_wake(conn: sqlite3.Connection, device_id: str) -> tuple[float, int] | None:
    """(next_wake_at, awake_window_ms) the node announced in its last HELLO, or None."""
    row = conn.execute("SELECT next_wake_at, awake_window_ms FROM devices WHERE id=?",
                       (device_id,)).fetchone()
    if row is None or row[0] is None:
        return None
    return float(row[0]), int(row[1] or 0)


def in_service(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """(id, class) of every device neither revoked nor decommissioned, by id."""
    rows = conn.execute(
        "SELECT id, class FROM devices WHERE status NOT IN (?, ?) ORDER BY id",
        (REVOKED, DECOMMISSIONED)).fetchall()
    return [(str(r[0]), str(r[1])) for r in rows]


def last_seen(conn: sqlite3.Connection) -> float | None:
    """When any device was last heard from."""
    value = conn.execute("SELECT max(last_seen) FROM devices").fetchone()[0]
    return None if value is None else float(value)


def seen_since(conn: sqlite3.Connection, since: float) -> int:
    """How many devices were heard from at or after `since`."""
    return int(conn.execute("SELECT count(*) FROM devices WHERE last_seen >= ?",
                            (since,)).fetchone()[0])
