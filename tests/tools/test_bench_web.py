"""`torpor bench web --quick --json`: a small fleet, one short round of each phase, against
a real gateway process with its web page on. The figures are printed (-s), never held to
their targets here; the test checks that every key is there and adds up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("fleet_page_p99_ms", "device_page_p99_ms", "metrics_p99_ms", "ingest_ratio_with_web")


def test_bench_web_quick_json() -> None:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}:/usr/sbin"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.cli", "bench", "web", "--quick", "--json"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fig = json.loads(proc.stdout)
    print({k: fig[k] for k in KEYS})
    for key in KEYS:
        assert isinstance(fig[key], float) and fig[key] > 0, (key, fig[key])
    assert set(fig["targets"]) == {"fleet_page_p99_ms", "device_page_p99_ms",
                                   "ingest_ratio_with_web"}
    for kind in ("fleet", "device_30d", "device_30d_live", "device_1d", "metrics"):
        assert fig[f"{kind}_samples"] >= 1
    assert fig["fleet_page_p50_ms"] <= fig["fleet_page_p99_ms"]
    for key in ("device_30d_redraw_cpu_ms", "device_30d_redraw_cpu_ms_baseline"):
        assert isinstance(fig[key], float) and fig[key] > 0, (key, fig[key])
    assert fig["devices"] == 500 and fig["month_device_readings"] == 3 * 1440
    assert fig["readings_prefilled"] == (500 - 8 - 2) * 4 + 2 * 3 * 1440
    assert fig["ingest_readings_per_s"] > 0 and fig["ingest_readings_per_s_polled"] > 0
    assert fig["poller_fetches"] >= 1
    assert 0 < fig["latency_offered_readings_per_s"] <= fig["ingest_readings_per_s"]
