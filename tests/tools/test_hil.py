"""`torpor hil` and `pytest --hil-port` run the on-device suite on the virtual board and report
it pytest-style. One board serves the module: the second run finds the suite deployed."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.hil import SUITE
from tools.sim.board import VirtualBoard

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VirtualBoard]:
    with VirtualBoard(tmp_path_factory.mktemp("hil") / "node") as b:
        yield b


def test_hil_suite_on_the_virtual_board(vboard: VirtualBoard) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "tools.cli", "hil", "--port", vboard.port, "-k", "not million"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    out = p.stdout
    assert p.returncode == 0, out + p.stderr
    assert "tests/hil/mptest_board_api.py::test_rtc_memory_round_trip PASSED" in out
    assert "test_radio_joins_configured_network SKIPPED (needs a real radio)" in out
    assert "tests/protocol/mptest_codec.py::test_valid_frames_decode PASSED" in out
    assert "test_sha512_million_a" not in out
    assert " passed, " in out and "skipped in" in out
    assert "mem before" in out


def pytest_on_board(port: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-rs",
         "--hil-port", port, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


def test_pytest_hil_port_runs_the_suite_on_the_board(vboard: VirtualBoard) -> None:
    p = pytest_on_board(vboard.port, *SUITE, "-k", "not million", "-v")
    out = p.stdout
    assert p.returncode == 0, out + p.stderr
    # One pytest item per on-device test, run on the board, not on the unix port.
    assert "tests/hil/mptest_board_api.py::test_rtc_memory_round_trip[board] PASSED" in out
    assert "tests/protocol/mptest_codec.py::test_valid_frames_decode[board] PASSED" in out
    assert "test_radio_joins_configured_network[board] SKIPPED" in out
    assert "SKIPPED [1] tests/hil/mptest_board_api.py:1: needs a real radio" in out
    assert "on the board: Torpor virtual board (sim)" in out and "mem before" in out
    m = re.search(r"(\d+) passed, (\d+) skipped, (\d+) deselected", out)
    assert m, out
    passed, skipped, deselected = map(int, m.groups())
    assert skipped == 3  # radio, sensor, and the harness's own skip test
    assert passed >= 20
    # the same modules' unix-port items and the million-a test are left out
    assert deselected >= passed + skipped


def test_pytest_hil_port_reports_a_failure_with_the_board_traceback(vboard: VirtualBoard) -> None:
    # A directory where the filesystem test writes its file: the test fails on the board.
    def mpremote(*args: str) -> None:
        p = subprocess.run([sys.executable, "-m", "mpremote", "connect", vboard.port, *args],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stdout + p.stderr

    mpremote("fs", "mkdir", ":hil_tmp.bin")
    try:
        p = pytest_on_board(vboard.port, "tests/hil", "-k", "filesystem or unique_id",
                            "--hil-board", "sim")
    finally:
        mpremote("fs", "rmdir", ":hil_tmp.bin")
    out = p.stdout
    assert p.returncode == 1, out + p.stderr
    assert "on the board: tests/hil/mptest_board_api.py::test_flash_filesystem_write_read" in out
    assert "Traceback (most recent call last):" in out and "OSError" in out
    assert re.search(r"1 failed, 1 passed, \d+ deselected", out), out
    # the wrong board: no item runs, the error names both
    p = pytest_on_board(vboard.port, "tests/hil", "--hil-board", "esp32")
    assert p.returncode != 0
    assert "the board on the port is sim, not esp32" in p.stdout


def test_without_hil_port_nothing_changes() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist",
         "--collect-only", "-q", "tests/hil"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[board]" not in p.stdout
    assert "tests/hil/mptest_board_api.py::test_rtc_memory_round_trip" in p.stdout


def test_hil_reports_no_board(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "tools.cli", "hil", "--port", str(tmp_path / "nope")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert p.returncode == 3 and "no board on" in p.stderr


def test_results_table_keeps_long_test_names_whole() -> None:
    from tools.hil import HilResult, summary_lines

    long = HilResult("tests/hil/mptest_board_api.py",
                     "test_rtc_memory_survives_deep_sleep_and_watchdog_but_not_power_loss",
                     "passed", 12, 1000, 900, 1000, "")
    short = HilResult("tests/x.py", "test_a", "skipped", 1, 10, 10, 10, "no radio")
    lines = summary_lines([long, short], 1.5)
    assert lines[1].startswith(long.nodeid + " passed")
    assert lines[2].startswith("tests/x.py::test_a ")
    # the columns line up under the header
    col = lines[0].index("result")
    assert lines[1][col:].startswith("passed") and lines[2][col:].startswith("skipped")
    assert "1 passed, 1 skipped in 1.50s" in lines[-1]
