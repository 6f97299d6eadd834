"""The fleet PKI: what it issues, how it stores keys, revocation, rotation and its CLI."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import PkiError
from gateway.security.pki import Pki
from tools.cli import main as torpor


def _cert(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    if path.suffix == ".der":
        return x509.load_der_x509_certificate(data)
    return x509.load_pem_x509_certificate(data)


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_ca_is_p256_self_signed_pathlen_1(pki: Pki) -> None:
    ca = _cert(pki.ca_pem)
    assert ca.issuer == ca.subject
    pub = ca.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 1  # room for the issuing CA
    ca.verify_directly_issued_by(ca)


def test_private_keys_are_0600(pki: Pki) -> None:
    creds = pki.issue_device("node-1")
    keys = [pki.ca_key, pki.server.key_pem, pki.gateway.key_pem, creds.key_pem, creds.key_der]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE(creds.cert_der.stat().st_mode) == 0o644


def test_server_cert_sans_and_usage(pki: Pki) -> None:
    cert = _cert(pki.issue_server(["broker.lan", "192.0.2.7", "::1"]).cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["broker.lan"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.0.2.7"), ipaddress.ip_address("::1")
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    cert.verify_directly_issued_by(_cert(pki.ca_pem))
    with pytest.raises(PkiError, match="invalid server name"):
        pki.issue_server(["bad name"])


def test_gateway_cert_cn(pki: Pki) -> None:
    cert = _cert(pki.gateway.cert_pem)
    assert _cn(cert) == "torpor-gateway"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_device_cert_subject_serial_validity_and_der(pki: Pki) -> None:
    creds = pki.issue_device("node-1", days=30)
    pem, der = _cert(creds.cert_pem), _cert(creds.cert_der)
    assert pem == der
    assert _cn(pem) == "node-1" and creds.device_id == "node-1"
    assert pem.serial_number == creds.serial
    lifetime = pem.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=29, hours=23) < lifetime <= dt.timedelta(days=30)
    pem.verify_directly_issued_by(_cert(creds.ca_der))
    # The DER key is PKCS#8 and matches the certificate.
    key = serialization.load_der_private_key(creds.key_der.read_bytes(), None)
    assert creds.key_der.read_bytes()[:3] == b"\x30\x81\x87"  # PKCS#8 P-256 envelope
    assert key.public_key() == pem.public_key()
    rec = [r for r in pki.list() if r.serial == creds.serial]
    assert len(rec) == 1 and rec[0].kind == "device" and rec[0].cn == "node-1"
    assert rec[0].not_after == pem.not_valid_after_utc and rec[0].revoked_at is None


@pytest.mark.parametrize(
    "bad", ["", "a" * 33, "node/1", "node+", "node#", "nöde", "a b", "$SYS", "../x", "torpor-gateway"]
)
def test_bad_device_ids_are_refused(pki: Pki, bad: str) -> None:
    before = pki.list()
    with pytest.raises(PkiError):
        pki.issue_device(bad)
    assert pki.list() == before


def test_longest_valid_device_id(pki: Pki) -> None:
    assert _cn(_cert(pki.issue_device("A_z-9" * 6 + "xy").cert_pem)) == "A_z-9" * 6 + "xy"


def test_revoke_lists_serial_in_crl(pki: Pki) -> None:
    a = pki.issue_device("node-1")
    b = pki.issue_device("node-2")
    assert pki.revoke("node-1") == [a.serial]
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert crl.is_signature_valid(_cert(pki.ca_pem).public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(a.serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(b.serial) is None
    assert crl.next_update_utc is not None and crl.next_update_utc > dt.datetime.now(dt.UTC)
    assert pki.revoke("node-1") == []  # idempotent
    assert pki.revoke(b.serial) == [b.serial]
    assert pki.revoked_serials() == {a.serial, b.serial}
    with pytest.raises(PkiError, match="unknown device"):
        pki.revoke("node-3")
    with pytest.raises(PkiError, match="no certificate with serial"):
        pki.revoke(12345)


def test_rotate_keeps_old_valid_until_revoked(pki: Pki) -> None:
    old = pki.issue_device("node-1")
    new = pki.rotate("node-1", days=10)
    assert new.serial != old.serial and new.cert_der != old.cert_der
    assert old.cert_der.exists() and new.cert_der.exists()
    assert {r.serial for r in pki.device_records("node-1", include_revoked=False)} == {
        old.serial, new.serial
    }
    pki.revoke(old.serial)
    assert pki.revoked_serials() == {old.serial}
    assert pki.device_credentials("node-1").serial == new.serial
    with pytest.raises(PkiError, match="no valid certificate"):
        pki.rotate("never-issued")


def test_list_shows_every_certificate(pki: Pki) -> None:
    pki.issue_device("node-1")
    pki.issue_device("node-2")
    pki.revoke("node-2")
    rows = {(r.kind, r.cn): r for r in pki.list()}
    assert set(rows) == {("ca", "Torpor fleet CA"), ("server", "torpor-broker"),
                         ("gateway", "torpor-gateway"), ("control", "torpor-control"),
                         ("device", "node-1"), ("device", "node-2")}
    assert rows[("device", "node-2")].revoked_at is not None
    assert rows[("device", "node-1")].revoked_at is None


def test_offline_ca_key_dir(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki", ca_key_dir=tmp_path / "offline")
    pki.init_ca()
    assert (tmp_path / "offline" / "ca.key").exists() and not (tmp_path / "pki" / "ca.key").exists()
    pki.issue_gateway()
    # Without the offline key mounted nothing can be issued or revoked...
    with pytest.raises(PkiError, match="--ca-key-dir"):
        Pki(tmp_path / "pki").issue_device("node-1")
    # ...but listing still works.
    assert len(Pki(tmp_path / "pki").list()) == 3  # CA, gateway and its control certificate


def test_init_twice_refused(pki: Pki) -> None:
    with pytest.raises(PkiError, match="already exists"):
        pki.init_ca()


# --- CLI ---------------------------------------------------------------------------------

def test_cli_flow_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = ["--dir", str(tmp_path / "pki")]
    assert torpor(["pki", "device", "node-1", *d]) == 2
    assert "torpor pki init" in capsys.readouterr().err
    assert torpor(["pki", "init", *d]) == 0
    assert torpor(["pki", "init", *d]) == 2
    assert torpor(["pki", "server", "--san", "localhost,127.0.0.1", *d]) == 0
    assert torpor(["pki", "gateway", *d]) == 0
    capsys.readouterr()
    assert torpor(["pki", "device", "node-1", "--days", "7", *d]) == 0
    out = capsys.readouterr().out
    assert "node-1" in out and "cert.der" in out
    assert torpor(["pki", "device", "bad/id", *d]) == 2
    assert "invalid device id" in capsys.readouterr().err
    assert torpor(["pki", "rotate", "node-1", *d]) == 0
    assert torpor(["pki", "rotate", "node-9", *d]) == 2
    capsys.readouterr()
    assert torpor(["pki", "list", "--json", *d]) == 0
    rows = json.loads(capsys.readouterr().out)
    serials = [r["serial"] for r in rows if r["cn"] == "node-1"]
    assert len(serials) == 2
    assert torpor(["pki", "revoke", "--serial", serials[0], *d]) == 0
    assert torpor(["pki", "revoke", "--serial", "zz", *d]) == 2
    assert torpor(["pki", "revoke", "node-1", *d]) == 0
    assert torpor(["pki", "revoke", "node-7", *d]) == 2
    assert torpor(["pki", "crl", *d]) == 0
    capsys.readouterr()
    assert torpor(["pki", "list", *d]) == 0
    table = capsys.readouterr().out
    assert table.count("node-1") == 2 and "torpor-gateway" in table


def test_cli_missing_offline_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = ["--dir", str(tmp_path / "pki")]
    assert torpor(["pki", "init", *d, "--ca-key-dir", str(tmp_path / "usb")]) == 0
    assert torpor(["pki", "gateway", *d]) == 2
    assert "--ca-key-dir" in capsys.readouterr().err
    assert torpor(["pki", "gateway", *d, "--ca-key-dir", str(tmp_path / "usb")]) == 0


@pytest.mark.parametrize("flags", [
    ["--san", "localhost", "--san", "127.0.0.1", "--san", "gw.lan"],
    ["--san", "localhost,127.0.0.1,gw.lan"],
    ["--san", "localhost,127.0.0.1", "--san", "gw.lan"],
])
def test_server_san_takes_repeated_flags_and_comma_lists(tmp_path: Path, flags: list[str]) -> None:
    d = str(tmp_path / "pki")
    assert torpor(["pki", "init", "--dir", d]) == 0
    assert torpor(["pki", "server", "--dir", d, *flags]) == 0
    sans = _cert(Pki(d).server.cert_pem).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "gw.lan"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_pki_commands_leave_private_files(tmp_path: Path) -> None:
    """Keys 0600, the rest no more than 0644, in 0700 folders, after every `pki` command."""
    d = tmp_path / "pki"
    for argv in (["init"], ["server"], ["gateway"], ["device", "n1"], ["revoke", "n1"],
                 ["crl"]):
        assert torpor(["pki", *argv[:1], *argv[1:], "--dir", str(d)]) == 0, argv
        for path in [d, *d.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            if path.is_dir():
                assert mode == 0o700, (argv, path, oct(mode))
            elif path.suffix in (".key",) or path.name in ("key.pem", "key.der"):
                assert mode == 0o600, (argv, path, oct(mode))
            else:
                assert mode & 0o133 == 0, (argv, path, oct(mode))


def test_gateway_and_control_names_are_never_device_ids(pki: Pki) -> None:
    """The broker makes every client id its certificate's CN: a device named like the
    gateway or its control identity would share their sessions."""
    assert pki.control.cn == "torpor-control" and pki.gateway.cn == "torpor-gateway"
    for name in ("torpor-gateway", "torpor-control"):
        with pytest.raises(PkiError, match="name of the gateway"):
            pki.issue_device(name)
