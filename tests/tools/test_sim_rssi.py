"""The sim board's RSSI lies in a real radio's range (about -100 to -30 dBm) for every node
and at every time, and it varies: boards/sim.py run in the MicroPython unix port."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tools import venvbin

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import sim
lo, hi, seen = 0, -1000, set()
for seed in range(1, 401):
    for k in range(60):
        # times from 2000-01-01 (a cold clock) to 2040, minute and sub-minute apart
        t = 946684800000 + seed * 7919000 + k * k * 3600000 + k * 37000
        v = sim.rssi_at(seed, t)
        lo, hi = min(lo, v), max(hi, v)
        seen.add(v)
print(lo, hi, len(seen))
"""


def test_sim_rssi_in_a_real_radios_range() -> None:
    mp = venvbin.find("micropython")
    if not mp:
        pytest.skip("the MicroPython unix port is not installed (x86-64 wheel only)")
    env = dict(os.environ, MICROPYPATH=f".frozen:{ROOT / 'boards'}")
    p = subprocess.run([mp, "-c", _PROBE], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    lo, hi, distinct = (int(x) for x in p.stdout.split())
    print(f"sim rssi over 400 seeds x 60 times: {lo} .. {hi} dBm, {distinct} values")
    assert -100 <= lo <= hi <= -30
    assert distinct >= 20  # a spread of sites and fading, not one constant
