# The bootloader's state record and slot API on a real littlefs image (boards/simflash.py):
# state transitions, atomic saves under torn writes, install/resume/confirm, and every
# refusal reason, each leaving the running slot and the state record as they were.
# The manifests below are signed with RFC 8032's public test keys 1 and 2 (section 7.1),
# so anyone can re-create them with `cryptography`; only key 1 is trusted (fleet_keys).
import os
import sys

import bootstate
import mpunit
import simflash
import slots
import trusted_keys
import vfs

MNT = "/flash"
CS = 64  # chunk size

K1_ID = '21fe31df'
K1_PUB = b'\xd7Z\x98\x01\x82\xb1\n\xb7\xd5K\xfe\xd3\xc9d\x07:\x0e\xe1r\xf3\xda\xa6#%\xaf\x02\x1ah\xf7\x07Q\x1a'
K2_ID = '39f713d0'

FILES = {"app.mpy": bytes(range(256)) * 2 + b"tail", "main.mpy": b"print('image main')\n" * 7}

V1 = (
    b'{"board":"sim","display":"1","files":[{"path":"app.mpy","sha256":"0eab4186793e884baf23a388179b63638b6cbbec858076a086b7c358b8cd8613","size":516},{"path":"main.mpy","sha256":"366f53cab229571993f91294f08aa1eb95ec350e25cae06132b9682568d81324","size":140}],"key_id":"21fe31df","min_bootloader":1,"version":1}',
    b'HMm\x9eYx\xc5\t\xac\xbf\xcd\xb2\xf1\x96f\xbb\xed1\x9eG\xf1C\xeb\xe9\xe9Ux\xd0:\xe1\xdc%\xf6\xe3\xe9\xdc\xdaW\x9f\x15\x81\x10`\xe5\xf7\x1dV\xe6\xe0gH\xde\xcex\xc9&\xacy\x89\x0bP\x8b\xd2\x02',
)
V2 = (
    b'{"board":"sim","display":"2","files":[{"path":"app.mpy","sha256":"0eab4186793e884baf23a388179b63638b6cbbec858076a086b7c358b8cd8613","size":516},{"path":"main.mpy","sha256":"366f53cab229571993f91294f08aa1eb95ec350e25cae06132b9682568d81324","size":140}],"key_id":"21fe31df","min_bootloader":1,"version":2}',
    b'\xb3\x02\x88c\xc07\x87bfGn\x9b?\xc3\x12\xfa\x1f\xf8)Q%\xe9\x84\xd1u\x1f\xf6H\xb5\xaa\xfb\xec\xeaH1\x0f\xfcl\xa6\xdc\xb4H\x9c\x94\xac\x021\xd7\xc1\x86\xdfF\x92\x03\x8c\x83\x90\xc2JF\xe1\x1cL\x0f',
)
V3 = (
    b'{"board":"sim","display":"3","files":[{"path":"app.mpy","sha256":"0eab4186793e884baf23a388179b63638b6cbbec858076a086b7c358b8cd8613","size":516},{"path":"main.mpy","sha256":"366f53cab229571993f91294f08aa1eb95ec350e25cae06132b9682568d81324","size":140}],"key_id":"21fe31df","min_bootloader":1,"version":3}',
    b'M+JF\xf78\xbfI\xbdt\x8f\xbf\x91\xfa\xbd\xd6\xb2v8\xbckH\xcd\xf1v\xda\xa0\xb6\xa4\xa1\x8c\x95\xf2\xc4\xf6\x8b\xaa:\xa7\xe7T\x14\x81\x8c\xb5\xc8\xcbA\xe2n\xa4O!\xca\xa8\xb4\xf8y@\n\xb6\xdc\xb6\x02',
)
V2_K2 = (
    b'{"board":"sim","display":"2","files":[{"path":"app.mpy","sha256":"0eab4186793e884baf23a388179b63638b6cbbec858076a086b7c358b8cd8613","size":516},{"path":"main.mpy","sha256":"366f53cab229571993f91294f08aa1eb95ec350e25cae06132b9682568d81324","size":140}],"key_id":"39f713d0","min_bootloader":1,"version":2}',
    b'\x98\xe4\xf8Wh\xedu\x06\n\x18\x0e\xad\xa9"K\xcf\xdfcj\xb5S\xb3p3\x06\xcf\xaf\xb7E\xfd\xba\x9a\x8c\xcb\xef\x7fa\xdf\\8\xcd\xc8B\xac\x8e\xb1\xcc`8\x13\xa6\x18\x8d\x8c\xa91\\L\xef\xaf\xce\xa2\xd5\x07',
)
V2_ESP32 = (
    b'{"board":"esp32","display":"2","files":[{"path":"app.mpy","sha256":"0eab4186793e884baf23a388179b63638b6cbbec858076a086b7c358b8cd8613","size":516},{"path":"main.mpy","sha256":"366f53cab229571993f91294f08aa1eb95ec350e25cae06132b9682568d81324","size":140}],"key_id":"21fe31df","min_bootloader":1,"version":2}',
    b'@\xf3\xc8W\t\xe7i\xca\xed=r\x81\xa8\x00\x1aI\x9ffp\xe6\xbd\x05\xea\xe7,\x8a\x19\n\x11\x9b\x17&\xe6J\x8c\x03\xcb\x14\xc3\x7f\xa67T\xb5F\xa2\x86j\x9acHUY\xa5\xd0\x9f\xb2V\x8f\x9e\x1c|\xab\x0b',
)
V2_MB9 = (
    b'{"board":"sim","display":"2","files":[{"path":"app.mpy","sha256":"0eab4186793e884baf23a388179b63638b6cbbec858076a086b7c358b8cd8613","size":516},{"path":"main.mpy","sha256":"366f53cab229571993f91294f08aa1eb95ec350e25cae06132b9682568d81324","size":140}],"key_id":"21fe31df","min_bootloader":9,"version":2}',
    b"'\x83W\x1e\x16\x90\xd4]IJ\x98\xe2\xb2\xb4\x90FjQ*\xbb4\xac\x8f\xa3\x8ae\x91d\xf1\xaf\xf1\xdb\xe1p\xffN\xcd\xacV\x89\xea\x144\xebh`a\xff\xdb\xb8\x85\xc7^\xd5=\xcf\x03;\xca\xcf\xf6\xe8\xa3\x04",
)
KEYLIST_K2 = (
    b'{"key_id":"21fe31df","keys":{"39f713d0":"3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"},"seq":1}',
    b'\xd7\xa9\xe66e\x068\xc04n6\x9f\xe8h\x9b\x8d\xb1\x12\x93nz\xde*9)\xd58u\x99\x1dk\x901kZ\x92du\x86r\x99Ko\xe7\xd6\xa8\x84\xc0\x08\xf2\x9e7a\xdf*\xc3i\xd9c\x0b\xea\xbf\xfc\x04',
)
KEYLIST_BY_K2 = (
    b'{"key_id":"21fe31df","keys":{"21fe31df":"d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"},"seq":1}',
    b"Rc\xfb|\xad\xda\xc6\x8fA\x12'\x10j\x93\xf4\xf7\x04\xb6\x7fHj\x1e\x97\xde\xaeN\xca\x06\xeb\xe0\x1f\x98\xbco\xd0\xc0\xce`\xb1t\xd6\x94~\xadK\x16]SA\x1dH\xfb\xfe\xba\xedl\xf4U/\xf2\xfa\xbf\xdc\t",
)

# Firmware key lists (JSON, then signature) by the same test keys: list 1, signed by key 1,
# adds key 2; list 2, signed by key 2, retires key 1.
KL_ADD = b'{"key_id":"21fe31df","keys":{"21fe31df":"d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a","39f713d0":"3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"},"seq":1}\x9aU\xf6S\x83\xcd\xb1(\xbb?1xY\x8a\xd7&"O\xb4\xafW\x0c\r\xe6\xa7\x91Y\xdfC\xd9\xcf\x86v\x1f\x80\x06%P\xae\x85\xad>^\xccB\x0ez\x0c\xa5[\xab\t5\x9bW=\xcc\xcc\x19\xc0]\xfd\xd4\x00'
KL_RETIRE = b'{"key_id":"39f713d0","keys":{"39f713d0":"3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"},"seq":2}\xa2\xe9\x8f\xcaz| \xca\xbf\xddo\x82T\x1a\xf1Sm"\x99\xf7\xea_2\xd4jgG\x18\xfeSZeH\xb4\x1d\x85\xea\x93\xd5g\x85\xae5s\xfb[i\xbb\x83|\xf7%\xad\x11b\xd0\xadUa\x13mf\x88\x05'


def stream():
    # The OTA stream: the manifest's files (sorted by path) back to back.
    return FILES["app.mpy"] + FILES["main.mpy"]


def _rm(path):
    try:
        os.remove(path)
    except OSError:
        pass


def fresh(name="img.bin"):
    try:
        vfs.umount(MNT)
    except OSError:
        pass
    tmp = mpunit.tmpdir()
    _rm(tmp + "/" + name)
    with open(tmp + "/fleet_keys.py", "w") as f:
        f.write("KEYS = {%r: %r}\n" % (K1_ID, K1_PUB))
    if tmp not in sys.path:
        sys.path.insert(0, tmp)
    bdev = simflash.mount(tmp + "/" + name, MNT, 4096, 64)
    slots.configure(MNT, "sim")
    bootstate.booted = None
    return bdev


def remount(name="img.bin"):
    vfs.umount(MNT)
    bdev = simflash.mount(mpunit.tmpdir() + "/" + name, MNT, 4096, 64)
    slots.configure(MNT, "sim")
    return bdev


def provision(slot, signed):
    # What `torpor fw install` does: the slot's files, then a confirmed state record.
    d = MNT + "/fw"
    for p in (d, d + "/" + slot):
        try:
            os.mkdir(p)
        except OSError:
            pass
    d += "/" + slot
    for n in FILES:
        with open(d + "/" + n, "wb") as f:
            f.write(FILES[n])
    with open(d + "/manifest.json", "wb") as f:
        f.write(signed[0])
    with open(d + "/manifest.sig", "wb") as f:
        f.write(signed[1])
    import json

    v = json.loads(signed[0])["version"]
    bootstate.save(MNT, bootstate.new(slot, v))


def download(signed, order=None, data=None):
    got, n = slots.begin(signed[0], signed[1], CS)
    s = data if data is not None else stream()
    for i in order if order is not None else range(n):
        slots.write_chunk(i, s[i * CS:(i + 1) * CS])
    return n


def snapshot():
    # The running slot's bytes and the state record: what no refusal may change.
    out = []
    for n in sorted(os.listdir(MNT + "/fw/a")):
        with open(MNT + "/fw/a/" + n, "rb") as f:
            out.append((n, f.read()))
    with open(MNT + "/fw/state.json") as f:
        out.append(f.read())
    return out


def refused(reason, fn, *args):
    e = mpunit.raises(slots.Refused, fn, *args)
    mpunit.eq(e.reason, reason, "detail: %s" % e.detail)
    return e


# ---- tests ----

def test_enums_match_the_protocol():
    import proto

    for name in ("IDLE", "TRIAL", "CONFIRMED", "REVERTED"):
        mpunit.eq(getattr(bootstate, name), getattr(proto, "OTA_STATE_" + name))
    for name in ("NONE", "BAD_SIGNATURE", "UNKNOWN_KEY", "BAD_HASH", "MISSING_FILE",
                 "WRONG_BOARD", "DOWNGRADE", "TRUNCATED", "HEALTH_CHECK", "CRASHED",
                 "NO_SPACE", "BAD_MANIFEST"):
        mpunit.eq(getattr(bootstate, name), getattr(proto, "OTA_REASON_" + name), name)


_BOOT = None


def _boot():
    # The bootloader's globals: boot.py loaded under another name, so that it starts nothing.
    global _BOOT
    if _BOOT is None:
        import sim

        sys.modules["board"] = sim  # what the sim node's board shim does
        _BOOT = {"__name__": "boot_table"}
        with open(mpunit.repo_root() + "/firmware/boot.py") as f:
            exec(f.read(), _BOOT)
    return _BOOT


def test_state_transitions():
    # (The boot's decisions on these fields: tests/firmware/test_boot_table.py.)
    st = bootstate.new("a", 1)
    assert not bootstate.confirm(st)
    bootstate.set_trial(st, "b", 2)
    mpunit.eq((st["trial"], st["tver"], st["ota"]), ("b", 2, bootstate.TRIAL))
    mpunit.eq((st["tboots"], st["max"], st["nonet"], st["nmax"]), (0, 1, 0, bootstate.OUTAGE_BOOTS))
    bootstate.no_network(st)  # no trial boot yet: nothing to forgive
    mpunit.eq(st["nonet"], 0)
    st["tboots"] = 1  # as the bootloader counts a trial boot
    bootstate.no_network(st)
    bootstate.no_network(st)  # one per trial boot
    mpunit.eq((st["tboots"], st["nonet"]), (1, 1))
    r = dict(st)
    _boot()["_revert"](r, bootstate.CRASHED)
    mpunit.eq((r["active"], r["ver"], r["floor"], r["trial"]), ("a", 1, 1, ""))
    mpunit.eq((r["ota"], r["reason"], r["rver"]), (bootstate.REVERTED, bootstate.CRASHED, 2))
    bootstate.set_trial(st, "b", 2, 3)
    mpunit.eq((st["tboots"], st["max"]), (0, 3))
    assert bootstate.confirm(st)
    mpunit.eq((st["active"], st["ver"], st["floor"], st["trial"], st["ota"]), ("b", 2, 2, "", bootstate.CONFIRMED))
    bootstate.clear_report(st)
    mpunit.eq((st["ota"], st["reason"]), (bootstate.IDLE, bootstate.NONE))


def test_status_is_the_bootloaders_record_until_the_next_save():
    fresh()
    st = bootstate.new("a", 1)
    bootstate.save(MNT, st)
    # As boot.choose() leaves it: the HELLO's outcome without reading the file again.
    bootstate.report = (bootstate.REVERTED, bootstate.CRASHED, 2)
    os.remove(bootstate.boot_dir(MNT) + "/state.json")
    mpunit.eq(slots.status(), (bootstate.REVERTED, bootstate.CRASHED, 2))
    bootstate.save(MNT, st)  # any change on flash: the file tells again
    mpunit.eq(bootstate.report, None)
    mpunit.eq(slots.status(), (bootstate.IDLE, bootstate.NONE, 0))


def test_state_record_survives_torn_saves():
    fresh()
    bootstate.save(MNT, bootstate.new("a", 1))
    mpunit.eq(bootstate.load(MNT)["seq"], 1)
    # A leftover temporary file (a save cut before its rename) is ignored and removed.
    with open(MNT + "/fw/state.tmp", "w") as f:
        f.write('{"active": "b"')
    mpunit.eq(bootstate.load(MNT)["active"], "a")
    assert "state.tmp" not in os.listdir(MNT + "/fw")
    # Cut the flash at every write of a save in turn: after a remount the record is the
    # old one or the new one, whole.
    cuts = 0
    for n in range(200):
        st = bootstate.load(MNT)
        old = st["seq"]
        st["trial"] = "b" if st["trial"] == "" else ""
        st["tver"] = 7 if st["trial"] else 0
        bdev = remount()
        bdev.tear_after(n, n + 1)
        try:
            bootstate.save(MNT, st)
            done = True
        except (simflash.PowerCut, OSError):
            # littlefs may turn the cut into its own error code: only a cut may fail.
            if not bdev.dead:
                raise
            done = False
            cuts += 1
        bdev.dead = True  # nothing after the cut reaches flash
        remount()
        got = bootstate.load(MNT)
        assert got is not None, "record lost after a cut at write %d" % n
        assert got["seq"] in (old, old + 1), (got["seq"], old)
        if got["seq"] == old + 1:
            mpunit.eq(got["trial"], st["trial"])
        if done:
            break
    assert cuts >= 2, cuts
    # An unreadable record reads as none: the bootloader then recovers from the slots.
    with open(MNT + "/fw/state.json", "w") as f:
        f.write("{not json")
    mpunit.eq(bootstate.load(MNT), None)


def test_install_confirm_and_resume():
    fresh()
    provision("a", V1)
    got, n = slots.begin(V2[0], V2[1], CS)
    mpunit.eq(got, 0)
    s = stream()
    mpunit.eq(n, (len(s) + CS - 1) // CS)
    # Out of order, with a repeat, then a reboot half-way: the map in flash resumes it.
    for i in range(n - 1, n // 2, -1):
        slots.write_chunk(i, s[i * CS:(i + 1) * CS])
    slots.write_chunk(n - 1, s[(n - 1) * CS:])
    remount()
    got, n2 = slots.begin(V2[0], V2[1], CS)
    mpunit.eq((got, n2), (n - 1 - n // 2, n))
    mpunit.eq(slots.missing(), 0)
    for i in range(n // 2 + 1):
        slots.write_chunk(i, s[i * CS:(i + 1) * CS])
    mpunit.eq(slots.missing(), -1)
    mpunit.eq(slots.finish(), 2)
    mpunit.eq(slots.set_trial(), 2)
    st = bootstate.load(MNT)
    mpunit.eq((st["active"], st["trial"], st["tver"], st["ota"]), ("a", "b", 2, bootstate.TRIAL))
    mpunit.eq(slots.status(), (bootstate.TRIAL, bootstate.NONE, 2))
    # No second update while one is on trial; the trial slot is not written.
    refused(bootstate.NONE, slots.begin, V3[0], V3[1], CS)
    bootstate.booted = ("b", 2, True)
    assert slots.confirm()
    st = bootstate.load(MNT)
    mpunit.eq((st["active"], st["ver"], st["floor"], st["trial"]), ("b", 2, 2, ""))
    mpunit.eq(slots.status(), (bootstate.CONFIRMED, bootstate.NONE, 2))
    slots.clear_report()
    mpunit.eq(slots.status()[0], bootstate.IDLE)
    assert not slots.confirm()
    # The next update goes to slot a, the one not running.
    download(V3)
    mpunit.eq(slots.finish(), 3)
    mpunit.eq(slots.set_trial(), 3)
    mpunit.eq(bootstate.load(MNT)["trial"], "a")


def test_refusals_leave_the_running_slot_alone():
    fresh()
    provision("a", V1)
    before = snapshot()
    bad_sig = bytearray(V2[1])
    bad_sig[5] ^= 1
    refused(bootstate.BAD_SIGNATURE, slots.begin, V2[0], bytes(bad_sig), CS)
    bad_man = bytearray(V2[0])
    bad_man[bad_man.find(b'"version":2')+10] = ord("9")
    refused(bootstate.BAD_SIGNATURE, slots.begin, bytes(bad_man), V2[1], CS)
    refused(bootstate.UNKNOWN_KEY, slots.begin, V2_K2[0], V2_K2[1], CS)
    refused(bootstate.WRONG_BOARD, slots.begin, V2_ESP32[0], V2_ESP32[1], CS)
    refused(bootstate.BAD_MANIFEST, slots.begin, V2_MB9[0], V2_MB9[1], CS)
    refused(bootstate.BAD_MANIFEST, slots.begin, b"{}", V2[1], CS)
    refused(bootstate.DOWNGRADE, slots.begin, V1[0], V1[1], CS)  # the running version again
    mpunit.eq(snapshot(), before)
    # Truncated chunk stream: a short chunk, an index past the end, a missing chunk.
    n = (len(stream()) + CS - 1) // CS
    slots.begin(V2[0], V2[1], CS)
    refused(bootstate.TRUNCATED, slots.write_chunk, 0, stream()[:CS - 1])
    refused(bootstate.TRUNCATED, slots.write_chunk, n, b"x")
    download(V2, order=range(n - 1))
    refused(bootstate.TRUNCATED, slots.finish)
    refused(bootstate.BAD_HASH, slots.set_trial)  # main.mpy is short of its last chunk
    # Tampered data: every chunk arrives, the hash does not match.
    s = bytearray(stream())
    s[100] ^= 0xFF
    slots.configure(MNT, "sim")
    _rm(MNT + "/fw/b/.chunks")
    download(V2, data=bytes(s))
    refused(bootstate.BAD_HASH, slots.finish)
    refused(bootstate.BAD_HASH, slots.set_trial)
    # A file that disappears between finish and set_trial.
    slots.configure(MNT, "sim")
    _rm(MNT + "/fw/b/.chunks")
    download(V2)
    mpunit.eq(slots.finish(), 2)
    os.remove(MNT + "/fw/b/main.mpy")
    slots.configure(MNT, "sim")
    refused(bootstate.MISSING_FILE, slots.set_trial)
    mpunit.eq(snapshot(), before)
    mpunit.eq(slots.check(MNT, "a", True)[0], bootstate.NONE)
    mpunit.eq(bootstate.load(MNT)["trial"], "")


def test_replayed_older_manifest_after_an_update():
    fresh()
    provision("a", V1)
    download(V3)
    slots.finish()
    slots.set_trial()
    bootstate.booted = ("b", 3, True)
    assert slots.confirm()
    before = bootstate.load(MNT)
    # v2 is newer than what ran before, but older than the floor (3): refused.
    refused(bootstate.DOWNGRADE, slots.begin, V2[0], V2[1], CS)
    refused(bootstate.DOWNGRADE, slots.begin, V3[0], V3[1], CS)
    mpunit.eq(bootstate.load(MNT), before)


def test_no_space():
    fresh()
    provision("a", V1)
    # Fill the flash so that the image cannot fit next to the running one.
    with open(MNT + "/fill", "wb") as f:
        blk = b"\x00" * 4096
        while os.statvfs(MNT)[3] > 6:
            f.write(blk)
            f.flush()
    refused(bootstate.NO_SPACE, slots.begin, V2[0], V2[1], CS)
    mpunit.eq(slots.check(MNT, "a", True)[0], bootstate.NONE)


def test_boot_check_takes_sizes_from_one_listing():
    # The check of every boot (full=False) reads the slot's sizes from one directory
    # listing: a longer file, a missing one and a directory under a file's name are still
    # refused as they were with a stat per file.
    fresh()
    provision("a", V1)
    d = MNT + "/fw/a"
    mpunit.eq(slots.check(MNT, "a", False)[0], bootstate.NONE)
    mpunit.eq(slots._sizes(d), {n: len(FILES[n]) for n in FILES} | {"manifest.json": len(V1[0]), "manifest.sig": 64})
    with open(d + "/app.mpy", "ab") as f:
        f.write(b"x")
    mpunit.eq(slots.check(MNT, "a", False)[0], bootstate.BAD_HASH)
    os.remove(d + "/app.mpy")
    mpunit.eq(slots.check(MNT, "a", False)[0], bootstate.MISSING_FILE)
    os.mkdir(d + "/app.mpy")
    mpunit.eq(slots.check(MNT, "a", False)[0], bootstate.MISSING_FILE)
    mpunit.eq(slots._sizes(MNT + "/fw/none"), {})


def test_key_list_update_adds_and_retires_keys():
    fresh()
    provision("a", V1)
    mpunit.eq(list(trusted_keys.keys(MNT)), [K1_ID])
    # A list naming key 1 as its signer but signed by key 2 (not trusted yet).
    mpunit.eq(trusted_keys.update(MNT, KEYLIST_BY_K2[0], KEYLIST_BY_K2[1]), bootstate.BAD_SIGNATURE)
    sig = bytearray(KEYLIST_K2[1])
    sig[0] ^= 1
    mpunit.eq(trusted_keys.update(MNT, KEYLIST_K2[0], bytes(sig)), bootstate.BAD_SIGNATURE)
    mpunit.eq(trusted_keys.update(MNT, b"[1]", KEYLIST_K2[1]), bootstate.BAD_MANIFEST)
    mpunit.eq(trusted_keys.update(MNT, KEYLIST_K2[0], KEYLIST_K2[1]), bootstate.NONE)
    mpunit.eq(list(trusted_keys.keys(MNT)), [K2_ID])
    # The same list again is refused: its signer is retired now (and its seq is not newer).
    mpunit.eq(trusted_keys.update(MNT, KEYLIST_K2[0], KEYLIST_K2[1]), bootstate.UNKNOWN_KEY)
    # Key 1 is retired: its manifests are refused; key 2's are taken.
    refused(bootstate.UNKNOWN_KEY, slots.begin, V2[0], V2[1], CS)
    download(V2_K2)
    mpunit.eq(slots.finish(), 2)
    # The running image (signed by the retired key) no longer checks out, by design: a
    # rotation ships a re-signed image before retiring the old key (docs/bootloader.md).
    mpunit.eq(slots.check(MNT, "a", False)[0], bootstate.UNKNOWN_KEY)


class _Rtc:
    # RTC memory for state.State, as a board keeps it between wakes.
    def __init__(self):
        self.m = b""

    def rtc_memory(self):
        return self.m

    def rtc_memory_write(self, buf):
        self.m = bytes(buf)


def _staged():
    # A list waits for its check (keylist's marker).
    try:
        return any(n.startswith("L") for n in os.listdir(MNT + "/kl"))
    except OSError:
        return False


def _state():
    import state

    return state.State(_Rtc(), MNT)


def _pieces(blob, seq, size, order, cid=1):
    # set_keys pieces of `blob` as the gateway cuts them (command ids cid, cid+1, ...), put
    # in `order`; the last answer (None: the list is staged, answered by apply_staged).
    import keylist

    offs = list(range(0, len(blob), size))
    out = None
    for i in order(len(offs)):
        out = keylist.put_piece(seq, offs[i], len(blob), blob[offs[i]:offs[i] + size], MNT, cid + i)
    return out


def _answers(st, n):
    # (command id, status, detail, values) of the last n results the node keeps to send.
    import proto

    out = []
    for r in st.results[-n:]:
        f = proto.decode(r)[1]
        out.append((f[proto.COMMAND_RESULT_COMMAND_ID], f[proto.COMMAND_RESULT_STATUS],
                    f[proto.COMMAND_RESULT_DETAIL], tuple(f[proto.COMMAND_RESULT_VALUES])))
    return out


def _stage_and_apply(blob, seq, size, order=range, cid=1):
    # The wake that takes the pieces, then the start of the next sending wake: the
    # answer to the command whose piece completed the list.
    import keylist

    last = cid + list(order(len(range(0, len(blob), size))))[-1]
    mpunit.eq(_pieces(blob, seq, size, order, cid), None)
    st = _state()
    mpunit.eq(keylist.apply_staged(st, MNT), 1)
    got = _answers(st, 1)[0]
    mpunit.eq((got[0], got[3]), (last, (seq,)))
    return got[1], got[2]


def test_set_keys_pieces_stage_a_list_and_the_next_wake_applies_it():
    import keylist
    import proto

    fresh()
    provision("a", V1)  # the running image, signed by key 1
    # The last piece only stages the list: no check, no verifier loaded, the list as it was.
    for m in ("ed25519", "sha512"):
        sys.modules.pop(m, None)
    mpunit.eq(_pieces(KL_ADD, 1, 64, range, 40), None)
    assert "ed25519" not in sys.modules
    mpunit.eq(trusted_keys.seq(MNT), 0)
    mpunit.eq(_staged(), True)
    # The same piece delivered again before the check is still not answered.
    last = (len(KL_ADD) - 1) // 64 * 64
    cid = 40 + last // 64
    mpunit.eq(keylist.put_piece(1, last, len(KL_ADD), KL_ADD[last:], MNT, cid), None)
    st = _state()
    mpunit.eq(keylist.apply_staged(st, MNT), 1)
    mpunit.eq(_answers(st, 1), [(cid, proto.RESULT_STATUS_OK, "applied", (1,))])
    assert "ed25519" not in sys.modules  # the verifier left the heap with the check
    mpunit.eq(_staged(), False)
    mpunit.eq(os.listdir(MNT + "/kl"), [])  # the pieces are gone once applied
    mpunit.eq(sorted(trusted_keys.keys(MNT)), [K1_ID, K2_ID])
    mpunit.eq(keylist.apply_staged(st, MNT), 0)


def test_set_keys_refusals_come_with_the_next_wake():
    import keylist
    import proto

    fresh()
    provision("a", V1)  # the running image, signed by key 1
    # Retiring key 1 by a list signed by key 2, which is not trusted yet: unknown_key.
    mpunit.eq(_stage_and_apply(KL_RETIRE, 2, 100), (proto.RESULT_STATUS_REFUSED, "unknown_key"))
    mpunit.eq(trusted_keys.seq(MNT), 0)
    mpunit.eq(os.listdir(MNT + "/kl"), [])  # a refused list leaves nothing
    # Key 2 added, its pieces arriving out of order (a lost one sent again next wake).
    mpunit.eq(_stage_and_apply(KL_ADD, 1, 64, lambda n: [2, 0] + list(range(3, n)) + [1], 10),
              (proto.RESULT_STATUS_OK, "applied"))
    mpunit.eq(trusted_keys.seq(MNT), 1)
    # A piece of the list held again is harmless; an older seq is a downgrade.
    mpunit.eq(keylist.put_piece(1, 0, len(KL_ADD), KL_ADD[:64], MNT), (proto.RESULT_STATUS_OK, "held"))
    mpunit.eq(keylist.put_piece(1, 0, 10, b"x", MNT)[1], "held")
    bad = bytearray(KL_RETIRE)  # its signature broken
    bad[-1] ^= 1
    # Retiring key 1 while the running image is signed by it: refused, nothing changes.
    mpunit.eq(_stage_and_apply(KL_RETIRE, 2, 100, cid=15),
              (proto.RESULT_STATUS_REFUSED, "retires %s of the running image" % K1_ID))
    mpunit.eq(trusted_keys.seq(MNT), 1)
    # Once the node runs an image signed by key 2, key 1 can go; not with a bad signature.
    download(V2_K2)
    mpunit.eq(slots.finish(), 2)
    st = bootstate.load(MNT)
    st["active"], st["ver"] = "b", 2
    bootstate.save(MNT, st)
    mpunit.eq(_stage_and_apply(bytes(bad), 2, 100, cid=20), (proto.RESULT_STATUS_REFUSED, "bad_signature"))
    mpunit.eq(trusted_keys.seq(MNT), 1)
    mpunit.eq(_stage_and_apply(KL_RETIRE, 2, 100, cid=30), (proto.RESULT_STATUS_OK, "applied"))
    mpunit.eq(list(trusted_keys.keys(MNT)), [K2_ID])
    mpunit.eq(keylist.put_piece(1, 0, len(KL_ADD), KL_ADD[:64], MNT)[0], proto.RESULT_STATUS_REFUSED)


def test_two_lists_in_one_wake_apply_in_order():
    # A node that lacks lists 1 and 2 gets both in one wake; list 2 is signed by key 2,
    # which only list 1 brings: the check takes them in seq order.
    import keylist
    import proto

    fresh()
    provision("b", V2_K2)  # running an image signed by key 2 (installed, not downloaded)
    mpunit.eq(_pieces(KL_ADD, 1, 100, range, 1), None)
    mpunit.eq(_pieces(KL_RETIRE, 2, 100, range, 10), None)
    s = _state()
    mpunit.eq(keylist.apply_staged(s, MNT), 2)
    mpunit.eq([a[:3] for a in _answers(s, 2)],
              [(3, proto.RESULT_STATUS_OK, "applied"), (11, proto.RESULT_STATUS_OK, "applied")])
    mpunit.eq(list(trusted_keys.keys(MNT)), [K2_ID])


def test_a_cut_at_every_flash_write_of_a_key_list_leaves_the_old_list_or_the_new():
    # From the first piece to the answer, the flash cut at each write in turn; after the
    # cut the node boots again, the gateway sends again what was not answered (a piece
    # whose answer was not recorded), and the next wake's check runs. The trusted list is
    # always the old one or the new one, whole, and the list ends applied and answered once.
    import keylist
    import proto

    size = 64
    offs = list(range(0, len(KL_ADD), size))
    cuts = 0
    for n in range(400):
        fresh("cut.bin")
        provision("a", V1)
        bdev = remount("cut.bin")
        bdev.tear_after(n, n + 1)
        answered = {}
        done = False
        try:
            for i, off in enumerate(offs):  # the wake that takes the pieces
                r = keylist.put_piece(1, off, len(KL_ADD), KL_ADD[off:off + size], MNT, 1 + i)
                if r is not None:
                    answered[1 + i] = r
            st = _state()  # the next sending wake's start
            keylist.apply_staged(st, MNT)  # it logs a flash error and leaves the list
            done = not bdev.dead
        except (simflash.PowerCut, OSError):
            if not bdev.dead:
                raise
        cuts += not done
        bdev.dead = True
        remount("cut.bin")
        mpunit.eq(trusted_keys.seq(MNT) in (0, 1), True)
        mpunit.eq(sorted(trusted_keys.keys(MNT)) in ([K1_ID], [K1_ID, K2_ID]), True)
        if done:
            break
        # After the cut: the gateway sends again every piece not answered (a result the
        # cut kept is in state.bin), then a sending wake checks what is staged.
        st = _state()
        for i, off in enumerate(offs):
            cid = 1 + i
            if st.was_executed(cid) or (cid in answered and cid != len(offs)):
                continue
            r = keylist.put_piece(1, off, len(KL_ADD), KL_ADD[off:off + size], MNT, cid)
            if r is not None:
                answered[cid] = r
        keylist.apply_staged(st, MNT)
        mpunit.eq(trusted_keys.seq(MNT), 1)
        last = len(offs)
        if st.was_executed(last):
            mpunit.eq(_answers(st, 1)[0][:3], (last, proto.RESULT_STATUS_OK, "applied"))
        else:
            # The list was in place before its answer was: the piece again says so.
            mpunit.eq(answered[last], (proto.RESULT_STATUS_OK, "held"))
        mpunit.eq(_staged(), False)
    assert done and cuts >= 30, (done, cuts)


def test_remount_without_mtime_keeps_files_and_stops_timestamps():
    # What the bootloader does on real boards, here on a flash image mounted the way the
    # ports mount theirs (mtime on).
    img = mpunit.tmpdir() + "/mt.bin"
    bdev = simflash.FileBlockDev(img, 4096, 64)
    vfs.VfsLfs2.mkfs(bdev)
    vfs.mount(vfs.VfsLfs2(bdev), "/mt")
    with open("/mt/old.txt", "w") as f:
        f.write("kept")
    assert os.stat("/mt/old.txt")[8] != 0, "the port's default mount stores mtime"
    cwd = os.getcwd()
    try:
        assert _boot()["_remount_without_mtime"](bdev, "/mt")
        mpunit.eq(os.getcwd(), "/mt")
    finally:
        os.chdir(cwd)
    with open("/mt/old.txt") as f:
        mpunit.eq(f.read(), "kept")
    with open("/mt/new.txt", "w") as f:
        f.write("x")
    mpunit.eq(os.stat("/mt/new.txt")[8], 0)
    vfs.umount("/mt")
    # Not littlefs (an erased device): nothing changes.
    blank = simflash.FileBlockDev(mpunit.tmpdir() + "/blank.bin", 4096, 16)
    vfs.mount(vfs.VfsLfs2(bdev), "/mt")
    assert not _boot()["_remount_without_mtime"](blank, "/mt")
    with open("/mt/old.txt") as f:
        mpunit.eq(f.read(), "kept")
    vfs.umount("/mt")
    bdev.close()
    blank.close()
