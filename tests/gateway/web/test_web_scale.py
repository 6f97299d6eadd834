"""The fleet page with 10,000 devices and a device with a month of readings: the answers
are right, and the latencies are printed (never asserted: the machine is shared)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from gateway.config import WebConfig
from tests.gateway.web.fleetdb import add_month, fill
from tests.gateway.web.test_api import web_client

DEVICES = 10_000
REQUESTS = 20  # per page


async def _timed(c: object, path: str) -> tuple[list[float], str]:
    times = []
    text = ""
    for _ in range(REQUESTS):
        t = time.perf_counter()
        r = await c.get(path)  # type: ignore[attr-defined]
        text = await r.text()
        times.append((time.perf_counter() - t) * 1000)
        assert r.status == 200, text
    return sorted(times), text


def test_fleet_of_ten_thousand(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    fill(path, devices=DEVICES, readings_per_device=24)
    month = add_month(path, "node-00000")

    async def main() -> None:
        async with web_client(path, WebConfig(enabled=True)) as c:
            doc = await (await c.get("/api/v1/devices", params={"q": "node-09"})).json()
            assert doc["total"] == 1000 and len(doc["devices"]) == 50
            assert doc["devices"][0]["id"] == "node-09000"
            doc = await (await c.get("/api/v1/devices", params={"offset": "9990"})).json()
            assert [d["id"] for d in doc["devices"]] == [f"node-{i:05d}" for i in range(9990, 10000)]
            doc = await (await c.get("/api/v1/devices/node-00000/readings",
                                     params={"since": str(time.time() - 31 * 86400)})).json()
            assert doc["count"] == month + 24 and len(doc["series"][0]["points"]) == 600
            print(f"\n{DEVICES} devices, {month} readings on node-00000; {REQUESTS} requests each")
            for p in ("/", "/?q=node-09&offset=500", "/?status=active&offset=9900",
                      "/api/v1/devices", "/devices/node-00000?range=1d",
                      "/devices/node-00000?range=30d"):
                times, text = await _timed(c, p)
                if p.startswith("/?") or p == "/":
                    assert text.count("<tr data-device=") == 50, p
                print(f"  {p:34s} median {times[len(times) // 2]:6.1f} ms   max {times[-1]:6.1f} ms")

    asyncio.run(asyncio.wait_for(main(), 120))
