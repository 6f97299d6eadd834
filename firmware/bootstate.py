# The bootloader's state record: which slot is confirmed, which one is on trial, the
# anti-downgrade floor and the outcome the app reports next. One small JSON file, replaced
# atomically (write fw/state.tmp, then rename over fw/state.json): after a power cut
# the record is the old one or the new one, never a mix. docs/bootloader.md has the table.
import json
import os
import sys

import bootwire
from micropython import const

# The bootloader's version, the manifest limit and the protocol's ota_state and ota_reason
# values come from bootwire.py, generated from the spec and installed with the bootloader:
# the bootloader cannot import proto.py (that lives in the image it checks).
BOOTLOADER_VERSION = bootwire.BOOTLOADER_VERSION
MAX_MANIFEST = bootwire.MAX_MANIFEST

IDLE = bootwire.IDLE
TRIAL = bootwire.TRIAL
CONFIRMED = bootwire.CONFIRMED
REVERTED = bootwire.REVERTED

NONE = bootwire.NONE
BAD_SIGNATURE = bootwire.BAD_SIGNATURE
UNKNOWN_KEY = bootwire.UNKNOWN_KEY
BAD_HASH = bootwire.BAD_HASH
MISSING_FILE = bootwire.MISSING_FILE
WRONG_BOARD = bootwire.WRONG_BOARD
DOWNGRADE = bootwire.DOWNGRADE
TRUNCATED = bootwire.TRUNCATED
HEALTH_CHECK = bootwire.HEALTH_CHECK
CRASHED = bootwire.CRASHED
NO_SPACE = bootwire.NO_SPACE
BAD_MANIFEST = bootwire.BAD_MANIFEST

# What the bootloader needs is copied above: the module's own table of every value need not
# stay on the heap for the whole wake.
del bootwire
sys.modules.pop("bootwire", None)

# (slot, version, on_trial) of the image the bootloader started in this process; None when
# the firmware runs without the bootloader (tests, development from source).
booted = None
# gc.mem_alloc() when the bootloader started (None without it): per-boot memory figures.
alloc0 = None
# (ota, reason, rver) of the record as the bootloader left it this boot, for the HELLO:
# the app need not read the file again. Any later save() clears it.
report = None

_KEYS = ("active", "ver", "floor", "trial", "tver", "tboots", "max", "ota", "reason", "rver", "seq")
# Keys added later, with the value a record written before them means.
_LATER = (("nonet", 0), ("nmax", 0))
# Trial boots that may end without reaching the gateway because the network was down
# (a Wi-Fi or gateway outage) before the trial is given up: a day of hourly wakes.
OUTAGE_BOOTS = const(24)


# Everything the bootloader keeps on flash lives under this one directory: the state record,
# an applied key list and the slots (fw/a, fw/b). On real boards '' (the flash root) comes
# before /lib on sys.path and MicroPython imports a directory as a namespace package, so a
# root directory named like a module (`boot/`, `slots/`) would shadow that module; no
# module is named `fw`.
FW_DIR = "fw"


def boot_dir(root):
    return root.rstrip("/") + "/" + FW_DIR


def new(slot, version):
    """A record with `slot` confirmed at `version` (provisioning, or recovery)."""
    return {
        "active": slot,  # the confirmed slot: never written while it is referenced here
        "ver": version,  # its version
        "floor": version,  # anti-downgrade: highest version ever confirmed
        "trial": "",  # slot on trial ("" = none)
        "tver": 0,  # version on trial
        "tboots": 0,  # trial boots started (counted before the trial image runs)
        "max": 1,  # trial boots allowed before an unconfirmed trial is reverted
        "ota": IDLE,  # outcome to report in the next HELLO (ota_state)
        "reason": NONE,  # and its ota_reason
        "rver": 0,  # version the outcome concerns
        "seq": 0,  # bumped by every save
        "nonet": 0,  # trial boots that ended cleanly with the gateway out of reach
        "nmax": 0,  # of those, how many the trial may use
    }


def _valid(st):
    if not isinstance(st, dict):
        return False
    for k in _KEYS:
        if k not in st:
            return False
    if st["active"] not in ("a", "b") or st["trial"] not in ("", "a", "b"):
        return False
    if st["trial"] == st["active"]:
        return False
    for k in _KEYS[1:]:
        if k != "trial" and not isinstance(st[k], int):
            return False
    return True


def load(root):
    """The record, or None when there is none (never provisioned) or it is unreadable."""
    d = boot_dir(root)
    try:
        # A leftover temporary file is a save cut short: the record before it stands.
        os.remove(d + "/state.tmp")
    except OSError:
        pass
    try:
        with open(d + "/state.json") as f:
            st = json.loads(f.read())
    except (OSError, ValueError):
        return None
    if not _valid(st):
        return None
    for k, v in _LATER:
        if not isinstance(st.get(k), int):
            st[k] = v
    return st


def save(root, st):
    global report
    report = None
    d = boot_dir(root)
    try:
        os.mkdir(d)
    except OSError:
        pass
    st["seq"] = st["seq"] + 1
    tmp = d + "/state.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(st))
    # littlefs renames atomically, replacing the old record in one metadata commit.
    os.rename(tmp, d + "/state.json")


# ---- transitions (pure: they change the dict; the caller saves it) ----
# Those only the bootloader makes (count a trial boot, revert, fall back) are boot.py's: the
# app's wake does not keep their code on its heap.

def set_trial(st, slot, version, max_boots=1, outage_boots=OUTAGE_BOOTS):
    st["trial"] = slot
    st["tver"] = version
    st["tboots"] = 0
    st["max"] = max_boots if max_boots > 0 else 1
    st["nonet"] = 0
    st["nmax"] = outage_boots if outage_boots > 0 else 0
    st["ota"] = TRIAL
    st["reason"] = NONE
    st["rver"] = version


def no_network(st):
    """The trial boot that is running ended its wake cleanly without reaching the gateway."""
    if st["nonet"] < st["tboots"]:
        st["nonet"] += 1


def confirm(st):
    """The trial slot becomes the confirmed one; the floor rises to its version."""
    if not st["trial"]:
        return False
    st["active"] = st["trial"]
    st["ver"] = st["tver"]
    if st["tver"] > st["floor"]:
        st["floor"] = st["tver"]
    st["rver"] = st["tver"]
    st["trial"] = ""
    st["tver"] = 0
    st["tboots"] = 0
    st["nonet"] = 0
    st["ota"] = CONFIRMED
    st["reason"] = NONE
    return True


def clear_report(st):
    st["ota"] = IDLE
    st["reason"] = NONE
    st["rver"] = 0


def other(slot):
    return "b" if slot == "a" else "a"
