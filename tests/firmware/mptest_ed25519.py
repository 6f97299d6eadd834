# SHA-512 and Ed25519 verification in MicroPython: FIPS 180-4 and RFC 8032 vectors, and
# every way a bootloader could be fooled by a malformed key or signature.
import time
from binascii import hexlify, unhexlify

import ed25519
import mpunit
import sha512 as sha512_mod
from ed25519 import verify
from sha512 import sha512

TIMEOUT = 120

_L = 2**252 + 27742317777372353535851937790883648493
_P = 2**255 - 19

SHA_VECTORS = (
    (b"", "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce"
          "47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e"),
    (b"abc", "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
             "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"),
    (b"abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopq"
     b"klmnopqrlmnopqrsmnopqrstnopqrstu",
     "8e959b75dae313da8cf4f72814fc143f8f7779c6eb9f7fa17299aeadb6889018"
     "501d289e4900f7e4331b99dec4b5433ac7d329eeb6dd26545e96e55b874be909"),
)

# Canonical encodings of the eight points of order 1, 2, 4 and 8.
SMALL_ORDER = (
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
)


def _vectors():
    out = []
    with open(mpunit.repo_root() + "/tests/firmware/vectors/rfc8032.txt") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            name, _sk, pk, msg, sig = line.split()
            out.append((name, unhexlify(pk), b"" if msg == "-" else unhexlify(msg), unhexlify(sig)))
    return out


def _test1():
    for v in _vectors():
        if v[0] == "TEST_1":
            return v[1], v[2], v[3]
    raise AssertionError("TEST_1 missing")


def _hex(b):
    return hexlify(b).decode()


# ---- SHA-512 ----


def test_sha512_fips_vectors_both_word_layouts():
    for wide in (True, False):
        for msg, want in SHA_VECTORS:
            mpunit.eq(sha512(msg, wide=wide).hexdigest(), want, "%r wide=%r" % (msg[:8], wide))


def test_sha512_streaming_matches_one_shot_at_every_split():
    msg = bytes((i * 31 + 7) & 0xFF for i in range(300))
    for wide in (True, False):
        want = sha512(msg, wide=wide).digest()
        for cut in (0, 1, 63, 111, 112, 127, 128, 129, 200, 256, 299, 300):
            h = sha512(wide=wide)
            h.update(msg[:cut])
            h.update(memoryview(msg)[cut:])
            mpunit.eq(h.digest(), want, "cut %d" % cut)
        # Byte by byte, and digest() does not end the stream.
        h = sha512(wide=wide)
        for i in range(len(msg)):
            h.update(msg[i:i + 1])
            if i == 150:
                h.digest()
        mpunit.eq(h.digest(), want)


def test_sha512_million_a():
    h = sha512()
    block = b"a" * 1000
    for _ in range(1000):
        h.update(block)
    mpunit.eq(h.hexdigest(), "e718483d0ce769644e2e42c7bc15b4638e1f98b13b2044285632a803afa973eb"
                             "de0ff244877ea60a4cb0432ce577c31beb009c5c2c49aa2e4eadb217ad8cc09b")


def test_sha512_uses_no_viper_or_native_code():
    # Must run as plain bytecode on every port: no emitter decorators in the sources.
    for name in ("sha512", "ed25519"):
        with open(mpunit.repo_root() + "/firmware/" + name + ".py") as f:
            src = f.read()
        for word in ("@micropython.viper", "@micropython.native", "@micropython.asm"):
            mpunit.eq(word in src, False, name + " uses " + word)
    mpunit.eq(sha512_mod.sha512(b"abc").digest_size, 64)


# ---- Ed25519: RFC 8032 section 7.1 ----


def test_rfc8032_vectors_verify():
    vs = _vectors()
    mpunit.eq([v[0] for v in vs], ["TEST_1", "TEST_2", "TEST_3", "TEST_1024", "TEST_SHA_abc"])
    for name, pk, msg, sig in vs:
        mpunit.eq(verify(pk, msg, sig), True, name)
        # bytearray and memoryview inputs, as a manifest read from flash would be.
        mpunit.eq(verify(bytearray(pk), memoryview(bytearray(msg)), memoryview(sig)), True, name)


def test_rfc8032_sha_abc_message_is_sha512_of_abc():
    for name, pk, msg, sig in _vectors():
        if name == "TEST_SHA_abc":
            mpunit.eq(msg, sha512(b"abc").digest())


def test_modified_signature_message_or_key_is_rejected():
    for name, pk, msg, sig in _vectors():
        for i in (0, 17, 31, 32, 50, 63):
            bad = bytearray(sig)
            bad[i] ^= 0x04
            mpunit.eq(verify(pk, msg, bad), False, "%s sig byte %d" % (name, i))
        mpunit.eq(verify(pk, msg + b"\x00", sig), False, name + " longer message")
        if msg:
            bad = bytearray(msg)
            bad[len(bad) // 2] ^= 0x80
            mpunit.eq(verify(pk, bad, sig), False, name + " message bit")
        bad = bytearray(pk)
        bad[3] ^= 0x01
        mpunit.eq(verify(bad, msg, sig), False, name + " key bit")


def test_signature_by_another_key_is_rejected():
    vs = _vectors()
    for i in range(len(vs)):
        other = vs[(i + 1) % len(vs)]
        mpunit.eq(verify(other[1], vs[i][2], vs[i][3]), False, vs[i][0])


def test_s_at_or_above_l_is_rejected():
    pk, msg, sig = _test1()
    s = int.from_bytes(sig[32:], "little")
    # S + L is the same scalar modulo L, so the group equation still holds: only the
    # canonical-S check stands between it and acceptance.
    for bad_s in (s + _L, _L, 2**256 - 1):
        bad = sig[:32] + bad_s.to_bytes(32, "little")
        mpunit.eq(verify(pk, msg, bad), False, "S=%x" % bad_s)


def test_non_canonical_encodings_are_rejected():
    pk, msg, sig = _test1()
    # y >= p: p itself, p + 1 (a second spelling of the identity), 2^255 - 1, each with
    # and without the sign bit.
    for y in (_P, _P + 1, _P + 3, 2**255 - 1):
        for sign in (0, 1):
            enc = (y | (sign << 255)).to_bytes(32, "little")
            mpunit.eq(ed25519._decode(enc), None, "decode y=%x sign=%d" % (y, sign))
            mpunit.eq(verify(enc, msg, sig), False, "A y=%x" % y)
            mpunit.eq(verify(pk, msg, enc + sig[32:]), False, "R y=%x" % y)
    # x = 0 with the sign bit set is a non-canonical spelling of (0, 1) / (0, -1).
    mpunit.eq(ed25519._decode(unhexlify("01" + "00" * 30 + "80")), None)
    mpunit.eq(ed25519._decode(unhexlify("ec" + "ff" * 30 + "ff")), None)


def test_points_not_on_the_curve_are_rejected():
    pk, msg, sig = _test1()
    # y = 2 is not the y of any curve point (x^2 would be a non-square).
    off = 0
    for y in range(2, 40):
        enc = y.to_bytes(32, "little")
        if ed25519._decode(enc) is None:
            off += 1
            mpunit.eq(verify(enc, msg, sig), False, "A y=%d" % y)
            mpunit.eq(verify(pk, msg, enc + sig[32:]), False, "R y=%d" % y)
    mpunit.eq(off > 5, True, "found too few off-curve y values")


def test_small_order_public_keys_are_rejected():
    pk, msg, sig = _test1()
    for enc in SMALL_ORDER:
        a = unhexlify(enc)
        point = ed25519._decode(a)
        mpunit.eq(point is not None, True, enc + " should decode")
        mpunit.eq(ed25519._small_order(point[0], point[1]), True, enc)
        mpunit.eq(verify(a, msg, sig), False, enc)
        mpunit.eq(verify(a, b"", a + bytes(32)), False, enc)
    # A real key is not of small order.
    x, y = ed25519._decode(pk)
    mpunit.eq(ed25519._small_order(x, y), False)


def test_identity_key_would_accept_anything_without_the_check():
    # With A = identity, [k]A vanishes, so R = [S]B with any S satisfies the equation for
    # every message: exactly the forgery the small-order check exists to stop.
    pk, msg, sig = _test1()
    s = 1234567
    X, Y, Z = ed25519._combine(s, 0, ed25519._table(0, 1, ed25519._WA, False))
    zi = ed25519._invert(Z)
    x = X * zi % _P
    y = Y * zi % _P
    r = (y | ((x & 1) << 255)).to_bytes(32, "little")
    ident = unhexlify(SMALL_ORDER[0])
    forged = r + s.to_bytes(32, "little")
    mpunit.eq(verify(ident, b"any message at all", forged), False)


def test_wrong_lengths_and_types_return_false():
    pk, msg, sig = _test1()
    for bad_pk in (b"", pk[:31], pk + b"\x00", bytes(64)):
        mpunit.eq(verify(bad_pk, msg, sig), False)
    for bad_sig in (b"", sig[:63], sig + b"\x00", bytes(32)):
        mpunit.eq(verify(pk, msg, bad_sig), False)
    mpunit.eq(verify(None, msg, sig), False)
    mpunit.eq(verify(pk, None, sig), False)
    mpunit.eq(verify(pk, msg, None), False)
    mpunit.eq(verify(pk, 12, sig), False)
    mpunit.eq(verify("x" * 32, msg, sig), False)


def test_verify_time_on_this_port():
    # Reports the figure; the bound is generous so a loaded machine does not fail it.
    import gc

    vs = _vectors()
    name, pk, msg, sig = vs[2]
    best = 10**9
    for _ in range(5):
        ed25519._btab = None  # the first verify after boot also builds the base table
        gc.collect()
        t = time.ticks_us()
        ok = verify(pk, msg, sig)
        best = min(best, time.ticks_diff(time.ticks_us(), t))
        mpunit.eq(ok, True)
    print("ed25519 verify: %.2f ms" % (best / 1000))
    mpunit.eq(best < 200000, True, "verify took %d us" % best)
