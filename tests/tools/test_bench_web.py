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
        capture_output=True, text=True, timeout=240, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fig = json.loads(proc.stdout)
    # Both web modes, in the gateway's process and in its child process, in one run.
    assert list(fig["modes"]) == ["in-process", "process"]
    assert set(fig["targets"]) == {"fleet_page_p99_ms", "device_page_p99_ms",
                                   "ingest_ratio_with_web"}
    for key in ("device_30d_redraw_cpu_ms", "device_30d_redraw_cpu_ms_baseline"):
        assert isinstance(fig[key], float) and fig[key] > 0, (key, fig[key])
    assert fig["devices"] == 500 and fig["month_device_readings"] == 3 * 1440
    assert fig["readings_prefilled"] == (500 - 8 - 2) * 4 + 2 * 3 * 1440
    assert fig["page_phase_rate"] == "fixed"  # --quick's, not half of what it measured
    for mode, got in fig["modes"].items():
        print(mode, {k: got[k] for k in KEYS})
        for key in KEYS:
            assert isinstance(got[key], float) and got[key] > 0, (mode, key, got[key])
        for kind in ("fleet", "device_30d", "device_30d_live", "device_1d", "metrics"):
            assert got[f"{kind}_samples"] >= 1
        assert got["fleet_page_p50_ms"] <= got["fleet_page_p99_ms"]
        assert got["ingest_readings_per_s"] > 0 and got["ingest_readings_per_s_polled"] > 0
        assert got["poller_fetches"] >= 1
        # The page phase offers the fixed rate, whatever the ingest phase measured.
        assert got["page_phase_offered_frames_per_s"] == 20.0
        assert got["latency_offered_readings_per_s"] == 20 * 64
        assert got["latency_sent_frames_per_s"] > 0 and got["latency_ingested_frames_per_s"] > 0
        assert 0 < got["latency_stored_fraction"] <= 1
