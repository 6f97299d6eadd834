"""`torpor bench transport --quick --json` measures every installed candidate in every
scenario through a real Mosquitto. Sanity only: wall-clock speed is never asserted here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools.bench.transport import SCENARIOS, available

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_reports_every_candidate_and_scenario() -> None:
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("mosquitto is not installed (`make mosquitto`)")
    out = subprocess.run(
        [sys.executable, "-m", "tools.cli", "bench", "transport", "--quick", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    fig = json.loads(out.stdout)
    assert set(fig["candidates"]) == {"aiomqtt", "gmqtt", "torpor"}
    for candidate in available():
        per = fig["candidates"][candidate]
        for scenario in SCENARIOS:
            f = per[scenario]
            assert f["msgs_per_s"] > 0 and f["cpu_us_per_msg"] > 0, (candidate, scenario, f)
            assert f["broker_cpu_us_per_msg"] >= 0
    assert fig["messages"] > 0 and fig["rounds"] >= 1
    assert fig["versions"]["aiomqtt"]
