"""The bootloader's decision table: docs/bootloader.md prints it as firmware/boot.py has it,
and every row of it is reached by a record on a real littlefs image with signed images,
through boot.choose() on the MicroPython unix port."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.firmware.test_boot_power_cut import make_image
from tests.mpharness import micropython_binary, mp_env
from tools.fw import boot_table, keys
from tools.sim.node import BOARD_SHIM


def test_the_doc_prints_the_table_of_the_code() -> None:
    now, want = boot_table.expected()
    assert now == want, "docs/bootloader.md differs from firmware/boot.py's TABLE: run python -m tools.fw.boot_table"


def test_the_table_reads_every_fact_and_action_with_its_text() -> None:
    t = boot_table.read(boot_table.BOOT_PY.read_text())
    assert len(t.rows) == 10
    assert {a.name for a in t.actions} == {"_RECOVER", "_REVERT", "_START_TRIAL", "_START_ACTIVE", "_FALL_BACK", "_SLEEP"}
    with pytest.raises(boot_table.TableError):
        boot_table.read("TABLE = ((((F_X, 1),), START, NONE),)\n")  # F_X is no fact


ROWS = r"""
import os
import simflash, bootstate, slots, vfs
import board

ns = {"__name__": "boot_table"}
with open(__BOOT_PY__) as f:
    exec(f.read(), ns)
choose = ns["choose"]
DIR = __DIR__
ROOT = "/flash"


def read(p):
    with open(p, "rb") as f:
        return f.read()


simflash.mount(DIR + "/flash.img", ROOT, 4096, 40)
for d in ("/fw", "/fw/a", "/fw/b"):
    os.mkdir(ROOT + d)
for slot, v in (("a", 1), ("b", 2)):
    for name in os.listdir(DIR + "/v%d" % v):
        if name != "stream.bin":
            with open(ROOT + "/fw/%s/%s" % (slot, name), "wb") as f:
                f.write(read(DIR + "/v%d/%s" % (v, name)))


def flip(slot):
    # Same size, one byte inverted (twice: back as it was): only a hash check sees it.
    p = ROOT + "/fw/%s/app.mpy" % slot
    data = bytearray(read(p))
    data[0] ^= 0xFF
    with open(p, "wb") as f:
        f.write(data)


def grow(slot):
    # One byte more: the size check of every boot sees it.
    with open(ROOT + "/fw/%s/app.mpy" % slot, "ab") as f:
        f.write(b"\x00")


def record(**kw):
    if kw.get("none"):
        try:
            os.remove(ROOT + "/fw/state.json")
        except OSError:
            pass
        return
    st = bootstate.new("a", 1)
    if kw.get("trial"):
        bootstate.set_trial(st, "b", 2, kw.get("max", 1), kw.get("nmax", 24))
        st["tboots"] = kw.get("tboots", 0)
        st["nonet"] = kw.get("nonet", 0)
    bootstate.save(ROOT, st)


def row(n, cause=board.POWER_ON):
    bootstate.report = None
    picked = choose(ROOT, cause)
    st = bootstate.load(ROOT)
    print("ROW", n, picked, None if st is None else (st["active"], st["ver"], st["trial"], st["tboots"], st["ota"], st["reason"]))


record(none=True)
row(1)  # recover: the newest slot that checks out (b, v2), confirmed
flip("a")
flip("b")
record(none=True)
row(2)
flip("a")
flip("b")
record(trial=True)
row(0, board.CRASH)  # a crash cause before the first trial boot is the old image's
record(trial=True, tboots=1)
row(3, board.CRASH)
record(trial=True, tboots=1)
row(4)
record(trial=True, tboots=3, nonet=3, nmax=2)
row(5, board.TIMER)
flip("b")
record(trial=True)
row(6)
flip("b")
record(trial=True)
row(7, board.SOFT_RESET)
record()
row(8, board.TIMER)
grow("a")
record()
row(9)
grow("b")
row(10)
print("DONE")
"""

EXPECT = [
    "ROW 1 ('b', 2, False) ('b', 2, '', 0, 0, 0)",
    "ROW 2 None None",
    "ROW 0 ('b', 2, True) ('a', 1, 'b', 1, 3, 0)",  # row 7: the trial starts
    "ROW 3 ('a', 1, False) ('a', 1, '', 0, 5, 10)",  # reverted, crashed
    "ROW 4 ('a', 1, False) ('a', 1, '', 0, 5, 9)",  # reverted, health_check
    "ROW 5 ('a', 1, False) ('a', 1, '', 0, 5, 9)",
    "ROW 6 ('a', 1, False) ('a', 1, '', 0, 5, 3)",  # reverted, bad_hash (the check's)
    "ROW 7 ('b', 2, True) ('a', 1, 'b', 1, 3, 0)",  # trial, its boot counted first
    "ROW 8 ('a', 1, False) ('a', 1, '', 0, 0, 0)",
    "ROW 9 ('b', 2, False) ('b', 2, '', 0, 5, 3)",  # fell back, the check's reason
    "ROW 10 None ('b', 2, '', 0, 5, 3)",
    "DONE",
]


def test_every_row_of_the_table_is_reached_by_its_record(tmp_path: Path) -> None:
    binary = micropython_binary()
    if binary is None:
        pytest.skip("the MicroPython unix port (`micropython`) is not installed")
    key = Ed25519PrivateKey.generate()
    pub = keys.public_raw(key.public_key())
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / keys.FLEET_KEYS_NAME).write_text(keys.fleet_keys_source({keys.key_id(pub): pub}))
    (lib / "board.py").write_text(BOARD_SHIM)
    make_image(tmp_path, key, 1)
    make_image(tmp_path, key, 2)
    code = ROWS.replace("__DIR__", repr(str(tmp_path))).replace("__BOOT_PY__", repr(str(boot_table.BOOT_PY)))
    proc = subprocess.run([binary, "-c", code], env=mp_env([str(lib)], TORPOR_SIM_DIR=str(tmp_path)),
                          capture_output=True, text=True, timeout=120)
    got = [ln for ln in proc.stdout.splitlines() if ln.startswith(("ROW", "DONE"))]
    assert got == EXPECT, proc.stdout[-3000:] + proc.stderr[-2000:]
