"""The web page in a real headless Chromium (Debian's `chromium`, driven over the DevTools
protocol) against the real gateway process with [web] enabled, real sim nodes' readings
through a real Mosquitto, and a real SQLite file."""

from __future__ import annotations

import asyncio
import json
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
        # The energy model: the nodes' own awake and radio times × the esp32 profile's
        # cited currents.
        f.write("[energy]\nboard = \"esp32\"\n")
    base = f"http://127.0.0.1:{port}"

    async def main() -> None:
        stack.start()
        nodes = [stack.add_node(f"web-{i}", seed=20 + i, send_every=1) for i in range(2)]
        for node in nodes:
            await node.wake(2)
        # A third wake of web-0: its second and third HELLOs report the wake before each
        # (the first, after power-on, has nothing to report), two points of energy.
        await nodes[0].wake()
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
            # Each row has its battery days-left cell, showing what the API computes.
            cells = await page.eval(
                "Array.from(document.querySelectorAll('#fleet tbody tr[data-device]'))"
                ".map(r => [r.querySelector('td.days-left').dataset.days,"
                " r.querySelector('td.days-left').textContent])")
            with urllib.request.urlopen(base + "/api/v1/devices") as r:
                api = {d["id"]: d for d in json.load(r)["devices"]}
            for (days, text), dev in zip(cells, ("web-0", "web-1"), strict=True):
                want = api[dev]["days_left"]
                trend = api[dev]["days_left_trend"]
                if trend == "falling":
                    assert abs(float(days) - want) < 0.01 and text.endswith(" d"), (days, want)
                else:
                    assert (days, text) == {"not falling": ("inf", "not falling"),
                                            "pending": ("pending", "…"),
                                            "unknown": ("", "–")}[trend], (days, text, trend)
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
            # The wake charts are drawn from the node's logged HELLOs: a line through each.
            wake_charts = await page.eval(
                "Array.from(document.querySelectorAll('svg.chart[data-kind=wake]')).map(s =>"
                " [s.dataset.series, +s.dataset.points,"
                " (s.querySelector('path.line') || {getAttribute: () => ''}).getAttribute('d')])")
            assert [c[0] for c in wake_charts] == [
                "battery at wake", "rssi", "awake seen by gateway",
                "energy per wake (model estimate)"], wake_charts
            for name, points, line in wake_charts:
                assert points >= 2 and line.startswith("M") and "L" in line, (name, points)
            wakes = await page.eval(
                "Array.from(document.querySelectorAll('#wakes tbody tr'))"
                ".map(r => Array.from(r.cells).map(c => c.textContent))")
            assert len(wakes) >= 2, wakes
            with stack.db() as conn:
                from gateway.store import wake_log

                logged = wake_log.of_device(conn, "web-0")
            assert len(wakes) == len(logged)
            for cells, w in zip(wakes, logged, strict=True):
                assert cells[1].startswith(w.boot_cause) and cells[3] == f"{w.rssi} dBm"
                assert cells[4] == f"{w.battery_mv} mV"
                if w.prev_awake_ms is None:
                    assert cells[6] == "not reported", cells
                else:
                    assert cells[6].endswith(", sent)") and " µAh est. (" in cells[6], cells
            assert sum(w.readings for w in logged) > 0  # the bursts are counted to their wake
            # The first wake after power-on has no previous wake; every later HELLO reports
            # the one before it, as the node's ticks measured it: awake longer than its
            # radio was on (the radio came up inside the wake), and it sent.
            facts = [w for w in logged if w.prev_awake_ms is not None]
            assert len(facts) == len(logged) - 1 >= 2, logged
            for w in facts:
                assert w.prev_awake_ms and w.prev_radio_ms and w.prev_sent == 1, w
                assert 0 < w.prev_radio_ms < w.prev_awake_ms < 60_000, w
            note = await page.eval("document.getElementById('energy-per-wake').textContent")
            assert "model estimate, not a measurement" in note and "esp32" in note, note
            with urllib.request.urlopen(base + "/api/v1/devices/web-0/wakes") as r:
                api_wakes = json.load(r)
            assert api_wakes["energy_reported"] is True
            assert api_wakes["energy_model"]["board"] == "esp32"
            e = [w["energy_uah"] for w in api_wakes["wakes"] if w["energy_uah"] is not None]
            assert len(e) == len(facts) and all(x > 0 for x in e), api_wakes
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
            # A configuration change through the page's form: desired, pending, queued as
            # the node's next SHADOW_DELTA.
            await page.eval(
                "document.querySelector('#set-config select[name=key]').value = 'send_every';"
                "document.querySelector('#set-config input[name=value]').value = '2';"
                "document.querySelector('#set-config button').click(); true")
            note = await page.wait_for(
                "((document.querySelector('.msg') || {}).textContent || '')"
                ".includes('configuration') && document.querySelector('.msg').textContent")
            assert "configuration v1 queued: send_every = 2" in note, note
            with stack.db() as conn:
                items = {i.what: i for i in q.pending(conn, "web-0")}
                assert set(items) == {"set_interval 120", "config v1"}, items
                assert [(c.key, c.value, c.applied) for c in q.config_state(conn, "web-0")] == [
                    ("send_every", 2, False)]
            # The node wakes, runs the command and applies the configuration; the page shows
            # both.
            await nodes[0].wake()
            with stack.db() as conn:
                for what, item in items.items():
                    await _until(lambda i=item: q.get(conn, "web-0", i.command_id).status == q.DONE,
                                 f"{what} retired")
            await page.goto(base + "/devices/web-0")
            cfg = await page.eval(
                "Array.from(document.querySelectorAll('#config tbody tr'))"
                ".map(r => Array.from(r.cells).map(c => c.textContent))")
            assert cfg and cfg[0][:4] == ["send_every", "2", "v1", "yes"], cfg
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
