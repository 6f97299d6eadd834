"""/metrics through aiohttp's test client on a real SQLite file filled through the gateway's
own modules: the store's gauges agree with what the fleet page shows."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import WebConfig
from gateway.ops import fleet, metrics
from gateway.store import db
from gateway.web.app import make_app
from tests.gateway.web.fleetdb import fill


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_store_gauges_agree_with_the_fleet_page(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    # Heard from 1,000 s ago with a 300 s interval: every node heard from is overdue now.
    fill(path, devices=40, now=time.time() - 1000)

    async def main() -> str:
        conn = db.connect(path)
        live = metrics.Live()
        live.observe_commit(0.003)
        live.observe_commit(0.2)
        c = TestClient(TestServer(make_app(WebConfig(enabled=True), conn, live=live)))
        await c.start_server()
        try:
            r = await c.get("/metrics")
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            return await r.text()
        finally:
            await c.close()
            conn.close()

    m = _samples(asyncio.run(asyncio.wait_for(main(), 30)))
    conn = db.connect(path)
    try:
        page = fleet.fleet(conn, limit=1000)
    finally:
        conn.close()
    active = [r for r in page.rows if r.status == "active"]
    assert m[("torpor_devices", (("status", "active"),))] == len(active) == 38
    assert m[("torpor_devices", (("status", "quarantined"),))] == 1
    assert m[("torpor_devices", (("status", "provisioned"),))] == 1
    overdue = [r for r in active if r.overdue_wakes]
    assert m[("torpor_devices_overdue", ())] == len(overdue) == 38
    assert m[("torpor_missed_wakes", ())] == sum(r.overdue_wakes for r in overdue)
    assert m[("torpor_battery_lowest_volts", ())] == min(
        r.battery_mv for r in page.rows if r.battery_mv is not None
        and r.status in ("active", "provisioned")) / 1000.0
    assert m[("torpor_downlink_items", (("state", "queued"),))] == 1
    assert m[("torpor_dead_letters", ())] == 1
    assert m[("torpor_ingest_commit_seconds_count", ())] == 2
    assert m[("torpor_ingest_commit_seconds_bucket", (("le", "0.005"),))] == 1
    assert m[("torpor_ingest_commit_seconds_bucket", (("le", "0.25"),))] == 2
    # Not running: the page alone says so, and the broker is not reported up.
    assert m[("torpor_broker_up", ())] == 0


def test_a_snapshot_exports_what_the_live_metrics_do(tmp_path: Path) -> None:
    """A page in the gateway's child process scrapes the gateway's counters and histogram
    from `Live.snapshot()`, sent as JSON: the same samples as the gateway's own."""
    import json

    path = tmp_path / "gateway.db"
    fill(path, devices=5, now=time.time())
    live = metrics.Live(ingest=lambda: {"frames": 7, "readings_stored": 300, "batches": 3},
                        downlink=lambda: {"results": 2}, broker_connected=lambda: True,
                        credentials=lambda: {"crl": 12.5})
    for s in (0.0004, 0.003, 0.2):
        live.observe_commit(s)
    copy = metrics.Live.from_snapshot(json.loads(json.dumps(live.snapshot())))
    conn = db.connect(path)
    try:
        now = time.time()
        mine = _samples(metrics.render(conn, live, now).decode())
        theirs = _samples(metrics.render(conn, copy, now).decode())
    finally:
        conn.close()
    assert theirs == mine
    assert mine[("torpor_ingest_readings_total", ())] == 300
    assert mine[("torpor_ingest_commit_seconds_bucket", (("le", "0.005"),))] == 2
    assert mine[("torpor_credential_expiry_seconds", (("credential", "crl"),))] == 12.5 * 86400


def test_a_scrape_of_ten_thousand_devices_is_cheap(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    fill(path, devices=10_000, readings_per_device=0)
    conn = db.connect(path)
    try:
        metrics.render(conn)
        t0 = time.perf_counter()
        for _ in range(5):
            text = metrics.render(conn).decode()
        took = (time.perf_counter() - t0) / 5
    finally:
        conn.close()
    print(f"\n/metrics body at 10,000 devices: {took * 1000:.1f} ms a scrape")
    assert "torpor_devices{status=\"active\"} 9998.0" in text
