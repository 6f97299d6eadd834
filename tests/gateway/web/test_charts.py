"""The device page's charts are drawn once per new reading: a reload with nothing new shows
the same chart, and one after a burst was committed shows that burst's readings."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from gateway.config import WebConfig
from gateway.ops.charts import ChartCache
from gateway.ops.fleet import MAX_CHART_POINTS
from gateway.store import db, readings
from gateway.web.app import make_app
from tests.gateway.web.fleetdb import burst, fill


def _count(html: str) -> int:
    m = re.search(r"· (\d+) readings", html)
    assert m, html[:3000]
    return int(m.group(1))


def test_a_new_reading_redraws_the_chart(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    fill(path, devices=3, readings_per_device=30)

    async def main() -> None:
        conn = db.connect(path)
        c = TestClient(TestServer(make_app(WebConfig(enabled=True), conn)))
        await c.start_server()
        try:
            first = _count(await (await c.get("/devices/node-000?range=1d")).text())
            assert first == 30
            assert _count(await (await c.get("/devices/node-000?range=1d")).text()) == 30
            w = db.connect(path)
            try:
                readings.commit_bursts(w, [("node-000", burst(31, int(time.time()) - 5, 4, 3300,
                                                              step_s=1))], now=time.time())
            finally:
                w.close()
            assert _count(await (await c.get("/devices/node-000?range=1d")).text()) == 34
            # Each range is a chart of its own.
            assert _count(await (await c.get("/devices/node-000?range=1h")).text()) == 34
        finally:
            await c.close()
            conn.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_chart_kept_up_to_date_equals_one_drawn_afresh(tmp_path: Path) -> None:
    """Bursts added one after another while the range slides: the kept chart reads only
    the new runs, and shows what a chart drawn from scratch at that moment shows."""
    path = tmp_path / "gateway.db"
    now = time.time()
    fill(path, devices=3, readings_per_device=0, now=now)
    w = db.open_db(path)
    r = db.connect(path)
    try:
        t0 = int(now) - 900 * 60  # more readings than a chart has points: bucket means
        readings.commit_bursts(w, [("node-000", burst(1 + 300 * k, t0 + 300 * 60 * k, 300,
                                                      3300 - k)) for k in range(3)], now=now)
        kept = ChartCache()
        day = 86400.0
        first = kept.view(r, "node-000", now - day, now)
        assert first.count == 900 and kept.rebuilds == 1
        assert {s.name for s in first.series} == {"temperature", "humidity", "battery"}
        assert all(len(s.points) <= MAX_CHART_POINTS for s in first.series)
        next_id = 901
        for step in range(1, 6):
            t = now + 60 * step
            readings.commit_bursts(w, [("node-000", burst(next_id, int(t) - 30, 3, 3290, step_s=1))],
                                   now=t)
            next_id += 3
            got = kept.view(r, "node-000", t - day, t)
            fresh = ChartCache().view(r, "node-000", t - day, t)
            assert got == fresh, step
            assert got.count == 900 + 3 * step
        assert kept.rebuilds == 1  # each later view read only what was new
        # A range that slides past old readings drops them, as a fresh chart would.
        later = now + 12 * 3600
        slid = kept.view(r, "node-000", later - day, later)
        assert slid == ChartCache().view(r, "node-000", later - day, later)
        assert slid.count < 900
        # Bounded: the least recently viewed chart goes first.
        small = ChartCache(size=2)
        for rng in (3600.0, 6 * 3600.0, day):
            small.view(r, "node-000", now - rng, now)
        assert small.rebuilds == 3
        small.view(r, "node-000", now - 3600, now)
        assert small.rebuilds == 4
    finally:
        w.close()
        r.close()


def test_battery_forecasts_are_kept_and_bounded_per_request(tmp_path: Path) -> None:
    """The fleet's days-left column is the rules engine's fit, refitted at most once per
    FORECAST_EVERY_S per device, and a request fits only within its budget."""
    import math

    from gateway.ops import fleet

    path = tmp_path / "gateway.db"
    now = time.time()
    fill(path, devices=6, readings_per_device=120, now=now)
    conn = db.connect(path)
    try:
        none_yet = fleet.Forecasts(budget_s=0.0)
        page = fleet.fleet(conn, now=now, forecasts=none_yet)
        heard = [r for r in page.rows if r.battery]
        assert heard and all(r.days_left_pending for r in heard) and none_yet.fits == 0
        kept = fleet.Forecasts(budget_s=math.inf)
        page = fleet.fleet(conn, now=now, forecasts=kept)
        assert kept.fits == len(heard)
        for r in page.rows:
            if r.battery:
                want = readings.battery_forecast(conn, r.id, r.battery[-1][0])
                assert r.days_left == want and not r.days_left_pending
        fleet.fleet(conn, now=now + 60, forecasts=kept)
        assert kept.fits == len(heard)  # within the hour: kept
        fleet.fleet(conn, now=now + fleet.FORECAST_EVERY_S + 1, forecasts=kept)
        assert kept.fits == 2 * len(heard)
    finally:
        conn.close()
