# Device-key rotation over the air, the node's side of the wake: which pair a connect uses
# (the trial pair, and the confirmed one when the broker refuses it), the rotate_key and
# install_cert commands, CSR_UP, and what the HELLO tells the gateway. The two slots and
# their power-cut rules are creds.py; docs/credentials.md tells the whole story.
#
# A node that never rotated has no record (certs/creds.json): it connects with the pair
# config.json names and never loads creds, csr or p256 (about 10 KB of bytecode).
import os

_RECORD = "creds.json"

_c = None  # creds.Credentials, once loaded this wake
_used = None  # the certificate DER this session connected with
_trial = False
_told = 0  # the outcome this session's HELLO carried (cleared once the gateway has it)
_csr_sent = False

# Refusals of the trial pair: the broker's TLS alert (a certificate it does not accept:
# revoked, unknown issuer, expired) or CONNACK "bad user name or password"/"not authorized".
_REFUSALS = (4, 5)
# mbedtls's codes for a connection the other end closed or reset, or that failed to send or
# receive: a broker going down mid-handshake (SSL_CONN_EOF, SSL_PEER_CLOSE_NOTIFY,
# NET_CONN_RESET, NET_RECV_FAILED, NET_SEND_FAILED).
_TLS_NET = (-0x7280, -0x7880, -0x0050, -0x004C, -0x004E)


def _refusal(err):
    import mqtt  # loaded by the send path already; not at import (before_send runs first)

    code = getattr(err, "code", None)
    if code == mqtt.TLS_FAILED:
        return getattr(err, "tls", 0) == mqtt.TLS_ALERT
    return code in _REFUSALS


def _unreached(err):
    # The broker never answered: a failed name lookup (an OSError of the port), a refused,
    # reset or closed connection, a timeout. Anything else (a TLS failure of our own, out
    # of memory in the handshake) counts against the trial, as a crash would.
    import mqtt

    code = getattr(err, "code", None)
    if code is None:
        return isinstance(err, OSError)
    if code == mqtt.TLS_FAILED:
        return getattr(err, "tls", 0) in _TLS_NET
    return code == mqtt.NETWORK or code == mqtt.TIMEOUT or code == mqtt.CLOSED


def _root(cfg):
    p = cfg.path("cert")
    return p[: p.rfind("/")] if "/" in p else "."


def _has_record(cfg):
    try:
        os.stat(_root(cfg) + "/" + _RECORD)
        return True
    except OSError:
        return False


def creds(cfg):
    """The node's Credentials, loaded once per wake (this sweeps what a cut left)."""
    global _c
    if _c is None:
        import creds as c

        _c = c.Credentials(_root(cfg), cfg.path("cert"), cfg.path("key"))
    return _c


def busy(cfg):
    """A certificate rotation is under way or its outcome unreported: the session must
    use the certificate path (the trial pair is confirmed only by connecting with it)."""
    if _c is None and not _has_record(cfg):
        return False
    c = creds(cfg)
    return c.state != 0 or bool(c.outcome())


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def pair(cfg):
    """(certificate DER, key DER) for this connect: the trial pair while one is on trial."""
    global _used, _trial
    if not _has_record(cfg):
        _used, _trial = cfg.read_file("cert"), False
        return _used, cfg.read_file("key")
    c = creds(cfg)
    cp, kp, _trial = c.for_connect(False)
    # The pair is read before the attempt is counted: the record's write (a file opened,
    # renamed) then leaves its garbage after the pair rather than under it, for the TLS
    # context's one block of about 3 KB that comes next (the ESP32 profile's trial wake ran
    # out of it with 30 KB free; see docs/soak.md).
    _used = _read(cp)
    key = _read(kp)
    if _trial:
        c.count_try()  # saved before the connect, as the power-cut rules need
    return _used, key


def refused(cfg, err):
    """The connect failed with `err`: True when it was the trial pair the broker refused,
    which is then dropped (the next pair() is the confirmed one). A failure before the
    broker answered (name lookup, TCP refused or reset, a handshake closed without an
    alert, a timeout) says nothing about the new pair: the attempt is given back and the
    trial waits for the next send. Any other failure counts, bounded by creds.MAX_TRIES."""
    global _trial
    if not _trial:
        return False
    if not _refusal(err):
        import log

        _trial = False  # this session goes no further; the next pair() counts afresh
        if _unreached(err):
            creds(cfg).session_unreached()
            log.warn("new credentials not tried: broker not reached (%s)", err)
        else:
            log.warn("new credentials: connect failed (%s), the attempt counts", err)
        return False
    import log

    log.warn("new credentials refused (%s): back to the confirmed pair", err)
    creds(cfg).session_refused()
    _trial = False
    return True


def connected(cfg):
    """CONNACK 0: a trial pair becomes the confirmed one (the old one is deleted)."""
    global _trial
    if _trial:
        creds(cfg).session_ok()
        _trial = False
        import log

        log.info("new credentials kept")


def hello_kw(cfg):
    """The HELLO's cert_serial, cred_outcome and cred_rotation: told while a rotation is
    under way or its outcome is unreported (else none: the fields stay off the air)."""
    global _told
    if _c is None and not _has_record(cfg):
        return {}
    c = creds(cfg)
    out = c.outcome()
    if c.state == 0 and not out:
        return {}
    import creds as cm

    _told = out
    try:
        serial = cm.cert_serial(_used) if _used else b""
    except (cm.CredsError, IndexError):
        serial = b""
    return {"cert_serial": serial, "cred_outcome": out, "cred_rotation": c.rotation}


def reported(cfg):
    """The gateway acknowledged the HELLO that carried the outcome: stop telling it."""
    if _told and _c is not None and _c.outcome() == _told:
        _c.reported()


# ---- commands (commands.execute calls these; results as (status, detail)) -------------

def rotate_key(cfg, rid, board=None):
    """Make a new key and its CSR for rotation `rid` (kept on flash before the result).
    The same rotation again keeps the key it has: the request is the same bytes. With the
    session up the heap may be too small for the big-int work (the ESP32 profile): then the
    rotation is noted on flash and the key is made at the start of the next sending wake,
    before the session (before_send); the result says so."""
    import proto

    if _pending(cfg) == rid:
        return proto.RESULT_STATUS_OK, _LATER
    try:
        # Loading the credentials' code can itself find no room with the session up (a
        # 1,280-byte block on a fragmented ESP32 heap): deferred like the key.
        c = creds(cfg)
        if c.rotation == rid:
            if c.state != 0:
                return proto.RESULT_STATUS_OK, ""
            return proto.RESULT_STATUS_REFUSED, "rotation already ended"
        _make_key(cfg, c, rid, board)
        _clear_pending(cfg)
    except MemoryError:
        _unload(("csr", "p256"))
        try:
            _write_pending(cfg, rid)
        except MemoryError:
            return _no_heap()
        _warn("rotation: no heap for the key with the session up: made at the next send")
        return proto.RESULT_STATUS_OK, _LATER
    finally:
        _unload(("csr", "p256"))
    return proto.RESULT_STATUS_OK, ""


_PENDING = "/rotate.rid"  # a rotate_key whose key waits for the next sending wake
_LATER = "key at next send"


def _pending(cfg):
    try:
        with open(_root(cfg) + _PENDING) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def _write_pending(cfg, rid):
    # Whole or absent after a cut (littlefs commits on close); absent means the command was
    # not recorded either, and it comes again.
    with open(_root(cfg) + _PENDING, "w") as f:
        f.write(str(rid))


def _clear_pending(cfg):
    try:
        os.remove(_root(cfg) + _PENDING)
    except OSError:
        pass


def before_send(cfg, board):
    """At the start of a sending wake, before the session and the send code take the heap:
    the key of a rotate_key that found no room for it (rotate_key). Its request then goes
    up at the end of this wake's window (after_window), as if made in the command."""
    rid = _pending(cfg)
    if not rid:
        return
    try:
        c = creds(cfg)
        if c.rotation != rid:
            _make_key(cfg, c, rid, board)  # begin() replaces a rotation still in progress
        _clear_pending(cfg)
    except MemoryError:
        _warn("rotation: no heap for the key before the session either: tried again")
    finally:
        _unload(("csr", "p256"))


def _warn(text):
    import log

    try:
        log.warn(text)
    except MemoryError:
        pass


def _make_key(cfg, c, rid, board):
    # Seconds of big-int work on a board: the watchdog is fed between the steps.
    import csr
    import p256

    d = p256.generate()
    pub = p256.public_key(d)
    if board is not None:
        board.watchdog_feed()
    req = csr.request(cfg.device_id, d, pub)
    if board is not None:
        board.watchdog_feed()
    c.begin(csr.private_key_der(d, pub), rid, req)


def _unload(names):
    # p256 and csr are about 10 KB of bytecode and p256's table 1.5 KB: needed once a
    # rotation, in this command only. Dropped from sys.modules they are garbage, and the
    # rest of the wake (the results, the window, the close) gets the heap back: on the ESP32
    # profile under the bootloader that wake ran out of heap in close() otherwise.
    import gc
    import sys

    for n in names:
        if n in sys.modules:
            del sys.modules[n]
    gc.collect()


def _no_heap():
    # Out of heap says nothing about the rotation: no result is kept or sent (None), so the
    # gateway delivers the command again at the next send, on a heap this wake's garbage
    # no longer fills. The pieces on flash and the record are whole either way.
    import gc

    gc.collect()
    _warn("rotation: out of heap, the command comes again")
    return None


def install_cert(cfg, rid, offset, total, data):
    """One piece of the certificate for rotation `rid`; installed once whole."""
    import creds as cm
    import proto

    try:
        done = creds(cfg).put_piece(rid, offset, total, bytes(data))
    except MemoryError:
        return _no_heap()
    except cm.CredsError as e:
        return proto.RESULT_STATUS_REFUSED if e.code != cm.MISMATCH else proto.RESULT_STATUS_ERROR, str(e)[:48]
    return proto.RESULT_STATUS_OK, "installed" if done else ""


def after_window(client, w):
    """While a new key waits for its certificate, its request goes up once a session (at
    the end of the window: a certificate arriving in it makes it needless)."""
    global _csr_sent
    if _csr_sent or (_c is None and not _has_record(w.cfg)):
        return
    c = creds(w.cfg)
    der = c.csr_der() if c.state == 1 else None
    if der is None or not c.request_sent():
        return  # request_sent() counts it before it goes, and gives up past the bound
    import proto

    n = proto.encode_csr_up(w.out, w.st.msg_id(), c.rotation, der)
    client.publish_out(w.up_topic, n, 1)
    _csr_sent = True
