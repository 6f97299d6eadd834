"""The fleet page's rows in one query (two when some devices send short bursts), however
many rows the page holds.

A row needs the device's registry row, its wake statistics, its queued items, its open
alerts, its group and its newest readings (the battery sparkline). Read a table and a
device at a time, that was some two hundred statements for a page of fifty, each paying
the sqlite3 module's per-call work in Python; and the web's database thread shares the
interpreter with ingest, so every millisecond of Python it runs costs more than one while
ingest is busy. Here one statement joins the page's devices to the other tables and brings
each device's newest run whole; only devices whose newest run holds fewer readings than
the sparkline needs cost a second one, for all of them at once.

This module writes nothing: each table it reads has its owner (devices, downlink_wakes,
downlink_items, alerts, device_groups, dedup and reading_runs), whose indexes serve these
reads as they serve the owners' own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.store import devices as registry
from gateway.store import readings
from gateway.store import wakes as wake_store

_DEVICE_COLUMNS = len(registry.Device.__slots__)
_WAKE_COLUMNS = ("device", "wakes", "missed_wakes", "last_hello_at", "expected_at",
                 "interval_s", "window_ms", "delivered_total", "last_delivered",
                 "max_delivered", "last_left", "last_bytes", "awake_until")
# One row per device of the page: the registry's columns, downlink_wakes' (NULL before the
# first wake), queued items, open alerts, group, readings stored, then the newest run (by
# reading id) whole: for most devices it holds the sparkline's readings by itself.
_ROWS = (
    "SELECT d.*, " + ", ".join(f"w.{c}" for c in _WAKE_COLUMNS) + ", "
    "(SELECT count(*) FROM downlink_items i WHERE i.device = d.id "
    "AND i.status IN ('queued', 'sent')), "
    "(SELECT count(*) FROM alerts a WHERE a.device = d.id AND a.cleared_at IS NULL), "
    "(SELECT name FROM device_groups g WHERE g.device = d.id), "
    "coalesce(s.total, 0), r.rowid, r.msg_id, r.count, r.schema, r.layout, r.data "
    "FROM ({page}) d LEFT JOIN downlink_wakes w ON w.device = d.id "
    "LEFT JOIN dedup s ON s.device = d.id "
    "LEFT JOIN reading_runs r ON r.rowid = (SELECT rowid FROM reading_runs n "
    "WHERE n.device = d.id ORDER BY n.msg_id DESC LIMIT 1)"
)
# The runs that hold a device's `n` newest readings: its newest runs (at most n of them,
# each holds one reading at least) down to the first whose newer runs hold fewer than n
# readings; found through reading_runs(device, msg_id), newest first, so a device's history
# before them is never read.
_NEWEST = (
    "SELECT r.device, r.msg_id, r.count, r.schema, r.layout, r.data "
    "FROM reading_runs r WHERE r.device = ? AND r.msg_id >= ("
    "SELECT coalesce(min(msg_id), 0) FROM ("
    "SELECT msg_id, sum(count) OVER (ORDER BY msg_id DESC ROWS UNBOUNDED PRECEDING) - count "
    "AS newer FROM (SELECT msg_id, count FROM reading_runs WHERE device = ? "
    "ORDER BY msg_id DESC LIMIT ?)) WHERE newer < ?)"
)
# Devices per statement of newest runs (a compound SELECT has at most 500 parts).
CHUNK = 100

Reading = tuple[int, ...]  # (msg_id, ts, schema, v0, ...), as readings.fetch returns them
Key = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Row:
    """What the fleet page shows of one device, as stored."""

    device: registry.Device
    wakes: wake_store.WakeStats | None
    queued: int  # downlink items queued or sent
    alerts: int  # open alerts
    group: str | None
    # (readings stored, rowid of the newest run): moves whenever the device's newest
    # readings may have changed (a reading stored, even one with an older id).
    readings_key: Key
    # The newest readings, newest first; None when the caller kept them under this key.
    newest: tuple[Reading, ...] | None


def page(conn: sqlite3.Connection, *, status: str | None = None, text: str = "",
         offset: int = 0, limit: int = 50, newest: int = 24,
         kept: Mapping[str, Key] | None = None) -> tuple[list[Row], int | None]:
    """One page of the fleet by id, filtered as registry.page filters it, with each device's
    `newest` newest readings (not read for a device whose readings_key is `kept`'s); and
    how many devices match in all, or None when no text filter is given (registry.counts
    says it then)."""
    sql, count_sql, params = registry.page_query(status, text)
    total = int(conn.execute(count_sql, params).fetchone()[0]) if text else None
    rows = conn.execute(_ROWS.format(page=sql), (*params, limit, offset)).fetchall()
    rows.sort(key=lambda r: str(r[0]))  # by id, as the page was cut (sorted here, not in SQL,
    # where it would copy every row's newest run into a sorter)
    kept = kept or {}
    n = _DEVICE_COLUMNS
    w = n + len(_WAKE_COLUMNS)
    latest: dict[str, tuple[Reading, ...]] = {}
    more: list[str] = []
    for r in rows:
        device = str(r[0])
        key = (int(r[w + 3]), int(r[w + 4] or 0))
        if kept.get(device) == key or r[w + 4] is None:
            continue
        first, count, schema, codes, data = r[w + 5:w + 10]
        if count < newest:  # older runs may hold some of them
            more.append(device)
        else:
            latest[device] = _newest_first([(first, count, schema, codes, data)], newest)
    if more:
        latest.update(newest_readings(conn, more, newest))
    out = []
    for r in rows:
        device = str(r[0])
        key = (int(r[w + 3]), int(r[w + 4] or 0))
        wake = r[n:w]
        out.append(Row(
            device=registry.Device(*r[:n]),
            wakes=wake_store.WakeStats(*wake) if wake[0] is not None else None,
            queued=int(r[w]), alerts=int(r[w + 1]),
            group=None if r[w + 2] is None else str(r[w + 2]),
            readings_key=key,
            newest=None if kept.get(device) == key else latest.get(device, ())))
    return out, total


def _newest_first(runs: list[tuple[int, int, int, str, bytes]], n: int) -> tuple[Reading, ...]:
    """The `n` newest readings of a device's runs (given newest first), newest first."""
    got: list[Reading] = []
    for first, count, schema, codes, data in runs:
        columns = readings.unpack(codes, count, data)
        for k in range(count - 1, max(-1, count - 1 - (n - len(got))), -1):
            got.append((first + k, columns[0][k], schema, *(c[k] for c in columns[1:])))
        if len(got) >= n:
            break
    return tuple(got)


def newest_readings(conn: sqlite3.Connection, devices: Sequence[str],
                    n: int) -> dict[str, tuple[Reading, ...]]:
    """device -> its `n` newest readings, newest first: (msg_id, ts, schema, v0, ...), as
    readings.fetch(conn, device, n) returns them; devices with none are left out."""
    runs: dict[str, list[tuple[int, int, int, str, bytes]]] = {}
    for i in range(0, len(devices), CHUNK):
        part = devices[i:i + CHUNK]
        sql = " UNION ALL ".join(f"SELECT * FROM ({_NEWEST})" for _ in part)
        args: list[object] = []
        for d in part:
            args += [d, d, n, n]
        for device, first, count, schema, codes, data in conn.execute(sql, args):
            runs.setdefault(device, []).append((int(first), int(count), int(schema), codes,
                                                data))
    out: dict[str, tuple[Reading, ...]] = {}
    for device, found in runs.items():
        found.sort(reverse=True)
        out[device] = _newest_first(found, n)
    return out
