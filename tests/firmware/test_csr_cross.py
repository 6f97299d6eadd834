"""Cross-checks of the node's own key pair and certificate request against `cryptography`
(OpenSSL), and the whole path: a key made in the MicroPython unix port, its CSR signed by
the fleet CA, the node connecting with it to a real Mosquitto with mutual TLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.security.pki import Pki
from tests.fixtures.broker import RunningBroker, mqtt_client
from tests.mpharness import run_micropython

DEVICE = "node-7"
# The order of the P-256 group.
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

# The node's side: a new key, its CSR, its SEC1 key file and a signature over a message.
_NODE = """
import gc, json, time
import csr, p256
t0 = time.ticks_us()
d = p256.generate()
pub = p256.public_key(d)
t1 = time.ticks_us()
req = csr.request({device!r}, d, pub)
t2 = time.ticks_us()
sig = p256.der_signature(*p256.sign(d, b'signed on the node'))
t3 = time.ticks_us()
with open('csr.der', 'wb') as f:
    f.write(req)
with open('key.der', 'wb') as f:
    f.write(csr.private_key_der(d, pub))
with open('sig.der', 'wb') as f:
    f.write(sig)
with open('pub.bin', 'wb') as f:
    f.write(pub)
# The key file reads back to the same scalar.
assert csr.private_key_from_der(csr.private_key_der(d, pub)) == d
print('OUT ' + json.dumps({{'keygen_us': time.ticks_diff(t1, t0), 'csr_us': time.ticks_diff(t2, t1),
                           'sign_us': time.ticks_diff(t3, t2)}}))
"""


def _node_makes_key(tmp_path: Path, device: str = DEVICE) -> dict[str, Any]:
    proc = run_micropython(_NODE.format(device=device), cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("OUT "))
    figures: dict[str, Any] = json.loads(line[4:])
    return figures


def _issue_from_csr(pki: Pki, csr: x509.CertificateSigningRequest, days: int = 30) -> x509.Certificate:
    """What the fleet CA puts in a device certificate (gateway/security/pki.py), for the CSR's key."""
    ca = x509.load_pem_x509_certificate(pki.ca_pem.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(ca.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _pub_raw(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def test_node_csr_verifies_and_its_certificate_carries_the_node_key(pki: Pki, tmp_path: Path) -> None:
    figures = _node_makes_key(tmp_path)
    node_pub = (tmp_path / "pub.bin").read_bytes()

    req = x509.load_der_x509_csr((tmp_path / "csr.der").read_bytes())
    assert req.is_signature_valid
    assert req.signature_hash_algorithm is not None and req.signature_hash_algorithm.name == "sha256"
    assert req.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)])
    assert len(req.attributes) == 0 and len(req.extensions) == 0
    req_pub = req.public_key()
    assert isinstance(req_pub, ec.EllipticCurvePublicKey) and req_pub.curve.name == "secp256r1"
    assert _pub_raw(req_pub) == node_pub
    # OpenSSL re-encodes the parsed request byte for byte: the node's DER is canonical.
    assert req.public_bytes(serialization.Encoding.DER) == (tmp_path / "csr.der").read_bytes()

    # The key file is a valid SEC1 ECPrivateKey of the same key.
    key = serialization.load_der_private_key((tmp_path / "key.der").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert _pub_raw(key.public_key()) == node_pub

    cert = _issue_from_csr(pki, req)
    cert_pub = cert.public_key()
    assert isinstance(cert_pub, ec.EllipticCurvePublicKey)
    assert _pub_raw(cert_pub) == node_pub
    cert_pub.verify((tmp_path / "sig.der").read_bytes(), b"signed on the node", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        cert_pub.verify((tmp_path / "sig.der").read_bytes(), b"signed elsewhere", ec.ECDSA(hashes.SHA256()))
    print(f"\nnode P-256 in the unix port: {figures}")


_SIGN_MANY = """
from binascii import hexlify, unhexlify
import p256
with open('cases.txt') as f:
    for line in f:
        d, msg = line.split()
        r, s = p256.sign(int(d, 16), b'' if msg == '-' else unhexlify(msg))
        print(hexlify(p256.der_signature(r, s)).decode())
"""


def test_node_signatures_equal_openssl_rfc6979(tmp_path: Path) -> None:
    # OpenSSL's deterministic ECDSA is RFC 6979 too: the node's DER must match byte for byte
    # (same k, same (r, s), same minimal INTEGER encoding), over keys and lengths at random.
    rng = random.Random(6979)
    keys = [1, 2, N - 1] + [rng.randrange(1, N) for _ in range(12)]
    cases = [(d, rng.randbytes(rng.choice((0, 1, 55, 64, 200)))) for d in keys]
    (tmp_path / "cases.txt").write_text("".join(f"{d:064x} {m.hex() or '-'}\n" for d, m in cases))
    proc = run_micropython(_SIGN_MANY, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = proc.stdout.split()
    assert len(got) == len(cases)
    for (d, msg), sig_hex in zip(cases, got, strict=True):
        key = ec.derive_private_key(d, ec.SECP256R1())
        want = key.sign(msg, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
        assert bytes.fromhex(sig_hex) == want, f"d={d:x} msg={msg.hex()}"
        key.public_key().verify(bytes.fromhex(sig_hex), msg, ec.ECDSA(hashes.SHA256()))


_CONNECT = """
import json
import mqtt
def rd(p):
    with open(p, 'rb') as f:
        return f.read()
ctx = mqtt.make_tls_context(rd('cert.der'), rd('key.der'), rd({ca!r}))
c = mqtt.MQTTClient({device!r}, {host!r}, {port}, ssl=ctx)
c.connect(mqtt.deadline(10000))
c.publish('torpor/{device}/up', b'new key', qos=1)
c.wait_pubacks(mqtt.deadline(5000))
c.disconnect()
print('OUT connected')
"""


def test_node_connects_with_its_own_key_and_the_issued_certificate(
    broker: RunningBroker, pki: Pki, tmp_path: Path
) -> None:
    _node_makes_key(tmp_path)
    req = x509.load_der_x509_csr((tmp_path / "csr.der").read_bytes())
    cert = _issue_from_csr(pki, req)
    (tmp_path / "cert.der").write_bytes(cert.public_bytes(serialization.Encoding.DER))
    code = _CONNECT.format(ca=str(pki.ca_der), device=DEVICE, host=broker.host, port=broker.port)

    async def scenario() -> tuple[str, list[bytes]]:
        async with mqtt_client(broker) as gw:
            await gw.subscribe(f"torpor/{DEVICE}/up", qos=1)
            proc = await asyncio.to_thread(run_micropython, code, cwd=tmp_path, timeout=60)
            got: list[bytes] = []
            try:
                async with asyncio.timeout(5):
                    async for m in gw.messages:
                        got.append(bytes(m.payload))  # type: ignore[arg-type]
                        break
            except TimeoutError:
                pass
            return proc.stdout + proc.stderr, got

    out, got = asyncio.run(scenario())
    assert "OUT connected" in out, out + broker.logs
    assert got == [b"new key"]


def test_csr_for_a_bad_device_id_is_refused_on_the_node(tmp_path: Path) -> None:
    code = (
        "import csr\n"
        "for bad in ('', 'a' * 33, 'node/7', 'n\\u00e9', 'x y'):\n"
        "    try:\n"
        "        csr.subject(bad)\n"
        "    except csr.CsrError:\n"
        "        print('refused')\n"
    )
    proc = run_micropython(code, cwd=tmp_path)
    assert proc.stdout.split() == ["refused"] * 5, proc.stdout + proc.stderr
