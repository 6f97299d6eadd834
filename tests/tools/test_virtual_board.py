"""Plain mpremote against the virtual board on a pty: exec, fs, reset, soft reset, mip.

One board serves the module: each test leaves the board as it found it (no main.py, the REPL
answering), so the restarts a test needs are its own, not a fresh board per test."""

from __future__ import annotations

import os
import select
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


def test_session_right_after_reset_gets_its_repl(vboard: VirtualBoard) -> None:
    # The next session's Ctrl-C lands while `reset` still sleeps before machine.reset():
    # the program is interrupted and the raw REPL entry typed after it must be answered.
    for attempt in range(3):
        p = mpremote(vboard.port, "exec", "--no-follow",
                     "import time, machine; time.sleep_ms(400); machine.reset()")
        assert p.returncode == 0, p.stderr
        p = mpremote(vboard.port, "exec", "print('alive', 6*7)", timeout=15)
        assert p.returncode == 0 and "alive 42" in p.stdout, (attempt, p.stdout + p.stderr)


def test_ctrl_c_the_program_swallows_still_reaches_the_repl(
    vboard: VirtualBoard, tmp_path: Path
) -> None:
    # A program that catches the KeyboardInterrupt and then resets: the Ctrl-C came too late
    # for it, so the restart keeps main.py (which never gives the REPL back) from running and
    # the session typed meanwhile gets its raw REPL.
    main = tmp_path / "main.py"
    main.write_text("import time\nwhile True:\n    time.sleep_ms(20)\n")
    assert mpremote(vboard.port, "fs", "cp", str(main), ":main.py").returncode == 0
    try:
        code = ("import time, machine\ntry:\n    time.sleep_ms(400)\n"
                "except KeyboardInterrupt:\n    pass\nmachine.reset()\n")
        assert mpremote(vboard.port, "exec", "--no-follow", code).returncode == 0
        p = mpremote(vboard.port, "exec", "print('after', 6*7)", timeout=15)
        assert p.returncode == 0 and "after 42" in p.stdout, p.stdout + p.stderr
    finally:
        # Ctrl-C interrupts the endless main.py of a hard reset like on a real board
        assert mpremote(vboard.port, "reset").returncode == 0
        p = mpremote(vboard.port, "fs", "rm", ":main.py", timeout=15)
        assert p.returncode == 0, p.stdout + p.stderr


def test_input_typed_while_a_program_runs_waits_for_the_repl(vboard: VirtualBoard) -> None:
    # Bytes that arrive while code runs are buffered, as in a UART FIFO, not dropped.
    fd = os.open(vboard.port, os.O_RDWR | os.O_NOCTTY)
    try:
        out = bytearray()

        def read_until(end: bytes, limit: float = 10) -> None:
            deadline = time.monotonic() + limit
            while not out.endswith(end):
                left = deadline - time.monotonic()
                assert left > 0, bytes(out[-300:])
                if select.select([fd], [], [], min(left, 0.5))[0]:
                    out.extend(os.read(fd, 4096))

        os.write(fd, b"\r\x03\r\x01")
        read_until(b"raw REPL; CTRL-B to exit\r\n>")
        os.write(fd, b"import time; time.sleep_ms(300); print('one')\x04")
        read_until(b"OK")
        # typed during the sleep: the next program and its end-of-input
        os.write(fd, b"print('two')\x04\x02")
        read_until(b">>> ")
        text = bytes(out)
        assert b"one\r\n\x04\x04>OKtwo\r\n\x04\x04>" in text, text[-300:]
    finally:
        os.close(fd)


def test_repl_entry_while_main_py_wakes_every_few_ms(tmp_path: Path) -> None:
    # 60 s sleeps at time scale 1000: output never stops, yet Ctrl-C gets the REPL.
    main = tmp_path / "main.py"
    main.write_text("import board\nprint('wake', board.boot_cause())\nboard.deep_sleep(60000)\n")
    with VirtualBoard(tmp_path / "node", time_scale=1000) as b:
        assert mpremote(b.port, "fs", "cp", str(main), ":main.py").returncode == 0
        assert mpremote(b.port, "reset").returncode == 0
        log = b.dir / "board.log"
        deadline = time.monotonic() + 10
        while b.sleeps < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert b.sleeps >= 5, log.read_text(errors="replace")[-500:]
        for i in range(6):
            time.sleep(0.013 * i)  # land in different parts of the wake cycle
            p = mpremote(b.port, "exec", "print('repl', 6*7)", timeout=15)
            assert p.returncode == 0 and "repl 42" in p.stdout, (i, p.stdout + p.stderr)
            assert mpremote(b.port, "reset").returncode == 0  # main.py runs again
            time.sleep(0.15)
        p = mpremote(b.port, "fs", "rm", ":main.py", timeout=15)
        assert p.returncode == 0, p.stdout + p.stderr


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
    while time.monotonic() < deadline and (
        log.read_text(errors="replace").count("woke 1") < start + 2 or vboard.sleeps < sleeps + 2
    ):
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


def test_profile_board_starts_cold_and_its_watchdog_resets_it(tmp_path: Path) -> None:
    from tools.sim.field import FieldModel

    field = FieldModel.named("esp32")
    with VirtualBoard(tmp_path / "node", time_scale=100, field=field) as b:
        p = mpremote(b.port, "exec", "import board, gc; print('T', board.time(), gc.mem_free() + gc.mem_alloc())")
        assert p.returncode == 0, p.stderr
        _, t, heap = p.stdout.split()
        # Power-on: the RTC reads 2000-01-01; the heap is the profile's, scaled for 64 bits.
        assert 946_684_800 <= int(t) < 946_684_800 + 120
        assert int(heap) <= field.profile.heap_for_unix_port() + 64 * 1024
        # Armed and never fed: the board resets with cause WATCHDOG, flash kept.
        p = mpremote(b.port, "exec", "--no-follow", "with open('kept', 'w') as f: f.write('1')\nimport board; board.watchdog_start(300)")
        assert p.returncode == 0, p.stderr
        time.sleep(1.5)
        # `resume`: no soft reset of its own, so the boot cause is the watchdog's.
        p = mpremote(b.port, "resume", "exec", "import board; print('C', board.boot_cause(), open('kept').read())")
        assert "C 2 1" in p.stdout, p.stdout + p.stderr
