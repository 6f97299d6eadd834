# The bootloader: what a node runs first. It reads the state record, reverts a failed trial,
# checks the image it is about to start and starts it: that slot's directory goes first on
# sys.path and `main` is imported from it. docs/bootloader.md has the states and the
# power-cut analysis. Checks per boot: the confirmed image gets its manifest signature and
# file sizes checked; a trial image (first boots of a new version) gets every hash checked.
import gc

# Heap bytes in use before anything of Torpor loads: the app's memory report counts the whole
# boot (code loading, this check, the wake) from here.
_ALLOC0 = gc.mem_alloc()

import sys  # noqa: E402
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


def _recover(root):
    # No state record (never provisioned, or lost): take the newest slot that checks out
    # completely and confirm it; its version becomes the floor.
    best = None
    for slot in ("a", "b"):
        reason, m = slots.check(root, slot, True)
        if not reason and (best is None or m["version"] > best[1]):
            best = (slot, m["version"])
    if best is None:
        return None
    st = bootstate.new(best[0], best[1])
    bootstate.save(root, st)
    _log("recovered state: slot %s v%d" % best)
    return st


def choose(root, cause):
    """(slot, version, on_trial) to start, after applying the trial rules; None if none."""
    st = bootstate.load(root)
    if st is None:
        st = _recover(root)
        if st is None:
            return None
    if st["trial"]:
        reason = bootstate.trial_verdict(st, cause)
        if not reason:
            reason, m = slots.check(root, st["trial"], True)
            if not reason and m["version"] != st["tver"]:
                reason = bootstate.BAD_MANIFEST
        if reason:
            _log("revert v%d in slot %s: reason %d" % (st["tver"], st["trial"], reason))
            bootstate.revert(st, reason)
            bootstate.save(root, st)
        else:
            # Counted before the trial image runs: a trial boot that never gets to confirm
            # (reset, power cut, crash) is seen at the next boot.
            bootstate.count_trial_boot(st)
            bootstate.save(root, st)
            _keep_report(st)
            return st["trial"], st["tver"], True
    # A wake from deep sleep (the common boot of a battery node) takes the signature from
    # the slot's seal when (key, signature, manifest) are the bytes verified before; any
    # other boot cause verifies it again.
    reason, m = slots.check(root, st["active"], False, use_seal=cause == board.TIMER)
    if reason or m["version"] != st["ver"]:
        _log("confirmed slot %s does not check out: reason %d" % (st["active"], reason))
        # The other slot (the image before the last update, say) runs if it verifies
        # completely; only when neither does the node sleep and retry.
        alt = bootstate.other(st["active"])
        r2, m2 = slots.check(root, alt, True)
        if r2:
            _log("slot %s does not check out either: reason %d" % (alt, r2))
            return None
        _log("falling back to slot %s v%d" % (alt, m2["version"]))
        bootstate.fall_back(st, alt, m2["version"], reason or bootstate.BAD_MANIFEST)
        bootstate.save(root, st)
        _keep_report(st)
        return alt, m2["version"], False
    _keep_report(st)
    return st["active"], st["ver"], False


def _keep_report(st):
    # The outcome the HELLO reports, as on flash now: the app need not read the file again.
    bootstate.report = (st["ota"], st["reason"], st["rver"])


def _crashed(root, slot, exc):
    # The trial image raised out of main: revert it now, then restart into the old image.
    sys.print_exception(exc)
    st = bootstate.load(root)
    if st is not None and st["trial"] == slot:
        bootstate.revert(st, bootstate.CRASHED)
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
            bootstate.remount_without_mtime(bdev, "/", 256 if sys.platform == "rp2" else 0)
    except Exception as exc:  # never let a mount option stop the boot
        _log("mtime remount skipped: %r" % (exc,))


def run():
    t0 = time.ticks_ms()
    bootstate.alloc0 = _ALLOC0
    board.init()
    board.watchdog_start(BOOT_WDT_MS)
    root = board.FS_ROOT
    if root == "/":
        _no_mtime()
    picked = choose(root, board.boot_cause())
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


run()
