# Over-the-air updates on the node: OTA_MANIFEST and OTA_CHUNK frames from the gateway
# into the inactive slot through the bootloader's slot API, one wake at a time, and the
# outcome back to the gateway (OTA_STATUS, and the HELLO's ota_state/ota_reason).
# docs/ota.md has the stream layout and the states. A download resumes across wakes and
# reboots: the staging record in <flash>/ota/ and the slot's own resume map survive.
import binascii
import json
import os
import struct
import time

import slots
from micropython import const

RESERVE_MS = const(1500)  # of the awake budget, kept for answering and disconnecting
_HDR = "/ota/hdr"  # {"v": version, "cs": chunk size, "sig": hex, "m": prefix chunks or -1,
#                     "ok": 1 once the manifest passed its check (check_staged)}
_MAN = "/ota/man"  # u16 length + manifest: inline from the frame, or the stream's prefix
_SEAL = "/ota/seal"  # the slot API's seal of the staged manifest once Ed25519 has verified it

_root = None
_report = None  # (version, state, chunks, reason, detail) to publish after the window
_hdr = None  # staging record of this wake, once loaded
_begun = False  # slots.begin() ran in this process for the staged manifest
_n = 0  # chunks of the image (without the manifest prefix)
_acked = False
_hello = (0, 0)
_reboot = False  # a check passed at this wake's start (restart_due), or the download ended


def _where():
    global _root
    if _root is None:
        import board

        _root = board.FS_ROOT
    return _root


def configure(root):
    """Another flash root (tests)."""
    global _root, _report, _hdr, _begun, _acked, _reboot
    _root = root
    _report = _hdr = None
    _begun = _acked = _reboot = False


def _read(path, n=-1):
    try:
        with open(_where() + path, "rb") as f:
            return f.read(n)
    except OSError:
        return None


def _write(path, data, mode="wb"):
    root = _where()
    try:
        os.mkdir(root + "/ota")
    except OSError:
        pass
    with open(root + path, mode) as f:
        f.write(data)


def _size(path):
    try:
        return os.stat(_where() + path)[6]
    except OSError:
        return 0


def _drop_staging():
    global _hdr, _begun
    _hdr = None
    _begun = False
    for p in (_HDR, _MAN, _SEAL):
        try:
            os.remove(_where() + p)
        except OSError:
            pass


def _load():
    global _hdr
    if _hdr is None:
        raw = _read(_HDR)
        if raw:
            try:
                _hdr = json.loads(raw)
            except ValueError:
                _hdr = None
    return _hdr


def _set_report(version, state, chunks, reason=0, detail=""):
    global _report
    _report = (version, state, chunks, reason, detail[:48])


# ---- what the app calls ----

def fw_version(default):
    """The version of the running image (the bootloader's), else the configured one."""
    r = slots.running()
    return r[1] if r is not None else default


def on_trial():
    """True when the bootloader started this image on trial: the wake must reach the
    gateway (that is the health check), whatever the send schedule says."""
    r = slots.running()
    return r is not None and r[2]


def hello_state():
    """(ota_state, ota_reason) for the HELLO: the bootloader's outcome to report."""
    global _hello
    try:
        s = slots.status()
        _hello = (s[0], s[1])
    except OSError:
        _hello = (0, 0)
    return _hello


def keys_seq():
    """The HELLO's keys_seq: the applied firmware key list's seq (keylist.py), 0 for the
    baked keys, found without reading a file when no list was ever applied."""
    import bootstate  # loaded with slots
    import trusted_keys

    root = _where()
    try:
        os.stat(bootstate.boot_dir(root) + "/keys.json")
    except OSError:
        return 0
    return trusted_keys.seq(root)


def on_ack():
    """The gateway acknowledged this wake's HELLO. A trial image has reached it: keep it
    (True: this confirmed it). An outcome the HELLO carried (confirmed, reverted) is now on
    record there: clear it."""
    global _acked
    import proto  # the codec: only a wake that sends gets here

    if _acked:
        return False
    _acked = True
    r = slots.running()
    if r is not None and r[2]:
        if slots.confirm():
            _set_report(r[1], proto.OTA_STATE_CONFIRMED, 0)
            return True
        return False
    if _hello[0] == proto.OTA_STATE_CONFIRMED or _hello[0] == proto.OTA_STATE_REVERTED:
        slots.clear_report()


def trial_unreached():
    """This trial wake could not reach the gateway (the network or the gateway was down):
    not a failed health check. The bootloader gives the trial another boot."""
    r = slots.running()
    if r is not None and r[2] and slots.trial_no_network():
        return True
    return False


def on_frame(ftype, f, w):
    """OTA_MANIFEST or OTA_CHUNK from the gateway; w is the app's Wake (battery, budget,
    effects). Never raises for a bad frame: the outcome goes into the next OTA_STATUS."""
    import proto  # the codec: only a wake that sends gets here

    try:
        if ftype == proto.OTA_MANIFEST:
            _manifest(f, w)
        else:
            _chunk(f, w)
    except slots.Refused as e:
        _refused(f[1], e.reason, e.detail)
    except OSError as e:
        _set_report(f[1], proto.OTA_STATE_FAILED, 0, proto.OTA_REASON_NO_SPACE, "flash: %s" % e)
    except MemoryError:
        # Out of heap says nothing about the update: never a refusal, and the frame comes
        # again. A stream prefix collected in order so far stays: it is on flash, and it
        # is checked as a whole before anything reaches the slot. So does a download whose
        # manifest passed its check (no report: the gateway resends the chunk). Only an
        # unchecked manifest is dropped, and IDLE ("no manifest here") has the gateway
        # send it again.
        import log

        log.warn("OTA frame %d: out of heap, it comes again", ftype)
        h = _hdr
        if _begun:
            return
        if h is not None and h["v"] == f[1]:
            if h["m"] < 0:
                _progress(f[1])  # the prefix so far stays; its next index costs a stat
                return
            if h.get("ok", 1):
                return  # checked in an earlier wake: it stays, the chunk comes again
        _drop_staging()
        _set_report(f[1], proto.OTA_STATE_IDLE, 0, 0, "heap")


def _refused(version, reason, detail):
    # Nothing of a refused image stays: the next manifest starts clean.
    import proto  # the codec: only a wake that sends gets here

    _drop_staging()
    state = proto.OTA_STATE_REFUSED
    if reason == proto.OTA_REASON_BAD_HASH or reason == proto.OTA_REASON_MISSING_FILE:
        state = proto.OTA_STATE_FAILED  # the manifest was good, the data was not
    _set_report(version, state, 0, reason, detail)


def _low_battery(w):
    return w.mv and w.mv < w.cfg.low_battery_mv


def _manifest(f, w):
    global _hdr
    import proto  # the codec: only a wake that sends gets here

    v = f[proto.OTA_MANIFEST_VERSION]
    cs = f[proto.OTA_MANIFEST_CHUNK_SIZE]
    man = f[proto.OTA_MANIFEST_MANIFEST]
    sig = f[proto.OTA_MANIFEST_SIGNATURE]
    if _low_battery(w):
        _set_report(v, proto.OTA_STATE_REFUSED, 0, proto.OTA_REASON_LOW_BATTERY, "%d mV" % w.mv)
        return
    h = _load()
    sh = binascii.hexlify(sig).decode()
    if h is not None and h["v"] == v and h["cs"] == cs and h["sig"] == sh:
        # The same update again (a lost status, a new campaign for it): resume.
        _progress(v)
        return
    _drop_staging()
    if man:
        # Staged unchecked: check_staged() verifies it at the start of the next sending
        # wake, on a heap that holds no session yet; nothing is written to the slot before.
        _write(_MAN, struct.pack("<H", len(man)) + bytes(man))
        _hdr = {"v": v, "cs": cs, "sig": sh, "m": 0, "ok": 0}
    else:
        # Too big for the class's frames: it comes first in the chunk stream.
        _hdr = {"v": v, "cs": cs, "sig": sh, "m": -1, "ok": 0}
        _write(_MAN, b"")
    _write(_HDR, json.dumps(_hdr))
    _progress(v)


def _resume():
    # Reopen the staged download in this process: the slot API checks the manifest again,
    # its signature by the seal check_staged() left (no second Ed25519 amid a session).
    global _begun, _n
    if _begun:
        return True
    h = _hdr
    if not h.get("ok", 1):
        return False  # not checked yet: check_staged() comes first
    raw = _read(_MAN)
    if h["m"] < 0 or raw is None or len(raw) < 2:
        return False
    man = raw[2:2 + struct.unpack_from("<H", raw, 0)[0]]
    _n = slots.begin(man, binascii.unhexlify(h["sig"]), h["cs"], _where() + _SEAL)[1]
    _begun = True
    return True


def check_staged(cfg):
    """At the start of a sending wake, before the radio: the check (Ed25519 and the rest)
    of a manifest an earlier wake staged, on a heap that holds no session, frames or chunks
    yet. The outcome goes into this wake's OTA_STATUS; a refused manifest is dropped. A
    download whose manifest passed its check in an earlier wake is reopened here too: the
    manifest read back and parsed takes blocks of its size, which a heap with a session up
    may no longer have."""
    global _reboot
    h = _load()
    if h is None or h["m"] < 0:
        return
    import gc

    import proto  # the codec: only a wake that sends gets here

    v = h["v"]
    checked = h.get("ok", 1)
    try:
        if checked:
            # False (its manifest gone): the first chunk has it sent again.
            if _resume() and h.get("done"):
                _finish(h, cfg)  # every chunk in: the check that found no room last wake
        else:
            h["ok"] = 1
            if _resume():
                _write(_HDR, json.dumps(h))
                _progress(v)
                _reboot = True  # a fresh heap for the session (restart_due)
            else:
                # Staging without its manifest (a cut write): have the manifest sent again.
                _drop_staging()
                _set_report(v, proto.OTA_STATE_IDLE, 0)
    except slots.Refused as e:
        _refused(v, e.reason, e.detail)
    except OSError as e:
        _drop_staging()
        _set_report(v, proto.OTA_STATE_FAILED, 0, proto.OTA_REASON_NO_SPACE, "flash: %s" % e)
    except MemoryError:
        # Never a refusal. Checked in an earlier wake: a chunk reopens it. Unchecked: the
        # manifest is sent again and checked in a later wake.
        if not checked:
            _drop_staging()
            _set_report(v, proto.OTA_STATE_IDLE, 0, 0, "heap")
    gc.collect()  # the verifier's garbage goes before the session's buffers come


def restart_due():
    """check_staged passed a check with Ed25519 at this wake's start (a staged manifest,
    or the whole slot once every chunk is in, which set the trial): the wake should
    restart now, before the send code and the session load on a heap the verifier left
    fragmented. The next boot sends on a fresh heap. Its progress report, lost with the
    restart, is no loss: the gateway's next chunks find the download reopened."""
    return _reboot


def _prefix_len():
    # Its size on flash: the prefix grows a chunk at a time, and reading it whole to
    # measure it took a block of its size from a heap a session already holds.
    return _size(_MAN)


def _next_index():
    # Wire index of the first chunk the node still needs.
    h = _hdr
    if h["m"] < 0:
        return _prefix_len() // h["cs"]
    if not _resume():
        return h["m"]  # the manifest is here: the image's chunks once it passes its check
    k = slots.missing()
    if k < 0:
        return h["m"] + _n
    return h["m"] + k


def _progress(v):
    import proto  # the codec: only a wake that sends gets here

    _set_report(v, proto.OTA_STATE_DOWNLOADING, _next_index())


def _chunk(f, w):
    import proto  # the codec: only a wake that sends gets here

    v = f[proto.OTA_CHUNK_VERSION]
    i = f[proto.OTA_CHUNK_INDEX]
    data = f[proto.OTA_CHUNK_DATA]
    h = _load()
    if h is None or h["v"] != v:
        r = _report
        if r is not None and r[0] == v and r[1] in (proto.OTA_STATE_REFUSED, proto.OTA_STATE_FAILED):
            return  # this wake refused its manifest: the refusal is the answer, not "resend"
        # No manifest for this version here (lost): ask for it again.
        _set_report(v, proto.OTA_STATE_IDLE, 0)
        return
    if time.ticks_diff(time.ticks_ms(), w.t0) > w.cfg.awake_budget_ms - RESERVE_MS:
        return  # out of awake time: the gateway sends it again next wake
    if h["m"] < 0:
        _prefix_chunk(h, i, data, v)
        return
    if i < h["m"]:
        return  # a prefix chunk again: already have it
    if not _resume():
        if h.get("ok", 1):
            # Checked once but its manifest is gone (a cut write): have it sent again.
            _drop_staging()
            _set_report(v, proto.OTA_STATE_IDLE, 0)
            return
        _progress(v)
        return  # the manifest is not checked yet (next wake): the chunk comes again
    if h.get("done"):
        return  # every chunk is in: the next sending wake checks the slot
    slots.write_chunk(i - h["m"], data)
    if slots.missing() >= 0:
        _progress(v)
        return
    try:
        _finish(h, w.cfg)
    except MemoryError:
        # The whole-slot check (Ed25519 among it) found no room beside the session: it
        # runs at the start of the next sending wake (check_staged), before the radio.
        h["done"] = 1
        _write(_HDR, json.dumps(h))
        _set_report(v, proto.OTA_STATE_DOWNLOADING, h["m"] + _n)
        return
    w.effects.reboot = True


def _finish(h, cfg):
    global _reboot
    import log
    import proto  # the codec: only a wake that sends gets here

    n = h["m"] + _n
    slots.finish()
    slots.set_trial(1, cfg.trial_outage_boots)
    log.info("OTA: v%d in, checked whole: trial set", h["v"])
    # The download is over: the slot and the bootloader's record hold everything now.
    _drop_staging()
    _set_report(h["v"], proto.OTA_STATE_TRIAL, n)
    _reboot = True


def _prefix_chunk(h, i, data, v):
    global _begun
    import proto  # the codec: only a wake that sends gets here

    cs = h["cs"]
    have = _prefix_len()
    at = have - i * cs  # where this chunk's bytes go on: 0 but after an append cut short
    if at < 0 or at >= max(len(data), 1):
        _progress(v)
        return  # in order only: the prefix has no resume map of its own
    if i == 0:
        if len(data) < 2:
            raise slots.Refused(proto.OTA_REASON_TRUNCATED, "manifest length")
        need = 2 + struct.unpack_from("<H", data, 0)[0]
        if need - 2 > slots.MAX_MANIFEST:
            raise slots.Refused(proto.OTA_REASON_BAD_MANIFEST, "manifest size")
    else:
        need = 2 + struct.unpack_from("<H", _read(_MAN, 2), 0)[0]
    if len(data) != min(cs, need - i * cs):
        raise slots.Refused(proto.OTA_REASON_TRUNCATED, "chunk %d has %d bytes" % (i, len(data)))
    _write(_MAN, data[at:] if at else data, "ab")
    have += len(data) - at
    if have < need:
        _progress(v)
        return
    h["m"] = (need + cs - 1) // cs
    h["ok"] = 0  # checked by check_staged() at the start of the next sending wake
    _begun = False
    _write(_HDR, json.dumps(h))
    _progress(v)


def after_window(client, w):
    """Publish this wake's OTA_STATUS, if any (after the window, once)."""
    global _report
    import proto  # the codec: only a wake that sends gets here

    r = _report
    if r is None:
        return
    _report = None
    n = proto.encode_ota_status(w.out, w.st.msg_id(), r[0], r[1], r[2], r[3], r[4])
    client.publish_out(w.up_topic, n, 1)
