"""Every refusal of `torpor flash` (exit codes 3-8, and 9 and 10 where they come from the
image or the PKI) comes before anything is written: even with --format, the virtual board's
filesystem is afterwards exactly as it was."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.security.pki import Pki
from gateway.store import db, devices
from tools.flash import Board
from tools.sim.board import VirtualBoard

ROOT = Path(__file__).resolve().parents[2]

# Every file on the board (the sim board's own /.sim mount aside) with its SHA-256.
_SNAPSHOT = """
import os, hashlib, binascii
def walk(d, out):
    for e in os.ilistdir(d):
        p = d.rstrip('/') + '/' + e[0]
        if p == '/.sim':
            continue
        if e[1] & 0x4000:
            out.append((p + '/', ''))
            walk(p, out)
        else:
            h = hashlib.sha256()
            with open(p, 'rb') as f:
                h.update(f.read())
            out.append((p, binascii.hexlify(h.digest()).decode()))
out = []
walk('/', out)
print(repr(sorted(out)))
"""


def torpor(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def snapshot(port: str) -> list[tuple[str, str]]:
    with Board(port) as b:
        result: list[tuple[str, str]] = b.eval_code(_SNAPSHOT)
        return result


def set_identity(board: VirtualBoard, identity: dict[str, object] | None) -> None:
    path = board.dir / "simfiles" / "sim.json"
    cfg = json.loads(path.read_text())
    cfg.pop("identity", None)
    if identity:
        cfg["identity"] = identity
    path.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VirtualBoard, Path]]:
    tmp = tmp_path_factory.mktemp("refusals")
    Pki(tmp / "pki").init_ca()
    # The device "known" is registered already.
    conn = db.open_db(tmp / "gw.db")
    devices.add_missing(conn, {"known": "1a"})
    conn.close()
    with VirtualBoard(tmp / "node", time_scale=1000) as b:
        # Files that a --format would erase: the board's "firmware" and its data.
        with Board(b.port) as board:
            board.write("/main.py", b"print('the old firmware')\n")
            board.write("/lib/app.py", b"X = 1\n" * 100)
            board.write("/data/queue.bin", bytes(range(256)) * 30)
        yield b, tmp


def _flash(b: VirtualBoard, tmp: Path, *extra: str, port: str | None = None,
           device: str = "fresh", board: str = "sim") -> subprocess.CompletedProcess[str]:
    return torpor("flash", "--port", port or b.port, "--board", board, "--device-id", device,
                  "--pki", str(tmp / "pki"), "--db", str(tmp / "gw.db"), "--format",
                  "--log-seconds", "0", "--timeout", "4", *extra)


@pytest.mark.parametrize(
    ("code", "case"),
    [
        (3, "no board on the port"),
        (4, "not MicroPython"),
        (5, "wrong board"),
        (6, "MicroPython too old"),
        (7, "not enough flash"),
        (8, "already provisioned"),
        (9, "image does not verify"),
        (10, "no fleet CA"),
    ],
)
def test_refusal_leaves_the_board_untouched(
    setup: tuple[VirtualBoard, Path], code: int, case: str
) -> None:
    b, tmp = setup
    before = snapshot(b.port)
    assert ("/main.py", "") not in before and any(p == "/main.py" for p, _ in before)
    try:
        if code == 3:
            p = _flash(b, tmp, port=str(tmp / "no-such-port"))
            assert "no board on" in p.stderr
        elif code == 4:
            set_identity(b, {"implementation": "circuitpython"})
            p = _flash(b, tmp)
            assert "not MicroPython" in p.stderr
        elif code == 5:
            p = _flash(b, tmp, board="esp32")
            assert "not 'esp32'" in p.stderr
        elif code == 6:
            set_identity(b, {"version": [1, 19, 1]})
            p = _flash(b, tmp)
            assert "1.19.1 is too old" in p.stderr
        elif code == 7:
            # A board whose whole filesystem, once formatted, is smaller than the image.
            with VirtualBoard(tmp / "small", time_scale=1000, block_count=32) as small:
                with Board(small.port) as board:
                    board.write("/main.py", b"print('the old firmware')\n")
                    board.write("/data/queue.bin", bytes(range(256)) * 30)
                before_small = snapshot(small.port)
                p = _flash(small, tmp)
                assert "not enough flash" in p.stderr and "after formatting" in p.stderr
                assert snapshot(small.port) == before_small
        elif code == 8:
            p = _flash(b, tmp, device="known")
            assert "already provisioned" in p.stderr
        elif code == 9:
            from tools.fw import image, keys

            kp = keys.keygen(tmp / "keys")
            img = tmp / "img"
            image.build_image("sim", 3, img)
            image.sign_image(img, keys.load_private(kp.private))
            (img / "log.mpy").write_bytes((img / "log.mpy").read_bytes() + b"\x00")
            p = _flash(b, tmp, "--image", str(img), "--pubkey", str(kp.public))
            assert "does not match the manifest" in p.stderr
        else:
            p = _flash(b, tmp, "--pki", str(tmp / "no-pki"))
            assert "no fleet CA" in p.stderr
    finally:
        set_identity(b, None)
    assert p.returncode == code, (case, p.stdout, p.stderr)
    assert "formatting" not in p.stdout and "writing" not in p.stdout, p.stdout
    assert snapshot(b.port) == before, case
