"""The sim node supervisor driving real unix-port processes: sleeps, clock, cuts, crashes."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.mpharness import micropython_binary
from tools.sim.node import CRASH, POWER_ON, SOFT_RESET, TIMER, WATCHDOG, BoardModel, SimNode

pytestmark = pytest.mark.skipif(micropython_binary() is None, reason="needs the MicroPython unix port")

START_MS = 1767225600000  # 2026-01-01T00:00:00Z

# Counts its boots in flash (survives everything) and in RTC memory (not power cuts).
COUNTER = """
import os, time
import board
board.init()
try:
    with open(board.FS_ROOT + '/boots') as f:
        flash = int(f.read())
except OSError:
    flash = 0
with open(board.FS_ROOT + '/boots', 'w') as f:
    f.write(str(flash + 1))
rtc = board.rtc_memory()
rtc = int(rtc) if rtc else 0
board.rtc_memory_write(b'%d' % (rtc + 1))
print('BOOT cause=%d flash=%d rtc=%d time=%d' % (board.boot_cause(), flash, rtc, board.time()))
time.sleep_ms(AWAKE_MS)
board.deep_sleep(SLEEP_MS)
"""

# One fault per boot, chosen by a counter in RTC memory.
FAULTS = """
import time
import board
board.init()
n = board.rtc_memory()
n = int(n) if n else 0
board.rtc_memory_write(b'%d' % (n + 1))
print('BOOT n=%d cause=%d' % (n, board.boot_cause()))
if n == 0:
    raise RuntimeError('a bug')
if n == 1:
    board.watchdog_start(300)
    for _ in range(3):
        board.watchdog_feed()
        time.sleep_ms(100)
    while True:
        time.sleep_ms(50)
if n == 2:
    board.reset()
if n == 3:
    try:
        board.deep_sleep(1000)
    except Exception:
        print('deep sleep returned')
"""


def _script(tmp_path: Path, text: str, **subs: int) -> str:
    for key, value in subs.items():
        text = text.replace(key, str(value))
    path = tmp_path / "entry.py"
    path.write_text(text)
    return str(path)


def _boots(node_dir: Path) -> dict[int, dict[str, int]]:
    """run index -> the fields of the BOOT line that run printed (if it got that far)."""
    out: dict[int, dict[str, int]] = {}
    run = -1
    for line in (node_dir / "node.log").read_text().splitlines():
        header = re.match(r"--- run (\d+) cause=", line)
        if header:
            run = int(header.group(1))
        elif line.startswith("BOOT "):
            out[run] = {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", line)}
    return out


def test_cycles_of_deep_sleep_keep_flash_and_rtc_and_advance_the_clock(tmp_path: Path) -> None:
    entry = _script(tmp_path, COUNTER, AWAKE_MS=0, SLEEP_MS=3600000)
    node = SimNode(tmp_path / "node", seed=4, time_scale=0, entry=entry, start_ms=START_MS)
    summary = node.run_sync(4)
    assert [r.kind for r in summary.runs] == ["sleep"] * 4
    assert [r.cause for r in summary.runs] == [POWER_ON, TIMER, TIMER, TIMER]
    assert summary.exit_codes == {75: 4}
    boots = _boots(node.dir)
    assert [boots[i]["flash"] for i in range(4)] == [0, 1, 2, 3]
    assert [boots[i]["rtc"] for i in range(4)] == [0, 1, 2, 3]
    # Each wake is one slept hour (plus the short awake time) after the previous one.
    times = [boots[i]["time"] for i in range(4)]
    assert times[0] == START_MS // 1000
    for a, b in zip(times, times[1:], strict=False):
        assert 3600 <= b - a <= 3605, times
    assert summary.virtual_end_ms - summary.virtual_start_ms >= 4 * 3600000
    assert summary.wall_s < 30


def test_time_scale_compresses_the_slept_interval(tmp_path: Path) -> None:
    entry = _script(tmp_path, COUNTER, AWAKE_MS=0, SLEEP_MS=4000)
    node = SimNode(tmp_path / "node", time_scale=10, entry=entry, start_ms=START_MS)
    t0 = time.monotonic()
    summary = node.run_sync(3)
    wall = time.monotonic() - t0
    # Two waits of 4 s / 10 (none after the last run); far less than the 8 s slept.
    assert 0.8 <= wall < 6, wall
    assert summary.virtual_end_ms - START_MS >= 3 * 4000


def test_power_cuts_are_injected_counted_and_lose_rtc_memory(tmp_path: Path) -> None:
    entry = _script(tmp_path, COUNTER, AWAKE_MS=400, SLEEP_MS=60000)
    node = SimNode(tmp_path / "node", seed=11, time_scale=0, entry=entry, start_ms=START_MS)
    summary = node.run_sync(8, power_cuts=3)
    kinds = [r.kind for r in summary.runs]
    assert summary.power_cuts == 3 == kinds.count("power_cut"), kinds
    assert summary.exit_codes[-9] == 3
    boots = _boots(node.dir)
    for run, nxt in zip(summary.runs, summary.runs[1:], strict=False):
        assert nxt.cause == (POWER_ON if run.kind == "power_cut" else TIMER)
    rtc_expected = 0
    flash_seen = -1
    for i, run in enumerate(summary.runs):
        if run.cause == POWER_ON:
            rtc_expected = 0
        if i in boots:
            # RTC memory restarts after each cut; the flash counter only ever grows.
            assert boots[i]["rtc"] == rtc_expected, (i, boots)
            assert boots[i]["cause"] == run.cause
            assert boots[i]["flash"] > flash_seen
            flash_seen = boots[i]["flash"]
        if run.kind == "sleep":
            rtc_expected += 1
        elif i in boots:
            rtc_expected = boots[i]["rtc"] + 1
    assert flash_seen >= 4


def test_crash_watchdog_and_reset_are_classified(tmp_path: Path) -> None:
    entry = _script(tmp_path, FAULTS)
    node = SimNode(tmp_path / "node", time_scale=0, entry=entry, start_ms=START_MS)
    summary = node.run_sync(5)
    kinds = [r.kind for r in summary.runs]
    assert kinds[:4] == ["crash", "watchdog", "soft_reset", "sleep"], kinds
    assert [r.cause for r in summary.runs[:5]] == [POWER_ON, CRASH, WATCHDOG, SOFT_RESET, TIMER]
    assert summary.runs[0].returncode == 1
    assert summary.runs[2].returncode == 76
    # The watchdog bit 300 ms after the last feed, not before.
    assert 500 <= summary.runs[1].awake_ms < 5000
    log = (node.dir / "node.log").read_text()
    assert "RuntimeError: a bug" in log
    assert "deep sleep returned" not in log
    assert "\x00sim:" not in log


def test_node_dir_keeps_its_seed(tmp_path: Path) -> None:
    SimNode(tmp_path / "node", model=BoardModel(seed=3, block_count=32))
    cfg = json.loads((tmp_path / "node" / "sim.json").read_text())
    assert cfg["seed"] == 3 and cfg["block_count"] == 32
    assert (tmp_path / "node" / "lib" / "board.py").read_text().strip().endswith("from sim import *")
    from tools.sim.node import SimError

    with pytest.raises(SimError, match="seed 3"):
        SimNode(tmp_path / "node", seed=4)


def test_cli_runs_a_node_and_prints_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tools.cli import main

    entry = _script(tmp_path, COUNTER, AWAKE_MS=0, SLEEP_MS=1000)
    code = main(
        ["sim", "node", "--dir", str(tmp_path / "node"), "--seed", "2", "--entry", entry,
         "--cycles", "2", "--time-scale", "0", "--json"]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["runs"] == 2 and data["kinds"] == {"sleep": 2} and data["power_cuts"] == 0


def test_cli_rejects_a_missing_firmware_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tools.cli import main

    code = main(["sim", "node", "--dir", str(tmp_path / "n"), "--entry", "no_such_app", "--cycles", "1"])
    assert code == 2
    assert "no firmware module 'no_such_app'" in capsys.readouterr().err
