"""`torpor flash` provisions a virtual board; its error paths have their own exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from gateway.security.pki import Pki
from gateway.store import db, devices
from tools.flash import Board
from tools.sim.board import VirtualBoard

ROOT = Path(__file__).resolve().parents[2]


def torpor(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_flash_provisions_a_virtual_board(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.init_ca()
    dbp = tmp_path / "gw.db"
    with VirtualBoard(tmp_path / "node", time_scale=1000) as b:
        common = ["flash", "--port", b.port, "--board", "sim", "--device-id", "node-7",
                  "--pki", str(tmp_path / "pki"), "--db", str(dbp), "--gateway", "127.0.0.1:18883"]
        p = torpor(*common, "--format", "--log-seconds", "2")
        assert p.returncode == 0, p.stdout + p.stderr
        assert "verified SHA-256" in p.stdout and "first boot" in p.stdout
        # the device is registered and has a certificate
        conn = db.open_db(dbp)
        dev = devices.get(conn, "node-7")
        conn.close()
        creds = pki.device_credentials("node-7")
        assert dev.cert_serial == format(creds.serial, "x")
        assert dev.board is None  # the sim board is no board profile
        # again: refused, then allowed with --reprovision
        p = torpor(*common, "--log-seconds", "0")
        assert p.returncode == 8 and "already provisioned" in p.stderr
        # The gateway already holds readings up to id 500 from this device: after a
        # re-flash that erased its queue, new readings must start above them.
        conn = db.open_db(dbp)
        with db.transaction(conn):
            conn.execute("INSERT INTO dedup(device, hwm, ranges, total) VALUES ('node-7', 480, '490-500', 491)")
        conn.close()
        p = torpor(*common, "--reprovision", "--format", "--log-seconds", "3")
        assert p.returncode == 0, p.stderr
        assert "new readings start at id 501" in p.stdout
        assert "R id=501 " in p.stdout, p.stdout
        # wrong board
        p = torpor("flash", "--port", b.port, "--board", "esp32", "--device-id", "x1",
                   "--pki", str(tmp_path / "pki"), "--db", str(dbp))
        assert p.returncode == 5 and "not 'esp32'" in p.stderr
        with Board(b.port) as board:
            cfg = json.loads(board.exec("print(open('/config.json').read())").decode())
            assert cfg["device_id"] == "node-7" and cfg["broker_port"] == 18883
            assert cfg["first_reading_id"] == 501
            assert board.sha256("/certs/cert.der") == hashlib.sha256(creds.cert_der.read_bytes()).digest()
            assert board.sha256("/certs/ca.der") == hashlib.sha256(creds.ca_der.read_bytes()).digest()


def test_flash_registers_the_board_it_flashed(tmp_path: Path) -> None:
    """What `torpor flash --board NAME` writes to the registry once the board is verified:
    the device with that board, and on a reflash (--reprovision) the board flashed now."""
    from tools.flash import register_device

    dbp = tmp_path / "gw.db"
    register_device(dbp, "n1", "ab", "esp32c3")
    register_device(dbp, "n2", "cd", "sim")
    conn = db.open_db(dbp)
    assert (devices.get(conn, "n1").board, devices.get(conn, "n1").cert_serial) == ("esp32c3", "ab")
    assert devices.get(conn, "n2").board is None
    conn.close()
    register_device(dbp, "n1", "ab", "pico2_w")  # the same id flashed onto another board
    conn = db.open_db(dbp)
    assert devices.get(conn, "n1").board == "pico2_w"
    conn.close()
    # Every board flash writes, but the sim, is a profile: its devices get energy figures.
    from gateway.config import board_models, parse_config
    from tools.flash import BOARDS

    names = board_models(parse_config({})).names
    assert {b for b, arch in BOARDS.items() if arch is not None} <= set(names)


def test_no_board_and_not_micropython(tmp_path: Path) -> None:
    p = torpor("flash", "--port", str(tmp_path / "nothing"), "--board", "sim", "--device-id", "a")
    assert p.returncode == 3 and "no board on" in p.stderr
    master, slave = os.openpty()  # a silent serial device
    try:
        p = torpor("flash", "--port", os.ttyname(slave), "--board", "sim", "--device-id", "a",
                   "--timeout", "2")
    finally:
        os.close(master)
        os.close(slave)
    assert p.returncode == 4 and "MicroPython" in p.stderr


def test_flash_bootloader_and_signed_image_boots_through_the_bootloader(tmp_path: Path) -> None:
    from tools.fw import image, keys

    kp = keys.keygen(tmp_path / "keys")
    img = tmp_path / "img"
    image.build_image("sim", 3, img)
    image.sign_image(img, keys.load_private(kp.private))
    Pki(tmp_path / "pki").init_ca()
    with VirtualBoard(tmp_path / "node", time_scale=1000) as b:
        common = ["flash", "--port", b.port, "--board", "sim", "--device-id", "node-9",
                  "--pki", str(tmp_path / "pki"), "--db", str(tmp_path / "gw.db"),
                  "--image", str(img), "--pubkey", str(kp.public), "--format"]
        # A file changed after signing: refused before anything is written.
        (img / "log.mpy").write_bytes((img / "log.mpy").read_bytes() + b"\x00")
        p = torpor(*common, "--log-seconds", "0")
        assert p.returncode == 9 and "does not match the manifest" in p.stderr, p.stdout + p.stderr
        image.build_image("sim", 3, img)
        image.sign_image(img, keys.load_private(kp.private))
        p = torpor(*common, "--log-seconds", "1.5")
        assert p.returncode == 0, p.stdout + p.stderr
        assert "/fw/a/manifest.sig" in p.stdout and "/lib/slots.py" in p.stdout
        # First boot: no state record, the bootloader checks slot A fully and confirms it,
        # then starts the app from it.
        assert "boot: recovered state: slot a v3" in p.stdout, p.stdout
        assert "boot: slot a v3 trial=0" in p.stdout
        assert "R id=1 " in p.stdout
