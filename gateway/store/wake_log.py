"""Owns the `wake_log` table: each node's recent wakes, one row per HELLO, with what the
HELLO reported (cause, battery, RSSI, OTA and key-rotation state) and what the gateway saw
of the wake after it (readings stored, when its last frame came).

The log is bounded per device: the newest KEEP_WAKES wakes, none older than KEEP_DAYS.
Rows are written by `record()`, inside the transaction that commits the wake's frames,
on whatever connection (thread or process) commits them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway import proto
from gateway.store import db, readings

STORE = "wake_log"
KEEP_WAKES = 1000  # per device: three and a half days at one wake in five minutes
KEEP_DAYS = 31.0  # and never older than this (the device page's longest range is 30 days)
# Frames of a device up to this long after its HELLO belong to that wake (the awake window
# of any real node is far shorter); later ones without a HELLO are not attributed.
WAKE_SPAN_S = 600.0

_STEPS = (
    """
    CREATE TABLE wake_log (
        device TEXT NOT NULL,
        seq INTEGER NOT NULL,
        at REAL NOT NULL,
        node_time INTEGER,
        boot_cause TEXT NOT NULL,
        battery_mv INTEGER,
        rssi INTEGER,
        queue_depth INTEGER,
        readings INTEGER NOT NULL DEFAULT 0,
        last_frame_at REAL,
        fw_version INTEGER,
        config_version INTEGER,
        ota_state TEXT,
        ota_reason TEXT,
        cred_rotation INTEGER,
        cred_outcome TEXT,
        safe_mode INTEGER NOT NULL DEFAULT 0,
        awake_window_ms INTEGER,
        next_wake_s INTEGER,
        PRIMARY KEY (device, seq)
    ) WITHOUT ROWID;
    """,
)


def migrate(conn: sqlite3.Connection) -> None:
    db.apply(conn, STORE, _STEPS)


@dataclass(frozen=True, slots=True)
class Wake:
    """One wake as the gateway saw it. `readings` counts the readings it stored from the
    wake's bursts (duplicates of earlier sends are not counted); `last_frame_at` is when
    the wake's last frame arrived, so `seen_s` is how long the gateway saw the node awake
    (from its HELLO to its last frame: a lower bound of its awake time)."""

    device: str
    seq: int
    at: float
    node_time: int | None
    boot_cause: str
    battery_mv: int | None
    rssi: int | None
    queue_depth: int | None
    readings: int
    last_frame_at: float | None
    fw_version: int | None
    config_version: int | None
    ota_state: str | None
    ota_reason: str | None
    cred_rotation: int | None
    cred_outcome: str | None
    safe_mode: int
    awake_window_ms: int | None
    next_wake_s: int | None

    @property
    def seen_s(self) -> float | None:
        return None if self.last_frame_at is None else max(0.0, self.last_frame_at - self.at)

    def as_dict(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in self.__slots__}
        d["seen_s"] = self.seen_s
        return d


_COLS = ("device, seq, at, node_time, boot_cause, battery_mv, rssi, queue_depth, readings, "
         "last_frame_at, fw_version, config_version, ota_state, ota_reason, cred_rotation, "
         "cred_outcome, safe_mode, awake_window_ms, next_wake_s")


def record(conn: sqlite3.Connection, hellos: Sequence[tuple[str, proto.Hello]],
           devices: Iterable[str], committed: Iterable[readings.Committed],
           now: float) -> None:
    """One committed batch: a new wake per HELLO; then, for every device that sent frames
    in it (`devices`), the readings of `committed` (those stored now) are added to its
    latest wake when that began at most WAKE_SPAN_S ago, and the wake's last frame is now.
    Older wakes of the devices that woke are pruned (KEEP_WAKES, KEEP_DAYS)."""
    stored = dict.fromkeys(devices, 0)
    for c in committed:
        stored[c.device] = stored.get(c.device, 0) + len(c.series)
    for device, h in hellos:
        row = conn.execute("SELECT max(seq) FROM wake_log WHERE device=?", (device,)).fetchone()
        seq = (row[0] or 0) + 1
        conn.execute(
            f"INSERT INTO wake_log({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, "
            "?, ?, ?, ?, ?)",
            (device, seq, now, h.time, h.boot_cause.name.lower(), h.battery_mv, h.rssi,
             h.queue_depth, now, h.fw_version, h.config_version, h.ota_state.name.lower(),
             h.ota_reason.name.lower(), h.cred_rotation or None,
             h.cred_outcome.name.lower() if h.cred_outcome else None, int(h.safe_mode),
             h.awake_window_ms, h.next_wake_s))
        conn.execute("DELETE FROM wake_log WHERE device=? AND (seq <= ? OR at < ?)",
                     (device, seq - KEEP_WAKES, now - KEEP_DAYS * 86400.0))
    conn.executemany(
        "UPDATE wake_log SET readings=readings+?, last_frame_at=? WHERE device=? AND seq="
        "(SELECT max(seq) FROM wake_log WHERE device=?) AND at >= ?",
        [(n, now, d, d, now - WAKE_SPAN_S) for d, n in stored.items()])


def of_device(conn: sqlite3.Connection, device: str, since: float | None = None,
              limit: int = KEEP_WAKES) -> list[Wake]:
    """The device's wakes, newest first (only those at or after `since` when given)."""
    rows = conn.execute(
        f"SELECT {_COLS} FROM wake_log WHERE device=? AND at >= ? ORDER BY seq DESC LIMIT ?",
        (device, -1.0 if since is None else since, limit)).fetchall()
    return [Wake(*r) for r in rows]


def count(conn: sqlite3.Connection, device: str | None = None) -> int:
    if device is None:
        return int(conn.execute("SELECT count(*) FROM wake_log").fetchone()[0])
    return int(conn.execute("SELECT count(*) FROM wake_log WHERE device=?",
                            (device,)).fetchone()[0])
