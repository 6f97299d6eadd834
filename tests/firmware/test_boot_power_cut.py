"""Power cut at every flash operation of an update, MCUboot's way (run_perm_with_fails).

A MicroPython worker runs the whole update on a littlefs image of the sim board's flash, as
the node does it across its wakes: the bootloader (firmware/boot.py's choose(), its table)
starts v1, the app installs v2 into the other slot through the slot API and sets it on trial,
the bootloader starts the trial, the app confirms it after the gateway's ACK, the next boots
start v2 and the app clears the report. A clean run counts the flash operations (programs and
erases) of all that; then, from the same starting image each time, the run is repeated with
operation i torn (a random prefix of it written, nothing after), for every i. After each cut
the node powers on again and keeps booting: every boot must start an image that passes the
full check (signature, sizes, hashes), and the update must end completed (v2 confirmed,
floor 2) or reverted (v1 confirmed, v2 reported reverted), never anything else. One process
loops over the cut indexes; nothing but the flash image carries over from one cut to the
next (the module state of bootstate, slots and the table is reset).

A second scenario does the same for an update whose trial image crashes: every cut must end
with v1 confirmed and the update reverted."""

from __future__ import annotations

import hashlib
import resource
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.mpharness import micropython_binary, mp_env
from tools.fw import image, keys
from tools.sim.node import BOARD_SHIM

CHUNK = 256

WORKER = r"""
import binascii, gc, hashlib, json, os, sys
import simflash, bootstate, slots, vfs
import board

DIR = __DIR__
ROOT = "/flash"
IMG = DIR + "/flash.img"
BLOCKS = 40
SCENARIO = __SCENARIO__
POWER_ON, TIMER, CRASH, SOFT = board.POWER_ON, board.TIMER, board.CRASH, board.SOFT_RESET

# The bootloader, loaded under another name than `boot` so that it does not start a node.
ns = {"__name__": "boot_table"}
with open(__BOOT_PY__) as f:
    exec(f.read(), ns)
choose = ns["choose"]


def read(p):
    with open(p, "rb") as f:
        return f.read()


V1 = (read(DIR + "/v1/manifest.json"), read(DIR + "/v1/manifest.sig"), __V1_FILES__)
V2 = (read(DIR + "/v2/manifest.json"), read(DIR + "/v2/manifest.sig"))
STREAM = read(DIR + "/v2/stream.bin")
MANIFESTS = (V1[0], V2[0])
SIGS = (V1[1], V2[1])
CS = __CHUNK__
bdev = None


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


def mount(tear=-1, seed=1):
    global bdev
    bdev = CountingDev(IMG, 4096, BLOCKS)
    if tear >= 0:
        bdev.tear_after(tear, seed)
    vfs.mount(simflash.filesystem(bdev), ROOT)


def power_off():
    # Whatever littlefs still holds in RAM is lost: the dead device ignores every write.
    bdev.dead = True
    gc.collect()  # files left open by the cut are finalized on the dead flash
    try:
        vfs.umount(ROOT)
    except OSError:
        pass
    bdev.close()


def fresh_process():
    # One boot = one process on the node: no module state survives it.
    bootstate.booted = None
    bootstate.report = None
    slots.configure(ROOT, "sim")


def install_v1():
    # Provisioning: v1 written into slot a and confirmed (what `torpor fw install` does).
    try:
        os.remove(IMG)
    except OSError:
        pass
    global bdev
    bdev = simflash.FileBlockDev(IMG, 4096, BLOCKS)
    vfs.VfsLfs2.mkfs(bdev)
    vfs.mount(simflash.filesystem(bdev), ROOT)
    for d in ("/fw", "/fw/a"):
        os.mkdir(ROOT + d)
    with open(ROOT + "/fw/a/manifest.json", "wb") as f:
        f.write(V1[0])
    with open(ROOT + "/fw/a/manifest.sig", "wb") as f:
        f.write(V1[1])
    for name in V1[2]:
        with open(ROOT + "/fw/a/" + name, "wb") as f:
            f.write(read(DIR + "/v1/" + name))
    bootstate.save(ROOT, bootstate.new("a", 1))
    vfs.umount(ROOT)
    bdev.close()


def signed_image(slot, ver):
    # The slot holds exactly the signed image of that version: the manifest and signature
    # bytes that were signed, and every file with its manifest hash. (Byte equality with the
    # signed manifest stands for the Ed25519 check, which the bootloader itself ran.)
    d = ROOT + "/fw/" + slot
    try:
        if read(d + "/manifest.json") != MANIFESTS[ver - 1] or read(d + "/manifest.sig") != SIGS[ver - 1]:
            return False
        for f in json.loads(MANIFESTS[ver - 1])["files"]:
            if binascii.hexlify(hashlib.sha256(read(d + "/" + f["path"])).digest()).decode() != f["sha256"]:
                return False
    except OSError:
        return False
    return True


def boot(cause, seen):
    # The bootloader's part of a boot: it must start an image, and one that checks out.
    fresh_process()
    picked = choose(ROOT, cause)
    if picked is None:
        raise AssertionError("no image started")
    slot, ver, trial = picked
    if not signed_image(slot, ver):
        raise AssertionError("started slot %s v%d, which is not the signed image" % (slot, ver))
    bootstate.booted = picked
    seen.append(ver)
    return picked


def download():
    # The app's part of a wake that receives the update: resume, write, check, trial, reset.
    got, n = slots.begin(V2[0], V2[1], CS)
    for i in range(n):
        slots.write_chunk(i, memoryview(STREAM)[i * CS:(i + 1) * CS])
    slots.finish()
    slots.set_trial()


trial_at = 0  # flash operations before the trial boot (clean run)


def update(seen):
    # The update as the node lives it, wake by wake.
    global trial_at
    boot(TIMER, seen)
    download()
    trial_at = bdev.ops
    slot, ver, trial = boot(SOFT, seen)
    if SCENARIO == "crash":
        # The trial image crashes: the chip resets with the crash as its cause.
        boot(CRASH, seen)
    else:
        slots.confirm()  # the gateway's ACK reached the trial image
    boot(TIMER, seen)
    slots.clear_report()  # the outcome reached the gateway
    boot(TIMER, seen)


def settle(seen):
    # After a cut: power on, then boot until the update has ended one way or the other.
    cause = POWER_ON
    for _ in range(6):
        slot, ver, trial = boot(cause, seen)
        st = bootstate.load(ROOT)
        ota, reason, rver = slots.status()
        if trial:
            if SCENARIO == "crash":
                cause = CRASH
            else:
                slots.confirm()
                cause = TIMER
            continue
        if ver == 2 and st["floor"] == 2 and st["active"] == slot:
            return "completed"
        if ver == 1 and ota == bootstate.REVERTED and rver == 2:
            return "reverted"
        if ota == bootstate.REVERTED:
            raise AssertionError("v%d runs after a revert of v%d" % (ver, rver))
        # v1 confirmed and the update neither done nor refused: the gateway offers it again.
        download()
        cause = SOFT
    raise AssertionError("the update did not end in 6 boots: %r" % (bootstate.load(ROOT),))


def final_check(outcome):
    # Two more boots from deep sleep change nothing.
    seen = []
    want = 2 if outcome == "completed" else 1
    for _ in range(2):
        slot, ver, trial = boot(TIMER, seen)
        slots.clear_report()
        if ver != want or trial:
            raise AssertionError("after %s, v%d trial=%d started" % (outcome, ver, trial))


install_v1()
pristine = read(IMG)


def restore():
    with open(IMG, "wb") as f:
        f.write(pristine)


# The clean run: count the flash operations of the whole update.
restore()
mount()
seen = []
update(seen)
ops = bdev.ops
want = "completed" if SCENARIO == "clean" else "reverted"
print("CLEAN ops=%d trial_at=%d seen=%s state=%s" % (ops, trial_at, seen, bootstate.load(ROOT)))
# The crashing update's operations up to its trial boot are the clean update's (cut by the
# clean scenario): it is cut from there on.
first = trial_at if SCENARIO == "crash" else 0
power_off()
mount()
final_check(want)
power_off()
sys.stdout.flush()

for i in range(first, ops):
    restore()
    mount(i, i + 1)
    seen = []
    cut = False
    try:
        update(seen)
    except simflash.PowerCut:
        cut = True
    except OSError:
        # clean-up code (a file's close) running on after the cut: on a node nothing runs
        # after it, so whatever that code raises is the cut
        if not bdev.dead:
            raise
        cut = True
    if not cut:
        raise AssertionError("operation %d of %d was never reached" % (i, ops))
    at = len(seen)
    power_off()
    mount()
    try:
        outcome = settle(seen)
        final_check(outcome)
    except Exception as e:
        print("FAIL cut=%d after %d boots: %r seen=%s" % (i, at, e, seen))
        raise
    power_off()
    print("CUT %d boots=%d outcome=%s seen=%s" % (i, at, outcome, "".join(str(v) for v in seen)))
print("DONE")
"""


def make_image(root: Path, key: Ed25519PrivateKey, version: int) -> Path:
    """A small signed image for the sim board: a main and one module of a few KB."""
    d = root / f"v{version}"
    d.mkdir()
    files = {
        "main.py": f"print('image v{version}')\n".encode(),
        # Past littlefs's inline size (its own blocks), in several chunks.
        "app.mpy": hashlib.sha256(b"v%d" % version).digest() * 40,
    }
    entries = []
    for name, data in sorted(files.items()):
        (d / name).write_bytes(data)
        entries.append(image.FileEntry(name, len(data), hashlib.sha256(data).hexdigest()))
    pub = keys.public_raw(key.public_key())
    m = image.Manifest(version, str(version), "sim", tuple(entries), key_id=keys.key_id(pub))
    raw = m.to_bytes()
    (d / image.MANIFEST).write_bytes(raw)
    (d / image.SIGNATURE).write_bytes(key.sign(raw))
    (d / "stream.bin").write_bytes(b"".join(files[e.path] for e in entries))
    return d


def _run(tmp: Path, scenario: str) -> tuple[list[str], float]:
    """The worker's output lines and the CPU seconds it took."""
    binary = micropython_binary()
    if binary is None:
        pytest.skip("the MicroPython unix port (`micropython`) is not installed")
    key = Ed25519PrivateKey.generate()
    pub = keys.public_raw(key.public_key())
    lib = tmp / "lib"
    lib.mkdir()
    (lib / keys.FLEET_KEYS_NAME).write_text(keys.fleet_keys_source({keys.key_id(pub): pub}))
    (lib / "board.py").write_text(BOARD_SHIM)
    v1 = make_image(tmp, key, 1)
    make_image(tmp, key, 2)
    boot_py = Path(__file__).resolve().parents[2] / "firmware" / "boot.py"
    code = (
        WORKER.replace("__DIR__", repr(str(tmp)))
        .replace("__SCENARIO__", repr(scenario))
        .replace("__BOOT_PY__", repr(str(boot_py)))
        .replace("__V1_FILES__", repr(sorted(p.name for p in v1.iterdir() if not p.name.startswith(("manifest", "stream")))))
        .replace("__CHUNK__", str(CHUNK))
    )
    # The sim board module reads its node directory (no supervisor: a plain power-on).
    env = mp_env([str(lib)], TORPOR_SIM_DIR=str(tmp))
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([binary, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
    out = proc.stdout.splitlines()
    tail = "\n".join(out[-15:]) + "\n" + proc.stderr[-3000:]
    assert proc.returncode == 0 and out and out[-1] == "DONE", tail
    return out, cpu


@pytest.mark.parametrize("scenario", ["clean", "crash"])
def test_a_cut_at_every_flash_operation_of_an_update_leaves_a_bootable_node(
    tmp_path: Path, scenario: str
) -> None:
    out, cpu = _run(tmp_path, scenario)
    clean = [ln for ln in out if ln.startswith("CLEAN ")]
    assert clean, out[:5]
    ops = int(clean[0].split()[1].removeprefix("ops="))
    first = int(clean[0].split()[2].removeprefix("trial_at=")) if scenario == "crash" else 0
    cuts = [ln.split() for ln in out if ln.startswith("CUT ")]
    # Every operation index was cut, in order, and each run went on to a settled node.
    assert [int(c[1]) for c in cuts] == list(range(first, ops))
    outcomes = [c[3].removeprefix("outcome=") for c in cuts]
    if scenario == "crash":
        assert set(outcomes) == {"reverted"}
    else:
        assert set(outcomes) <= {"completed", "reverted"}
        # Cuts before the trial starts end in a completed update (the download resumes);
        # the last cuts (after the confirm) too.
        assert outcomes[0] == "completed" and outcomes[-1] == "completed"
    # The cuts reached every wake of the update (the bootloader's saves included).
    boots_at_cut = {int(c[2].removeprefix("boots=")) for c in cuts}
    assert len(boots_at_cut) >= (3 if scenario == "crash" else 4), boots_at_cut
    print(f"\n{scenario}: {ops} flash operations, cut at {len(cuts)}: "
          f"{outcomes.count('completed')} completed, {outcomes.count('reverted')} reverted, {cpu:.1f} s CPU")
