"""Owns the `fw_key*` tables: the signed firmware key lists the gateway has sent, and per
device the list its HELLO says it holds and the lists pushed to it.

The lists are signed on the build machine (`torpor fw keys add|retire`); the gateway keeps
them (public data: JSON and signature) so that a node that missed some gets the whole chain
in order, and so that operators see which keys each node trusts. docs/ota.md, "Firmware
signing keys", tells the whole story.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.store import db

STORE = "fw_keys"

_STEPS = (
    """
    CREATE TABLE fw_keylists (
        seq INTEGER PRIMARY KEY,
        signer TEXT NOT NULL,
        keys TEXT NOT NULL,
        data BLOB NOT NULL,
        signature BLOB NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE fw_key_nodes (
        device TEXT PRIMARY KEY,
        held INTEGER NOT NULL DEFAULT 0,
        reported_at REAL,
        pushed INTEGER NOT NULL DEFAULT 0,
        pushed_at REAL,
        items TEXT NOT NULL DEFAULT ''
    ) WITHOUT ROWID;
    """,
)


def migrate(conn: sqlite3.Connection) -> None:
    db.apply(conn, STORE, _STEPS)


@dataclass(frozen=True, slots=True)
class StoredList:
    """A key list as stored; seq 0 is the set baked in at provisioning (no signature)."""

    seq: int
    signer: str
    keys: dict[str, bytes]
    data: bytes
    signature: bytes
    created_at: float

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self.keys))

    @property
    def blob(self) -> bytes:
        return self.data + self.signature


@dataclass(frozen=True, slots=True)
class NodeKeys:
    """One device's key lists: `held` from its HELLO, `pushed` the newest sent to it, and
    the set_keys items of that push as (seq, command id)."""

    device: str
    held: int
    reported_at: float | None
    pushed: int
    pushed_at: float | None
    items: tuple[tuple[int, int], ...]


def _stored(row: Sequence[Any]) -> StoredList:
    keys = {k: bytes.fromhex(v) for k, v in json.loads(row[2]).items()}
    return StoredList(int(row[0]), str(row[1]), keys, bytes(row[3]), bytes(row[4]), float(row[5]))


_LIST_COLS = "seq, signer, keys, data, signature, created_at"


def add_list(conn: sqlite3.Connection, seq: int, signer: str, keys: dict[str, bytes],
             data: bytes, signature: bytes, now: float) -> None:
    """Record a list (the same seq again with the same bytes is a no-op)."""
    conn.execute(
        f"INSERT INTO fw_keylists({_LIST_COLS}) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(seq) DO NOTHING",
        (seq, signer, json.dumps({k: v.hex() for k, v in sorted(keys.items())}), data,
         signature, now))


def get_list(conn: sqlite3.Connection, seq: int) -> StoredList | None:
    row = conn.execute(f"SELECT {_LIST_COLS} FROM fw_keylists WHERE seq=?", (seq,)).fetchone()
    return None if row is None else _stored(row)


def latest(conn: sqlite3.Connection) -> StoredList | None:
    row = conn.execute(f"SELECT {_LIST_COLS} FROM fw_keylists ORDER BY seq DESC LIMIT 1").fetchone()
    return None if row is None else _stored(row)


def lists(conn: sqlite3.Connection) -> list[StoredList]:
    return [_stored(r) for r in conn.execute(f"SELECT {_LIST_COLS} FROM fw_keylists ORDER BY seq")]


def note_held(conn: sqlite3.Connection, rows: Sequence[tuple[str, int]], now: float) -> None:
    """HELLOs' keys_seq: written only when it changed (a HELLO of a node that never held a
    list writes nothing)."""
    conn.executemany(
        "INSERT INTO fw_key_nodes(device, held, reported_at) SELECT ?1, ?2, ?3 "
        "WHERE ?2 != 0 OR EXISTS (SELECT 1 FROM fw_key_nodes WHERE device=?1) "
        "ON CONFLICT(device) DO UPDATE SET held=excluded.held, reported_at=excluded.reported_at "
        "WHERE held != excluded.held",
        [(device, seq, now) for device, seq in rows])


def pushed(conn: sqlite3.Connection, device: str, seq: int,
           items: Sequence[tuple[int, int]], now: float) -> None:
    text = ",".join(f"{s}:{c}" for s, c in items)
    conn.execute(
        "INSERT INTO fw_key_nodes(device, pushed, pushed_at, items) VALUES (?, ?, ?, ?) "
        "ON CONFLICT(device) DO UPDATE SET pushed=excluded.pushed, pushed_at=excluded.pushed_at, "
        "items=excluded.items", (device, seq, now, text))


def _node(row: Sequence[Any]) -> NodeKeys:
    items = tuple((int(s), int(c)) for s, _, c in
                  (p.partition(":") for p in str(row[5]).split(",") if p))
    return NodeKeys(str(row[0]), int(row[1]), row[2], int(row[3]), row[4], items)


_NODE_COLS = "device, held, reported_at, pushed, pushed_at, items"


def node(conn: sqlite3.Connection, device: str) -> NodeKeys:
    row = conn.execute(f"SELECT {_NODE_COLS} FROM fw_key_nodes WHERE device=?", (device,)).fetchone()
    return NodeKeys(device, 0, None, 0, None, ()) if row is None else _node(row)


def nodes(conn: sqlite3.Connection) -> dict[str, NodeKeys]:
    """Every device with a row (devices without one hold the baked set, nothing pushed)."""
    return {r[0]: _node(r) for r in conn.execute(f"SELECT {_NODE_COLS} FROM fw_key_nodes")}
