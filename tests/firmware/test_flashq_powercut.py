"""Power cuts against the flash queue: a MicroPython worker appends, acks and compacts on a
littlefs image while this test kills it (SIGKILL at random moments, or a torn block write
inside the block device), then checks the reopened queue against everything the worker
reported as done.

The every-operation test does it MCUboot's way (run_perm_with_fails): a fixed scenario runs
once on a clean image to count its flash operations (programs and erases), then once per
operation index with that operation torn, each time from the same starting image."""

from __future__ import annotations

import copy
import math
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
    dropping: bool = False  # an append into a full queue started and did not return

    def feed(self, lines: list[str]) -> None:
        for line in lines:
            parts = line.split()
            if not parts or not line.endswith("\n"):
                continue
            if parts[0] == "d":
                self.dropping = True
            elif parts[0] == "D":
                # the drop policy removed this reading (the queue was full)
                self.acked.add(int(parts[1]))
            elif parts[0] == "A":
                self.dropping = False
                i, p = int(parts[1]), int(parts[2])
                if i == 0:
                    continue  # the new reading was the one dropped
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
        lost = [i for i in self.prio if i not in self.acked and i not in present]
        if self.dropping and len(lost) <= 1:
            # cut inside an append into a full queue: its victim may already be gone
            self.acked.update(lost)
            self.dropping = False
            lost = []
        assert not lost, f"unacked readings lost: {lost}"


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


EVERY_OP_WORKER = r'''
import gc, struct, sys, vfs
import simflash, flashq

BLOCKS = 48
MAXQ = 48


class CountingDev(simflash.FileBlockDev):
    # Counts program and erase operations through the block-device protocol: the same
    # operations tear_after() counts, so index n of a clean run is the n-th op torn.
    ops = 0

    def writeblocks(self, block_num, buf, offset=None):
        self.ops += 1
        simflash.FileBlockDev.writeblocks(self, block_num, buf, offset)

    def ioctl(self, op, arg):
        if op == 6:  # erase
            self.ops += 1
        return simflash.FileBlockDev.ioctl(self, op, arg)


def rec(i):
    return struct.pack("<IIH", (i * 2654435761) & 0xFFFFFFFF, i, i & 0xFFFF)


def mount(path, tear=-1):
    dev = CountingDev(path, 4096, BLOCKS)
    if tear >= 0:
        dev.tear_after(tear, tear + 1)
    vfs.mount(simflash.filesystem(dev), "/flash")
    return dev


def unmount(dev):
    try:
        vfs.umount("/flash")
    except OSError:
        pass
    dev.close()


def copy(src, dst):
    buf = bytearray(4096)
    with open(src, "rb") as f:
        with open(dst, "wb") as g:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                g.write(memoryview(buf)[:n])


BUF = bytearray(16 * 64)


def append(q, p, say):
    if q.depth >= q.max_records:
        say("d")  # this append may drop a reading
    i = q.append(rec(q.next_id), p)
    say("A %d %d" % (i, p))
    if q.last_dropped:
        say("D %d" % q.last_dropped)


def ack(q, cum_at, sel_at, say):
    k = q.read_into(BUF)
    ids = [flashq.FlashQueue.slot_id(BUF, j, q.slot_size) for j in range(k)]
    cum = ids[min(cum_at, k - 1)]
    sel = [ids[j] for j in sel_at if j < k]
    line = "%d %s" % (cum, " ".join(str(s) for s in sel))
    say("k " + line)
    q.ack(cum, sel)
    say("K " + line)


def scenario(say):
    # Appends (head segments fill and merge), an ack with selective ids, a compaction,
    # appends into a full queue (the drop policy) and an ack of everything sent.
    q = flashq.FlashQueue("/flash/q", 10, MAXQ, seg_records=16)
    for n in range(20):
        append(q, n % 3, say)
    ack(q, 3, (5, 7, 9), say)
    q.compact()
    for n in range(40):
        append(q, (n * 7) % 3, say)
    ack(q, 40, (), say)
    for n in range(6):
        append(q, 1, say)
    q.close()


def listing(say):
    q = flashq.FlashQueue("/flash/q", 10, MAXQ, seg_records=16)
    n = q.read_into(BUF)
    for j in range(n):
        o = j * q.slot_size
        say("L %d %d %s" % (flashq.FlashQueue.slot_id(BUF, j, q.slot_size), BUF[o + 4],
                            bytes(BUF[o + 6:o + q.slot_size]).hex()))
    say("N %d" % q.next_id)
    return q


def say(line):
    sys.stdout.write(line + "\n")


def quiet(line):
    pass


cmd, base, work = sys.argv[1], sys.argv[2], sys.argv[3]
if cmd == "base":
    dev = simflash.mount(base, "/flash", 4096, BLOCKS)
    q = flashq.FlashQueue("/flash/q", 10, MAXQ, seg_records=16)
    for n in range(12):
        append(q, n % 2, say)
    ack(q, 2, (4,), say)
    q.close()
    unmount(dev)
elif cmd == "count":
    copy(base, work)
    dev = mount(work)
    scenario(quiet)
    say("OPS %d" % dev.ops)
    unmount(dev)
else:
    lo, hi, step = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    for cut in range(lo, hi, step):
        copy(base, work)
        dev = mount(work, cut)
        say("= %d" % cut)
        try:
            scenario(say)
        except simflash.PowerCut:
            say("X")
        except OSError:
            # clean-up code (a file's close) running on after the cut: on a node nothing
            # runs after it, so whatever that code raises is the cut
            if not dev.dead:
                raise
            say("X")
        gc.collect()  # the lost queue's open files are finalized on the dead flash
        unmount(dev)
        # the node comes back: the queue opens, keeps working, and opens again
        dev = mount(work)
        q = listing(say)
        append(q, 2, say)
        q.close()
        listing(say).close()
        unmount(dev)
'''
MAX_CUTS = 400  # operation indices cut per run; a longer scenario is sampled at an even stride


def _mp(worker: Path, *args: str) -> str:
    binary = micropython_binary()
    if binary is None:
        pytest.skip("the MicroPython unix port (`micropython`) is not installed")
    proc = subprocess.run([binary, str(worker), *args], capture_output=True, text=True,
                          env=mp_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def cut_indices(ops: int, limit: int = MAX_CUTS) -> range:
    """Every operation index, or when there are more than `limit`, every k-th from 0 with
    k = ceil(ops / limit), so the sample still spans the whole run."""
    return range(0, ops, max(1, math.ceil(ops / limit)))


def test_cut_at_every_flash_operation_loses_nothing(tmp_path: Path) -> None:
    worker = tmp_path / "worker.py"
    worker.write_text(EVERY_OP_WORKER)
    base, work = str(tmp_path / "base.img"), str(tmp_path / "work.img")
    base_model = Model()
    base_model.feed(_mp(worker, "base", base, work).splitlines(keepends=True))
    out = _mp(worker, "count", base, work)
    ops = int(out.split("OPS ")[1].split()[0])
    assert ops > 100, ops  # appends, merges, an ack, a compaction and drops all ran
    idx = cut_indices(ops)
    out = _mp(worker, "run", base, work, str(idx.start), str(idx.stop), str(idx.step))
    blocks = ("\n" + out).split("\n= ")[1:]
    assert [int(b.split("\n", 1)[0]) for b in blocks] == list(idx)
    kinds = set()
    for block in blocks:
        cut, _, rest = block.partition("\n")
        lines = rest.splitlines(keepends=True)
        assert "X\n" in lines, f"cut {cut}: the scenario ran to its end without a cut"
        x = lines.index("X\n")
        before, after = lines[:x], lines[x + 1:]
        n1 = next(j for j, line in enumerate(after) if line.startswith("N "))
        model = copy.deepcopy(base_model)
        model.feed(before)
        try:
            # the queue opens with everything durable, ...
            model.check_open(after[: n1 + 1])
            # ... takes a new reading and opens again with it
            model.feed(after[n1 + 1:])
            model.check_open([line for line in after[n1 + 1:] if line[0] in "LN"])
        except AssertionError as exc:
            raise AssertionError(f"power cut at flash operation {cut} of {ops}: {exc}") from exc
        kinds.add(next((line[0] for line in reversed(before) if line[0] in "AKkd"), ""))
    # cuts fell inside appends, acks and appends into a full queue
    assert {"A", "k", "d"} <= kinds, kinds
    print(f"flash operations: {ops}, cut at {len(idx)} of them")
