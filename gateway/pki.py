"""The fleet's certificate authority: CA, broker, gateway and device certificates, the CRL.

A device is its certificate (subject CN = device id). Everything lives in one PKI directory
with an index of every certificate issued; the CA key may live in a separate directory that
is only mounted when certificates are issued or revoked.
"""

from __future__ import annotations

import builtins
import datetime as dt
import ipaddress
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import PkiError

log = logging.getLogger(__name__)

Kind = Literal["ca", "server", "gateway", "control", "device"]

DEVICE_ID_MAX = 32
DEVICE_ID_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{DEVICE_ID_MAX}}}")
DEFAULT_GATEWAY_CN = "torpor-gateway"
DEFAULT_SERVER_CN = "torpor-broker"
# The gateway's short control connections (health probes, cutting a session) have their own
# identity: the broker makes every client id its certificate's CN, so they would otherwise
# replace the gateway's persistent session (see gateway.broker).
DEFAULT_CONTROL_CN = "torpor-control"
CA_CN = "Torpor fleet CA"
CA_DAYS = 3650
SERVER_DAYS = 825
GATEWAY_DAYS = 825
DEVICE_DAYS = 3650
# The broker refuses every client once the CRL's nextUpdate has passed, so a CRL is
# issued for a year and re-issued on every revocation (or by `torpor pki crl`).
CRL_DAYS = 365
# Certificates start a little in the past so a node whose clock is slightly behind still
# accepts the broker's, and vice versa.
BACKDATE = dt.timedelta(minutes=5)


def validate_device_id(device_id: str) -> str:
    """Device ids become MQTT usernames and topic segments: refuse anything else."""
    if not isinstance(device_id, str) or not DEVICE_ID_RE.fullmatch(device_id):
        raise PkiError(
            f"invalid device id {device_id!r}: use 1 to 32 characters from A-Z a-z 0-9 _ -"
        )
    return device_id


@dataclass(frozen=True, slots=True)
class CertRecord:
    """One line of the PKI index."""

    serial: int
    cn: str
    kind: Kind
    not_before: dt.datetime
    not_after: dt.datetime
    revoked_at: dt.datetime | None
    path: str  # certificate file, relative to the PKI directory

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")

    def to_json(self) -> dict[str, Any]:
        return {
            "serial": self.serial_hex,
            "cn": self.cn,
            "kind": self.kind,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "path": self.path,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CertRecord:
        revoked = d.get("revoked_at")
        return cls(
            serial=int(d["serial"], 16),
            cn=str(d["cn"]),
            kind=d["kind"],
            not_before=dt.datetime.fromisoformat(d["not_before"]),
            not_after=dt.datetime.fromisoformat(d["not_after"]),
            revoked_at=dt.datetime.fromisoformat(revoked) if revoked else None,
            path=str(d["path"]),
        )


@dataclass(frozen=True, slots=True)
class Credentials:
    """A certificate and its private key (PEM), for the broker or the gateway."""

    cn: str
    serial: int
    cert_pem: Path
    key_pem: Path
    ca_pem: Path


@dataclass(frozen=True, slots=True)
class DeviceCredentials:
    """What a node is provisioned with. The firmware loads the DER files; the key DER is
    PKCS#8, which MicroPython's `tls.SSLContext.load_cert_chain` (mbedTLS) accepts."""

    device_id: str
    serial: int
    not_after: dt.datetime
    cert_pem: Path
    key_pem: Path
    cert_der: Path
    key_der: Path
    ca_pem: Path
    ca_der: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only; never through an existing file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def private_dir(path: Path, *, within: Path | None = None) -> Path:
    """Create `path` and any missing parents below `within` mode 0700 (mkdir's `mode`
    applies to the last level only, the parents would get the umask's 0755)."""
    missing: list[Path] = []
    here = path
    while not here.exists() and here != within and here != here.parent:
        missing.append(here)
        here = here.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)  # the umask may have taken bits off the mode
    return path


def write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _parse_sans(sans: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for raw in sans:
        item = raw.strip()
        if not item:
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(item)))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", item):
                raise PkiError(f"invalid server name {item!r}: give DNS names or IP addresses") from None
            names.append(x509.DNSName(item))
    if not names:
        raise PkiError("the server certificate needs at least one DNS name or IP address")
    return names


class Pki:
    """A PKI directory. `Pki(path).init_ca()` once, then issue and revoke certificates."""

    def __init__(self, path: str | os.PathLike[str], ca_key_dir: str | os.PathLike[str] | None = None):
        self.path = Path(path)
        self.ca_key_dir = Path(ca_key_dir) if ca_key_dir is not None else self.path

    # --- well-known files -------------------------------------------------------------
    @property
    def ca_pem(self) -> Path:
        return self.path / "ca.pem"

    @property
    def ca_der(self) -> Path:
        return self.path / "ca.der"

    @property
    def ca_key(self) -> Path:
        return self.ca_key_dir / "ca.key"

    @property
    def crl_path(self) -> Path:
        return self.path / "crl.pem"

    @property
    def index_path(self) -> Path:
        return self.path / "index.json"

    @property
    def server(self) -> Credentials:
        return self._creds("server")

    @property
    def gateway(self) -> Credentials:
        return self._creds("gateway")

    @property
    def control(self) -> Credentials:
        """The gateway's control identity (probes, the broker's control API)."""
        return self._creds("control")

    @property
    def has_control(self) -> bool:
        return (self.path / "control.pem").exists()

    def _creds(self, kind: Kind) -> Credentials:
        cert = self.path / f"{kind}.pem"
        if not cert.exists():
            action = "gateway` (it issues the control certificate too)" if kind == "control" else f"{kind}`"
            raise PkiError(f"no {kind} certificate in {self.path}: run `torpor pki {action} first")
        parsed = x509.load_pem_x509_certificate(cert.read_bytes())
        cn = parsed.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        return Credentials(
            cn=str(cn),
            serial=parsed.serial_number,
            cert_pem=cert,
            key_pem=self.path / f"{kind}.key",
            ca_pem=self.ca_pem,
        )

    # --- CA ---------------------------------------------------------------------------
    def init_ca(self, days: int = CA_DAYS) -> Path:
        """Create the fleet CA (ECDSA P-256, pathlen 0) and an empty CRL."""
        if self.ca_pem.exists() or self.ca_key.exists():
            raise PkiError(f"a CA already exists in {self.path}; use a new directory for a new fleet")
        private_dir(self.path)
        private_dir(self.ca_key_dir)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_CN)])
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        write_private(self.ca_key, _key_pem(key))
        write_public(self.ca_pem, cert.public_bytes(serialization.Encoding.PEM))
        write_public(self.ca_der, cert.public_bytes(serialization.Encoding.DER))
        self._save_index([])
        self._record(cert, "ca", self.ca_pem)
        self.write_crl()
        log.info("created fleet CA in %s (key in %s)", self.path, self.ca_key_dir)
        return self.ca_pem

    def _load_ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if not self.ca_pem.exists():
            raise PkiError(f"no CA in {self.path}: run `torpor pki init --dir {self.path}` first")
        if not self.ca_key.exists():
            raise PkiError(
                f"CA key {self.ca_key} not found: mount the offline CA key directory and pass --ca-key-dir"
            )
        cert = x509.load_pem_x509_certificate(self.ca_pem.read_bytes())
        key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{self.ca_key} is not an EC private key")
        return cert, key

    def _issue(
        self,
        cn: str,
        days: int,
        eku: x509.ObjectIdentifier,
        sans: Sequence[x509.GeneralName] = (),
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if days < 1:
            raise PkiError(f"validity must be at least 1 day, not {days}")
        ca_cert, ca_key = self._load_ca()
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    def issue_server(self, sans: Iterable[str], cn: str = DEFAULT_SERVER_CN, days: int = SERVER_DAYS) -> Credentials:
        """The broker's certificate; nodes check it against `sans` (DNS names and IPs)."""
        names = _parse_sans(sans)
        cert, key = self._issue(cn, days, ExtendedKeyUsageOID.SERVER_AUTH, names)
        self._write_pair("server", cert, key)
        return self.server

    def issue_gateway(self, cn: str = DEFAULT_GATEWAY_CN, days: int = GATEWAY_DAYS,
                      control_cn: str = DEFAULT_CONTROL_CN) -> Credentials:
        """The gateway service's client certificate; its CN is its broker username and
        client id. Also issues the gateway's control certificate (`control_cn`)."""
        validate_device_id(cn)
        validate_device_id(control_cn)
        if cn == control_cn:
            raise PkiError(f"the gateway and its control identity need different names, not {cn!r}")
        devices = {r.cn for r in self.list() if r.kind == "device"}
        for name in (cn, control_cn):
            if name in devices:
                raise PkiError(f"{name!r} is already a device id; choose another gateway name")
        cert, key = self._issue(cn, days, ExtendedKeyUsageOID.CLIENT_AUTH)
        self._write_pair("gateway", cert, key)
        self.issue_control(control_cn, days)
        return self.gateway

    def issue_control(self, cn: str = DEFAULT_CONTROL_CN, days: int = GATEWAY_DAYS) -> Credentials:
        """The certificate of the gateway's control connections (see DEFAULT_CONTROL_CN)."""
        validate_device_id(cn)
        if any(r.kind == "device" and r.cn == cn for r in self.list()):
            raise PkiError(f"{cn!r} is already a device id; choose another control name")
        cert, key = self._issue(cn, days, ExtendedKeyUsageOID.CLIENT_AUTH)
        self._write_pair("control", cert, key)
        return self.control

    def _write_pair(self, kind: Kind, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        write_private(self.path / f"{kind}.key", _key_pem(key))
        cert_path = self.path / f"{kind}.pem"
        write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        self._record(cert, kind, cert_path)

    def issue_device(self, device_id: str, days: int = DEVICE_DAYS) -> DeviceCredentials:
        """Issue a certificate whose subject CN is `device_id`. Earlier certificates of the
        same device stay valid until revoked (this is also how a rotation works)."""
        validate_device_id(device_id)
        reserved = {r.cn for r in self.list() if r.kind in ("gateway", "control", "server")}
        reserved |= {DEFAULT_GATEWAY_CN, DEFAULT_CONTROL_CN}
        if device_id in reserved:
            raise PkiError(f"{device_id!r} is the name of the gateway or broker certificate")
        cert, key = self._issue(device_id, days, ExtendedKeyUsageOID.CLIENT_AUTH)
        folder = self.path / "devices" / device_id / format(cert.serial_number, "x")
        if folder.exists():
            raise PkiError(f"{folder} already exists")
        private_dir(folder, within=self.path)
        creds = DeviceCredentials(
            device_id=device_id,
            serial=cert.serial_number,
            not_after=cert.not_valid_after_utc,
            cert_pem=folder / "cert.pem",
            key_pem=folder / "key.pem",
            cert_der=folder / "cert.der",
            key_der=folder / "key.der",
            ca_pem=self.ca_pem,
            ca_der=self.ca_der,
        )
        write_private(creds.key_pem, _key_pem(key))
        write_private(
            creds.key_der,
            key.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        write_public(creds.cert_pem, cert.public_bytes(serialization.Encoding.PEM))
        write_public(creds.cert_der, cert.public_bytes(serialization.Encoding.DER))
        self._record(cert, "device", creds.cert_pem)
        log.info("issued certificate %x for device %s", cert.serial_number, device_id,
                 extra={"device_id": device_id})
        return creds

    def rotate(self, device_id: str, days: int = DEVICE_DAYS) -> DeviceCredentials:
        """Issue a new certificate for a known device; revoke the old one once it is in use."""
        validate_device_id(device_id)
        if not self.device_records(device_id, include_revoked=False):
            raise PkiError(f"device {device_id!r} has no valid certificate to rotate; use `torpor pki device`")
        return self.issue_device(device_id, days)

    def device_credentials(self, device_id: str) -> DeviceCredentials:
        """The newest unrevoked credentials of a device."""
        records = self.device_records(device_id, include_revoked=False)
        if not records:
            raise PkiError(f"device {device_id!r} has no valid certificate")
        rec: CertRecord = max(records, key=lambda r: r.not_before)
        folder = (self.path / rec.path).parent
        return DeviceCredentials(
            device_id=device_id, serial=rec.serial, not_after=rec.not_after,
            cert_pem=folder / "cert.pem", key_pem=folder / "key.pem",
            cert_der=folder / "cert.der", key_der=folder / "key.der",
            ca_pem=self.ca_pem, ca_der=self.ca_der,
        )

    # --- revocation -------------------------------------------------------------------
    def revoke(self, target: str | int) -> list[int]:
        """Revoke a device (every unrevoked certificate with that CN) when `target` is a
        str, or one certificate when it is an int serial. Rewrites the CRL; returns the
        serials newly revoked. The broker must reload the CRL (see gateway.broker)."""
        records = self.list()
        if isinstance(target, int):
            chosen = [r for r in records if r.serial == target]
            if not chosen:
                raise PkiError(f"no certificate with serial {target:x} in {self.index_path}")
            if chosen[0].kind == "ca":
                raise PkiError("the CA certificate cannot be revoked; start a new fleet CA instead")
        else:
            validate_device_id(target)
            chosen = [r for r in records if r.kind == "device" and r.cn == target]
            if not chosen:
                raise PkiError(f"unknown device {target!r}: `torpor pki list` shows the issued certificates")
        now = _now()
        fresh = [r.serial for r in chosen if r.revoked_at is None]
        updated = [
            CertRecord(r.serial, r.cn, r.kind, r.not_before, r.not_after, now, r.path)
            if r.serial in fresh else r
            for r in records
        ]
        # The CRL is signed before the index is saved: without the CA key nothing changes.
        self.write_crl(updated)
        self._save_index(updated)
        for r in chosen:
            log.info("revoked certificate %x of %s", r.serial, r.cn, extra={"device_id": r.cn})
        return fresh

    def write_crl(self, records: Sequence[CertRecord] | None = None, days: int = CRL_DAYS) -> Path:
        """(Re)issue the CRL from the index; run at least once a year (`torpor pki crl`)."""
        ca_cert, ca_key = self._load_ca()
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - BACKDATE)
            .next_update(now + dt.timedelta(days=days))
        )
        for r in self.list() if records is None else records:
            if r.revoked_at is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(r.serial)
                    .revocation_date(r.revoked_at)
                    .build()
                )
        crl = builder.sign(ca_key, hashes.SHA256())
        write_public(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
        return self.crl_path

    def revoked_serials(self) -> set[int]:
        crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        return {r.serial_number for r in crl}

    # --- index ------------------------------------------------------------------------
    def list(self) -> list[CertRecord]:
        """Every certificate issued by this CA, oldest first."""
        if not self.index_path.exists():
            if not self.ca_pem.exists():
                raise PkiError(f"no CA in {self.path}: run `torpor pki init --dir {self.path}` first")
            return []
        try:
            data = json.loads(self.index_path.read_text())
            return [CertRecord.from_json(d) for d in data["certificates"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise PkiError(f"{self.index_path} is damaged ({exc}); restore it from backup") from exc

    def device_records(
        self, device_id: str, include_revoked: bool = True
    ) -> builtins.list[CertRecord]:
        return [
            r for r in self.list()
            if r.kind == "device" and r.cn == device_id and (include_revoked or r.revoked_at is None)
        ]

    def _record(self, cert: x509.Certificate, kind: Kind, path: Path) -> None:
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        rec = CertRecord(
            serial=cert.serial_number,
            cn=str(cn),
            kind=kind,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            revoked_at=None,
            path=str(path.relative_to(self.path)),
        )
        self._save_index([*self.list(), rec])

    def _save_index(self, records: Sequence[CertRecord]) -> None:
        body = json.dumps({"certificates": [r.to_json() for r in records]}, indent=1)
        write_public(self.index_path, body.encode() + b"\n")
