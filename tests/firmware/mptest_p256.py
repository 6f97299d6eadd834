# P-256 in MicroPython: RFC 6979 A.2.5 known answers, RFC 4231 HMAC vectors, unbiased key
# generation, DER signature encoding, and refusal of out-of-range keys and digests.
from binascii import hexlify, unhexlify

import mpunit
import p256

TIMEOUT = 120


def _vectors():
    # tests/firmware/vectors/rfc6979_p256_sha256.txt: the key, then one case per message.
    path = mpunit.repo_root() + "/tests/firmware/vectors/rfc6979_p256_sha256.txt"
    key = {}
    cases = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, value = line.split()
            if name == "msg":
                cases.append({"msg": value.encode()})
            elif cases:
                cases[-1][name] = int(value, 16)
            else:
                key[name] = int(value, 16)
    return key, cases


def test_rfc6979_public_key():
    key, _ = _vectors()
    pub = p256.public_key(key["x"])
    mpunit.eq(pub, b"\x04" + key["Ux"].to_bytes(32, "big") + key["Uy"].to_bytes(32, "big"))


def test_rfc6979_nonce_and_signature():
    key, cases = _vectors()
    mpunit.eq(len(cases), 2)
    from hashlib import sha256
    for c in cases:
        k = next(p256._nonces(key["x"], sha256(c["msg"]).digest()))
        mpunit.eq(k, c["k"], c["msg"])
        mpunit.eq(p256.sign(key["x"], c["msg"]), (c["r"], c["s"]), c["msg"])


def test_hmac_sha256_rfc4231():
    cases = (
        (b"\x0b" * 20, b"Hi There",
         "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
        (b"Jefe", b"what do ya want for nothing?",
         "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
        (b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First",
         "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"),
    )
    for key, data, mac in cases:
        mpunit.eq(hexlify(p256.hmac_sha256(key, data)).decode(), mac)
        # Parts are concatenated, as RFC 6979 feeds V || 0x00 || x || h1.
        mpunit.eq(p256.hmac_sha256(key, data[:3], data[3:]), unhexlify(mac))


def test_generate_rejects_out_of_range_draws():
    n = p256.N
    draws = [b"\x00" * 32, n.to_bytes(32, "big"), b"\xff" * 32, (n - 1).to_bytes(32, "big")]

    def fake(size):
        mpunit.eq(size, 32)
        return draws.pop(0)

    # 0, n and 2^256-1 are thrown away (never reduced mod n); n-1 is taken as drawn.
    mpunit.eq(p256.generate(fake), n - 1)
    mpunit.eq(draws, [])
    # A stuck RNG is an error, not an endless loop.
    mpunit.raises(p256.P256Error, p256.generate, lambda size: b"\xff" * size)


def test_generated_key_is_on_the_curve_and_distinct():
    d1 = p256.generate()
    d2 = p256.generate()
    assert d1 != d2
    for d in (d1, d2, 1, 2, p256.N - 1):
        pub = p256.public_key(d)
        mpunit.eq(len(pub), 65)
        x = int.from_bytes(pub[1:33], "big")
        y = int.from_bytes(pub[33:], "big")
        assert p256.on_curve(x, y), d
    # (n-1)G = -G: same x as G.
    mpunit.eq(p256.public_key(p256.N - 1)[1:33], p256.public_key(1)[1:33])


def test_out_of_range_inputs_refused():
    for bad in (0, p256.N, -1):
        mpunit.raises(p256.P256Error, p256.public_key, bad)
        mpunit.raises(p256.P256Error, p256.sign_digest, bad, b"\x00" * 32)
    mpunit.raises(p256.P256Error, p256.sign_digest, 1, b"\x00" * 31)
    mpunit.raises(p256.P256Error, p256.from_private_bytes, b"\x00" * 32)
    mpunit.raises(p256.P256Error, p256.from_private_bytes, b"\x01" * 31)
    mpunit.eq(p256.from_private_bytes((5).to_bytes(32, "big")), 5)


def test_der_signature_encoding():
    # Minimal INTEGERs: a leading 0 only before a high bit, none for small values.
    mpunit.eq(p256.der_signature(1, 0x80), unhexlify("3007020101020200 80".replace(" ", "")))
    big = (1 << 255) | 1
    der = p256.der_signature(big, big)
    mpunit.eq(len(der), 72)
    mpunit.eq(der[:5], unhexlify("3046022100"))
    mpunit.eq(der[5:37], big.to_bytes(32, "big"))
    short = p256.der_signature(0x7F << 248, 0x12)
    mpunit.eq(short[2:5], unhexlify("02207f"))
    mpunit.eq(short[-3:], unhexlify("020112"))
