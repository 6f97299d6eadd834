"""The field run's parts that need no stack: the truth a node log tells, the bound a reading
is held to, and the gateway's clock file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tools.sim.fieldrun import BOUND_MS, bound_ms, node_truth
from tools.sim.vclock import FileOffset, write_offset

LOG = """\
--- run 0 cause=POWER_ON vt=2026-01-01T00:00:00Z
V s 1000000
R id=1 t=946684800 temp=1 hum=2 mv=3
V c 1001500
L boot=650:8.0 sample=20:0.1 assoc=350:1.0 tls=1500:5.0 publish=100:1.0 sleep=3600000:9.0 total=24.1
--- run 1 cause=TIMER vt=2026-01-01T01:00:00Z
V s 4600000
R id=2 t=4600 temp=1 hum=2 mv=3
L boot=650:8.0 sample=20:0.1 sleep=3600000:9.0 total=17.1
--- run 2 cause=POWER_ON vt=2026-01-01T02:00:00Z
V s 8200000
R id=3 t=946684800 temp=1 hum=2 mv=3
--- run 3 cause=POWER_ON vt=2026-01-01T02:10:00Z
V s 8800000
R id=4 t=946684800 temp=1 hum=2 mv=3
V c 8801000
L boot=650:8.0 sample=20:0.1 assoc=2000:1.0 sleep=3600000:9.0 total=18.1
"""


def test_readings_are_paired_with_their_true_time_and_the_clock_setting_they_count_from() -> None:
    nt = node_truth("n", LOG, 100.0)
    # Sampled on the cold clock: measured to the setting that corrected it.
    assert nt.samples[1] == (1_000_000, 1_001_500)
    # On a set clock: from the last setting.
    assert nt.samples[2] == (4_600_000, 1_001_500)
    # A power-on loses the clock: the next setting corrects both cold readings.
    assert nt.samples[3] == (8_200_000, 8_801_000)
    assert nt.samples[4] == (8_800_000, 8_801_000)
    assert nt.cold_readings == 3 and nt.syncs == 2
    # Chip time after the boot, per wake with a ledger; the boot apart.
    assert nt.awake_ms == [1970, 20, 2020] and nt.boot_ms == [650, 650, 650]


def test_the_bound_is_two_seconds_plus_the_drift_since_the_clock_setting() -> None:
    nt = node_truth("n", LOG, 5000.0)
    assert bound_ms(nt, 4_600_000, 1_001_500) == BOUND_MS + 5000 * 3_598_500 / 1e6
    assert bound_ms(nt, 1_000_000, 1_001_500) == BOUND_MS + 5000 * 1_500 / 1e6
    assert bound_ms(nt, 1_000_000, None) == BOUND_MS


def test_the_gateway_clock_follows_the_clock_file(tmp_path: Path) -> None:
    clock = tmp_path / "clock"
    off = FileOffset(clock)
    assert off() == 0.0  # no file yet: the host's clock
    write_offset(clock, 86_400_000)
    assert off() == 86_400.0
    write_offset(clock, -1500)
    assert off() == -1.5
    # A whole process under it: `time.time` is the host's plus the offset.
    write_offset(clock, 30 * 86_400_000)
    code = ("import sys, time; real = time.time(); from tools.sim import vclock; "
            f"vclock.install(__import__('pathlib').Path({str(clock)!r})); "
            "print(round((time.time() - real) / 86400))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "30"
