"""`torpor hil` runs the on-device suite on the virtual board and reports it pytest-style."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tools.sim.board import VirtualBoard

ROOT = Path(__file__).resolve().parents[2]


def test_hil_suite_on_the_virtual_board(tmp_path: Path) -> None:
    with VirtualBoard(tmp_path / "node") as b:
        p = subprocess.run(
            [sys.executable, "-m", "tools.cli", "hil", "--port", b.port, "-k", "not million"],
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


def test_hil_reports_no_board(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "tools.cli", "hil", "--port", str(tmp_path / "nope")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert p.returncode == 3 and "no board on" in p.stderr
