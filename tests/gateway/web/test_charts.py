"""The device page's charts are drawn once per new reading: a reload with nothing new shows
the same chart, and one after a burst was committed shows that burst's readings."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from gateway.config import WebConfig
from gateway.store import db, readings
from gateway.web.app import Charts, make_app
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


def test_charts_age_out_and_stay_bounded() -> None:
    from gateway.ops.fleet import ReadingsView

    charts = Charts(size=2)
    view = ReadingsView("d", 0.0, 1.0, 0, (), None)
    charts.put("a", "1h", 5, 100.0, view)
    assert charts.get("a", "1h", 5, 104.0, 3600) is view
    assert charts.get("a", "1h", 5, 106.1, 3600) is None  # 3600 / 600 = 6 s later: moved a point
    assert charts.get("a", "1h", 6, 101.0, 3600) is None  # a new reading
    assert charts.get("a", "30d", 5, 101.0, 30 * 86400) is None
    charts.put("b", "1h", 1, 100.0, view)
    charts.put("c", "1h", 1, 100.0, view)
    assert charts.get("a", "1h", 5, 101.0, 3600) is None  # the oldest went first
    assert charts.get("c", "1h", 1, 101.0, 3600) is view
