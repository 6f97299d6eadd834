"""Owns the `wake_log` table: each node's recent wakes, one row per HELLO, with what the
HELLO reported (cause, battery, RSSI, OTA and key-rotation state, the previous wake's
awake and radio-on times) and what the gateway saw of the wake after it (readings stored,
when its last frame came). From the energy facts and a board's model it estimates each
wake's charge and the battery's days left (`ledger_forecast`).

The log is bounded per device: the newest KEEP_WAKES wakes, none older than KEEP_DAYS.
Rows are written by `record()`, inside the transaction that commits the wake's frames,
on whatever connection (thread or process) commits them.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway import proto
from gateway.config import EnergyModel
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
    # Protocol 1.5: the previous wake's energy facts (NULL: not reported), and the wakes
    # that did not send since the last delivered burst (the ledger counts them).
    """
    ALTER TABLE wake_log ADD COLUMN prev_awake_ms INTEGER;
    ALTER TABLE wake_log ADD COLUMN prev_radio_ms INTEGER;
    ALTER TABLE wake_log ADD COLUMN prev_sent INTEGER;
    ALTER TABLE wake_log ADD COLUMN boots_without_send INTEGER;
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
    # What the HELLO said of the node's previous wake (protocol 1.5; None: not reported):
    # its awake and radio-on times by the node's own ticks, and whether it sent.
    prev_awake_ms: int | None = None
    prev_radio_ms: int | None = None
    prev_sent: int | None = None
    boots_without_send: int | None = None

    def energy_uah(self, model: EnergyModel | None) -> float | None:
        """The previous wake's charge by the board's model (None: no facts or no model)."""
        if model is None or self.prev_awake_ms is None:
            return None
        return model.wake_uah(self.prev_awake_ms, self.prev_radio_ms or 0)

    @property
    def seen_s(self) -> float | None:
        return None if self.last_frame_at is None else max(0.0, self.last_frame_at - self.at)

    def as_dict(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in self.__slots__}
        d["seen_s"] = self.seen_s
        return d


_COLS = ("device, seq, at, node_time, boot_cause, battery_mv, rssi, queue_depth, readings, "
         "last_frame_at, fw_version, config_version, ota_state, ota_reason, cred_rotation, "
         "cred_outcome, safe_mode, awake_window_ms, next_wake_s, prev_awake_ms, prev_radio_ms, "
         "prev_sent, boots_without_send")


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
            "?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (device, seq, now, h.time, h.boot_cause.name.lower(), h.battery_mv, h.rssi,
             h.queue_depth, now, h.fw_version, h.config_version, h.ota_state.name.lower(),
             h.ota_reason.name.lower(), h.cred_rotation or None,
             h.cred_outcome.name.lower() if h.cred_outcome else None, int(h.safe_mode),
             h.awake_window_ms, h.next_wake_s,
             # 0 ms awake: the node does not know (a power-on) or predates protocol 1.5.
             h.prev_awake_ms or None, h.prev_radio_ms if h.prev_awake_ms else None,
             int(h.prev_sent) if h.prev_awake_ms else None, h.boots_without_send))
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


# ------------------------------------------------------------------ the energy ledger
# Remaining charge of a 2×AA alkaline pack by its voltage at a light load, (pack mV,
# share left): an estimate shaped after the low-drain constant-current curves of alkaline
# AA datasheets (docs/web.md, "Battery forecast from the energy ledger"). Not a
# measurement; the HELLO's battery is read at a wake's light load.
AA2_CURVE: tuple[tuple[float, float], ...] = (
    (2000.0, 0.0), (2200.0, 0.12), (2400.0, 0.30), (2600.0, 0.55), (2800.0, 0.75),
    (3000.0, 0.90), (3200.0, 1.0),
)
LEDGER_WINDOW_DAYS = 7.0  # the wakes the average drain is taken over
LEDGER_MIN_WAKES = 6  # HELLOs with energy facts needed for a forecast


def charge_left(mv: float, curve: Sequence[tuple[float, float]] = AA2_CURVE) -> float:
    """Share of the pack's capacity left at `mv` (0..1), linear between the curve's points."""
    if mv <= curve[0][0]:
        return curve[0][1]
    for (v0, f0), (v1, f1) in zip(curve, curve[1:], strict=False):
        if mv <= v1:
            return f0 + (f1 - f0) * (mv - v0) / (v1 - v0)
    return curve[-1][1]


@dataclass(frozen=True, slots=True)
class LedgerForecast:
    """Days left by the energy ledger: the charge left (by the voltage, `charge_left`)
    over the average drain of the device's wakes and sleep between them."""

    days: float
    drain_ua: float  # average current: wakes and the sleep between them
    left_mah: float  # charge left above the empty level
    battery_mv: int
    wakes: int  # wakes counted in the window (those reported and those inferred)
    span_s: float  # the window the drain was averaged over
    sending_uah: float  # mean charge of a sending wake
    sampling_uah: float | None  # mean charge of a wake that only sampled (None: none seen)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def ledger_forecast(conn: sqlite3.Connection, device: str, model: EnergyModel, until: float,
                    *, window_days: float = LEDGER_WINDOW_DAYS,
                    empty_mv: float | None = None,
                    min_wakes: int = LEDGER_MIN_WAKES) -> LedgerForecast | None:
    """Days from the device's last HELLO up to `until` until its battery reaches
    `empty_mv` (default: the model's), by the energy ledger of its wakes in the
    `window_days` before; None with fewer than `min_wakes` HELLOs reporting energy facts or
    no battery reading.

    Each HELLO's row is a sending wake; its `boots_without_send` counts the wakes that only
    sampled since the last delivered burst. The HELLO reports the wake before it: a
    sampling wake's, or the previous sending wake's when none sampled between. The drain
    is (sending wakes × their mean charge + sampling wakes × theirs + deep sleep for the
    rest of the span) over the span from the window's first HELLO to its last."""
    rows = sorted((w for w in of_device(conn, device, until - window_days * 86400.0)
                   if w.at <= until), key=lambda w: (w.at, w.seq))
    facts = [w for w in rows if w.prev_awake_ms is not None]
    last = rows[-1] if rows else None
    if len(facts) < max(1, min_wakes) or last is None or not last.battery_mv:
        return None
    span = last.at - rows[0].at
    if span <= 0:
        return None
    send = [model.wake_uah(w.prev_awake_ms or 0, w.prev_radio_ms or 0) for w in facts
            if w.prev_sent]
    sample = [model.wake_uah(w.prev_awake_ms or 0, w.prev_radio_ms or 0) for w in facts
              if not w.prev_sent]
    awake_send = [w.prev_awake_ms or 0 for w in facts if w.prev_sent]
    awake_sample = [w.prev_awake_ms or 0 for w in facts if not w.prev_sent]
    # A class never reported takes the other's figures (a sending wake's: the larger).
    e_send = sum(send) / len(send) if send else sum(sample) / len(sample)
    e_sample = sum(sample) / len(sample) if sample else None
    ms_send = (sum(awake_send) / len(awake_send) if awake_send
               else sum(awake_sample) / len(awake_sample))
    ms_sample = sum(awake_sample) / len(awake_sample) if awake_sample else ms_send
    n_send = len(rows) - 1  # the sending wakes from the first HELLO up to the last
    n_sample = sum(w.boots_without_send or 0 for w in rows[1:])
    awake_s = (n_send * (ms_send + model.boot_ms) + n_sample * (ms_sample + model.boot_ms)) / 1000
    sleep_uah = model.deep_sleep_ua * max(0.0, span - awake_s) / 3600.0
    used = n_send * e_send + n_sample * (e_sample if e_sample is not None else e_send) + sleep_uah
    drain_ua = used / (span / 3600.0)
    empty = model.empty_mv if empty_mv is None else empty_mv
    left_mah = max(0.0, charge_left(last.battery_mv) - charge_left(empty)) * model.capacity_mah
    days = math.inf if drain_ua <= 0 else left_mah * 1000.0 / drain_ua / 24.0
    return LedgerForecast(days=days, drain_ua=drain_ua, left_mah=left_mah,
                          battery_mv=last.battery_mv, wakes=n_send + n_sample, span_s=span,
                          sending_uah=e_send, sampling_uah=e_sample)
