"""Power cuts against the flash queue: a MicroPython worker appends, acks and compacts on a
littlefs image while this test kills it (SIGKILL at random moments, or a torn block write
inside the block device), then checks the reopened queue against everything the worker
reported as done."""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.mpharness import micropython_binary, mp_env

WORKER = r"""
import os, struct, sys
import simflash, flashq
img, seed = sys.argv[1], int(sys.argv[2])
simflash.mount(img, "/flash", 4096, 96)
q = flashq.FlashQueue("/flash/q", 10, 5000, seg_records=16)
ss = q.slot_size
buf = bytearray(ss * 600)
n = q.read_into(buf)
for j in range(n):
    o = j * ss
    print("L", flashq.FlashQueue.slot_id(buf, j, ss), buf[o + 4], bytes(buf[o + 6:o + ss]).hex())
print("N", q.next_id)

def rec(i):
    return struct.pack("<IIH", (i * 2654435761) & 0xFFFFFFFF, i, i & 0xFFFF)

def say(line):
    # one write() per event, so a kill never leaves half a line
    sys.stdout.write(line + "\n")

x = seed or 1
for step in range(400):
    x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    r = x % 100
    if r < 60 or q.depth == 0:
        i = q.append(rec(q.next_id), x % 3)
        say("A %d %d" % (i, x % 3))
    elif r < 92:
        k = q.read_into(buf)
        if k > 8:
            k = 8
        sent = [flashq.FlashQueue.slot_id(buf, j, ss) for j in range(k)]
        cut = (x >> 8) % k
        sel = [s for j, s in enumerate(sent) if j > cut and (x >> (12 + j)) & 1]
        say("k %d %s" % (sent[cut], " ".join(str(s) for s in sel)))
        q.ack(sent[cut], sel)
        say("K %d %s" % (sent[cut], " ".join(str(s) for s in sel)))
    else:
        q.compact()
        say("C")
"""


def rec(i: int) -> bytes:
    return ((i * 2654435761) & 0xFFFFFFFF).to_bytes(4, "little") + i.to_bytes(4, "little") + (
        i & 0xFFFF
    ).to_bytes(2, "little")


@dataclass
class Model:
    prio: dict[int, int] = field(default_factory=dict)  # every id an append returned
    acked: set[int] = field(default_factory=set)  # ids covered by an ack that was started
    top: int = 0  # highest id ever returned
    cuts: int = 0
    torn: int = 0
    reappeared: int = 0

    def feed(self, lines: list[str]) -> None:
        for line in lines:
            parts = line.split()
            if not parts or not line.endswith("\n"):
                continue
            if parts[0] == "A":
                i, p = int(parts[1]), int(parts[2])
                assert i > self.top, f"id {i} not above {self.top}"
                self.prio[i] = p
                self.top = i
            elif parts[0] in ("K", "k"):
                # "k": an ack about to be applied; if the cut falls inside it, the readings
                # it covers may be gone (the gateway has them) or still there
                cum = int(parts[1])
                self.acked.update(j for j in self.prio if j <= cum)
                self.acked.update(int(s) for s in parts[2:])

    def check_open(self, lines: list[str]) -> None:
        present: dict[int, tuple[int, bytes]] = {}
        next_id = None
        for line in lines:
            parts = line.split()
            if parts and parts[0] == "L":
                present[int(parts[1])] = (int(parts[2]), bytes.fromhex(parts[3]))
            elif parts and parts[0] == "N":
                next_id = int(parts[1])
                break
        assert next_id is not None, "queue did not open:\n" + "\n".join(lines[-20:])
        assert next_id > self.top, f"next id {next_id} would reuse ids up to {self.top}"
        for i, (p, r) in present.items():
            assert r == rec(i), f"reading {i} corrupted"
            if i in self.prio:
                assert p == self.prio[i], f"reading {i} priority changed"
                if i in self.acked:
                    self.reappeared += 1
            else:
                # an append cut before it returned may or may not have landed; once
                # reported at open it is durable and must stay
                assert i > self.top, f"unknown reading {i}"
                self.prio[i] = p
                self.top = i
        for i in self.prio:
            if i not in self.acked:
                assert i in present, f"unacked reading {i} lost"


def run_cuts(tmp: Path, seed: int, kills: int, tears: int) -> Model:
    binary = micropython_binary()
    if binary is None:
        pytest.skip("the MicroPython unix port (`micropython`) is not installed")
    rng = random.Random(seed)
    img = tmp / "flash.img"
    model = Model()
    plan = ["kill"] * kills + ["tear"] * tears
    rng.shuffle(plan)
    for mode in plan + ["final"]:
        env = mp_env()
        if mode == "tear":
            env["TORPOR_SIMFLASH_TEAR"] = f"{rng.randrange(1, 120)}:{rng.randrange(1, 1 << 30)}"
        proc = subprocess.Popen(
            [binary, "-c", WORKER, str(img), str(rng.randrange(1, 1 << 30))],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        assert proc.stdout is not None
        watchdog = threading.Timer(20, proc.kill)
        watchdog.start()
        head: list[str] = []
        deadline = time.monotonic() + 20
        if mode != "tear":
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                head.append(line)
                if line.startswith("N "):
                    break
            if mode == "kill":
                time.sleep(rng.uniform(0, 0.03))
                proc.send_signal(signal.SIGKILL)
        # read the rest through the same buffered reader: readline() may have read ahead
        out = proc.stdout.read()
        proc.wait()
        watchdog.cancel()
        lines = head + out.splitlines(keepends=True)
        err = out  # the port prints an uncaught exception's traceback on stdout
        if mode == "tear":
            if "PowerCut" not in err:
                # the tear point fell after the run ended or before the queue opened
                assert proc.returncode == 0, (proc.returncode, err)
        elif mode == "final":
            assert proc.returncode == 0, err
        opened = any(x.startswith("N ") for x in lines)
        if opened:
            model.check_open(lines)
            model.feed(lines)
        else:
            # cut before the queue finished opening (torn write during open's clean-up)
            assert mode == "tear", f"queue did not open:\n{err}"
        model.cuts += mode == "kill"
        model.torn += mode == "tear" and "PowerCut" in err
    return model


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_power_cuts_lose_nothing(tmp_path: Path, seed: int) -> None:
    model = run_cuts(tmp_path, seed, kills=130, tears=40)
    assert model.cuts == 130
    assert model.torn > 20
    assert len(model.prio) > 100
