# Ed25519 signature verification (RFC 8032, section 5.1.7) in plain MicroPython, for the
# bootloader's manifest check. Verify only: nodes never hold a signing key.
#
# Policy (what verify() accepts): fail closed, and accept no honest signature that the
# signing tools' own check (OpenSSL, through `cryptography`) would refuse:
# - lengths must be exactly 32 (key) and 64 (signature) bytes;
# - S must be canonical (S < L);
# - A and R must be canonical encodings (y < p) of points on the curve; R is compared as
#   bytes with the canonical encoding of [S]B - [k]A, so a non-canonical R never matches;
# - a public key of small order (order 1, 2, 4 or 8) is rejected, which OpenSSL does not
#   do: with such a key [k]A takes at most 8 values, so one R = [S]B made without any
#   private key verifies for about one message in 8. The key is baked into the
#   bootloader, so this guards against a provisioning mistake, not a live attacker;
# - the equation is checked cofactorless, [S]B = R + [k]A, as OpenSSL and libsodium do.
#   Every honestly made signature passes both forms; the cofactored form would also
#   accept R with a small-order component, which OpenSSL refuses, and the host-side
#   checks of a manifest and the bootloader must never disagree.
# Arithmetic is on Python ints (the ports' arbitrary-precision ints) modulo p = 2^255 - 19,
# points in extended coordinates (X:Y:Z:T), one double-scalar multiplication with signed
# sliding windows (w-NAF) over both scalars, and one inversion at the end.
from array import array

from sha512 import sha512

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = 37095705934669439343138083508754565189542113879843219016388785533085940283555
_D2 = 16295367250680780974490674513165176452449235426866156013048779062215315747161
_SQRT_M1 = 19681161376707505956807079304988542015446066515923890162744021073123829784752
_BX = 15112221349535400772501151409588531511454012693041857206046113283949847762202
_BY = 46316835694926478169428394003475163141307993866256225615783033603165251855960
_MASK255 = 2**255 - 1

# Window widths: a table of 2^(w-2) odd multiples per point; measured best on the unix
# port for one verify that also builds both tables (the bootloader verifies once per boot).
_WA = 5
_WB = 5

_btab = None  # odd multiples of B, affine cached form, built on first use


def _sq(x, n):
    # x^(2^n) mod p.
    p = _P
    for _ in range(n):
        x = x * x % p
    return x


def _pow250(z):
    # (z^(2^250 - 1), z^11): the shared head of the inversion and square-root chains.
    # A fixed addition chain in bytecode measured faster than the built-in pow(z, e, p).
    p = _P
    z2 = z * z % p
    z9 = _sq(z2, 2) * z % p
    z11 = z9 * z2 % p
    z5 = z11 * z11 % p * z9 % p
    z10 = _sq(z5, 5) * z5 % p
    z20 = _sq(z10, 10) * z10 % p
    z40 = _sq(z20, 20) * z20 % p
    z50 = _sq(z40, 10) * z10 % p
    z100 = _sq(z50, 50) * z50 % p
    z200 = _sq(z100, 100) * z100 % p
    return _sq(z200, 50) * z50 % p, z11


def _invert(z):
    # z^(p - 2) = z^(2^255 - 21)
    z250, z11 = _pow250(z)
    return _sq(z250, 5) * z11 % _P


def _pow22523(z):
    # z^((p - 5) / 8) = z^(2^252 - 3)
    z250, _ = _pow250(z)
    return _sq(z250, 2) * z % _P


def _decode(b):
    # 32 bytes -> affine (x, y), or None if non-canonical or not on the curve.
    p = _P
    y = int.from_bytes(b, "little")
    sign = y >> 255
    y &= _MASK255
    if y >= p:
        return None
    yy = y * y % p
    u = (yy - 1) % p
    v = (_D * yy + 1) % p
    v3 = v * v % p * v % p
    x = u * v3 % p * _pow22523(u * v3 % p * v3 % p * v % p) % p
    vxx = v * x % p * x % p
    if vxx != u:
        if vxx != p - u:
            return None
        x = x * _SQRT_M1 % p
    if x == 0 and sign:
        return None
    if (x & 1) != sign:
        x = p - x
    return x, y


def _double(X, Y, Z):
    # (X:Y:Z) -> 2*(X:Y:Z) as extended (X:Y:Z:T); off the hot path.
    p = _P
    a = X * X % p
    b = Y * Y % p
    c = 2 * Z * Z % p
    e = ((X + Y) * (X + Y) - a - b) % p
    g = b - a
    f = g - c
    h = -a - b
    return e * f % p, g * h % p, f * g % p, e * h % p


def _add(X1, Y1, Z1, T1, X2, Y2, Z2, T2):
    # Extended + extended -> extended; off the hot path.
    p = _P
    a = (Y1 - X1) * (Y2 - X2) % p
    b = (Y1 + X1) * (Y2 + X2) % p
    c = T1 * _D2 % p * T2 % p
    d = 2 * Z1 * Z2 % p
    e = b - a
    f = d - c
    g = d + c
    h = b + a
    return e * f % p, g * h % p, f * g % p, e * h % p


def _table(x, y, w, affine):
    # Odd multiples P, 3P, ..., (2^(w-1) - 1)P of an affine point as flat cached entries
    # (Y+X, Y-X, 2Z, 2dT); with `affine` each is scaled to Z = 1 (one shared inversion).
    p = _P
    n = 1 << (w - 2)
    pts = [(x, y, 1, x * y % p)]
    X2, Y2, Z2, T2 = _double(x, y, 1)
    for _ in range(n - 1):
        X, Y, Z, T = pts[-1]
        pts.append(_add(X, Y, Z, T, X2, Y2, Z2, T2))
    if affine:
        # Montgomery's trick: one inversion for all Z.
        acc = [1] * (n + 1)
        for i in range(n):
            acc[i + 1] = acc[i] * pts[i][2] % p
        inv = _invert(acc[n])
        for i in range(n - 1, -1, -1):
            X, Y, Z, T = pts[i]
            zi = inv * acc[i] % p
            inv = inv * Z % p
            X = X * zi % p
            Y = Y * zi % p
            pts[i] = (X, Y, 1, X * Y % p)
    out = []
    for X, Y, Z, T in pts:
        out.append((Y + X) % p)
        out.append((Y - X) % p)
        out.append(2 * Z % p)
        out.append(T * _D2 % p)
    return out


def _naf(n, w):
    # Width-w NAF of n, least significant digit first, as 256 signed bytes: one 256-byte
    # block where a list of small ints takes 1 KB (2 KB on a 64-bit port). The verify runs
    # in the middle of a wake (an OTA manifest next to received frames and the session's
    # buffers), whose heap is fragmented: it must ask for no large block.
    out = array("b", bytes(256))
    full = 1 << w
    half = full >> 1
    mask = full - 1
    i = 0
    while n:
        if n & 1:
            d = n & mask
            if d >= half:
                d -= full
            n -= d
            out[i] = d
        n >>= 1
        i += 1
    return out


def _small_order(x, y):
    # [8]A is the identity exactly when A has order 1, 2, 4 or 8.
    X, Y, Z, _ = _double(x, y, 1)
    X, Y, Z, _ = _double(X, Y, Z)
    X, Y, Z, _ = _double(X, Y, Z)
    return X % _P == 0 and (Y - Z) % _P == 0


def _combine(s, k, atab):
    # [s]B + [k]A' (A' already negated in atab), vartime: all inputs are public.
    global _btab
    if _btab is None:
        _btab = _table(_BX, _BY, _WB, True)
    btab = _btab
    p = _P
    ns = _naf(s, _WB)
    nk = _naf(k, _WA)
    top = 255
    while top >= 0 and not ns[top] and not nk[top]:
        top -= 1
    X = 0
    Y = 1
    Z = 1
    T = 0
    for i in range(top, -1, -1):
        # Doubling (dbl-2008-hwcd, a = -1); T only when an addition follows.
        ds = ns[i]
        dk = nk[i]
        a = X * X % p
        b = Y * Y % p
        c = Z * Z % p
        e = ((X + Y) * (X + Y) - a - b) % p
        g = b - a
        f = g - c - c
        h = -a - b
        X = e * f % p
        Y = g * h % p
        Z = f * g % p
        if ds or dk:
            T = e * h % p
            if ds:
                j = (ds if ds > 0 else -ds) >> 1 << 2
                if ds > 0:
                    a = (Y - X) * btab[j + 1] % p
                    b = (Y + X) * btab[j] % p
                    c = T * btab[j + 3] % p
                else:
                    a = (Y - X) * btab[j] % p
                    b = (Y + X) * btab[j + 1] % p
                    c = -T * btab[j + 3] % p
                d = Z + Z
                e = b - a
                f = d - c
                g = d + c
                h = b + a
                X = e * f % p
                Y = g * h % p
                Z = f * g % p
                T = e * h % p
            if dk:
                j = (dk if dk > 0 else -dk) >> 1 << 2
                if dk > 0:
                    a = (Y - X) * atab[j + 1] % p
                    b = (Y + X) * atab[j] % p
                    c = T * atab[j + 3] % p
                else:
                    a = (Y - X) * atab[j] % p
                    b = (Y + X) * atab[j + 1] % p
                    c = -T * atab[j + 3] % p
                d = Z * atab[j + 2] % p
                e = b - a
                f = d - c
                g = d + c
                h = b + a
                X = e * f % p
                Y = g * h % p
                Z = f * g % p
    return X, Y, Z


def _verify(public_key, message, signature):
    if len(public_key) != 32 or len(signature) != 64:
        return False
    pk = bytes(public_key)
    sig = bytes(signature)
    s = int.from_bytes(sig[32:], "little")
    if s >= _L:
        return False
    a = _decode(pk)
    if a is None:
        return False
    x, y = a
    if _small_order(x, y):
        return False
    h = sha512(sig[:32])
    h.update(pk)
    h.update(message)
    k = int.from_bytes(h.digest(), "little") % _L
    p = _P
    # Table for -A, so the loop only ever adds.
    X, Y, Z = _combine(s, k, _table(p - x, y, _WA, False))
    zi = _invert(Z)
    x = X * zi % p
    y = Y * zi % p
    return (y | ((x & 1) << 255)).to_bytes(32, "little") == sig[:32]


def verify(public_key, message, signature):
    """True if `signature` (64 bytes) is a valid Ed25519 signature of `message` under
    `public_key` (32 bytes). Accepts bytes, bytearray or memoryview. Raises MemoryError
    only: running out of heap says nothing about the signature, and a caller that took
    it for a refusal would refuse a good update."""
    try:
        return _verify(public_key, message, signature)
    except MemoryError:
        raise
    except Exception:
        # Fail closed: anything malformed enough to raise is not a valid signature.
        return False
