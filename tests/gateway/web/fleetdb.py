"""A gateway database with a fleet in it, filled through the gateway's own modules (the
registry, HELLO recording, downlink planning, burst commits, dead letters, the queue)."""

from __future__ import annotations

import time
from pathlib import Path

from gateway import proto
from gateway.pipeline import downlink
from gateway.store import db, deadletter, readings, wake_log
from gateway.store import devices as registry
from gateway.store import downlink_queue as q

INTERVAL_S = 300


def hello(now: float, battery_mv: int, next_wake_s: int = INTERVAL_S) -> proto.Hello:
    return proto.Hello(1, 7, proto.BootCause.TIMER, battery_mv, -61, 40_000, 0, 0, next_wake_s,
                       2000, int(now), proto.DeviceClass.SENSOR)


def burst(first_id: int, t0: int, n: int, battery0: int, step_s: int = 60) -> proto.Burst:
    ts = tuple(t0 + step_s * i for i in range(n))
    temp = tuple(2000 + (i * 37) % 500 for i in range(n))  # 20.00..25.00 degC
    hum = tuple(4000 + (i * 13) % 1000 for i in range(n))
    batt = tuple(max(0, battery0 - i // 10) for i in range(n))
    return proto.Burst(first_id, proto.SCHEMA_ENV3, step_s, proto.Series(ts, (temp, hum, batt)))


def fill(path: Path, devices: int = 30, readings_per_device: int = 120,
         now: float | None = None) -> list[str]:
    """`devices` sensors (node-000...), each with a HELLO and readings over the last
    readings_per_device minutes; node-001 quarantined, node-002 never heard from, one dead
    letter and one queued command. Returns the ids."""
    now = time.time() if now is None else now
    conn = db.open_db(path)
    ids = [f"node-{i:03d}" if devices <= 1000 else f"node-{i:05d}" for i in range(devices)]
    dl = downlink.Downlink()
    with db.transaction(conn):
        for d in ids:
            registry.add(conn, d, "sensor", now=now - 86400)
    heard = [d for d in ids if d != ids[min(2, len(ids) - 1)]]
    with db.transaction(conn):
        rows = []
        for k, d in enumerate(heard):
            h = hello(now, 3300 - k % 400)
            rows.append(registry.hello_row(d, h, now - 60))
        registry.record_hellos(conn, rows, now - 60)
        wake_log.record(conn, [(d, hello(now, 3300 - k % 400)) for k, d in enumerate(heard)],
                        [], [], now - 60)
        dl.plan(conn, [(d, hello(now, 3300)) for d in heard], now - 60)
    if readings_per_device:
        t0 = int(now) - 60 * readings_per_device
        readings.commit_bursts(
            conn, [(d, burst(1, t0, readings_per_device, 3300 - k % 400))
                   for k, d in enumerate(heard)], now=now)
    if len(ids) > 1:
        with db.transaction(conn):
            registry.quarantine(conn, ids[1], "malformed frames", now=now)
            deadletter.add(conn, ids[1], "malformed", b"\x01\x02\x03garbage", "bad length",
                           at=now)
        q.enqueue_command(conn, ids[0], "ping", now=now)
    conn.close()
    return ids


def add_month(path: Path, device: str, now: float | None = None, per_burst: int = 60) -> int:
    """A month of one-a-minute readings for `device`, in bursts of `per_burst`, after the
    ids it holds; returns how many."""
    now = time.time() if now is None else now
    conn = db.open_db(path)
    first = readings.stats(conn, device)[0] + 1
    t0 = int(now) - 30 * 86400
    n = 30 * 1440
    batch = [(device, burst(first + i, t0 + 60 * i, per_burst, 3600 - i // 1000))
             for i in range(0, n, per_burst)]
    readings.commit_bursts(conn, batch, now=now)
    conn.close()
    return n
