"""The fleet page's rows read in two queries (gateway.store.fleet_rows) hold what reading
each device on its own holds, on real SQLite files filled through the gateway's modules."""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path

import pytest

from gateway.ops import fleet
from gateway.store import alerts, db, fleet_rows, groups, readings
from gateway.store import devices as registry
from gateway.store import downlink_queue as q
from tests.gateway.web.fleetdb import burst, fill


def _bursts(conn: sqlite3.Connection, device: str, spans: list[tuple[int, int]],
            t0: int) -> None:
    """One burst per (first id, count), stamped a minute apart from t0 by id."""
    readings.commit_bursts(conn, [(device, burst(first, t0 + 60 * first, n, 3300 - first))
                                  for first, n in spans], now=time.time())


@pytest.mark.parametrize("n", [1, 5, 24, 100])
def test_newest_readings_are_those_fetch_reads_one_device_at_a_time(tmp_path: Path,
                                                                   n: int) -> None:
    conn = db.open_db(tmp_path / "gateway.db")
    try:
        t0 = int(time.time()) - 86400
        layouts: dict[str, list[tuple[int, int]]] = {
            "one-big-run": [(1, 64)],
            "small-runs": [(i, 1) for i in range(1, 40)],
            "mixed": [(1, 10), (11, 3), (14, 1), (15, 30), (45, 2)],
            "gaps": [(1, 5), (20, 2), (40, 7), (90, 1)],  # ids the node never sent
            "late-old-ids": [(30, 10), (1, 4)],  # older ids stored after newer ones
            "exactly": [(1, 12), (13, 12)],
        }
        for d in [*layouts, "silent"]:
            registry.add(conn, d)
        for d, spans in layouts.items():
            for span in spans:  # a transaction each: a run each
                _bursts(conn, d, [span], t0)
        got = fleet_rows.newest_readings(conn, [*layouts, "silent"], n)
        assert "silent" not in got
        for d in layouts:
            assert list(got[d]) == readings.fetch(conn, d, n), d
    finally:
        conn.close()


def test_newest_readings_of_more_devices_than_one_statement_takes(tmp_path: Path) -> None:
    conn = db.open_db(tmp_path / "gateway.db")
    try:
        ids = [f"n{i:04d}" for i in range(fleet_rows.CHUNK * 2 + 7)]
        t0 = int(time.time()) - 3600
        with db.transaction(conn):
            for d in ids:
                registry.add(conn, d)
        readings.commit_bursts(conn, [(d, burst(1, t0, 3 + k % 30, 3000 + k))
                                      for k, d in enumerate(ids)], now=time.time())
        got = fleet_rows.newest_readings(conn, ids, 24)
        assert set(got) == set(ids)
        for d in ids:
            assert list(got[d]) == readings.fetch(conn, d, 24), d
    finally:
        conn.close()


def _one_at_a_time(conn: sqlite3.Connection, now: float, forecasts: fleet.Forecasts,
                   **kw: object) -> tuple[tuple[fleet.FleetRow, ...], int]:
    """The page as it was read before: the registry's page, then each row on its own (as
    the device page reads its summary)."""
    devices, total = registry.page(conn, **kw)  # type: ignore[arg-type]
    return tuple(fleet.device(conn, d.id, now=now, forecasts=forecasts).row
                 for d in devices), total


FILTERS: list[dict[str, object]] = [
    {}, {"offset": 10, "limit": 7}, {"status": "active"}, {"status": "quarantined"},
    {"status": "provisioned"}, {"text": "node-01"}, {"status": "active", "text": "1"},
    {"text": "malformed"}, {"text": "7"}, {"text": "no-such"}, {"offset": 1000},
]


def test_the_fleet_page_shows_what_each_device_read_alone_shows(tmp_path: Path) -> None:
    """Every column of every row (status, last seen, next listening, battery sparkline and
    days left, queued, firmware, OTA, alerts, group), for each filter and page, and the
    number of devices that match."""
    path = tmp_path / "gateway.db"
    now = time.time()
    ids = fill(path, devices=40, readings_per_device=90, now=now)
    conn = db.open_db(path)
    try:
        q.enqueue_command(conn, ids[5], "ping", now=now)
        q.enqueue_command(conn, ids[5], "reboot", now=now)
        with db.transaction(conn):
            for rule, dev in (("hot", ids[3]), ("cold", ids[3]), ("hot", ids[7])):
                alerts.raise_alert(conn, rule=rule, kind="threshold", subject=dev, device=dev,
                                   severity="warning", message=f"{rule} {dev}", value=1.0,
                                   now=now)
        groups.set_group(conn, ids[4], "roof")
        # A device whose newest runs hold a reading each: its sparkline spans many runs.
        first = readings.stats(conn, ids[6])[0] + 1
        for k in range(5):
            readings.commit_bursts(conn, [(ids[6], burst(first + k, int(now) - 50 + k, 1,
                                                         3100 - k))], now=now)
    finally:
        conn.close()
    conn = db.connect(path)
    try:
        kept = fleet.Forecasts(budget_s=math.inf)
        for kw in FILTERS:
            page = fleet.fleet(conn, now=now, forecasts=kept, **kw)  # type: ignore[arg-type]
            rows, total = _one_at_a_time(conn, now, kept, **kw)
            assert page.rows == rows, kw
            assert page.total == total, kw
            assert page.counts == registry.counts(conn)
        page = fleet.fleet(conn, now=now, forecasts=kept, limit=100)
        by_id = {r.id: r for r in page.rows}
        assert by_id[ids[5]].queued == 2 + (ids[5] == ids[0])
        assert by_id[ids[3]].alerts == 2 and by_id[ids[7]].alerts == 1
        assert by_id[ids[4]].group == "roof"
        assert by_id[ids[2]].battery == () and by_id[ids[2]].last_seen is None
        assert len(by_id[ids[0]].battery) == fleet.SPARK_POINTS
        assert by_id[ids[0]].days_left is not None
    finally:
        conn.close()


def test_a_change_shows_in_the_next_page(tmp_path: Path) -> None:
    """The page keeps its sparklines and status counts between views (fleet.Kept), and
    nothing else: a reading arriving (even one with an older id), a command queued, an
    alert raised or cleared, a status changed, a device added each show in the page read
    next."""
    path = tmp_path / "gateway.db"
    now = time.time()
    ids = fill(path, devices=5, readings_per_device=30, now=now)
    reader = db.connect(path)
    writer = db.open_db(path)
    forecasts = fleet.Forecasts(budget_s=math.inf)
    kept = fleet.Kept()

    def row(device: str) -> fleet.FleetRow:
        page = fleet.fleet(reader, now=now, forecasts=forecasts, kept=kept)
        fresh = fleet.fleet(reader, now=now, forecasts=forecasts)  # nothing kept
        assert page == fresh
        return next(r for r in page.rows if r.id == device)

    try:
        d = ids[3]
        before = row(d)
        drawn = kept.decoded
        assert drawn == 5  # every row (the device never heard from: an empty one)
        assert row(d) == before and kept.decoded == drawn  # nothing new: nothing decoded
        first = readings.stats(writer, d)[0] + 1
        readings.commit_bursts(writer, [(d, burst(first + 10, int(now) - 2, 2, 2950,
                                                  step_s=1))], now=now)
        after = row(d)
        assert kept.decoded == drawn + 1  # only the device that stored readings
        assert after.battery[-2:] == ((int(now) - 2, 2950), (int(now) - 1, 2950))
        assert after.battery[:-2] == before.battery[2:]
        # The ids skipped above arrive late, stamped earlier: they are among the newest ids.
        readings.commit_bursts(writer, [(d, burst(first, int(now) - 30, 10, 2960,
                                                  step_s=1))], now=now)
        late = row(d)
        assert late.battery == fleet.device(reader, d, now=now).row.battery
        assert late.battery != after.battery and kept.decoded == drawn + 2
        q.enqueue_command(writer, d, "ping", now=now)
        assert row(d).queued == before.queued + 1
        with db.transaction(writer):
            a = alerts.raise_alert(writer, rule="low", kind="battery", subject=d, device=d,
                                   severity="warning", message="low", value=2950.0, now=now)
        assert a is not None and row(d).alerts == 1
        with db.transaction(writer):
            alerts.clear_alert(writer, "low", d, message="ok", now=now)
        assert row(d).alerts == 0
        counted = kept.counted
        assert counted == 1  # nothing changed status so far: counted once
        with db.transaction(writer):
            registry.quarantine(writer, d, "too many frames", now=now)
        r = row(d)
        assert r.status == "quarantined" and r.status_reason == "too many frames"
        assert kept.counted == counted + 1
        page = fleet.fleet(reader, now=now, status="quarantined", kept=kept)
        assert page.total == 2 and page.counts["quarantined"] == 2
        registry.add(writer, "node-new")
        page = fleet.fleet(reader, now=now, status="provisioned", kept=kept)
        assert [r.id for r in page.rows] == [ids[2], "node-new"] and page.total == 2
        assert page.counts == registry.counts(reader) and kept.counted == counted + 2
        groups.set_group(writer, d, "cellar")
        assert row(d).group == "cellar"
    finally:
        reader.close()
        writer.close()


def test_kept_sparklines_stay_within_their_bound(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    now = time.time()
    fill(path, devices=30, readings_per_device=10, now=now)
    conn = db.connect(path)
    try:
        kept = fleet.Kept(size=12)
        for offset in range(0, 30, 5):
            page = fleet.fleet(conn, now=now, offset=offset, limit=5, kept=kept)
            assert page == fleet.fleet(conn, now=now, offset=offset, limit=5)
            assert len(kept.keys) <= 12
        page = fleet.fleet(conn, now=now, limit=10, kept=kept)  # some kept, some not
        assert page == fleet.fleet(conn, now=now, limit=10) and len(kept.keys) <= 12
    finally:
        conn.close()
