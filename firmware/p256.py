# NIST P-256 (secp256r1) key generation and ECDSA-SHA256 signing in plain MicroPython, so a
# node can make its own device key and sign a certificate request: the key never leaves it.
#
# - Private keys come from os.urandom by rejection sampling: a 32-byte draw outside [1, n-1]
#   is thrown away, never reduced mod n, so every scalar is equally likely.
# - Nonces are deterministic (RFC 6979, HMAC-SHA256): a weak or repeating RNG at signing
#   time cannot leak the key, and the known-answer vectors of RFC 6979 A.2.5 check it.
# - Arithmetic is on the ports' arbitrary-precision ints. Points are in Jacobian
#   coordinates (a = -3 doubling, mixed addition with an affine table); k*G uses a fixed
#   4-bit window over a table of 1G..15G built once, and one inversion at the end.
#   Inversions use Fermat (pow(x, m - 2, m)): pow(x, -1, m) does not exist on every port.
# - Not constant-time: big-int arithmetic in bytecode leaks timing. Signing happens a
#   few times in a device's life (one CSR per key rotation), not per session, so the
#   exposure is a handful of traces, not the thousands a timing attack needs.
import os
from hashlib import sha256

from micropython import const

_P = const(0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF)
_N = const(0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551)
_B = const(0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B)
_GX = const(0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296)
_GY = const(0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5)

N = _N
# Draws of os.urandom before keygen gives up: one draw fails with probability < 2^-32, so
# running out means the RNG is broken (stuck at all-ones), not bad luck.
_MAX_DRAWS = const(16)

_gtab = None  # [None, (x, y) of 1G, ..., 15G], built on first use


class P256Error(ValueError):
    pass


def _dbl(x, y, z):
    # dbl-2001-b (a = -3).
    p = _P
    if not z:
        return x, y, z
    d = z * z % p
    g = y * y % p
    b = x * g % p
    a = 3 * (x - d) * (x + d) % p
    x3 = (a * a - 8 * b) % p
    z3 = ((y + z) * (y + z) - g - d) % p
    y3 = (a * (4 * b - x3) - 8 * g * g) % p
    return x3, y3, z3


def _madd(x1, y1, z1, x2, y2):
    # madd-2007-bl: Jacobian (x1, y1, z1) + affine (x2, y2).
    p = _P
    if not z1:
        return x2, y2, 1
    zz = z1 * z1 % p
    h = (x2 * zz - x1) % p
    r = 2 * (y2 * z1 * zz - y1) % p
    if not h:
        if not r:
            return _dbl(x1, y1, z1)
        return 0, 1, 0  # P + (-P): infinity
    hh = h * h % p
    i = 4 * hh
    j = h * i % p
    v = x1 * i % p
    x3 = (r * r - j - 2 * v) % p
    y3 = (r * (v - x3) - 2 * y1 * j) % p
    z3 = ((z1 + h) * (z1 + h) - zz - hh) % p
    return x3, y3, z3


def _affine(x, y, z):
    if not z:
        raise P256Error("point at infinity")
    p = _P
    zi = pow(z, p - 2, p)
    zi2 = zi * zi % p
    return x * zi2 % p, y * zi2 * zi % p


def _table():
    global _gtab
    if _gtab is None:
        # One inversion per entry. Batching them (Montgomery's trick) holds 14 Jacobian
        # points and their running products at once: a whole rotation then failed in a
        # 26 KB heap where this runs in 22 KB, to save ~20 ms once per boot on x86.
        t = [None, (_GX, _GY)]
        x, y, z = _GX, _GY, 1
        for _ in range(14):
            x, y, z = _madd(x, y, z, _GX, _GY)
            t.append(_affine(x, y, z))
        _gtab = t
    return _gtab


def mul_g(k):
    """k*G as affine (x, y), for 1 <= k < n."""
    if not 0 < k < _N:
        raise P256Error("scalar out of range")
    t = _table()
    x, y, z = 0, 1, 0
    for shift in range(252, -4, -4):
        x, y, z = _dbl(*_dbl(*_dbl(*_dbl(x, y, z))))
        w = (k >> shift) & 15
        if w:
            ax, ay = t[w]
            x, y, z = _madd(x, y, z, ax, ay)
    return _affine(x, y, z)


def on_curve(x, y):
    p = _P
    return 0 <= x < p and 0 <= y < p and (y * y - x * x * x + 3 * x - _B) % p == 0


def generate(urandom=os.urandom):
    """A new private scalar d, uniform in [1, n-1]."""
    for _ in range(_MAX_DRAWS):
        d = int.from_bytes(urandom(32), "big")
        if 0 < d < _N:
            return d
    raise P256Error("os.urandom gave no usable scalar in %d draws" % _MAX_DRAWS)


def public_key(d):
    """The uncompressed SEC1 encoding (65 bytes: 04 || X || Y) of d*G."""
    x, y = mul_g(d)
    return b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big")


def private_bytes(d):
    return d.to_bytes(32, "big")


def from_private_bytes(raw):
    if len(raw) != 32:
        raise P256Error("a P-256 private key is 32 bytes")
    d = int.from_bytes(raw, "big")
    if not 0 < d < _N:
        raise P256Error("private key out of range")
    return d


def hmac_sha256(key, *parts):
    """HMAC-SHA256 (RFC 2104): not every port has the hmac module."""
    if len(key) > 64:
        key = sha256(key).digest()
    ipad = bytearray(64)
    opad = bytearray(64)
    for i in range(len(key)):
        ipad[i] = key[i]
        opad[i] = key[i]
    for i in range(64):
        ipad[i] ^= 0x36
        opad[i] ^= 0x5C
    h = sha256(ipad)
    for part in parts:
        h.update(part)
    return sha256(bytes(opad) + h.digest()).digest()


def _nonces(d, h1):
    # RFC 6979 section 3.2 for qlen = hlen = 256: yields candidate k values in order.
    x = d.to_bytes(32, "big")
    h = (int.from_bytes(h1, "big") % _N).to_bytes(32, "big")
    v = b"\x01" * 32
    k = b"\x00" * 32
    k = hmac_sha256(k, v, b"\x00", x, h)
    v = hmac_sha256(k, v)
    k = hmac_sha256(k, v, b"\x01", x, h)
    v = hmac_sha256(k, v)
    while True:
        v = hmac_sha256(k, v)
        c = int.from_bytes(v, "big")
        if 0 < c < _N:
            yield c
        k = hmac_sha256(k, v, b"\x00")
        v = hmac_sha256(k, v)


def sign_digest(d, h1):
    """ECDSA signature (r, s) of a 32-byte SHA-256 digest, nonce per RFC 6979."""
    if len(h1) != 32:
        raise P256Error("digest must be 32 bytes")
    if not 0 < d < _N:
        raise P256Error("private key out of range")
    n = _N
    e = int.from_bytes(h1, "big") % n
    for k in _nonces(d, h1):
        r = mul_g(k)[0] % n
        if not r:
            continue
        s = pow(k, n - 2, n) * (e + r * d) % n
        if s:
            return r, s


def sign(d, msg):
    """ECDSA-SHA256 signature (r, s) of msg."""
    return sign_digest(d, sha256(msg).digest())


def _der_uint(v):
    b = v.to_bytes(33, "big")  # a leading 0 keeps it positive
    i = 0
    while i < 32 and b[i] == 0 and b[i + 1] < 0x80:
        i += 1
    return b"\x02" + bytes((33 - i,)) + b[i:]


def der_signature(r, s):
    """Ecdsa-Sig-Value: SEQUENCE { INTEGER r, INTEGER s } (at most 72 bytes)."""
    body = _der_uint(r) + _der_uint(s)
    return b"\x30" + bytes((len(body),)) + body
