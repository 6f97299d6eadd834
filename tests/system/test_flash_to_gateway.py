"""From the bench to the fleet: `torpor flash` provisions a (virtual) board over its serial port,
then the node joins a real gateway (`torpor gateway run`, its supervised Mosquitto with mutual
TLS) and its readings land in the gateway's database, attributed to its certificate."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.security.pki import Pki
from gateway.store import db, devices, readings
from tests.fixtures.broker import free_port
from tools.sim.board import VirtualBoard

ROOT = Path(__file__).resolve().parents[2]
DEVICE = "bench-1"
TIME_SCALE = 100  # a 10 s sample interval passes in 0.1 s


def gateway_config(tmp: Path, pki: Pki, port: int) -> Path:
    path = tmp / "gateway.toml"
    path.write_text(
        f'[gateway]\ndata_dir = "{tmp / "data"}"\nstatus_interval_s = 0.2\n'
        f'[broker]\nmode = "supervised"\nhost = "127.0.0.1"\nport = {port}\n'
        f'pki_dir = "{pki.path}"\n'
    )
    return path


def stored(db_path: Path) -> tuple[list[int], str]:
    conn = db.open_db(db_path)
    try:
        ids = [int(r[1]) for r in readings.iter_readings(conn, DEVICE)]
        dev = devices.find(conn, DEVICE)
        return ids, dev.status if dev is not None else ""
    finally:
        conn.close()


def test_flashed_board_joins_the_gateway_and_delivers(pki: Pki, tmp_path: Path) -> None:
    if not Path("/usr/sbin/mosquitto").exists() and subprocess.run(
        ["sh", "-c", "command -v mosquitto"], capture_output=True).returncode != 0:
        pytest.skip("mosquitto is not installed (`make mosquitto`)")
    port = free_port()
    config = gateway_config(tmp_path, pki, port)
    db_path = tmp_path / "data" / "gateway.db"
    gw_log = tmp_path / "gateway.log"
    deadline = time.monotonic() + 50
    with open(gw_log, "ab") as out:
        gw = subprocess.Popen(
            [sys.executable, "-m", "tools.cli", "gateway", "run", "--config", str(config)],
            stdout=out, stderr=out, cwd=ROOT,
        )
    board = VirtualBoard(tmp_path / "node", time_scale=TIME_SCALE)
    try:
        board.start()
        p = subprocess.run(
            [sys.executable, "-m", "tools.cli", "flash", "--port", board.port, "--board", "sim",
             "--device-id", DEVICE, "--pki", str(pki.path), "--db", str(db_path),
             "--gateway", f"127.0.0.1:{port}", "--server-hostname", "localhost",
             "--set", "send_every=1", "--set", "sample_interval_s=10", "--format",
             "--log-seconds", "1"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )
        assert p.returncode == 0, p.stdout + p.stderr
        assert f"registered {DEVICE}" in p.stdout
        # The flash issued the certificate from the gateway's PKI...
        serial = format(pki.device_credentials(DEVICE).serial, "x")
        assert f"certificate {serial}" in p.stdout
        # ...and the node, reset by the flash, wakes, connects with it and delivers.
        ids: list[int] = []
        status = ""
        while time.monotonic() < deadline:
            ids, status = stored(db_path)
            if len(ids) >= 3 and status == "active":
                break
            assert gw.poll() is None, gw_log.read_text()
            time.sleep(0.2)
        board_log = (board.dir / "board.log").read_text(errors="replace")
        assert len(ids) >= 3, f"readings stored: {ids}\n{board_log[-3000:]}\n{gw_log.read_text()}"
        assert status == "active"
        assert ids == list(range(ids[0], ids[0] + len(ids))), ids  # no gap, no duplicate
        assert "ack cumulative=" in board_log
    finally:
        board.stop()
        gw.send_signal(signal.SIGTERM)
        try:
            code = gw.wait(15)
        except subprocess.TimeoutExpired:
            gw.kill()
            code = gw.wait(5)
    assert code == 0, gw_log.read_text()
    conn = db.open_db(db_path)
    try:
        hwm, _, total = readings.stats(conn, DEVICE)
    finally:
        conn.close()
    assert total >= len(ids) and hwm >= ids[-1]
