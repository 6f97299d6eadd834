"""The fleet page's live update (`/?rows=1`, fetched on each `fleet` event) shows what
changed since the last view, though the page keeps sparklines and counts between views."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from gateway.config import WebConfig
from gateway.store import db, readings
from gateway.store import devices as registry
from gateway.store import downlink_queue as q
from gateway.web.app import make_app
from tests.gateway.web.fleetdb import burst, fill


def _row(html: str, device: str) -> str:
    return html.split(f'data-device="{device}"')[1].split("</tr>")[0]


def _spark(row: str) -> str:
    m = re.search(r'<path d="([^"]+)"', row)
    assert m, row
    return m.group(1)


def test_rows_follow_readings_queue_and_status(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    now = time.time()
    fill(path, devices=12, readings_per_device=40, now=now)

    async def main() -> None:
        conn = db.connect(path)
        c = TestClient(TestServer(make_app(WebConfig(enabled=True, page_size=10), conn)))
        await c.start_server()
        w = db.open_db(path)
        try:
            first = await (await c.get("/?rows=1")).text()
            again = await (await c.get("/?rows=1")).text()  # nothing new: the same lines
            assert _spark(_row(again, "node-004")) == _spark(_row(first, "node-004"))
            before = _row(first, "node-004")
            # A reading far below the others: the sparkline's line changes shape.
            nxt = readings.stats(w, "node-004")[0] + 1
            readings.commit_bursts(w, [("node-004", burst(nxt, int(time.time()) - 1, 1,
                                                          2000))], now=time.time())
            second = await (await c.get("/?rows=1")).text()
            after = _row(second, "node-004")
            assert _spark(after) != _spark(before)
            assert _spark(_row(second, "node-005")) == _spark(_row(first, "node-005"))
            queued = int(re.findall(r"<td>(\d+)</td>", after)[0])
            q.enqueue_command(w, "node-004", "ping", now=time.time())
            third = await (await c.get("/?rows=1")).text()
            assert int(re.findall(r"<td>(\d+)</td>", _row(third, "node-004"))[0]) == queued + 1
            with db.transaction(w):
                registry.quarantine(w, "node-004", "flooding", now=time.time())
            page = await (await c.get("/")).text()
            assert 'class="st-quarantined" title="flooding"' in _row(page, "node-004")
            assert "quarantined (2)" in page  # the status counts moved with it
            rows = await (await c.get("/?rows=1&status=quarantined")).text()
            assert "node-004" in rows and "node-001" in rows and "node-005" not in rows
        finally:
            w.close()
            await c.close()
            conn.close()

    asyncio.run(asyncio.wait_for(main(), 60))
