# Firmware key lists over the air, the node's side: set_keys COMMAND pieces gathered on
# flash, the whole list checked and applied through the bootloader's trusted_keys.update,
# and the refusals. The HELLO's keys_seq is ota.keys_seq(). docs/ota.md, "Firmware signing keys", tells the story.
#
# Pieces of one list (seq) are files kl/<seq>.<offset>; each is written whole (tmp, then
# rename), so a cut leaves a piece or none, and a repeated piece writes the same bytes.
# The piece that completes a list only stages it: a marker kl/L<seq>.<command id> says the
# pieces cover it, and that piece's command is not answered in its wake. The check (the
# staged images' manifests, Ed25519) and the replacement of the trusted list run at the
# start of the next sending wake, before the session takes the heap (apply_staged, as
# ota.check_staged does for a manifest); its outcome is that command's result. The app
# runs apply_staged in a wake the last one hinted (it asks for one); a list whose hint a
# failed session lost waits for its last piece to come again, which hints anew.
import os

_DIR = "/kl"
_MARK = "L"  # marker prefix; piece names start with a digit
_SIG = 64
_RESULT_MAX = 128  # a COMMAND_RESULT with a 48-byte detail and one value fits


def _root():
    import board

    return board.FS_ROOT


def _needed_keys(root):
    # Key ids of the images this node may boot next: the confirmed one, and one on trial.
    import json

    import bootstate

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


def _remove(d, names, drop):
    for n in names:
        if drop(n):
            try:
                os.remove(d + "/" + n)
            except OSError:
                pass


def _list_of(n):
    # "<seq>." of a piece's or a marker's name.
    return n[1 if n[0] == _MARK else 0:n.index(".") + 1]


def _staged(names, tag):
    for n in names:
        if n.startswith(_MARK) and n[1:].startswith(tag):
            return True
    return False


def _covered(d, names, tag, total):
    # Do the pieces of list `tag` cover 0..total? (a handful of files: a few hundred bytes)
    pieces = []
    for n in names:
        if n.startswith(tag):
            pieces.append((int(n[len(tag):]), n))
    pieces.sort()
    end = 0
    for off, n in pieces:
        if off > end:
            return None
        end = max(end, off + os.stat(d + "/" + n)[6])
    return pieces if end >= total else None


def put_piece(seq, offset, total, data, root=None, command_id=0):
    """One set_keys piece; (result status, detail), or None for the piece that completes
    the list: it is staged, and command_id's result is the outcome of its check at the
    start of the next sending wake (apply_staged). root: another flash root than the
    board's (tests)."""
    import proto
    import trusted_keys

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
    # Pieces of another list are superseded, unless that list is staged: a node that lacks
    # two lists gets both in one wake, the second signed by a key the first adds.
    names = os.listdir(d)
    keep = [_list_of(n) for n in names if n.startswith(_MARK)]
    keep.append(tag)
    _remove(d, names, lambda n: "." in n and n[0] != _MARK and _list_of(n) not in keep)
    with open(d + "/tmp", "wb") as f:
        f.write(data)
    os.rename(d + "/tmp", d + "/" + tag + str(offset))
    names = os.listdir(d)
    mark = _MARK + tag + str(command_id)
    if mark in names:
        return None  # staged by this command already: answered once checked
    if _staged(names, tag):
        return proto.RESULT_STATUS_OK, "staged"  # by another push's piece: its answer tells
    if _covered(d, names, tag, total) is None:
        return proto.RESULT_STATUS_OK, ""
    # An empty file is whole or absent after a cut; absent: the piece is not answered, so
    # it comes again and stages the list then.
    open(d + "/" + mark, "wb").close()
    return None


def apply_staged(st, root=None):
    """At the start of a sending wake, before the session: check and apply each staged
    list (lowest seq first, so the second of two is checked against the keys the first
    brings) and record its command's COMMAND_RESULT in `st`, sent in this wake. A check
    that runs out of heap records nothing: the command's last piece comes again and stages
    the list again. Returns how many lists were answered."""
    import gc

    root = root or _root()
    d = root.rstrip("/") + _DIR
    try:
        names = os.listdir(d)
    except OSError:
        return 0
    marks = []
    for n in names:
        if n.startswith(_MARK):
            seq, cid = n[1:].split(".")
            marks.append((int(seq), int(cid), n))
    marks.sort()
    done = 0
    for seq, cid, n in marks:
        tag = "%d." % seq
        try:
            # The marker goes first: a check that crashes the wake is not run again by
            # itself at every boot; the unanswered piece comes again instead, as often as
            # the gateway delivers an item without an answer.
            os.remove(d + "/" + n)
            if not st.was_executed(cid):
                r = _check(root, d, tag, seq)
                buf = bytearray(_RESULT_MAX)
                import proto

                ln = proto.encode_command_result(buf, st.msg_id(), cid, r[0], 0, r[1][:48], (seq,))
                st.record_result(cid, memoryview(buf)[:ln])
                done += 1
            _remove(d, os.listdir(d), lambda n: n.startswith(tag))
        except (MemoryError, OSError) as e:
            # Never a refusal: the pieces stay, the last one comes again and stages the list.
            # A later list waits for it (it may be signed by a key this one brings).
            gc.collect()
            import log

            log.warn("key list seq %d not checked (%s): it comes again", seq, e)
            break
    import sys

    for m in ("ed25519", "sha512"):  # the verifier leaves the heap before the session
        sys.modules.pop(m, None)
    gc.collect()
    return done


def _check(root, d, tag, seq):
    import proto
    import trusted_keys

    have = trusted_keys.seq(root)
    if seq == have:
        # Applied by an earlier wake that a cut stopped before its answer.
        return proto.RESULT_STATUS_OK, "applied"
    if seq < have:
        return proto.RESULT_STATUS_REFUSED, "downgrade: holds seq %d" % have
    names = os.listdir(d)
    pieces = None
    total = 0
    for n in names:
        if n.startswith(tag):
            total = max(total, int(n[len(tag):]) + os.stat(d + "/" + n)[6])
    if total > _SIG:
        pieces = _covered(d, names, tag, total)
    if pieces is None:
        return proto.RESULT_STATUS_REFUSED, "pieces lost: push the list again"
    blob = bytearray(total)
    for off, n in pieces:
        with open(d + "/" + n, "rb") as f:
            b = f.read()
        blob[off:off + len(b)] = b
    return _apply(root, bytes(blob[:-_SIG]), bytes(blob[-_SIG:]))


def _apply(root, data, sig):
    import json

    import bootstate
    import proto
    import trusted_keys

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
