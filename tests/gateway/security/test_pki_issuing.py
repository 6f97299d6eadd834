"""The issuing CA, migration from a root that signed everything, lifetimes and renewal."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest
from cryptography import x509

from gateway.config import PkiConfig
from gateway.errors import PkiError
from gateway.security import lifetimes
from gateway.security.pki import ISSUING_CN, Pki, crl_number
from tools.cli import main as torpor


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _fleet(path: Path, *, path_length: int = 1) -> Pki:
    pki = Pki(path)
    pki.init_ca(path_length=path_length)
    pki.issue_server(["localhost", "127.0.0.1"])
    pki.issue_gateway()
    return pki


class Clock:
    def __init__(self) -> None:
        self.t = dt.datetime.now(dt.UTC).replace(microsecond=0)

    def __call__(self) -> dt.datetime:
        return self.t


def test_issuing_ca_signs_new_certificates_and_the_crl(tmp_path: Path) -> None:
    pki = _fleet(tmp_path / "pki")
    pki.init_issuing()
    root, issuing = _cert(pki.ca_pem), _cert(pki.issuing_pem)
    issuing.verify_directly_issued_by(root)
    bc = issuing.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    dev = pki.issue_device("node-1")
    _cert(dev.cert_pem).verify_directly_issued_by(issuing)
    server = pki.issue_server(["localhost"])
    # The broker's certfile is a chain: server, then the issuing CA.
    chain = x509.load_pem_x509_certificates(server.cert_pem.read_bytes())
    assert [c.subject for c in chain] == [chain[0].subject, issuing.subject]
    chain[0].verify_directly_issued_by(issuing)
    assert pki.chain_pem.read_bytes() == pki.ca_pem.read_bytes() + pki.issuing_pem.read_bytes()
    # crl.pem: the issuing CA's CRL first, the root's after it.
    crls = pki.crls()
    assert [c.issuer for c in crls] == [issuing.subject, root.subject]
    pub_i, pub_r = issuing.public_key(), root.public_key()
    assert crls[0].is_signature_valid(pub_i) and crls[1].is_signature_valid(pub_r)  # type: ignore[arg-type]
    assert pki.revoke("node-1") == [dev.serial]
    assert dev.serial in {r.serial_number for r in pki.crls()[0]}
    assert pki.list()[-1].issuer == "issuing"


def test_issuing_ca_works_with_the_root_key_offline(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki", ca_key_dir=tmp_path / "usb")
    pki.init_ca()
    pki.issue_server(["localhost"])
    pki.issue_gateway()
    pki.init_issuing()
    shutil.rmtree(tmp_path / "usb")  # the root key goes back in the safe
    online = Pki(tmp_path / "pki")
    dev = online.issue_device("node-2")
    online.revoke("node-2")
    online.write_crl(days=3)
    online.renew_server(days=10)
    online.renew_gateway(days=10)
    assert dev.serial in online.revoked_serials()
    with pytest.raises(PkiError, match="CA key .* not found"):
        online.init_issuing()


def test_migration_keeps_root_signed_certificates_valid(tmp_path: Path) -> None:
    """A fleet whose root (pathlen 0) signed everything: the root is re-certified with the
    same key and name, old device certificates verify under it, and revoking one of them
    needs the root key (it goes on the root's CRL)."""
    pki = _fleet(tmp_path / "pki", path_length=0)
    old_dev = pki.issue_device("old-node")
    old_root = _cert(pki.ca_pem)
    pki.init_issuing()
    new_root = _cert(pki.ca_pem)
    assert new_root.subject == old_root.subject and new_root.serial_number != old_root.serial_number
    assert new_root.public_key() == old_root.public_key()
    assert new_root.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 1
    _cert(old_dev.cert_pem).verify_directly_issued_by(new_root)
    assert pki.legacy_root  # nodes still hold the old root: the root signs the server's
    _cert(pki.issue_server(["localhost"]).cert_pem).verify_directly_issued_by(new_root)
    assert _cert(pki.issue_device("new-node").cert_pem).issuer.rfc4514_string() == f"CN={ISSUING_CN}"
    root_crl = pki.crls()[1]
    assert root_crl.next_update_utc is not None
    assert root_crl.next_update_utc >= _cert(old_dev.cert_pem).not_valid_after_utc  # outlives it
    offline = Pki(tmp_path / "pki", ca_key_dir=tmp_path / "no-key")
    before = pki.index_path.read_bytes()
    with pytest.raises(PkiError, match="root CA signed before the issuing CA"):
        offline.revoke("old-node")
    assert pki.index_path.read_bytes() == before  # nothing changed
    offline.revoke("new-node")  # the issuing CA's own need no root key
    assert pki.revoke("old-node") == [old_dev.serial]
    assert old_dev.serial in {r.serial_number for r in pki.crls()[1]}


def test_status_lists_every_lifetime(tmp_path: Path) -> None:
    clock = Clock()
    pki = Pki(tmp_path / "pki", clock=clock)
    pki.init_ca()
    pki.issue_server(["localhost"], days=100)
    pki.issue_gateway(days=50)
    pki.init_issuing()
    for i, days in enumerate((3, 12, 40, 400)):
        pki.issue_device(f"n{i}", days=days)
    pki.revoke("n0")  # revoked: no longer counted
    old = pki.issue_device("n3", days=1)  # n3 rotated: its newest certificate counts...
    pki.rotate("n3", days=400)  # ...which is this one
    pki.write_crl(days=20)
    clock.t += dt.timedelta(days=2)
    st = pki.status(soonest=2)
    names = [c.name for c in st.credentials]
    assert names == ["root_ca", "issuing_ca", "server", "gateway", "control", "crl", "crl_root"]
    left = {c.name: c.days_left for c in st.credentials}
    assert left["server"] == pytest.approx(98, abs=0.01)
    assert left["gateway"] == left["control"] == pytest.approx(48, abs=0.01)
    assert left["crl"] == pytest.approx(18, abs=0.01)
    assert st.devices_total == 3 and st.devices_expiring == 1
    assert [d.subject for d in st.devices] == ["n1", "n2"]
    assert st.devices[0].days_left == pytest.approx(10, abs=0.01)
    assert old.serial not in {int(d.serial, 16) for d in st.device_lifetimes}
    doc = st.to_json()
    assert set(doc) == {"now", "credentials", "devices"}
    assert set(doc["devices"]) == {"total", "within_days", "expiring_within", "soonest"}
    assert set(doc["credentials"][0]) == {"name", "kind", "subject", "serial", "not_after", "days_left"}


def test_cli_status_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = ["--dir", str(tmp_path / "pki")]
    assert torpor(["pki", "init", *d]) == 0
    assert torpor(["pki", "server", *d]) == 0
    assert torpor(["pki", "gateway", *d]) == 0
    assert torpor(["pki", "issuing", *d]) == 0
    assert torpor(["pki", "device", "soon", "--days", "5", *d]) == 0
    assert torpor(["pki", "device", "late", *d]) == 0
    capsys.readouterr()
    assert torpor(["pki", "status", *d]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["CREDENTIAL", "SUBJECT", "SERIAL", "NOT", "AFTER", "(UTC)", "DAYS", "LEFT"]
    assert any(line.startswith("issuing_ca") and "1095.0" in line for line in lines)
    assert any(line.startswith("crl ") and "365.0" in line for line in lines)
    assert "devices: 2 with a valid certificate, 1 expire within 30 days" in out
    assert any("soon" in line and line.rstrip().endswith("5.0 !") for line in lines)
    assert torpor(["pki", "status", "--json", "--soonest", "1", *d]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["subject"] for s in doc["devices"]["soonest"]] == ["soon"]
    assert doc["devices"]["expiring_within"] == 1
    assert torpor(["pki", "status", "--dir", str(tmp_path / "nothing")]) == 2
    assert "no CA" in capsys.readouterr().err


def test_renewal_is_a_table_of_lead_times(tmp_path: Path) -> None:
    clock = Clock()
    pki = Pki(tmp_path / "pki", clock=clock)
    pki.init_ca()
    pki.issue_server(["localhost", "10.0.0.1"], days=40)
    pki.issue_gateway(days=60)
    pki.init_issuing()
    pki.write_crl(days=10)
    cfg = PkiConfig(crl_days=10, crl_renew_at=0.5, server_days=90, server_lead_days=30,
                    gateway_days=90, gateway_lead_days=30)
    assert lifetimes.renew_due(pki, cfg).renewed == ()
    clock.t += dt.timedelta(days=5, seconds=1)  # the CRL is half-way: renewed
    report = lifetimes.renew_due(pki, cfg)
    assert [r.name for r in report.renewed] == ["crl"] and report.broker_files_changed
    assert pki.status().credentials[5].days_left == pytest.approx(10, abs=0.01)
    clock.t += dt.timedelta(days=6)  # server 29 days left: renewed with its names
    old_server = pki.server.serial
    report = lifetimes.renew_due(pki, cfg)
    assert [r.name for r in report.renewed] == ["crl", "server"]
    sans = _cert(pki.server.cert_pem).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert pki.server.serial != old_server and "10.0.0.1" in str(sans.value)
    clock.t += dt.timedelta(days=25)  # gateway 29 days left: gateway and control together
    report = lifetimes.renew_due(pki, cfg)
    assert {r.name for r in report.renewed} == {"crl", "gateway", "control"}
    assert pki.status().credentials[3].days_left == pytest.approx(90, abs=0.01)
    (pki.path / "issuing.key").unlink()  # no key: reported, not raised
    clock.t += dt.timedelta(days=6)
    report = lifetimes.renew_due(pki, cfg)
    assert report.renewed == () and [f[0].name for f in report.failed] == ["crl"]
    assert "issuing CA key" in report.failed[0][1]


def test_each_new_crl_is_later_than_the_one_before(tmp_path: Path) -> None:
    """The broker keeps every CRL it reloaded and uses the one with the latest lastUpdate:
    two CRLs in one second (a renewal, then a revocation) must not tie. Each carries its
    RFC 5280 CRL number, one above the one before; the root's CRL counts on its own."""
    pki = _fleet(tmp_path / "pki")
    root_first = crl_number(pki.crls()[0])
    pki.init_issuing()
    root_number = crl_number(pki.crls()[1])
    pki.issue_device("node-1")
    stamps, numbers = [], []
    for _ in range(3):
        pki.write_crl(days=1)
        stamps.append(pki.crls()[0].last_update_utc)
        numbers.append(crl_number(pki.crls()[0]))
    pki.revoke("node-1")
    stamps.append(pki.crls()[0].last_update_utc)
    numbers.append(crl_number(pki.crls()[0]))
    assert stamps == sorted(set(stamps)), stamps
    assert numbers == list(range(numbers[0], numbers[0] + 4)) and numbers[0] >= 1, numbers
    assert root_first >= 1 and root_number > root_first
    assert crl_number(pki.crls()[1]) == root_number  # the root key was not used again


def test_a_crl_is_never_dated_in_the_future(tmp_path: Path) -> None:
    clock = Clock()
    pki = Pki(tmp_path / "pki", clock=clock)
    pki.init_ca()
    pki.write_crl(days=1)
    # The clock steps back past the backdating (as after a burst of CRLs in one second):
    # the next CRL is dated now, not after the last one.
    clock.t -= dt.timedelta(minutes=10)
    pki.write_crl(days=1)
    assert pki.crls()[0].last_update_utc == clock.t


def test_renewing_the_issuing_ca_keeps_what_it_signed_valid(tmp_path: Path) -> None:
    clock = Clock()
    pki = Pki(tmp_path / "pki", clock=clock)
    pki.init_ca()
    pki.init_issuing(days=100)
    pki.issue_server(["localhost"], days=400)  # capped at the issuing CA's end
    dev = pki.issue_device("node-1", days=400)
    assert pki.status().credentials[2].days_left == pytest.approx(100, abs=0.01)
    first = _cert(pki.issuing_pem)
    clock.t += dt.timedelta(days=80)
    pki.init_issuing(days=1000)
    second = _cert(pki.issuing_pem)
    assert second.serial_number != first.serial_number
    assert second.public_key() == first.public_key() and second.subject == first.subject
    assert second.not_valid_after_utc > first.not_valid_after_utc
    _cert(dev.cert_pem).verify_directly_issued_by(second)
    chain = x509.load_pem_x509_certificates(pki.server.cert_pem.read_bytes())
    assert chain[1] == second  # the broker sends the renewed issuing CA
    assert pki.chain_pem.read_bytes().endswith(pki.issuing_pem.read_bytes())
    assert pki.crls()[0].is_signature_valid(second.public_key())  # type: ignore[arg-type]


def test_the_roots_crl_outlives_the_issuing_ca(tmp_path: Path) -> None:
    """A verifier that checks the whole chain (OpenSSL's -crl_check_all) needs the root's CRL
    while a chain through the issuing CA is valid; only the offline root key re-signs it, so
    it must not lapse before the issuing CA does, nor after a renewal of it."""
    clock = Clock()
    pki = Pki(tmp_path / "pki", clock=clock)
    pki.init_ca()
    pki.init_issuing(days=3 * 365)
    root_crl = pki.crls()[1]
    assert root_crl.next_update_utc is not None
    assert root_crl.next_update_utc >= _cert(pki.issuing_pem).not_valid_after_utc
    clock.t += dt.timedelta(days=2 * 365)
    pki.init_issuing(days=4 * 365)  # renewed with the root key mounted
    root_crl = pki.crls()[1]
    assert root_crl.next_update_utc is not None
    assert root_crl.next_update_utc >= _cert(pki.issuing_pem).not_valid_after_utc
    assert root_crl.is_signature_valid(_cert(pki.ca_pem).public_key())  # type: ignore[arg-type]
