# Firmware slots A and B (directories fw/a and fw/b on the flash filesystem): checking
# an image, installing one chunk by chunk into the inactive slot with a resume map, and the
# state changes the app asks for (set_trial, confirm). The bootloader uses check() too.
# A slot holds manifest.json (canonical JSON, the signed bytes), manifest.sig (64 bytes) and
# the manifest's files. Nothing here writes the confirmed slot or the slot on trial.
import binascii
import hashlib
import json
import os
import struct
import sys

import bootstate
import trusted_keys
from micropython import const

_MAP_MAGIC = const(0x4D43)  # "CM": resume map header
_MAP_HDR = const(8)  # magic u16, chunk size u16, chunk count u32
MAX_MANIFEST = bootstate.MAX_MANIFEST  # generated from the spec
SPACE_MARGIN = const(4)  # blocks kept free beyond the image (littlefs metadata)

_root = None
_board_name = None
_buf = None
_verified = None  # slot fully checked in this process (finish), for set_trial
verifies = 0  # Ed25519 verifications run in this process (the boot log reports them)
_s = None  # the download in progress


class Refused(Exception):
    """An image or request refused; args = (ota_reason, detail)."""

    def __init__(self, reason, detail=""):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


def configure(root, board_name):
    """Use another flash root or board name than the board module's (tests, tools)."""
    global _root, _board_name, _s, _verified
    _root = root
    _board_name = board_name
    _s = None
    _verified = None


def _where():
    global _root, _board_name
    if _root is None:
        import board

        _root = board.FS_ROOT
        _board_name = board.NAME
    return _root


def slot_dir(root, slot):
    return bootstate.boot_dir(root) + "/" + slot


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _read_or_none(path):
    try:
        return _read(path)
    except OSError:
        return None


def _size(path):
    try:
        return os.stat(path)[6]
    except OSError:
        return -1


def _sizes(d):
    """{name: size} of the regular files in directory d, or None when the filesystem's
    listing gives no sizes (then each file is stat'ed)."""
    out = {}
    try:
        for e in os.ilistdir(d):
            if len(e) < 4:
                return None
            if e[1] == 0x8000:  # a regular file; a directory of that name is no file
                out[e[0]] = e[3]
    except OSError:
        return {}
    return out


def _name_ok(name):
    # Plain file names only: a signed manifest still must not reach outside its slot.
    if not name or len(name) > 40 or name[0] == "." or name.startswith("manifest."):
        return False
    for c in name:
        if not (c.isalpha() or c.isdigit() or c in "_-."):
            return False
    return True


def _seal_of(pk, data, signature):
    h = hashlib.sha256(pk)
    h.update(signature)
    h.update(data)
    return h.digest()


def seal_path(root, slot):
    return bootstate.boot_dir(root) + "/" + slot + ".sealed"


def check_manifest(data, signature, board_name=None, seal=None, use_seal=False):
    """(ota_reason, manifest dict) for manifest bytes and signature: parse, trusted key,
    signature, board, bootloader version. Nothing is trusted before the signature holds.

    seal: a file that records the SHA-256 of (key, signature, manifest) once Ed25519 has
    verified them; with use_seal, the same three bytes strings found again are not
    verified again (docs/bootloader.md, "Checks per boot")."""
    global verifies
    root = _where()
    try:
        m = json.loads(data)
        kid = m["key_id"]
        files = m["files"]
        version = m["version"]
        if not isinstance(version, int) or version < 1 or not isinstance(files, list) or not files:
            raise ValueError
        for f in files:
            if not _name_ok(f["path"]) or not isinstance(f["size"], int) or len(f["sha256"]) != 64:
                raise ValueError
    except (ValueError, KeyError, TypeError):
        return bootstate.BAD_MANIFEST, None
    pk = trusted_keys.keys(root).get(kid)
    if pk is None:
        return bootstate.UNKNOWN_KEY, None
    if len(signature) != 64:
        return bootstate.BAD_SIGNATURE, None
    digest = None if seal is None else _seal_of(pk, data, signature)
    if not (use_seal and digest is not None and _read_or_none(seal) == digest):
        import ed25519

        verifies += 1
        good = ed25519.verify(pk, bytes(data), bytes(signature))
        # The verifier's code and tables leave the heap with this check: what follows it
        # (the app after the bootloader, an OTA wake's session) needs the room.
        del ed25519
        for name in ("ed25519", "sha512"):
            sys.modules.pop(name, None)
        if not good:
            return bootstate.BAD_SIGNATURE, None
        if digest is not None:
            try:
                # A cut mid-write leaves a seal that does not match: verified again.
                with open(seal, "wb") as f:
                    f.write(digest)
            except OSError:
                pass
    if m.get("board") != (board_name or _board_name):
        return bootstate.WRONG_BOARD, m
    mb = m.get("min_bootloader", 1)
    if not isinstance(mb, int) or mb > bootstate.BOOTLOADER_VERSION:
        return bootstate.BAD_MANIFEST, m
    return bootstate.NONE, m


def check_files(d, m, full):
    """ota_reason for the files of manifest m in directory d: present, sizes, and with
    full=True their SHA-256."""
    global _buf
    # Sizes from one listing of the slot: a stat per file walks the path and reads the
    # directory's log again each time (on littlefs about 13 kB of flash reads per file,
    # ~330 kB on every wake for an image of 30 files), the listing reads it once.
    sizes = _sizes(d)
    for f in m["files"]:
        n = sizes.get(f["path"], -1) if sizes is not None else _size(d + "/" + f["path"])
        if n < 0:
            return bootstate.MISSING_FILE
        if n != f["size"]:
            return bootstate.BAD_HASH
    sizes = None
    if not full:
        return bootstate.NONE
    if _buf is None:
        _buf = bytearray(1024)
    mv = memoryview(_buf)
    for f in m["files"]:
        h = hashlib.sha256()
        with open(d + "/" + f["path"], "rb") as fh:
            while True:
                k = fh.readinto(_buf)
                if not k:
                    break
                h.update(mv[:k])
        if binascii.hexlify(h.digest()).decode() != f["sha256"]:
            return bootstate.BAD_HASH
    return bootstate.NONE


def check(root, slot, full, board_name=None, use_seal=False):
    """(ota_reason, manifest) of the image in `slot`; full=True also hashes every file.
    use_seal: take the slot's seal for the signature when it matches (see check_manifest)."""
    d = slot_dir(root, slot)
    try:
        data = _read(d + "/manifest.json")
        sig = _read(d + "/manifest.sig")
    except OSError:
        return bootstate.MISSING_FILE, None
    reason, m = check_manifest(data, sig, board_name, seal_path(root, slot), use_seal)
    if reason:
        return reason, m
    return check_files(d, m, full), m


# ---- what the app reads ----

def running():
    """(slot, version, on_trial) of the image the bootloader started, or None."""
    return bootstate.booted


def status():
    """(ota_state, ota_reason, version) to report in the next HELLO."""
    r = bootstate.report
    if r is not None:
        return r  # read by the bootloader this boot, nothing saved since
    st = bootstate.load(_where())
    if st is None:
        return bootstate.IDLE, bootstate.NONE, 0
    return st["ota"], st["reason"], st["rver"]


def clear_report():
    """The gateway has the outcome (its ACK came): report idle from now on."""
    root = _where()
    st = bootstate.load(root)
    if st is not None and st["ota"] != bootstate.IDLE and st["ota"] != bootstate.TRIAL:
        bootstate.clear_report(st)
        bootstate.save(root, st)


def confirm():
    """The running trial image reached the gateway: keep it. True if this confirmed it."""
    root = _where()
    st = bootstate.load(root)
    b = bootstate.booted
    if st is None or not st["trial"] or (b is not None and b[0] != st["trial"]):
        return False
    bootstate.confirm(st)
    bootstate.save(root, st)
    return True


def trial_no_network():
    """The running trial image ends this wake cleanly but could not reach the gateway: the
    bootloader does not count the boot against it (up to its outage budget)."""
    root = _where()
    st = bootstate.load(root)
    b = bootstate.booted
    if st is None or not st["trial"] or b is None or b[0] != st["trial"] or not b[2]:
        return False
    bootstate.no_network(st)
    bootstate.save(root, st)
    return True


# ---- install into the inactive slot ----

def _state_for_update(root):
    st = bootstate.load(root)
    if st is None:
        raise Refused(bootstate.BAD_MANIFEST, "no boot state")
    if st["trial"]:
        raise Refused(bootstate.NONE, "a trial is in progress")
    return st


def _rmtree(d):
    try:
        names = os.listdir(d)
    except OSError:
        return
    for n in names:
        os.remove(d + "/" + n)


def _mkdirs(d):
    p = ""
    for part in d.split("/"):
        if not part:
            continue
        p += "/" + part
        try:
            os.mkdir(p)
        except OSError:
            pass


def begin(manifest, signature, chunk_size=1024, seal=None):
    """Start (or resume) writing the image of `manifest` into the inactive slot.

    Everything but the file contents is checked first (signature, key, board, version,
    space); a refused manifest changes nothing. Returns (chunks received, chunk count).
    seal: a file as in check_manifest, taken for the signature when it matches."""
    global _s, _verified
    root = _where()
    st = _state_for_update(root)
    if len(manifest) > MAX_MANIFEST or chunk_size < 64 or chunk_size > 0xFFFF:
        raise Refused(bootstate.BAD_MANIFEST, "size")
    reason, m = check_manifest(manifest, signature, seal=seal, use_seal=seal is not None)
    if reason:
        raise Refused(reason, "manifest")
    v = m["version"]
    if v <= st["floor"] or v <= st["ver"]:
        raise Refused(bootstate.DOWNGRADE, "version %d <= %d" % (v, max(st["floor"], st["ver"])))
    slot = bootstate.other(st["active"])
    d = slot_dir(root, slot)
    total = 0
    for f in m["files"]:
        total += f["size"]
    n = (total + chunk_size - 1) // chunk_size
    _verified = None
    mp = _resume_map(d, manifest, chunk_size, n)
    if mp is None:
        # A fresh start: the slot is not referenced by the state record, so clearing it
        # cannot hurt a boot. The map is written last: without it nothing is resumed.
        _mkdirs(d)
        _rmtree(d)
        sv = os.statvfs(root)
        need = total + len(manifest) + (len(m["files"]) + 4) * sv[0]
        if need > (sv[3] - SPACE_MARGIN) * sv[0]:
            raise Refused(bootstate.NO_SPACE, "need %d bytes" % need)
        with open(d + "/manifest.json", "wb") as f:
            f.write(manifest)
        with open(d + "/manifest.sig", "wb") as f:
            f.write(signature)
        mp = bytearray(_MAP_HDR + (n + 7) // 8)
        struct.pack_into("<HHI", mp, 0, _MAP_MAGIC, chunk_size, n)
        with open(d + "/.chunks", "wb") as f:
            f.write(mp)
    got = 0
    for i in range(n):
        if mp[_MAP_HDR + (i >> 3)] & (1 << (i & 7)):
            got += 1
    starts = []
    off = 0
    for f in m["files"]:
        starts.append(off)
        off += f["size"]
    _s = {"slot": slot, "dir": d, "m": m, "cs": chunk_size, "n": n, "map": mp, "got": got,
          "starts": starts, "total": total}
    return got, n


def _resume_map(d, manifest, chunk_size, n):
    # The map of an earlier, interrupted download of this same manifest, if there is one.
    try:
        if _read(d + "/manifest.json") != bytes(manifest):
            return None
        mp = bytearray(_read(d + "/.chunks"))
    except OSError:
        return None
    if len(mp) != _MAP_HDR + (n + 7) // 8 or struct.unpack_from("<HHI", mp, 0) != (_MAP_MAGIC, chunk_size, n):
        return None
    return mp


def _session():
    if _s is None:
        raise Refused(bootstate.NONE, "no download in progress")
    return _s


def missing():
    """Index of the first chunk not yet written, or -1 when all are in."""
    s = _session()
    mp = s["map"]
    for i in range(s["n"]):
        if not mp[_MAP_HDR + (i >> 3)] & (1 << (i & 7)):
            return i
    return -1


def write_chunk(index, data):
    """Write chunk `index` (chunk_size bytes, the last one shorter) of the image stream, the
    manifest's files back to back. Returns the number of chunks received so far."""
    s = _session()
    n, cs = s["n"], s["cs"]
    if index < 0 or index >= n:
        raise Refused(bootstate.TRUNCATED, "chunk index %d" % index)
    start = index * cs
    end = min(start + cs, s["total"])
    if len(data) != end - start:
        raise Refused(bootstate.TRUNCATED, "chunk %d has %d bytes" % (index, len(data)))
    mp = s["map"]
    byte, bit = _MAP_HDR + (index >> 3), 1 << (index & 7)
    if mp[byte] & bit:
        return s["got"]
    mv = memoryview(data)
    files = s["m"]["files"]
    for i in range(len(files)):
        fs = s["starts"][i]
        fe = fs + files[i]["size"]
        if fe <= start or fs >= end:
            continue
        a = max(start, fs)
        b = min(end, fe)
        p = s["dir"] + "/" + files[i]["path"]
        try:
            fh = open(p, "r+b")
        except OSError:
            fh = open(p, "wb")
        with fh:
            fh.seek(a - fs)
            fh.write(mv[a - start:b - start])
    # Data first, then its bit: a cut in between only makes the chunk come again.
    mp[byte] |= bit
    with open(s["dir"] + "/.chunks", "r+b") as f:
        f.seek(byte)
        f.write(mp[byte:byte + 1])
    s["got"] += 1
    return s["got"]


def finish():
    """All chunks in: check the whole slot (signature, sizes, hashes). Returns the version;
    raises Refused(reason) when a chunk is missing or the image does not check out."""
    global _verified
    s = _session()
    if missing() >= 0:
        raise Refused(bootstate.TRUNCATED, "%d of %d chunks" % (s["got"], s["n"]))
    root = _where()
    reason, m = check(root, s["slot"], True)
    if reason:
        raise Refused(reason, "slot " + s["slot"])
    _verified = s["slot"]
    return m["version"]


def set_trial(max_boots=1, outage_boots=bootstate.OUTAGE_BOOTS):
    """Make the finished slot the trial image for the next boot (reset to start it).
    `outage_boots`: boots it may end without reaching the gateway (network down)."""
    root = _where()
    st = _state_for_update(root)
    slot = bootstate.other(st["active"])
    if _verified != slot:
        reason, m = check(root, slot, True)
    else:
        reason, m = check(root, slot, False)
    if reason:
        raise Refused(reason, "slot " + slot)
    v = m["version"]
    if v <= st["floor"] or v <= st["ver"]:
        raise Refused(bootstate.DOWNGRADE, "version %d" % v)
    bootstate.set_trial(st, slot, v, max_boots, outage_boots)
    bootstate.save(root, st)
    return v
