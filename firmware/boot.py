# The bootloader: what a node runs first. Its decision table (TABLE below) says, from the
# state record, the boot cause and the slots' checks, which image starts (or a revert, a
# fall-back, a sleep); the started slot's directory goes first on sys.path and `main` is
# imported from it. docs/bootloader.md prints the table and has the power-cut analysis.
# Checks per boot: the confirmed image gets its manifest signature and file sizes checked;
# a trial image (first boots of a new version) gets every hash checked.
import gc

# Heap bytes in use before anything of Torpor loads: the app's memory report counts the whole
# boot (code loading, this check, the wake) from here.
_ALLOC0 = gc.mem_alloc()

import sys  # noqa: E402


# MicroPython does not keep its extensible built-in modules (time, os, json, ...) in
# sys.modules: every `import time` in every module searches the filesystem on sys.path first,
# three lookups a directory (on littlefs about 13 kB of flash reads each: a sampling wake read
# 1.4 MB, most of it these). Imported here once with no path to search and kept, each costs a
# dict entry. Names a port lacks are skipped; a module already there (the sim's tls) stays.
def _keep_builtins(names):
    path = sys.path[:]
    sys.path.clear()
    try:
        for name in names:
            if name not in sys.modules:
                try:
                    sys.modules[name] = __import__(name)
                except ImportError:
                    pass
    finally:
        sys.path.extend(path)


_keep_builtins(("os", "time", "json", "struct", "binascii", "hashlib", "errno", "io", "select",
                "socket", "random", "cryptolib", "collections", "array", "re", "heapq"))
del _keep_builtins

import time  # noqa: E402

import board  # noqa: E402
import bootstate  # noqa: E402
import slots  # noqa: E402
from micropython import const  # noqa: E402

NO_IMAGE_SLEEP_MS = const(3600000)  # nothing verifiable to run: try again in an hour
# The watchdog from the first line: the checks (an Ed25519 verification on a power-on, every
# hash on a trial boot) until the app arms it for its own budget. RP2 clamps it to 8.4 s.
BOOT_WDT_MS = const(20000)


def _log(msg):
    print("boot: " + msg)


# ---- the decision table -------------------------------------------------------------
# Which image a boot starts is read from this table, in MCUboot's manner (its swap tables and
# the states of its design notes): the first row whose conditions all hold gives the action.
# A condition is (fact, value); a fact a row does not name does not matter to it. Facts come
# from the state record and the boot cause, or from checking a slot; a check runs only when
# a row asks for it, so the other slot is checked only once the confirmed one failed.
# docs/bootloader.md prints this table (tools/fw/boot_table.py; a test fails on drift). The
# comment after each fact and action is its text there. Facts and actions are compile-time
# constants (underscored): they cost no heap.

# facts
_F_RECORD = const(0)  # a valid state record is on flash
_F_ANY_OK = const(1)  # a slot passes the full check (signature, sizes, hashes)
_F_TRIAL = const(2)  # the record names a slot on trial
_F_CRASH = const(3)  # the trial has started a boot and this boot's cause is a crash or watchdog reset
_F_USED = const(4)  # the trial's boots are used: `tboots` - `nonet` >= `max`
_F_OUTAGE = const(5)  # the trial's outage budget is used: `nonet` > `nmax`
_F_TRIAL_OK = const(6)  # the trial slot passes the full check (the signature from its seal when it matches) and holds version `tver`
_F_ACTIVE_OK = const(7)  # the confirmed slot passes its boot check (signature, or its seal on a timer wake or the app's soft reset; sizes) and holds version `ver`
_F_OTHER_OK = const(8)  # the other slot passes the full check

# actions
_RECOVER = const(0)  # write a new record confirming the newest slot that passes the full check, then read the table again
_REVERT = const(1)  # end the trial (`ota` = reverted, with the reason), save, then read the table again
_START_TRIAL = const(2)  # count the trial boot (`tboots` + 1) and save it before the trial image starts, then start it
_START_ACTIVE = const(3)  # start the confirmed slot
_FALL_BACK = const(4)  # the other slot becomes the confirmed one (`floor` unchanged; `ota` = reverted with the reason), save, start it
_SLEEP = const(5)  # start nothing: deep sleep an hour and try again

_CHECKS = const(-1)  # reason: the one the failed check gave

TABLE = (
    # (conditions), action, ota_reason
    (((_F_RECORD, 0), (_F_ANY_OK, 1)), _RECOVER, bootstate.NONE),
    (((_F_RECORD, 0), (_F_ANY_OK, 0)), _SLEEP, bootstate.NONE),
    (((_F_TRIAL, 1), (_F_CRASH, 1)), _REVERT, bootstate.CRASHED),
    (((_F_TRIAL, 1), (_F_USED, 1)), _REVERT, bootstate.HEALTH_CHECK),
    (((_F_TRIAL, 1), (_F_OUTAGE, 1)), _REVERT, bootstate.HEALTH_CHECK),
    (((_F_TRIAL, 1), (_F_TRIAL_OK, 0)), _REVERT, _CHECKS),
    (((_F_TRIAL, 1), (_F_TRIAL_OK, 1)), _START_TRIAL, bootstate.NONE),
    (((_F_TRIAL, 0), (_F_ACTIVE_OK, 1)), _START_ACTIVE, bootstate.NONE),
    (((_F_TRIAL, 0), (_F_ACTIVE_OK, 0), (_F_OTHER_OK, 1)), _FALL_BACK, _CHECKS),
    (((_F_TRIAL, 0), (_F_ACTIVE_OK, 0), (_F_OTHER_OK, 0)), _SLEEP, bootstate.NONE),
)


class _Boot:
    # The facts of one boot, each found once, when a row first asks for it.

    def __init__(self, root, cause):
        self.root = root
        self.cause = cause
        self.st = bootstate.load(root)
        self.known = {}
        self.reason = bootstate.NONE  # of the last failed check
        self.found = ("", 0)  # (slot, version) the last passed check found

    def fact(self, f):
        v = self.known.get(f)
        if v is None:
            v = self.known[f] = self._find(f)
        return v

    def _check(self, role, slot, full, version=0, use_seal=False):
        try:
            reason, m = slots.check(self.root, slot, full, use_seal=use_seal)
        except MemoryError:
            # No verdict on the image: once more on a collected heap; a second one stops
            # this boot (the next starts over) rather than refuse a good image.
            gc.collect()
            reason, m = slots.check(self.root, slot, full, use_seal=use_seal)
        if not reason and version and m["version"] != version:
            reason = bootstate.BAD_MANIFEST
        if reason:
            _log("%s slot %s does not check out: reason %d" % (role, slot, reason))
            self.reason = reason
            return 0
        self.found = (slot, m["version"])
        return 1

    def _find(self, f):
        st = self.st
        if f == _F_RECORD:
            return 0 if st is None else 1
        if f == _F_ANY_OK:
            best = None
            for slot in ("a", "b"):
                if self._check("recovery", slot, True) and (best is None or self.found[1] > best[1]):
                    best = self.found
            if best is None:
                return 0
            self.found = best
            return 1
        if f == _F_TRIAL:
            return 1 if st["trial"] else 0
        if f == _F_CRASH:
            # A crash cause before the first trial boot is the old image's, not the trial's.
            c = self.cause
            return 1 if st["tboots"] > 0 and (c == board.CRASH or c == board.WATCHDOG) else 0
        if f == _F_USED:
            # A boot that ended cleanly without reaching the gateway (bootstate.no_network)
            # is not held against the trial; _F_OUTAGE bounds those.
            return 1 if st["tboots"] - st["nonet"] >= st["max"] else 0
        if f == _F_OUTAGE:
            return 1 if st["nonet"] > st["nmax"] else 0
        if f == _F_TRIAL_OK:
            # Every file hashed; the signature from the seal the update's own check left
            # moments before the trial was set, when it matches (docs/bootloader.md).
            return self._check("trial", st["trial"], True, st["tver"], True)
        if f == _F_ACTIVE_OK:
            # A wake from deep sleep (the common boot of a battery node) and a reset the app
            # asked for take the signature from the slot's seal when (key, signature,
            # manifest) are the bytes verified before; any other boot cause verifies it again.
            c = self.cause
            return self._check("confirmed", st["active"], False, st["ver"],
                               c == board.TIMER or c == board.SOFT_RESET)
        # _F_OTHER_OK: the image before the last update, say
        return self._check("other", bootstate.other(st["active"]), True)

    def row(self):
        for conds, action, reason in TABLE:
            for f, want in conds:
                if self.fact(f) != want:
                    break
            else:
                return action, self.reason if reason == _CHECKS else reason
        return _SLEEP, bootstate.NONE  # not reached: the last rows cover every record


def choose(root, cause):
    """(slot, version, on_trial) to start, as the table says; None to start nothing."""
    b = _Boot(root, cause)
    # A revert or a recovery changes the record, and the table is read again: at most one
    # of each comes before a start, a fall-back or a sleep.
    for _ in range(3):
        action, reason = b.row()
        st = b.st
        if action == _RECOVER:
            slot, version = b.found
            b.st = bootstate.new(slot, version)
            bootstate.save(root, b.st)
            _log("recovered state: slot %s v%d" % (slot, version))
        elif action == _REVERT:
            _log("revert v%d in slot %s: reason %d" % (st["tver"], st["trial"], reason))
            _revert(st, reason)
            bootstate.save(root, st)
        elif action == _START_TRIAL:
            # Counted before the trial image runs: a trial boot that never gets to confirm
            # (reset, power cut, crash) is seen at the next boot.
            st["tboots"] += 1
            bootstate.save(root, st)
            _keep_report(st)
            return st["trial"], st["tver"], True
        elif action == _START_ACTIVE:
            _keep_report(st)
            return st["active"], st["ver"], False
        elif action == _FALL_BACK:
            slot, version = b.found
            _log("falling back to slot %s v%d" % (slot, version))
            _fall_back(st, slot, version, reason or bootstate.BAD_MANIFEST)
            bootstate.save(root, st)
            _keep_report(st)
            return slot, version, False
        else:
            return None
        b.known = {}  # the record changed: every fact is found again
    return None


# ---- the transitions only the bootloader makes (pure: the caller saves the record) ----

def _revert(st, reason):
    st["rver"] = st["tver"]
    st["trial"] = ""
    st["tver"] = 0
    st["tboots"] = 0
    st["nonet"] = 0
    st["ota"] = bootstate.REVERTED
    st["reason"] = reason


def _fall_back(st, slot, version, reason):
    """The confirmed slot failed its check at boot and `slot` (the other one) verifies:
    it becomes the confirmed image. The floor stays: no update may go below it."""
    st["rver"] = st["ver"]
    st["active"] = slot
    st["ver"] = version
    st["trial"] = ""
    st["tver"] = 0
    st["tboots"] = 0
    st["nonet"] = 0
    st["ota"] = bootstate.REVERTED
    st["reason"] = reason


def _remount_without_mtime(bdev, point="/", progsize=0):
    """Mount the littlefs on `bdev` at `point` again, without modification times.

    The ESP32 and RP2 ports mount "/" with mtime on: littlefs then stores a timestamp
    attribute with every file commit, flash wear that nothing on a node reads. Safe at boot
    because nothing is open (the port compiled boot.py and each imported .mpy fully before
    running it); cost: one littlefs mount (superblock read). `progsize` must be the port's
    (RP2: 256; 0 keeps the default). Returns False and changes nothing when the block device
    holds no littlefs (a FAT filesystem, say)."""
    import os

    import vfs

    try:
        # The port stubs declare VfsLfs2 abstract; the real class is not (hence the ignores).
        fs = vfs.VfsLfs2(bdev, progsize=progsize, mtime=False) if progsize else vfs.VfsLfs2(bdev, mtime=False)  # type: ignore[abstract]
    except OSError:
        return False
    vfs.umount(point)
    try:
        vfs.mount(fs, point)
    except OSError:
        vfs.mount(vfs.VfsLfs2(bdev), point)  # type: ignore[abstract]  # back as the port had it
        raise
    os.chdir(point)
    return True


def _keep_report(st):
    # The outcome the HELLO reports, as on flash now: the app need not read the file again.
    bootstate.report = (st["ota"], st["reason"], st["rver"])


def _crashed(root, slot, exc):
    # The trial image raised out of main: revert it now, then restart into the old image.
    sys.print_exception(exc)
    st = bootstate.load(root)
    if st is not None and st["trial"] == slot:
        _revert(st, bootstate.CRASHED)
        bootstate.save(root, st)
        _log("trial crashed, reverted")
        board.reset()
    raise exc


def _no_mtime():
    # Real boards (flash at "/"): the port mounted it with modification times on; remount
    # without them (docs/bootloader.md, "Flash mount"). The sim mounts without them itself.
    try:
        bdev = board.flash_block_device()
        if bdev is not None:
            _remount_without_mtime(bdev, "/", 256 if sys.platform == "rp2" else 0)
    except Exception as exc:  # never let a mount option stop the boot
        _log("mtime remount skipped: %r" % (exc,))


def run():
    global TABLE, _Boot, choose, _fall_back
    t0 = time.ticks_ms()
    bootstate.alloc0 = _ALLOC0
    board.init()
    board.watchdog_start(BOOT_WDT_MS)
    root = board.FS_ROOT
    if root == "/":
        _no_mtime()
    picked = choose(root, board.boot_cause())
    # The table and its walk are done with: their code and objects leave the heap before
    # the image runs.
    del TABLE, _Boot, choose, _fall_back
    if picked is None:
        _log("no verified image")
        board.deep_sleep(NO_IMAGE_SLEEP_MS)
        return
    slot, version, trial = picked
    bootstate.booted = picked
    sys.path.insert(0, slots.slot_dir(root, slot))
    _log("slot %s v%d trial=%d verified=%d ms=%d" % (
        slot, version, trial, slots.verifies, time.ticks_diff(time.ticks_ms(), t0)))
    if not trial:
        import main  # noqa: F401
        return
    try:
        import main  # noqa: F401,F811
    except Exception as exc:
        _crashed(root, slot, exc)


# Started as the bootloader: `import boot` from the flash's /boot.py, or `micropython -m boot`
# on the sim board. The table's tests load this file under another name and call choose().
if __name__ == "boot" or __name__ == "__main__":
    run()
