"""Device-key rotations: one row per rotation, and the events of each.

A rotation asks a node for a certificate request for a key it makes itself (a `rotate_key`
command through the downlink queue), takes the request it answers with, issues the
certificate, sends it down in `install_cert` pieces, and revokes the old certificate only
once the node has connected with the new one (docs/credentials.md). This module owns the
`rotations` and `rotation_events` tables; nothing else writes them.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.errors import GatewayError
from gateway.store import db
from gateway.store import devices as registry
from gateway.store import downlink_queue as q

STORE = "rotations"

# States. A rotation is "active" until the node has the new certificate confirmed or the
# rotation ends otherwise; old certificates are revoked after CONFIRMED (then DONE).
REQUESTED = "requested"  # rotate_key queued; waiting for the node's CSR_UP
CSR_OK = "csr_ok"  # a valid request is stored; the certificate is to be issued
ISSUED = "issued"  # certificate issued, install_cert pieces queued
CONFIRMED = "confirmed"  # the node connected with the new certificate; old ones to revoke
DONE = "done"  # old certificates revoked
FAILED = "failed"  # the node fell back (refused, no session, mismatch) or gave up
CANCELLED = "cancelled"  # the operator, a revocation or a re-provisioning ended it
ACTIVE = (REQUESTED, CSR_OK, ISSUED)
OPEN = (*ACTIVE, CONFIRMED)
STATES = (REQUESTED, CSR_OK, ISSUED, CONFIRMED, DONE, FAILED, CANCELLED)

ROTATE_PRIORITY = 6  # above commands (queue.DEFAULT_PRIORITY = 4) and OTA
ROTATE_TTL_S = 14 * 86400.0  # a node may sleep long; the lead time is weeks
EVENTS_MAX = 10_000  # rotation_events keeps its newest rows
ROTATION_ID_MAX = 2**31 - 1  # the rotate_key argument's range in the spec

_STEPS = (
    """
    CREATE TABLE rotations (
        id INTEGER PRIMARY KEY,
        device TEXT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT NOT NULL,
        command_id INTEGER,
        csr BLOB,
        csr_sha256 TEXT,
        old_serials TEXT NOT NULL DEFAULT '',
        new_serial TEXT,
        pieces TEXT NOT NULL DEFAULT '',
        revoke TEXT NOT NULL DEFAULT '',
        revoked TEXT NOT NULL DEFAULT '',
        outcome TEXT NOT NULL DEFAULT '',
        detail TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        issued_at REAL,
        confirmed_at REAL,
        finished_at REAL
    );
    CREATE INDEX rotations_device ON rotations(device, state);
    CREATE INDEX rotations_revoke ON rotations(revoke) WHERE revoke != '';
    CREATE TABLE rotation_events (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        device TEXT NOT NULL,
        rotation INTEGER NOT NULL,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX rotation_events_device ON rotation_events(device, id);
    """,
)


class RotationError(GatewayError):
    """A rotation was refused; the message says why."""


# The ops only a rotation sends: queued by hand, a node would make a key for a rotation the
# gateway never asked for and send its request every wake, refused each time.
OWN_OPS = frozenset({"rotate_key", "install_cert"})


def refuse_own_op(op: object) -> None:
    """RotationError when `op` (a name or a CommandOp) is one only a rotation sends."""
    name = op.lower() if isinstance(op, str) else getattr(op, "name", str(op)).lower()
    if name in OWN_OPS:
        raise RotationError(f"{name} is sent by a key rotation only: use `torpor device "
                            "rotate <id>`")
    if name == "set_keys":  # pieces of a firmware key list the gateway checked first
        raise RotationError("set_keys is sent by a firmware key list only: use `torpor fw "
                            "keys add|retire` or `torpor ota keys push`")


def migrate(conn: sqlite3.Connection) -> None:
    db.apply(conn, STORE, _STEPS)


@dataclass(frozen=True, slots=True)
class Rotation:
    id: int
    device: str
    state: str
    reason: str
    command_id: int | None
    csr: bytes | None
    csr_sha256: str | None
    old_serials: tuple[str, ...]
    new_serial: str | None
    pieces: tuple[int, ...]
    revoke: tuple[str, ...]
    revoked: tuple[str, ...]
    outcome: str
    detail: str
    created_at: float
    updated_at: float
    issued_at: float | None
    confirmed_at: float | None
    finished_at: float | None

    def as_dict(self) -> dict[str, Any]:
        d = {n: getattr(self, n) for n in self.__slots__}
        d["csr"] = None if self.csr is None else self.csr.hex()
        return d


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    at: float
    device: str
    rotation: int
    kind: str
    detail: str


_COLS = ("id, device, state, reason, command_id, csr, csr_sha256, old_serials, new_serial, "
         "pieces, revoke, revoked, outcome, detail, created_at, updated_at, issued_at, "
         "confirmed_at, finished_at")


def _split(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split(",") if x)


def _row(r: Sequence[Any]) -> Rotation:
    return Rotation(
        int(r[0]), r[1], r[2], r[3], r[4], None if r[5] is None else bytes(r[5]), r[6],
        _split(r[7]), r[8], tuple(int(x) for x in _split(r[9])), _split(r[10]), _split(r[11]),
        r[12], r[13], r[14], r[15], r[16], r[17], r[18])


def get(conn: sqlite3.Connection, rotation: int) -> Rotation | None:
    row = conn.execute(f"SELECT {_COLS} FROM rotations WHERE id=?", (rotation,)).fetchone()
    return _row(row) if row else None


def of_device(conn: sqlite3.Connection, device: str, limit: int = 20) -> list[Rotation]:
    """The device's rotations, newest first."""
    return [_row(r) for r in conn.execute(
        f"SELECT {_COLS} FROM rotations WHERE device=? ORDER BY created_at DESC, id DESC LIMIT ?",
        (device, limit))]


def open_of(conn: sqlite3.Connection, device: str) -> Rotation | None:
    """The device's rotation in progress (requested .. confirmed), if any."""
    row = conn.execute(
        f"SELECT {_COLS} FROM rotations WHERE device=? AND state IN "
        f"({','.join('?' * len(OPEN))}) ORDER BY created_at DESC LIMIT 1",
        (device, *OPEN)).fetchone()
    return _row(row) if row else None


def in_state(conn: sqlite3.Connection, state: str) -> list[Rotation]:
    return [_row(r) for r in conn.execute(
        f"SELECT {_COLS} FROM rotations WHERE state=? ORDER BY updated_at", (state,))]


def with_revocations(conn: sqlite3.Connection) -> list[Rotation]:
    """Rotations with certificates waiting to be revoked."""
    return [_row(r) for r in conn.execute(
        f"SELECT {_COLS} FROM rotations WHERE revoke != '' ORDER BY updated_at")]


def last_ended(conn: sqlite3.Connection) -> dict[str, float]:
    """device -> when its latest rotation ended (done, failed or cancelled)."""
    return {r[0]: float(r[1]) for r in conn.execute(
        "SELECT device, max(finished_at) FROM rotations WHERE state IN (?, ?, ?) AND "
        "finished_at IS NOT NULL GROUP BY device", (DONE, FAILED, CANCELLED))}


def open_devices(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute(
        f"SELECT DISTINCT device FROM rotations WHERE state IN ({','.join('?' * len(OPEN))})",
        OPEN)}


def request(conn: sqlite3.Connection, device: str, reason: str, old_serials: Iterable[str] = (),
            *, now: float | None = None) -> Rotation:
    """Start a rotation of `device`: a rotation row and its rotate_key command, in one
    transaction. Refused for a device that is not served (revoked, quarantined,
    decommissioned: a rotation never re-admits one) or has one in progress."""
    now = time.time() if now is None else now
    with db.atomic(conn):
        dev = registry.get(conn, device)
        if dev.status not in registry.SERVED:
            raise RotationError(f"device {device!r} is {dev.status}: its key is not rotated")
        cur = open_of(conn, device)
        if cur is not None:
            raise RotationError(f"device {device!r} has rotation {cur.id} in progress "
                                f"({cur.state})")
        rid = secrets.randbelow(ROTATION_ID_MAX) + 1
        while get(conn, rid) is not None:
            rid = secrets.randbelow(ROTATION_ID_MAX) + 1
        cid = q.enqueue_command(conn, device, "rotate_key", [rid], priority=ROTATE_PRIORITY,
                                ttl_s=ROTATE_TTL_S, now=now)
        conn.execute(
            "INSERT INTO rotations(id, device, state, reason, command_id, old_serials, "
            "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (rid, device, REQUESTED, reason, cid, ",".join(old_serials), now, now))
        event(conn, device, rid, "requested", reason, now)
    found = get(conn, rid)
    assert found is not None
    return found


def store_csr(conn: sqlite3.Connection, rotation: int, csr: bytes, digest: str,
              now: float) -> None:
    conn.execute("UPDATE rotations SET state=?, csr=?, csr_sha256=?, updated_at=? WHERE id=?",
                 (CSR_OK, csr, digest, now, rotation))


def issued(conn: sqlite3.Connection, rotation: int, serial: str, pieces: Sequence[int],
           now: float) -> None:
    conn.execute("UPDATE rotations SET state=?, new_serial=?, pieces=?, issued_at=?, "
                 "updated_at=? WHERE id=?",
                 (ISSUED, serial, ",".join(map(str, pieces)), now, now, rotation))


def set_pieces(conn: sqlite3.Connection, rotation: int, pieces: Sequence[int],
               now: float) -> None:
    conn.execute("UPDATE rotations SET pieces=?, updated_at=? WHERE id=?",
                 (",".join(map(str, pieces)), now, rotation))


def set_command(conn: sqlite3.Connection, rotation: int, command_id: int, now: float) -> None:
    """The rotate_key COMMAND that now carries the rotation (queued again after expiring)."""
    conn.execute("UPDATE rotations SET command_id=?, updated_at=? WHERE id=?",
                 (command_id, now, rotation))


def confirmed(conn: sqlite3.Connection, rotation: int, revoke: Iterable[str], outcome: str,
              now: float) -> None:
    serials = ",".join(revoke)
    # Nothing left to revoke (the old certificate is revoked already): done at once.
    conn.execute("UPDATE rotations SET state=?, revoke=?, outcome=?, confirmed_at=?, "
                 "updated_at=?, finished_at=? WHERE id=?",
                 (CONFIRMED if serials else DONE, serials, outcome, now, now,
                  None if serials else now, rotation))


def end(conn: sqlite3.Connection, rotation: int, state: str, outcome: str, detail: str,
        revoke: Iterable[str], now: float) -> None:
    """End a rotation as failed or cancelled; `revoke`: certificates to revoke after it
    (a new certificate the node no longer holds a key for)."""
    if state not in (FAILED, CANCELLED):
        raise RotationError(f"a rotation ends as {FAILED} or {CANCELLED}, not {state!r}")
    conn.execute("UPDATE rotations SET state=?, outcome=?, detail=?, revoke=?, finished_at=?, "
                 "updated_at=? WHERE id=?",
                 (state, outcome, detail[:500], ",".join(revoke), now, now, rotation))


def cancel_open(conn: sqlite3.Connection, device: str, why: str, now: float) -> list[int]:
    """End the device's rotation in progress (the device is revoked or decommissioned);
    its certificates are revoked by whoever revokes the device. Returns the ids ended."""
    ids = [r[0] for r in conn.execute(
        f"SELECT id FROM rotations WHERE device=? AND state IN ({','.join('?' * len(OPEN))})",
        (device, *OPEN))]
    for rid in ids:
        conn.execute("UPDATE rotations SET state=?, detail=?, revoke='', finished_at=?, "
                     "updated_at=? WHERE id=?", (CANCELLED, why[:500], now, now, rid))
        event(conn, device, rid, CANCELLED, why, now)
    return ids


def revocations_done(conn: sqlite3.Connection, rotation: int, serials: Iterable[str],
                     now: float) -> None:
    """The certificates waiting for revocation are revoked: a confirmed rotation is done."""
    row = conn.execute("SELECT state, revoked FROM rotations WHERE id=?", (rotation,)).fetchone()
    if row is None:
        return
    done = ",".join(x for x in (*_split(row[1]), *serials) if x)
    state = DONE if row[0] == CONFIRMED else row[0]
    conn.execute("UPDATE rotations SET revoke='', revoked=?, state=?, updated_at=?, "
                 "finished_at=coalesce(finished_at, ?) WHERE id=?",
                 (done, state, now, now, rotation))


def event(conn: sqlite3.Connection, device: str, rotation: int, kind: str, detail: str,
          now: float) -> None:
    cur = conn.execute(
        "INSERT INTO rotation_events(at, device, rotation, kind, detail) VALUES (?, ?, ?, ?, ?)",
        (now, device, rotation, kind, detail[:500]))
    if (cur.lastrowid or 0) % 1000 == 0:
        conn.execute("DELETE FROM rotation_events WHERE id <= ?",
                     ((cur.lastrowid or 0) - EVENTS_MAX,))


def events(conn: sqlite3.Connection, device: str | None = None, limit: int = 50) -> list[Event]:
    """Newest first."""
    if device is None:
        rows = conn.execute("SELECT id, at, device, rotation, kind, detail FROM rotation_events "
                            "ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
    else:
        rows = conn.execute("SELECT id, at, device, rotation, kind, detail FROM rotation_events "
                            "WHERE device=? ORDER BY id DESC LIMIT ?", (device, limit)).fetchall()
    return [Event(*r) for r in rows]
