"""The web page in a real headless Chromium (Debian's `chromium`, driven over the DevTools
protocol) against the real gateway process with [web] enabled, real sim nodes' readings
through a real Mosquitto, and a real SQLite file."""

from __future__ import annotations

import asyncio
import statistics
import time
import urllib.request
from pathlib import Path

import pytest

from gateway.store import downlink_queue as q
from tests.fixtures.broker import free_port
from tests.system.cdp import chromium, find_chromium, png_pixels
from tests.system.stack import Stack

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                "(`make test` installs Debian's chromium)")


def _wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"the web page did not come up at {url}"
        time.sleep(0.1)


async def _until(cond: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not met within {timeout:g}s: {what}"
        await asyncio.sleep(0.05)


def test_fleet_device_chart_and_a_queued_command_in_chromium(stack: Stack, tmp_path: Path) -> None:
    assert CHROMIUM is not None
    port = free_port()
    with open(stack.config_path, "a") as f:
        f.write(f"[web]\nenabled = true\nhost = \"127.0.0.1\"\nport = {port}\n")
    base = f"http://127.0.0.1:{port}"

    async def main() -> None:
        stack.start()
        nodes = [stack.add_node(f"web-{i}", seed=20 + i, send_every=1) for i in range(2)]
        for node in nodes:
            await node.wake(2)
        with stack.db() as conn:
            from gateway.store import readings

            await _until(lambda: readings.count_rows(conn, "web-1") > 0, "readings stored")
        _wait_http(base + "/api/v1/health")
        async with chromium(CHROMIUM) as browser:
            page = await browser.new_page()
            # The fleet table lists both nodes, with a battery sparkline.
            await page.goto(base + "/")
            rows = await page.wait_for(
                "Array.from(document.querySelectorAll('#fleet tbody tr[data-device]'))"
                ".map(r => r.dataset.device)")
            assert rows == ["web-0", "web-1"], rows
            status = await page.eval("document.querySelector('tr[data-device=\"web-0\"] td:nth-child(2)').textContent")
            assert status == "active"
            # The device page draws its readings: an <svg> chart with a line in it.
            await page.goto(base + "/devices/web-0")
            d = await page.wait_for(
                "(document.querySelector('svg.chart path.line') || {getAttribute: () => ''})"
                ".getAttribute('d')")
            assert d.startswith("M") and "L" in d, d
            series = await page.eval(
                "Array.from(document.querySelectorAll('svg.chart')).map(s => s.dataset.series)")
            assert {"temperature", "humidity", "battery"} <= set(series), series
            # Queue a command through the page's form: it lands in the gateway's queue.
            await page.eval(
                "document.querySelector('#queue-command select[name=op]').value = 'set_interval';"
                "document.querySelector('#queue-command input[name=args]').value = '120';"
                "document.querySelector('#queue-command button').click(); true")
            await page.wait_for("(document.querySelector('.msg') || {}).textContent")
            with stack.db() as conn:
                pending = q.pending(conn, "web-0")
            assert [i.what for i in pending] == ["set_interval 120"], pending
            note = await page.eval("document.querySelector('.msg').textContent")
            assert "queued set_interval 120" in note
            # A refused one says why, and queues nothing.
            await page.eval(
                "document.querySelector('#queue-command select[name=op]').value = 'set_interval';"
                "document.querySelector('#queue-command input[name=args]').value = '';"
                "document.querySelector('#queue-command button').click(); true")
            await page.wait_for("(document.querySelector('.msg.err') || {}).textContent")
            with stack.db() as conn:
                assert len(q.pending(conn, "web-0")) == 1
            # The node wakes, runs it; the page shows its result.
            await nodes[0].wake()
            with stack.db() as conn:
                await _until(lambda: q.get(conn, "web-0", pending[0].command_id).status == q.DONE,
                             "command retired")
            await page.goto(base + "/devices/web-0")
            done = await page.eval(
                f"document.querySelector('tr[data-command-id=\"{pending[0].command_id}\"]')"
                ".textContent")
            assert "done" in done and "ok" in done, done
            # The fleet page follows the fleet live (server-sent events): a wake of web-1
            # shows in its row without a reload.
            await page.goto(base + "/")
            seen = ("document.querySelector('tr[data-device=\"web-1\"] td:nth-child(3)')"
                    ".textContent.slice(0, 19)")
            before = await page.eval(seen)
            await page.eval("window.notReloaded = true")
            await asyncio.sleep(1.1)  # a new HELLO's time differs in its seconds
            await nodes[1].wake()
            after = await page.wait_for(f"{seen} !== {before!r} && {seen}", timeout=20)
            assert after > before and await page.eval("window.notReloaded === true")
            # A screenshot of the fleet page that is not blank.
            await page.wait_for("document.querySelectorAll('svg.spark path').length >= 2")
            png = await page.screenshot()
            (tmp_path / "fleet.png").write_bytes(png)
            width, height, bpp, pixels = png_pixels(png)
            assert width >= 300 and height >= 200, (width, height)
            grey = pixels[::bpp * 7]  # every 7th pixel's first channel
            assert statistics.pstdev(grey) > 10, "the screenshot is blank"
            assert len(set(grey)) > 8, "the screenshot has almost no colours"

    asyncio.run(asyncio.wait_for(main(), 240))
