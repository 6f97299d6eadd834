# The node's TLS-PSK session key for routine sends (docs/session-keys.md): stored on flash
# next to the certificates, installed by the install_psk command, dropped when the broker
# refuses it. The certificate stays the node's identity: the key only ever arrives over a
# certificate-authenticated session (the gateway sends it only while the broker holds no
# key for the device) and the node falls back to its certificate whenever it is refused.
#
# File certs/psk.bin: key id (u32 LE), PSK listener port (u16 LE), the 32-byte key, then
# the first 4 bytes of SHA-256 over those 38 bytes. Written as psk.tmp and renamed over
# psk.bin: littlefs commits a file on close and renames atomically, so a power cut leaves
# the old key or the new one, never a mix; a file that fails its check is no key.
import os
import struct
from hashlib import sha256

from micropython import const

KEY_LEN = const(32)
_BODY = const(38)  # id, port, key
_NAME = "psk.bin"
_TMP = "psk.tmp"

# Refusals of the PSK session: the broker's TLS alert (an identity it does not know, a
# wrong key) or CONNACK "bad user name or password"/"not authorized". Anything else
# (timeouts, resets) is the network's, and keeps the key.
_REFUSALS = (-4, 4, 5)  # mqtt.TLS_FAILED, CONNACK 4 and 5


def _root(cfg):
    p = cfg.path("cert")
    return p[: p.rfind("/")] if "/" in p else "."


def load(cfg):
    """(key id, port, key) of the stored session key, or None."""
    try:
        with open(_root(cfg) + "/" + _NAME, "rb") as f:
            b = f.read()
    except OSError:
        return None
    if len(b) != _BODY + 4 or sha256(b[:_BODY]).digest()[:4] != b[_BODY:]:
        return None
    kid, port = struct.unpack_from("<IH", b, 0)
    return kid, port, b[6:_BODY]


def install(cfg, kid, port, key):
    """Store a key (power-safe). The same key again is a no-op: the command may repeat."""
    key = bytes(key)
    if len(key) != KEY_LEN or not 0 < port < 65536 or kid <= 0:
        return False
    old = load(cfg)
    if old is not None and old[0] == kid and old[2] == key:
        return True
    body = struct.pack("<IH", kid, port) + key
    root = _root(cfg)
    with open(root + "/" + _TMP, "wb") as f:
        f.write(body + sha256(body).digest()[:4])
    os.rename(root + "/" + _TMP, root + "/" + _NAME)
    return True


def drop(cfg):
    try:
        os.remove(_root(cfg) + "/" + _NAME)
    except OSError:
        pass


def context(cfg, key):
    """A TLS-PSK client context: the device id as identity. No certificate on this path:
    the key is the proof both ways (the broker shows it knows the key in its Finished).
    None when this build's `tls` has no PSK support (the certificate path then)."""
    import tls

    ctx = tls.SSLContext(tls.PROTOCOL_TLS_CLIENT)
    try:
        # Present on ports whose mbedtls has the PSK key exchange; absent from the stubs.
        ctx.psk_identity = cfg.device_id if isinstance(cfg.device_id, bytes) else cfg.device_id.encode()  # type: ignore[attr-defined]
        ctx.psk_key = key  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return None
    ctx.verify_mode = tls.CERT_NONE  # type: ignore[attr-defined]  # real on every port, absent from the stubs
    return ctx


def supported(cfg):
    """Whether this build can open a PSK session (install_psk is refused otherwise)."""
    try:
        return context(cfg, bytes(KEY_LEN)) is not None
    except ImportError:
        return False


def refusal(err):
    """Whether `err` from a PSK connect is the broker's refusal (not the network's)."""
    return getattr(err, "code", None) in _REFUSALS
