"""The README's five-minute tour, walked row by row as written.

Every command in the tour table runs in a new empty directory, in order, through bash, with
the venv's `torpor` on PATH: against the real gateway (its own Mosquitto with mutual TLS)
that the tour's own rows start, and the virtual board for the flash and HIL rows. Each
command's output is checked. The one change made to the text: the tour's broker port 18883
becomes a free port, so parallel runs do not collide. Commands that need a real board on
/dev/ttyUSB0 are not run (a separate test skips them with the reason); the virtual-board
commands of the same rows are.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.mpharness import micropython_binary

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TOUR_PORT = "18883"
HARDWARE = "/dev/ttyUSB0"

pytestmark = [
    pytest.mark.skipif(micropython_binary() is None, reason="no MicroPython unix port"),
    pytest.mark.skipif(
        shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
        reason="mosquitto is not installed (`make mosquitto`)",
    ),
]


def tour_rows() -> list[tuple[str, list[str]]]:
    """(what the row is for, its commands) for every row of the tour table."""
    text = README.read_text()
    section = text.split("## Five-minute tour", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| to…") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 3, f"a tour row must have 3 cells: {line}"
        runs = [c for c in re.findall(r"`([^`]+)`", cells[1])
                if c.startswith(("torpor ", "pytest ", "printf ", "shared/"))]
        assert runs, f"a tour row without a command: {line}"
        rows.append((cells[0], runs))
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Tour:
    """The shell a newcomer types into: one directory, the venv on PATH, jobs in the
    background."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.port = str(_free_port())
        self.env = dict(os.environ)
        self.env.pop("TORPOR_CONFIG", None)
        self.env["PATH"] = f"{Path(sys.executable).parent}:{self.env.get('PATH', '')}:/usr/sbin"
        self.background: list[subprocess.Popen[bytes]] = []
        self.times: list[tuple[str, float]] = []
        self.commands: list[str] = []  # what `torpor --help` lists
        self.skipped: list[str] = []  # commands for hardware that is not here

    def text(self, command: str) -> str:
        return command.replace(TOUR_PORT, self.port)

    def run(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        t0 = time.monotonic()
        p = subprocess.run(["bash", "-c", self.text(command)], cwd=self.cwd, env=self.env,
                           capture_output=True, text=True, timeout=timeout)
        self.times.append((command, time.monotonic() - t0))
        return p

    def start(self, command: str, log: str) -> subprocess.Popen[bytes]:
        assert command.endswith(" &"), command
        with open(self.cwd / log, "ab") as out:
            proc = subprocess.Popen(["bash", "-c", "exec " + self.text(command[:-2])],
                                    cwd=self.cwd, env=self.env, stdout=out, stderr=out,
                                    start_new_session=True)
        self.background.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.background):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)


def ok(p: subprocess.CompletedProcess[str], *expected: str) -> str:
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    for e in expected:
        assert e in out, (e, out[-3000:])
    return out


# ---- the checks, one per command of the table (in the README's words) ----------------

def _help(t: Tour, c: str) -> None:
    out = ok(t.run(c), "usage: torpor")
    t.commands = re.findall(r"^    (\w[\w-]*)\s", out, re.M)
    assert {"sim", "gateway", "device", "flash", "hil", "ota", "fw", "bench", "pki"} <= set(
        t.commands)


def _command_help(t: Tour, c: str) -> None:
    # `torpor <command> --help` for every command `torpor --help` lists, in this process
    # (the same parser, without a dozen interpreter starts).
    from tools.cli import main

    for name in t.commands:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0 and f"usage: torpor {name}" in out.getvalue(), name


def _spec(t: Tour, c: str) -> None:
    path = c.split()[0]
    assert (ROOT / path).is_file()
    assert "generated" in (ROOT / "docs" / "protocol.md").read_text()[:2000].lower()


def _gateway_up(t: Tour, c: str) -> None:
    proc = t.start(c, "gateway.log")
    from gateway.store import db
    from gateway.store import status as status_store

    dbp = t.cwd / "var" / "gw" / "gateway.db"
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        assert proc.poll() is None, (t.cwd / "gateway.log").read_text()[-3000:]
        if dbp.exists():
            with contextlib.suppress(sqlite3.Error, Exception):
                conn = db.connect(dbp, readonly=True)
                try:
                    st = status_store.read_status(conn)
                finally:
                    conn.close()
                if st.running and st.detail.get("mqtt_connected"):
                    return
        time.sleep(0.3)
    raise AssertionError((t.cwd / "gateway.log").read_text()[-3000:])


def _sim_node_first(t: Tour, c: str) -> None:
    out = ok(t.run(c), "provisioned n1: broker 127.0.0.1:", "[wakes] 5/5", "failed_runs            0")
    sent = int(re.search(r"^sent\s+(\d+)", out, re.M).group(1))  # type: ignore[union-attr]
    assert sent >= 4, out


def _device_show(t: Tour, c: str) -> None:
    out = ok(t.run(c), "device:          n1", "ping")
    rssi = int(re.search(r"^rssi:\s+(-?\d+) dBm", out, re.M).group(1))  # type: ignore[union-attr]
    assert -100 <= rssi <= -30, out
    assert re.search(r"\bdone\s+ping\s.*result ok", out), out


def _board_up(t: Tour, c: str) -> None:
    proc = t.start(c, "board.log")
    link = t.cwd / "board.tty"
    deadline = time.monotonic() + 30
    while not link.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (t.cwd / "board.log").read_text()
        time.sleep(0.1)


def _pki_list(t: Tour, c: str) -> None:
    out = ok(t.run(c))
    n3 = [line for line in out.splitlines() if re.search(r"\bn3\b", line)]
    assert n3 and re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d\s*$", n3[0]), out  # revoked at


def _gateway_toml(t: Tour, c: str) -> None:
    ok(t.run(c))
    text = (t.cwd / "gateway.toml").read_text()
    assert 'data_dir = "var/gw"' in text and f"port = {t.port}" in text, text


def _hardware(t: Tour, c: str) -> None:
    t.skipped.append(c)


def checks() -> dict[str, Callable[[Tour, str], None]]:
    def expect(*words: str) -> Callable[[Tour, str], None]:
        def check(t: Tour, c: str) -> None:
            ok(t.run(c), *words)

        return check

    return {
        "torpor --help": _help,
        "torpor <command> --help": _command_help,
        "shared/protocol/torpor.toml": _spec,
        "torpor pki init --dir var/gw/pki": expect("created CA"),
        "torpor pki server --dir var/gw/pki --san localhost,127.0.0.1": expect("issued server certificate"),
        "torpor pki gateway --dir var/gw/pki": expect("issued gateway certificate"),
        "printf '[gateway]\\ndata_dir = \"var/gw\"\\n[broker]\\nport = 18883\\n' > gateway.toml":
            _gateway_toml,
        "torpor gateway run --config gateway.toml &": _gateway_up,
        "torpor gateway status --config gateway.toml": expect("running", "database:"),
        "torpor sim node --dir var/n1 --gateway-config gateway.toml --cycles 5": _sim_node_first,
        "torpor device send n1 ping --config gateway.toml": expect("n1: queued command", "(ping)"),
        "torpor sim node --dir var/n1 --cycles 2": expect("[wakes] 2/2", "failed_runs            0"),
        "torpor device show n1 --config gateway.toml": _device_show,
        "torpor sim fleet --nodes 10 --wakes 3 --time-scale 60 --gateway-config gateway.toml --dir var/fleet":
            expect("nodes                 10", "(missing 0, duplicated 0)", "[fleet] "),
        "torpor gateway config-example": expect("[upstream]", "# enabled = false"),
        "torpor device add n3 --issue-cert --config gateway.toml": expect("n3: provisioned"),
        "torpor device revoke n3 --config gateway.toml": expect("n3: revoked", "broker: reloaded"),
        "torpor pki list --dir var/gw/pki": _pki_list,
        "torpor flash --port /dev/ttyUSB0 --board esp32 --device-id n2 --gateway-config gateway.toml "
        "--gateway PI_ADDRESS:18883 --wifi-ssid SSID --wifi-password PASSWORD": _hardware,
        "torpor sim board --pty --link board.tty &": _board_up,
        "torpor flash --port board.tty --board sim --device-id b1 --gateway-config gateway.toml":
            expect("verified SHA-256 of", "registered b1", "--- first boot"),
        "torpor hil --port /dev/ttyUSB0": _hardware,
        "pytest --hil-port /dev/ttyUSB0": _hardware,
        "torpor hil --port board.tty -k board_api":
            expect("mptest_board_api.py::test_rtc_memory_round_trip", " passed"),
        "torpor fw keygen --out var/keys": expect("var/keys/firmware-signing.pub"),
        "torpor fw build --board sim --version 2 --out var/v2": expect("built sim v2"),
        "torpor fw sign --key var/keys/firmware-signing.key var/v2": expect("signed sim v2"),
        "torpor ota campaign create --config gateway.toml --image var/v2 --devices n1 "
        "--pubkey var/keys/firmware-signing.pub": expect("campaign 1: v2", "to 1 device(s)"),
        "torpor ota status 1 --config gateway.toml": expect("campaign 1: v2 running", "n1"),
        "torpor bench protocol": expect("struct"),
        "torpor bench --help": expect("node", "gateway", "downlink", "ota"),
    }


@pytest.fixture
def tour(tmp_path: Path) -> Iterator[Tour]:
    t = Tour(tmp_path / "tour")
    t.cwd.mkdir()
    try:
        yield t
    finally:
        t.stop()


def test_every_tour_command_has_its_check() -> None:
    written = [c for _, cmds in tour_rows() for c in cmds]
    assert sorted(written) == sorted(checks()), set(written) ^ set(checks())


def test_readme_tour_as_written(tour: Tour) -> None:
    table = checks()
    tour.skipped = []
    t0 = time.monotonic()
    for row, commands in tour_rows():
        for command in commands:
            check = table.get(command)
            assert check is not None, f"row {row!r}: no check for {command!r}"
            check(tour, command)
    wall = time.monotonic() - t0
    for command, seconds in tour.times:
        print(f"{seconds:6.1f} s  {command[:100]}")
    print(f"tour: {wall:.1f} s wall; not run (need {HARDWARE}): {tour.skipped}")
    assert tour.skipped == [c for c in table if HARDWARE in c]


@pytest.mark.parametrize("command", [c for _, cmds in tour_rows() for c in cmds if HARDWARE in c])
def test_readme_tour_hardware_rows(command: str) -> None:
    pytest.skip(f"needs a real board on {HARDWARE}; the tour runs the virtual-board commands "
                f"of the same rows instead: {command}")
