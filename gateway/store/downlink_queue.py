"""The downlink queue: what waits in the gateway for a sleeping node.

Per device: commands (COMMAND frames), pre-encoded frames of other kinds (OTA later) and
the desired configuration, which travels as ONE SHADOW_DELTA item carrying every key the
node has not yet confirmed. Items leave the queue only when the node answers (COMMAND_RESULT
for a command, SHADOW_REPORT with the delta's version or newer for configuration), when
they expire, fail after too many deliveries, or are cancelled. This module owns the
`downlink_*` tables; nothing else writes them.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway import proto
from gateway.errors import GatewayError
from gateway.store import db

STORE = "queue"

QUEUED = "queued"
SENT = "sent"
DONE = "done"
FAILED = "failed"
EXPIRED = "expired"
CANCELLED = "cancelled"
STATUSES = (QUEUED, SENT, DONE, FAILED, EXPIRED, CANCELLED)
ACTIVE = (QUEUED, SENT)

DEFAULT_PRIORITY = 4
DEFAULT_TTL_S = 24 * 3600
MAX_PRIORITY = 255
MAX_DATA = 256
I32 = (-(2**31), 2**31 - 1)
U32 = 2**32

KIND_NAMES = {
    proto.COMMAND: "command", proto.SHADOW_DELTA: "config", proto.OTA_MANIFEST: "ota_manifest",
    proto.OTA_CHUNK: "ota_chunk",
}
OPS = {op.name.lower(): op for op in proto.CommandOp}
CONFIG_KEYS = {k.name.lower(): k for k in proto.ConfigKey}
# Result statuses that mean "the node has it": the item is done; any other is a failure.
_DONE_RESULTS = frozenset({proto.ResultStatus.OK, proto.ResultStatus.DUPLICATE})

_STEPS = (
    """
    CREATE TABLE downlink_items (
        device TEXT NOT NULL,
        command_id INTEGER NOT NULL,
        kind INTEGER NOT NULL,
        op INTEGER,
        args TEXT NOT NULL DEFAULT '',
        data BLOB NOT NULL DEFAULT x'',
        config_version INTEGER,
        priority INTEGER NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        status TEXT NOT NULL,
        sent_at REAL,
        delivered_at REAL,
        retired_at REAL,
        result_status TEXT,
        result_code INTEGER,
        result_detail TEXT,
        result_values TEXT,
        PRIMARY KEY (device, command_id)
    ) WITHOUT ROWID;
    CREATE INDEX downlink_items_active ON downlink_items(device, priority)
        WHERE status IN ('queued', 'sent');
    CREATE INDEX downlink_items_expiry ON downlink_items(expires_at)
        WHERE status IN ('queued', 'sent') AND expires_at IS NOT NULL;
    CREATE TABLE downlink_nodes (
        device TEXT PRIMARY KEY,
        next_id INTEGER NOT NULL,
        config_version INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE TABLE downlink_config (
        device TEXT NOT NULL,
        key INTEGER NOT NULL,
        value INTEGER NOT NULL,
        version INTEGER NOT NULL,
        set_at REAL NOT NULL,
        applied INTEGER NOT NULL DEFAULT 0,
        reported_value INTEGER,
        reported_at REAL,
        PRIMARY KEY (device, key)
    ) WITHOUT ROWID;
    """,
)


class QueueError(GatewayError):
    """A downlink queue operation was refused; the message says why, and `field` names the
    argument it concerns when there is one (priority, ttl_s, args, ...)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class BadArguments(QueueError):
    """A command's arguments do not suit its op (the spec's [commands] table): refused at
    enqueue, so the node never spends a wake on it."""


class QueueFull(QueueError):
    """The device's downlink queue holds its class's max_downlink items already."""


@dataclass(frozen=True, slots=True)
class Item:
    device: str
    command_id: int
    kind: int
    op: int | None
    args: tuple[int, ...]
    data: bytes
    config_version: int | None
    priority: int
    created_at: float
    expires_at: float | None
    attempts: int
    status: str
    sent_at: float | None
    delivered_at: float | None
    retired_at: float | None
    result_status: str | None
    result_code: int | None
    result_detail: str | None
    result_values: tuple[int, ...]

    @property
    def kind_name(self) -> str:
        return KIND_NAMES.get(self.kind, f"frame{self.kind}")

    @property
    def what(self) -> str:
        """One line for operators: `ping`, `set_interval 300`, `config v7`..."""
        if self.kind == proto.COMMAND and self.op is not None:
            name = proto.CommandOp(self.op).name.lower()
            return " ".join([name, *map(str, self.args)]) + (f" +{len(self.data)}B" if self.data else "")
        if self.kind == proto.SHADOW_DELTA:
            return f"config v{self.config_version}"
        return f"{self.kind_name} ({len(self.data)} B)"

    def as_dict(self) -> dict[str, object]:
        d = {name: getattr(self, name) for name in self.__slots__}
        # A session key is a secret: operators and the web API see that it went, not what.
        d["data"] = "" if self.op == proto.CommandOp.INSTALL_PSK and self.kind == proto.COMMAND \
            else self.data.hex()
        d["kind"] = self.kind_name
        d["what"] = self.what
        return d


@dataclass(frozen=True, slots=True)
class ConfigState:
    """One key of a device's shadow: desired value, whether the node confirmed it."""

    key: str
    value: int
    version: int
    set_at: float
    applied: bool
    reported_value: int | None
    reported_at: float | None


_COLS = (
    "device, command_id, kind, op, args, data, config_version, priority, created_at, "
    "expires_at, attempts, status, sent_at, delivered_at, retired_at, result_status, "
    "result_code, result_detail, result_values"
)
# Delivery order: priority first, configuration before other items of the same priority,
# then first queued first.
_ORDER = f"priority DESC, (kind != {proto.SHADOW_DELTA}), created_at, command_id"


def _ints(text: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",")) if text else ()


def _item(row: Sequence[Any]) -> Item:
    r = list(row)
    r[4] = _ints(r[4])
    r[5] = bytes(r[5])
    r[18] = _ints(r[18])
    return Item(*r)


def migrate(conn: sqlite3.Connection) -> None:
    db.apply(conn, STORE, _STEPS)


# ---------------------------------------------------------------- validation
def _device(conn: sqlite3.Connection, device: str) -> proto.ClassLimits:
    row = conn.execute("SELECT class, status FROM devices WHERE id=?", (device,)).fetchone()
    if row is None:
        raise QueueError(f"no device {device!r} in the registry (see `torpor device list`)")
    if row[1] in ("revoked", "decommissioned"):
        raise QueueError(f"device {device!r} is {row[1]}: it will not connect again")
    return proto.DEVICE_CLASSES[row[0]]


def parse_op(op: str | int | proto.CommandOp) -> proto.CommandOp:
    if isinstance(op, str):
        found = OPS.get(op.lower())
        if found is None:
            raise QueueError(f"unknown op {op!r}: one of {', '.join(OPS)}")
        return found
    try:
        return proto.CommandOp(op)
    except ValueError:
        raise QueueError(f"unknown op {op!r}: one of {', '.join(OPS)}") from None


def parse_key(key: str | int | proto.ConfigKey) -> proto.ConfigKey:
    if isinstance(key, str):
        found = CONFIG_KEYS.get(key.lower())
        if found is None:
            raise QueueError(f"unknown configuration key {key!r}: one of {', '.join(CONFIG_KEYS)}")
        return found
    try:
        return proto.ConfigKey(key)
    except ValueError:
        raise QueueError(
            f"unknown configuration key {key!r}: one of {', '.join(CONFIG_KEYS)}") from None


def _check_i32(what: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not I32[0] <= v <= I32[1]:
        raise QueueError(f"{what}: {v!r} is not a 32-bit signed integer")
    return v


def check_args(op: proto.CommandOp, args: Sequence[object]) -> tuple[int, ...]:
    """The arguments as a tuple if they suit `op` by the spec's table (count, each range);
    else BadArguments naming the op, the argument and its range."""
    values = []
    for i, a in enumerate(args, start=1):
        if isinstance(a, bool) or not isinstance(a, int):
            raise BadArguments(f"{op.name.lower()}: argument {i} ({a!r}) is not an integer")
        values.append(a)
    problem = proto.OP_ARGS[op].problem(values)
    if problem is not None:
        raise BadArguments(problem)
    return tuple(values)


def _check_common(priority: int, ttl_s: float | None) -> None:
    if not 0 <= priority <= MAX_PRIORITY:
        raise QueueError(f"priority {priority} is out of range 0..{MAX_PRIORITY}", "priority")
    if ttl_s is not None and ttl_s <= 0:
        raise QueueError(f"ttl {ttl_s:g}s must be positive (or none)", "ttl_s")


def _active_count(conn: sqlite3.Connection, device: str) -> int:
    return int(conn.execute(
        "SELECT count(*) FROM downlink_items WHERE device=? AND status IN ('queued', 'sent')",
        (device,)).fetchone()[0])


def _check_room(conn: sqlite3.Connection, device: str, limits: proto.ClassLimits) -> None:
    n = _active_count(conn, device)
    if n >= limits.max_downlink:
        cls = next(k for k, v in proto.DEVICE_CLASSES.items() if v is limits)
        raise QueueFull(
            f"the downlink queue of {device} is full: {n} items, the bound for class {cls} is "
            f"{limits.max_downlink}; cancel items (`torpor device cancel`) or wait for it to wake")


def _node(conn: sqlite3.Connection, device: str, now: float) -> tuple[int, int]:
    """(next command id, last allocated config version), creating the row on first use.

    Ids start at the clock's seconds, so a gateway whose database was lost and rebuilt does
    not reuse ids the node remembers as executed (it would answer `duplicate`)."""
    row = conn.execute(
        "SELECT next_id, config_version FROM downlink_nodes WHERE device=?", (device,)).fetchone()
    if row is not None:
        return int(row[0]), int(row[1])
    first = max(1, int(now) % U32)
    conn.execute("INSERT INTO downlink_nodes(device, next_id) VALUES (?, ?)", (device, first))
    return first, 0


def _alloc_id(conn: sqlite3.Connection, device: str, now: float) -> int:
    cid, _ = _node(conn, device, now)
    while conn.execute("SELECT 1 FROM downlink_items WHERE device=? AND command_id=?",
                       (device, cid)).fetchone():
        cid = cid % (U32 - 1) + 1  # wrapped around onto an id still on record: skip it
    conn.execute("UPDATE downlink_nodes SET next_id=? WHERE device=?",
                 (cid % (U32 - 1) + 1, device))
    return cid


def _insert(conn: sqlite3.Connection, device: str, cid: int, kind: int, op: int | None,
            args: Sequence[int], data: bytes, version: int | None, priority: int,
            ttl_s: float | None, now: float) -> None:
    conn.execute(
        "INSERT INTO downlink_items(device, command_id, kind, op, args, data, config_version,"
        " priority, created_at, expires_at, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (device, cid, kind, op, ",".join(map(str, args)), data, version, priority, now,
         None if ttl_s is None else now + ttl_s, QUEUED),
    )


# ---------------------------------------------------------------- operator / module API
def enqueue_command(
    conn: sqlite3.Connection, device: str, op: str | int | proto.CommandOp,
    args: Sequence[int] = (), priority: int = DEFAULT_PRIORITY,
    ttl_s: float | None = DEFAULT_TTL_S, data: bytes = b"", *, now: float | None = None,
) -> int:
    """Queue a COMMAND for `device`; returns its command id."""
    now = time.time() if now is None else now
    cop = parse_op(op)
    args = check_args(cop, args)
    if len(data) > MAX_DATA:
        raise QueueError(f"{len(data)} bytes of data: a command carries at most {MAX_DATA}")
    _check_common(priority, ttl_s)
    with db.atomic(conn):
        limits = _device(conn, device)
        size = len(proto.encode_command(proto.Command(0, 0, cop, args, priority, 0, data)))
        if size > limits.max_message:
            raise QueueError(f"the command frame is {size} bytes; {device} accepts at most "
                             f"{limits.max_message}")
        _check_room(conn, device, limits)
        cid = _alloc_id(conn, device, now)
        _insert(conn, device, cid, proto.COMMAND, int(cop), args, bytes(data), None, priority,
                ttl_s, now)
    return cid


def enqueue_frame(
    conn: sqlite3.Connection, device: str, kind: int, payload: bytes,
    priority: int = DEFAULT_PRIORITY, ttl_s: float | None = DEFAULT_TTL_S,
    *, now: float | None = None,
) -> int:
    """Queue a pre-encoded down frame (e.g. OTA_MANIFEST/OTA_CHUNK) as it is; returns its
    item id. Its owner retires it with `retire()` when the node's answer says so."""
    now = time.time() if now is None else now
    if kind in (proto.COMMAND, proto.SHADOW_DELTA):
        raise QueueError("commands and configuration go through enqueue_command/set_config")
    if len(payload) < proto.HEADER_SIZE or payload[1] != kind:
        raise QueueError(f"the payload is not an encoded frame of type {kind}")
    _check_common(priority, ttl_s)
    with db.atomic(conn):
        limits = _device(conn, device)
        if len(payload) > limits.max_message:
            raise QueueError(f"the frame is {len(payload)} bytes; {device} accepts at most "
                             f"{limits.max_message}")
        _check_room(conn, device, limits)
        cid = _alloc_id(conn, device, now)
        _insert(conn, device, cid, kind, None, (), bytes(payload), None, priority, ttl_s, now)
    return cid


def set_config(
    conn: sqlite3.Connection, device: str, values: Mapping[str | int | proto.ConfigKey, int],
    priority: int = DEFAULT_PRIORITY, ttl_s: float | None = None, *, now: float | None = None,
) -> int:
    """Set desired configuration values; returns the new config version. A newer value for
    a key replaces one still pending; one SHADOW_DELTA item carries every unconfirmed key."""
    now = time.time() if now is None else now
    if not values:
        raise QueueError("no configuration values given")
    entries = {parse_key(k): _check_i32(f"value of {parse_key(k).name.lower()}", v)
               for k, v in values.items()}
    _check_common(priority, ttl_s)
    with db.atomic(conn):
        limits = _device(conn, device)
        _, last = _node(conn, device, now)
        reported = conn.execute("SELECT config_version FROM devices WHERE id=?",
                                (device,)).fetchone()[0] or 0
        version = max(last, int(reported)) + 1
        if version >= U32:
            raise QueueError(f"config version of {device} exhausted")
        row = conn.execute(
            "SELECT command_id, priority FROM downlink_items WHERE device=? AND kind=? AND "
            "status IN ('queued', 'sent')", (device, proto.SHADOW_DELTA)).fetchone()
        if row is None:
            _check_room(conn, device, limits)
        conn.executemany(
            "INSERT INTO downlink_config(device, key, value, version, set_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT(device, key) DO UPDATE SET value=excluded.value,"
            " version=excluded.version, set_at=excluded.set_at, applied=0",
            [(device, int(k), v, version, now) for k, v in sorted(entries.items())])
        conn.execute("UPDATE downlink_nodes SET config_version=? WHERE device=?", (version, device))
        expires = None if ttl_s is None else now + ttl_s
        if row is None:
            cid = _alloc_id(conn, device, now)
            _insert(conn, device, cid, proto.SHADOW_DELTA, None, (), b"", version, priority,
                    ttl_s, now)
        else:
            # New content: a fresh item as far as deliveries go.
            conn.execute(
                "UPDATE downlink_items SET config_version=?, priority=?, expires_at=?, "
                "status='queued', attempts=0 WHERE device=? AND command_id=?",
                (version, max(priority, int(row[1])), expires, device, row[0]))
    return version


def cancel(conn: sqlite3.Connection, device: str, command_id: int,
           *, now: float | None = None) -> Item:
    """Withdraw a queued or sent item (a node that already got it may still run it)."""
    now = time.time() if now is None else now
    with db.atomic(conn):
        it = get(conn, device, command_id)
        if it.status not in ACTIVE:
            raise QueueError(f"item {command_id} of {device} is already {it.status}")
        conn.execute("UPDATE downlink_items SET status=?, retired_at=? WHERE device=? AND "
                     "command_id=?", (CANCELLED, now, device, command_id))
        if it.kind == proto.SHADOW_DELTA:
            conn.execute("DELETE FROM downlink_config WHERE device=? AND applied=0", (device,))
    return get(conn, device, command_id)


def get(conn: sqlite3.Connection, device: str, command_id: int) -> Item:
    row = conn.execute(f"SELECT {_COLS} FROM downlink_items WHERE device=? AND command_id=?",
                       (device, command_id)).fetchone()
    if row is None:
        raise QueueError(f"no downlink item {command_id} for device {device!r}")
    return _item(row)


def pending(conn: sqlite3.Connection, device: str) -> list[Item]:
    """Queued and sent items in delivery order."""
    rows = conn.execute(
        f"SELECT {_COLS} FROM downlink_items WHERE device=? AND status IN ('queued', 'sent') "
        f"ORDER BY {_ORDER}", (device,)).fetchall()
    return [_item(r) for r in rows]


def history(conn: sqlite3.Connection, device: str, limit: int = 50) -> list[Item]:
    """Every item of the device, newest first."""
    rows = conn.execute(
        f"SELECT {_COLS} FROM downlink_items WHERE device=? ORDER BY created_at DESC, "
        "command_id DESC LIMIT ?", (device, limit)).fetchall()
    return [_item(r) for r in rows]


def pending_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """device -> queued or sent items, for devices that have any."""
    return {r[0]: int(r[1]) for r in conn.execute(
        "SELECT device, count(*) FROM downlink_items WHERE status IN ('queued', 'sent') "
        "GROUP BY device")}


def status_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Items of every device by status (queued, sent, done, failed, expired, cancelled)."""
    return {r[0]: int(r[1]) for r in conn.execute(
        "SELECT status, count(*) FROM downlink_items GROUP BY status")}


def config_state(conn: sqlite3.Connection, device: str) -> list[ConfigState]:
    rows = conn.execute(
        "SELECT key, value, version, set_at, applied, reported_value, reported_at "
        "FROM downlink_config WHERE device=? ORDER BY key", (device,)).fetchall()
    return [ConfigState(proto.ConfigKey(r[0]).name.lower(), r[1], r[2], r[3], bool(r[4]),
                        r[5], r[6]) for r in rows]


def shadow_entries(conn: sqlite3.Connection, device: str) -> tuple[proto.ConfigEntry, ...]:
    """The keys the node has not confirmed, for the SHADOW_DELTA."""
    return tuple(proto.ConfigEntry(proto.ConfigKey(k), v) for k, v in conn.execute(
        "SELECT key, value FROM downlink_config WHERE device=? AND applied=0 ORDER BY key",
        (device,)))


# ---------------------------------------------------------------- delivery side
def expire(conn: sqlite3.Connection, now: float, device: str | None = None) -> int:
    """Mark items past their TTL expired; returns how many."""
    with db.atomic(conn):
        if device is None:
            cur = conn.execute(
                "UPDATE downlink_items SET status=?, retired_at=? WHERE status IN "
                "('queued', 'sent') AND expires_at IS NOT NULL AND expires_at <= ?",
                (EXPIRED, now, now))
        else:
            cur = conn.execute(
                "UPDATE downlink_items SET status=?, retired_at=? WHERE device=? AND status IN "
                "('queued', 'sent') AND expires_at IS NOT NULL AND expires_at <= ?",
                (EXPIRED, now, device, now))
    return cur.rowcount


def mark_sent(conn: sqlite3.Connection, device: str, ids: Sequence[int], now: float) -> None:
    conn.executemany(
        "UPDATE downlink_items SET status=?, attempts=attempts+1, sent_at=?, "
        "delivered_at=coalesce(delivered_at, ?) WHERE device=? AND command_id=?",
        [(SENT, now, now, device, i) for i in ids])


def retire(conn: sqlite3.Connection, device: str, command_id: int, status: str, now: float,
           *, result: str | None = None, code: int | None = None, detail: str | None = None,
           values: Sequence[int] = ()) -> bool:
    """End an active item as done or failed; False when it was not active (a repeat)."""
    if status not in (DONE, FAILED):
        raise QueueError(f"an item retires as {DONE} or {FAILED}, not {status!r}")
    cur = conn.execute(
        "UPDATE downlink_items SET status=?, retired_at=?, result_status=?, result_code=?, "
        "result_detail=?, result_values=? WHERE device=? AND command_id=? AND status IN "
        "('queued', 'sent')",
        (status, now, result, code, detail, ",".join(map(str, values)), device, command_id))
    return cur.rowcount > 0


def record_result(conn: sqlite3.Connection, device: str, res: proto.CommandResult,
                  now: float) -> str:
    """Apply a COMMAND_RESULT: 'retired', 'repeat' (changed nothing), 'late' (the item had
    expired or been cancelled; the result is kept for the record) or 'unknown'."""
    row = conn.execute(
        "SELECT kind, status, result_status FROM downlink_items WHERE device=? AND command_id=?",
        (device, res.command_id)).fetchone()
    if row is None or row[0] != proto.COMMAND:
        return "unknown"
    status = DONE if res.status in _DONE_RESULTS else FAILED
    name = res.status.name.lower()
    if row[1] in ACTIVE:
        retire(conn, device, res.command_id, status, now, result=name, code=res.code,
               detail=res.detail, values=res.values)
        return "retired"
    if row[2] is None and row[1] in (EXPIRED, CANCELLED):
        conn.execute(
            "UPDATE downlink_items SET result_status=?, result_code=?, result_detail=?, "
            "result_values=? WHERE device=? AND command_id=?",
            (name, res.code, res.detail, ",".join(map(str, res.values)), device, res.command_id))
        return "late"
    return "repeat"


def record_report(conn: sqlite3.Connection, device: str, version: int,
                  entries: Sequence[proto.ConfigEntry], now: float) -> int:
    """Apply a SHADOW_REPORT (or a HELLO's config_version when entries is empty): keys set
    at `version` or before are confirmed and the delta items they covered retire. Returns
    how many items retired."""
    conn.execute("UPDATE downlink_config SET applied=1 WHERE device=? AND version<=? AND applied=0",
                 (device, version))
    if entries:
        conn.executemany(
            "UPDATE downlink_config SET reported_value=?, reported_at=? WHERE device=? AND key=?",
            [(e.value, now, device, int(e.key)) for e in entries])
    cur = conn.execute(
        "UPDATE downlink_items SET status=?, retired_at=?, result_status='applied', "
        "result_values=? WHERE device=? AND kind=? AND status IN ('queued', 'sent') AND "
        "config_version<=?",
        (DONE, now, str(version), device, proto.SHADOW_DELTA, version))
    return cur.rowcount


def enqueue_fleet(
    conn: sqlite3.Connection, devices: Sequence[str], op: str | int | proto.CommandOp,
    args: Sequence[int] = (), priority: int = DEFAULT_PRIORITY,
    ttl_s: float | None = DEFAULT_TTL_S, *, now: float | None = None,
) -> int:
    """The same command for many devices in one transaction (a fleet-wide ping, a time
    sync): a handful of statements whatever the count. All or nothing: a full queue or an
    unknown device refuses the whole call. Returns how many items were queued."""
    now = time.time() if now is None else now
    cop = parse_op(op)
    args = check_args(cop, args)
    _check_common(priority, ttl_s)
    devs = list(dict.fromkeys(devices))
    with db.atomic(conn):
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS fleet_batch (device TEXT PRIMARY KEY)")
        conn.execute("DELETE FROM fleet_batch")
        conn.executemany("INSERT INTO fleet_batch VALUES (?)", ((d,) for d in devs))
        rows = conn.execute(
            "SELECT b.device, d.class, d.status, n.next_id, (SELECT count(*) FROM downlink_items i"
            " WHERE i.device=b.device AND i.status IN ('queued', 'sent')) FROM fleet_batch b "
            "LEFT JOIN devices d ON d.id=b.device LEFT JOIN downlink_nodes n ON n.device=b.device"
        ).fetchall()
        conn.execute("DELETE FROM fleet_batch")
        first = max(1, int(now) % U32)
        items = []
        nodes = []
        for device, cls, status, next_id, active in rows:
            if cls is None:
                raise QueueError(f"no device {device!r} in the registry")
            if status in ("revoked", "decommissioned"):
                raise QueueError(f"device {device!r} is {status}: it will not connect again")
            limits = proto.DEVICE_CLASSES[cls]
            if active >= limits.max_downlink:
                raise QueueFull(f"the downlink queue of {device} is full: {active} items, the "
                                f"bound for class {cls} is {limits.max_downlink}")
            cid = int(next_id) if next_id is not None else first
            if next_id is not None and conn.execute(
                    "SELECT 1 FROM downlink_items WHERE device=? AND command_id=?",
                    (device, cid)).fetchone():
                cid = _alloc_id(conn, device, now)
            items.append((device, cid, proto.COMMAND, int(cop), ",".join(map(str, args)), b"",
                          None, priority, now, None if ttl_s is None else now + ttl_s, QUEUED))
            nodes.append((device, cid % (U32 - 1) + 1))
        conn.executemany(
            "INSERT INTO downlink_nodes(device, next_id) VALUES (?, ?) ON CONFLICT(device) "
            "DO UPDATE SET next_id=excluded.next_id", nodes)
        conn.executemany(
            "INSERT INTO downlink_items(device, command_id, kind, op, args, data, config_version,"
            " priority, created_at, expires_at, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            items)
    return len(items)
