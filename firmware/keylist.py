# Firmware key lists over the air, the node's side: set_keys COMMAND pieces gathered on
# flash, the whole list checked and applied through the bootloader's trusted_keys.update,
# and the refusals. The HELLO's keys_seq is ota.keys_seq(). docs/ota.md, "Firmware signing keys", tells the story.
#
# Pieces of one list (seq) are files kl/<seq>.<offset>; each is written whole (tmp, then
# rename), so a cut leaves a piece or none, and a repeated piece writes the same bytes.
# Once they cover `total`, the list (JSON, then a 64-byte signature) is applied, and the
# pieces go. Imported only by a wake that receives set_keys.
import os

import bootstate
import trusted_keys

_DIR = "/kl"
_SIG = 64


def _root():
    import board

    return board.FS_ROOT


def _needed_keys(root):
    # Key ids of the images this node may boot next: the confirmed one, and one on trial.
    import json

    st = bootstate.load(root)
    if st is None:
        return ()
    out = []
    for slot in (st["active"], st["trial"]):
        if not slot:
            continue
        try:
            with open(bootstate.boot_dir(root) + "/" + slot + "/manifest.json") as f:
                out.append(json.loads(f.read())["key_id"])
        except (OSError, ValueError, KeyError):
            pass
    return out


def _clear(d, keep=None):
    try:
        names = os.listdir(d)
    except OSError:
        return
    for n in names:
        if keep is None or not n.startswith(keep):
            try:
                os.remove(d + "/" + n)
            except OSError:
                pass


def put_piece(seq, offset, total, data, root=None):
    """One set_keys piece; (result status, detail). The piece that completes the list
    applies it: ok "applied", or refused with the bootloader's reason. root: another flash
    root than the board's (tests)."""
    import proto

    root = root or _root()
    have = trusted_keys.seq(root)
    if seq == have:
        return proto.RESULT_STATUS_OK, "held"
    if seq < have:
        return proto.RESULT_STATUS_REFUSED, "downgrade: holds seq %d" % have
    if offset + len(data) > total or not data:
        return proto.RESULT_STATUS_BAD_ARGS, "piece beyond total"
    d = root.rstrip("/") + _DIR
    try:
        os.mkdir(d)
    except OSError:
        pass
    tag = "%d." % seq
    _clear(d, tag)  # pieces of another list: superseded
    with open(d + "/tmp", "wb") as f:
        f.write(data)
    os.rename(d + "/tmp", d + "/" + tag + str(offset))
    # Do the pieces cover 0..total? (a handful of files: the list is a few hundred bytes)
    pieces = []
    for n in os.listdir(d):
        if n.startswith(tag):
            pieces.append((int(n[len(tag):]), n))
    pieces.sort()
    end = 0
    for off, _n in pieces:
        if off > end:
            return proto.RESULT_STATUS_OK, ""
        end = max(end, off + os.stat(d + "/" + _n)[6])
    if end < total:
        return proto.RESULT_STATUS_OK, ""
    blob = bytearray(total)
    for off, n in pieces:
        with open(d + "/" + n, "rb") as f:
            b = f.read()
        blob[off:off + len(b)] = b[: total - off]
    status, detail = _apply(root, bytes(blob[:-_SIG]), bytes(blob[-_SIG:]))
    _clear(d)
    return status, detail


def _apply(root, data, sig):
    import json

    import proto

    if len(data) < 2:
        return proto.RESULT_STATUS_REFUSED, "bad_manifest"
    try:
        d = json.loads(data)
        new = d["keys"]
        signer = d["key_id"]
    except (ValueError, KeyError, TypeError):
        return proto.RESULT_STATUS_REFUSED, "bad_manifest"
    if signer not in trusted_keys.keys(root):
        return proto.RESULT_STATUS_REFUSED, "unknown_key"
    # The bootloader checks its images at every cold boot: a list that drops the key of one
    # it may boot next would leave the node nothing to start.
    for kid in _needed_keys(root):
        if kid not in new:
            return proto.RESULT_STATUS_REFUSED, "retires %s of the running image" % kid
    reason = trusted_keys.update(root, data, sig)
    if reason:
        names = {bootstate.BAD_MANIFEST: "bad_manifest", bootstate.UNKNOWN_KEY: "unknown_key",
                 bootstate.BAD_SIGNATURE: "bad_signature", bootstate.DOWNGRADE: "downgrade"}
        return proto.RESULT_STATUS_REFUSED, names.get(reason, "reason %d" % reason)
    import log

    log.info("firmware key list seq %d applied" % trusted_keys.seq(root))
    return proto.RESULT_STATUS_OK, "applied"
