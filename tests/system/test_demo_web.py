"""`torpor demo` prints its status page's URL, and that page shows the demo's fleet while it
runs: every node listed, their statuses moving from provisioned to active as they wake."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.system.test_demo import ROOT, TORPOR, _env, pytestmark  # noqa: F401

URL_LINE = re.compile(r"status page: (http://127\.0\.0\.1:\d+/)")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200
        return str(r.read().decode())


def test_demo_prints_the_status_page_and_it_shows_the_fleet_live(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", TORPOR, "demo", "--dir", str(tmp_path / "demo"), "--quiet",
         "--json", "--nodes", "3", "--wakes", "24", "--time-scale", "60"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    url: list[str] = []
    got_url = threading.Event()

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            m = URL_LINE.search(line)
            if m and not url:
                url.append(m.group(1))
                got_url.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert got_url.wait(90), "no status page URL printed:\n" + "".join(lines)
        base = url[0]
        ids = [f"sim-{i:03d}" for i in range(1, 4)]
        seen_statuses: set[str] = set()
        deadline = time.monotonic() + 90
        while True:
            try:
                doc = json.loads(_get(base + "api/v1/devices"))
            except OSError as exc:
                raise AssertionError(f"{base}: {exc}\n" + "".join(lines)) from None
            statuses = {d["id"]: d["status"] for d in doc["devices"]}
            seen_statuses |= set(statuses.values())
            if sorted(statuses) == ids and all(s == "active" for s in statuses.values()):
                break
            assert proc.poll() is None and time.monotonic() < deadline, (
                f"the demo fleet never showed as active: {statuses}\n" + "".join(lines))
            time.sleep(0.2)
        html = _get(base)
        for d in ids:
            assert f'data-device="{d}"' in html, html[:2000]
        assert "/api/v1/events" in html  # the table follows the fleet live
        # /metrics of the same gateway, which relays upstream in the demo.
        m = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for fam in text_string_to_metric_families(_get(base + "metrics"))
             for s in fam.samples}
        assert m[("torpor_upstream_connected", ())] == 1
        assert m[("torpor_broker_up", ())] == 1
        assert m[("torpor_devices", (("status", "active"),))] == 3
        assert m[("torpor_ingest_readings_total", ())] > 0
        # Live: nodes were listed before their first wake reached the gateway, and the
        # readings the page shows keep growing while the demo runs.
        assert "provisioned" in seen_statuses, seen_statuses

        def stored() -> int:
            return sum(json.loads(_get(base + f"api/v1/devices/{d}"))["readings_stored"]
                       for d in ids)

        first = stored()
        deadline = time.monotonic() + 60
        while stored() <= first:
            assert proc.poll() is None and time.monotonic() < deadline, (
                "no new readings shown while the demo ran\n" + "".join(lines))
            time.sleep(0.2)
        proc.wait(240)
        assert proc.stdout is not None
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
    assert proc.returncode == 0, "".join(lines)[-4000:]
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc["ok"] is True and doc["web_url"] == base
