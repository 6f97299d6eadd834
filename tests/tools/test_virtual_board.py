"""Plain mpremote against the virtual board on a pty: exec, fs, reset, soft reset, mip.

One board serves the module: each test leaves the board as it found it (no main.py, the REPL
answering), so the restarts a test needs are its own, not a fresh board per test."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.sim.board import VirtualBoard


def mpremote(port: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mpremote", "connect", port, *args],
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def vboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VirtualBoard]:
    with VirtualBoard(tmp_path_factory.mktemp("vboard") / "node", time_scale=100) as b:
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
    back = tmp_path / "back.bin"
    p = mpremote(vboard.port, "fs", "ls", "+", "fs", "cat", "hello.txt",
                 "+", "fs", "cp", ":blob.bin", str(back))
    assert p.returncode == 0, p.stderr
    assert "hello.txt" in p.stdout and "5120 blob.bin" in p.stdout
    assert "hello board" in p.stdout
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
    log = vboard.dir / "board.log"
    start = log.read_text(errors="replace").count("woke 1")
    sleeps = vboard.sleeps
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and log.read_text(errors="replace").count("woke 1") < start + 2:
        time.sleep(0.05)
    assert log.read_text(errors="replace").count("woke 1") >= start + 2  # timer wakes after sleeps
    assert vboard.sleeps >= sleeps + 2
    # Ctrl-C (mpremote's raw REPL entry) gets through between wakes
    p = mpremote(vboard.port, "fs", "rm", "main.py")
    assert p.returncode == 0, p.stderr


def test_mip_reaches_the_network(vboard: VirtualBoard) -> None:
    p = mpremote(vboard.port, "mip", "install", "aioble", timeout=60)
    out = p.stdout + p.stderr
    assert "Installing aioble" in out and "to /lib" in out
    assert "could not enter raw repl" not in out and "TransportError" not in out
