"""Plain mpremote against the virtual board on a pty: exec, fs, reset, soft reset, mip."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.sim.board import VirtualBoard


def mpremote(port: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mpremote", "connect", port, *args],
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture
def vboard(tmp_path: Path) -> Iterator[VirtualBoard]:
    with VirtualBoard(tmp_path / "node", time_scale=100) as b:
        yield b


def test_exec_and_board_identity(vboard: VirtualBoard) -> None:
    p = mpremote(vboard.port, "exec", "import os, board; print(os.uname().machine, board.NAME, 6*7)")
    assert p.returncode == 0, p.stderr
    assert "Torpor virtual board (sim)" in p.stdout and "sim 42" in p.stdout


def test_fs_cp_ls_cat_and_files_survive_reset(vboard: VirtualBoard, tmp_path: Path) -> None:
    src = tmp_path / "hello.txt"
    src.write_text("hello board\n")
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 20)
    p = mpremote(vboard.port, "fs", "cp", str(src), ":hello.txt", "+", "fs", "cp", str(blob), ":blob.bin")
    assert p.returncode == 0, p.stderr
    p = mpremote(vboard.port, "fs", "ls")
    assert "hello.txt" in p.stdout and "5120 blob.bin" in p.stdout
    assert mpremote(vboard.port, "fs", "cat", "hello.txt").stdout.strip() == "hello board"
    back = tmp_path / "back.bin"
    assert mpremote(vboard.port, "fs", "cp", ":blob.bin", str(back)).returncode == 0
    assert back.read_bytes() == blob.read_bytes()
    # hard reset, then a new session: RAM is fresh, flash is kept
    assert mpremote(vboard.port, "exec", "x = 5").returncode == 0
    assert mpremote(vboard.port, "reset").returncode == 0
    p = mpremote(vboard.port, "exec", "print('x' in globals(), open('hello.txt').read())")
    assert "False hello board" in p.stdout, p.stdout + p.stderr
    p = mpremote(vboard.port, "soft-reset", "exec", "print(len(open('blob.bin','rb').read()))")
    assert p.stdout.strip() == "5120", p.stderr


def test_errors_come_back_as_tracebacks(vboard: VirtualBoard) -> None:
    p = mpremote(vboard.port, "exec", "1/0")
    assert p.returncode != 0
    assert "ZeroDivisionError" in p.stdout + p.stderr


def test_main_py_runs_at_boot_and_deep_sleep_reboots(vboard: VirtualBoard, tmp_path: Path) -> None:
    main = tmp_path / "main.py"
    main.write_text("import board\nprint('woke', board.boot_cause())\nboard.deep_sleep(100)\n")
    assert mpremote(vboard.port, "fs", "cp", str(main), ":main.py").returncode == 0
    assert mpremote(vboard.port, "reset").returncode == 0
    import time

    deadline = time.monotonic() + 15
    log = vboard.dir / "board.log"
    while time.monotonic() < deadline and log.read_text(errors="replace").count("woke 1") < 2:
        time.sleep(0.2)
    assert log.read_text(errors="replace").count("woke 1") >= 2  # timer wakes after sleeps
    assert vboard.sleeps >= 2
    # Ctrl-C (mpremote's raw REPL entry) gets through between wakes
    p = mpremote(vboard.port, "fs", "rm", "main.py")
    assert p.returncode == 0, p.stderr


def test_mip_reaches_the_network(vboard: VirtualBoard) -> None:
    p = mpremote(vboard.port, "mip", "install", "aioble", timeout=60)
    out = p.stdout + p.stderr
    assert "Installing aioble" in out and "to /lib" in out
    assert "could not enter raw repl" not in out and "TransportError" not in out
