# PKCS#10 certificate request (RFC 2986) for a device key made on the node, and the key's
# own DER form (SEC1 ECPrivateKey, RFC 5915) for the tls module's load_cert_chain.
#
# The request asks for what the fleet CA issues today: subject CN = device id, nothing
# else (no attributes, no extensions; the CA adds its own). A minimal DER writer suffices:
# every length is known before its body is written, and the request is ~230 bytes.
import p256
from micropython import const

# DER encodings of the fixed parts, written out once.
_OID_EC_PUBLIC_KEY = b"\x06\x07\x2a\x86\x48\xce\x3d\x02\x01"  # 1.2.840.10045.2.1
_OID_P256 = b"\x06\x08\x2a\x86\x48\xce\x3d\x03\x01\x07"  # 1.2.840.10045.3.1.7
_OID_ECDSA_SHA256 = b"\x06\x08\x2a\x86\x48\xce\x3d\x04\x03\x02"  # 1.2.840.10045.4.3.2
_OID_CN = b"\x06\x03\x55\x04\x03"  # 2.5.4.3

_SEQ = const(0x30)
_SET = const(0x31)
_INT = const(0x02)
_BITS = const(0x03)
_OCTETS = const(0x04)
_UTF8 = const(0x0C)
_ATTRS = const(0xA0)  # [0] IMPLICIT SET OF Attribute
_EXPLICIT0 = const(0xA0)
_EXPLICIT1 = const(0xA1)

# Device ids are 1..32 of A-Z a-z 0-9 _ - (the broker username and topic segment).
_ID_MAX = const(32)


class CsrError(ValueError):
    pass


def _tlv(tag, body):
    n = len(body)
    if n < 0x80:
        head = bytes((tag, n))
    elif n < 0x100:
        head = bytes((tag, 0x81, n))
    else:
        head = bytes((tag, 0x82, n >> 8, n & 0xFF))
    return head + body


def _check_id(device_id):
    if not 0 < len(device_id) <= _ID_MAX:
        raise CsrError("device id must be 1 to %d characters" % _ID_MAX)
    for c in device_id:
        if not ("a" <= c <= "z" or "A" <= c <= "Z" or "0" <= c <= "9" or c in "_-"):
            raise CsrError("device id may hold only A-Z a-z 0-9 _ -")


def subject(device_id):
    """Name ::= SEQUENCE { SET { SEQUENCE { id-at-commonName, UTF8String id } } }."""
    _check_id(device_id)
    return _tlv(_SEQ, _tlv(_SET, _tlv(_SEQ, _OID_CN + _tlv(_UTF8, device_id.encode()))))


def spki(pub):
    """SubjectPublicKeyInfo of an uncompressed P-256 point (65 bytes, 04 || X || Y)."""
    if len(pub) != 65 or pub[0] != 4:
        raise CsrError("public key must be an uncompressed P-256 point")
    return _tlv(_SEQ, _tlv(_SEQ, _OID_EC_PUBLIC_KEY + _OID_P256) + _tlv(_BITS, b"\x00" + pub))


def request(device_id, d, pub=None):
    """The DER CertificationRequest for device_id, signed (ECDSA-SHA256) with key d.

    pub: d's public key if the caller has it already (saves one scalar multiplication).
    """
    if pub is None:
        pub = p256.public_key(d)
    info = _tlv(_SEQ, b"\x02\x01\x00" + subject(device_id) + spki(pub) + bytes((_ATTRS, 0)))
    sig = p256.der_signature(*p256.sign(d, info))
    return _tlv(_SEQ, info + _tlv(_SEQ, _OID_ECDSA_SHA256) + _tlv(_BITS, b"\x00" + sig))


def private_key_der(d, pub=None):
    """ECPrivateKey (SEC1 / RFC 5915) with the curve and public key, as mbedtls loads it."""
    if pub is None:
        pub = p256.public_key(d)
    return _tlv(
        _SEQ,
        b"\x02\x01\x01"
        + _tlv(_OCTETS, p256.private_bytes(d))
        + _tlv(_EXPLICIT0, _OID_P256)
        + _tlv(_EXPLICIT1, _tlv(_BITS, b"\x00" + pub)),
    )


def private_key_from_der(der):
    """The scalar d of an ECPrivateKey written by private_key_der (the same fixed layout)."""
    # 30 77 02 01 01 04 20 <32 bytes d> a0 0a <OID P-256> a1 44 03 42 00 <65 bytes>
    if len(der) != 121 or der[:7] != b"\x30\x77\x02\x01\x01\x04\x20" or der[39:51] != b"\xa0\x0a" + _OID_P256:
        raise CsrError("not a P-256 ECPrivateKey in this firmware's layout")
    return p256.from_private_bytes(der[7:39])
