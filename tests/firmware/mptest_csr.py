# The node's certificate request and key file in MicroPython: DER lengths, the fixed layout
# the key file is read back from, and that a rotation fits in a small heap.
import gc

import csr
import mpunit
import p256

# A board has far more than this free; the request must not need more (sources compile in
# this heap too, which a board with frozen or .mpy modules does not pay).
HEAPSIZE = "64K"


def test_der_length_forms():
    mpunit.eq(csr._tlv(0x04, b"x" * 0x7F)[:2], b"\x04\x7f")
    mpunit.eq(csr._tlv(0x04, b"x" * 0x80)[:3], b"\x04\x81\x80")
    mpunit.eq(csr._tlv(0x04, b"x" * 0x1234)[:4], b"\x04\x82\x12\x34")


def test_subject_and_spki_layout():
    mpunit.eq(csr.subject("a"), b"\x30\x0c\x31\x0a\x30\x08\x06\x03\x55\x04\x03\x0c\x01a")
    pub = p256.public_key(7)
    info = csr.spki(pub)
    mpunit.eq(len(info), 91)  # the fixed size of a P-256 SubjectPublicKeyInfo
    mpunit.eq(info[-65:], pub)
    mpunit.raises(csr.CsrError, csr.spki, pub[1:])
    mpunit.raises(csr.CsrError, csr.spki, b"\x02" + pub[1:])


def test_request_is_deterministic_for_a_key_and_bounded_in_size():
    d = p256.generate()
    a = csr.request("node-7", d)
    mpunit.eq(a, csr.request("node-7", d, p256.public_key(d)))
    assert a[0] == 0x30 and a[1] == 0x81
    # 32-character id and a 72-byte signature: the largest request this firmware makes.
    big = csr.request("x" * 32, d)
    assert len(big) <= 260, len(big)


def test_key_file_round_trip_and_refusals():
    d = p256.generate()
    der = csr.private_key_der(d)
    mpunit.eq(len(der), 121)
    mpunit.eq(csr.private_key_from_der(der), d)
    mpunit.raises(csr.CsrError, csr.private_key_from_der, der[:-1])
    bad = bytearray(der)
    bad[45] ^= 1  # inside the curve OID
    mpunit.raises(csr.CsrError, csr.private_key_from_der, bytes(bad))
    zero = bytearray(der)
    zero[7:39] = bytes(32)
    mpunit.raises(p256.P256Error, csr.private_key_from_der, bytes(zero))


def test_rotation_fits_the_heap():
    gc.collect()
    d = p256.generate()
    pub = p256.public_key(d)
    req = csr.request("node-7", d, pub)
    key = csr.private_key_der(d, pub)
    assert len(req) > 200 and len(key) == 121
