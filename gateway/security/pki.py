"""The fleet's certificate authority: CA, broker, gateway and device certificates, the CRL.

A device is its certificate (subject CN = device id). Everything lives in one PKI directory
with an index of every certificate issued; the CA key may live in a separate directory that
is only mounted when certificates are issued or revoked.

Who signs (docs/operator-pki.md): the root CA, or, once `torpor pki issuing` has made one,
an online issuing CA under the root. The issuing CA signs every new certificate and the
CRL, so the gateway renews the CRL and its own and the broker's certificates while the
root key stays offline. Certificates the root signed earlier stay valid: `crl.pem` then
carries one CRL per issuer (Mosquitto checks the client certificate against its issuer's).
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import datetime as dt
import ipaddress
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import PkiError
from gateway.store import devices as device_store
from gateway.store.devices import DEVICE_ID_MAX as DEVICE_ID_MAX

log = logging.getLogger(__name__)

Kind = Literal["ca", "issuing", "server", "gateway", "control", "device"]

DEFAULT_GATEWAY_CN = "torpor-gateway"
DEFAULT_SERVER_CN = "torpor-broker"
# The gateway's short control connections (health probes, cutting a session) have their own
# identity: the broker makes every client id its certificate's CN, so they would otherwise
# replace the gateway's persistent session (see gateway.transport.broker).
DEFAULT_CONTROL_CN = "torpor-control"
CA_CN = "Torpor fleet CA"
ISSUING_CN = "Torpor issuing CA"
CA_DAYS = 3650
# The issuing CA is renewed by the root (an operator with the offline key), so it lives for
# years; a shorter life bounds what a stolen gateway key can sign (docs/operator-pki.md).
ISSUING_DAYS = 1095
SERVER_DAYS = 825
GATEWAY_DAYS = 825
DEVICE_DAYS = 3650
# The broker refuses every client once the CRL's nextUpdate has passed, so a CRL is
# issued for a year and re-issued on every revocation (or by `torpor pki crl`).
CRL_DAYS = 365
# Root and issuing CA: one intermediate is allowed below the root. Roots made before the
# issuing CA existed say pathlen 0 and are re-certified (same key and name) on migration.
ROOT_PATHLEN = 1
# Certificates start a little in the past so a node whose clock is slightly behind still
# accepts the broker's, and vice versa.
BACKDATE = dt.timedelta(minutes=5)


def validate_device_id(device_id: str) -> str:
    """Device ids become MQTT usernames and topic segments: refuse anything else."""
    if not device_store.is_device_id(device_id):
        raise PkiError(device_store.bad_device_id(device_id))
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
    issuer: Literal["root", "issuing"] = "root"  # who signed it

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
            "issuer": self.issuer,
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
            issuer="issuing" if d.get("issuer") == "issuing" else "root",
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


@dataclass(frozen=True, slots=True)
class Lifetime:
    """One credential's end of validity as seen at `now`."""

    name: str  # root_ca, issuing_ca, server, gateway, control, crl, crl_root, device
    kind: str  # ca, server, gateway, control, crl, device
    subject: str  # certificate CN, or the CRL issuer's CN
    serial: str  # hexadecimal; "" for a CRL
    not_after: dt.datetime  # a CRL's nextUpdate
    now: dt.datetime
    not_before: dt.datetime | None = None  # a CRL's lastUpdate

    @property
    def life_days(self) -> float | None:
        """Its whole validity (None when unknown)."""
        if self.not_before is None:
            return None
        return (self.not_after - self.not_before).total_seconds() / 86400.0

    @property
    def key(self) -> str:
        """Names one credential for its events: a renewed one is another credential."""
        return ":".join(x for x in (self.name, self.subject, self.serial) if x)

    @property
    def days_left(self) -> float:
        return (self.not_after - self.now).total_seconds() / 86400.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "subject": self.subject,
                "serial": self.serial, "not_after": self.not_after.isoformat(),
                "days_left": round(self.days_left, 3)}


@dataclass(frozen=True, slots=True)
class PkiStatus:
    """What `torpor pki status` shows (JSON keys documented in docs/operator-pki.md)."""

    now: dt.datetime
    credentials: tuple[Lifetime, ...]
    devices: tuple[Lifetime, ...]  # the soonest to expire, newest certificate per device
    devices_total: int
    devices_expiring: int  # within `within_days`
    within_days: float
    device_lifetimes: tuple[Lifetime, ...] = ()  # every device (for the gateway's events)

    def to_json(self) -> dict[str, Any]:
        return {
            "now": self.now.isoformat(),
            "credentials": [c.to_json() for c in self.credentials],
            "devices": {
                "total": self.devices_total,
                "within_days": self.within_days,
                "expiring_within": self.devices_expiring,
                "soonest": [d.to_json() for d in self.devices],
            },
        }


def crl_number(crl: x509.CertificateRevocationList | None) -> int:
    """The CRL's number (RFC 5280 5.2.3), 0 for none or one signed without it."""
    if crl is None:
        return 0
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return 0


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


def _issuer_kind(cert: x509.Certificate) -> Literal["root", "issuing"]:
    cn = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return "issuing" if cn and cn[0].value == ISSUING_CN else "root"


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

    def __init__(self, path: str | os.PathLike[str], ca_key_dir: str | os.PathLike[str] | None = None,
                 *, clock: Callable[[], dt.datetime] | None = None):
        self.path = Path(path)
        self.ca_key_dir = Path(ca_key_dir) if ca_key_dir is not None else self.path
        # Tests move time with `clock` (an aware UTC datetime); everything else uses now.
        self._clock = clock or _now

    def now(self) -> dt.datetime:
        return self._clock().replace(microsecond=0)

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
        """What the broker loads: the signing CA's CRL, and the root's while certificates
        the root signed are still in use."""
        return self.path / "crl.pem"

    @property
    def root_crl_path(self) -> Path:
        """The root's own CRL, kept apart once an issuing CA exists (signed offline)."""
        return self.path / "crl-root.pem"

    @property
    def issuing_pem(self) -> Path:
        return self.path / "issuing.pem"

    @property
    def issuing_key(self) -> Path:
        return self.path / "issuing.key"

    @property
    def has_issuing(self) -> bool:
        return self.issuing_pem.exists()

    @property
    def legacy_root(self) -> bool:
        """The root was re-certified for the issuing CA, and nodes provisioned before hold
        the old root certificate (pathlen 0): OpenSSL and mbedTLS then refuse a server
        certificate the issuing CA signed, so the root keeps signing the broker's until
        the operator says every node holds the new root (removes ca-pathlen0.pem)."""
        return (self.path / "ca-pathlen0.pem").exists()

    @property
    def chain_pem(self) -> Path:
        """Root then issuing CA: the broker's `cafile` once an issuing CA exists."""
        return self.path / "chain.pem" if self.has_issuing else self.ca_pem

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
    def init_ca(self, days: int = CA_DAYS, path_length: int = ROOT_PATHLEN) -> Path:
        """Create the fleet CA (ECDSA P-256, room for one issuing CA below it) and an empty
        CRL. `path_length=0` makes a root as Torpor made them before issuing CAs (tests of
        the migration)."""
        if self.ca_pem.exists() or self.ca_key.exists():
            raise PkiError(f"a CA already exists in {self.path}; use a new directory for a new fleet")
        private_dir(self.path)
        private_dir(self.ca_key_dir)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_CN)])
        now = self.now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
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

    def _signer(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Literal["root", "issuing"]]:
        """Who signs new certificates and the CRL: the issuing CA when there is one."""
        if not self.has_issuing:
            root, root_key = self._load_ca()
            return root, root_key, "root"
        if not self.issuing_key.exists():
            raise PkiError(f"issuing CA key {self.issuing_key} not found: restore it from backup "
                           "or make a new issuing CA with `torpor pki issuing` and the root key")
        cert = x509.load_pem_x509_certificate(self.issuing_pem.read_bytes())
        key = serialization.load_pem_private_key(self.issuing_key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{self.issuing_key} is not an EC private key")
        return cert, key, "issuing"

    def init_issuing(self, days: int = ISSUING_DAYS) -> Path:
        """Make (or renew) the online issuing CA with the root key. A root made with pathlen 0
        is first re-certified with the same key and name, so every certificate it signed
        stays valid. The root's CRL is signed now, to last as long as the certificates the
        root signed; the issuing CA signs every later certificate and `crl.pem`.

        Renewing keeps the issuing CA's key and name: every certificate and CRL it signed
        verifies under the new certificate too (a new key would need its own CRL for what
        the old one signed, and Mosquitto checks each client against its issuer's CRL)."""
        if days < 1:
            raise PkiError(f"validity must be at least 1 day, not {days}")
        root, root_key = self._load_ca()
        bc = root.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.path_length is not None and bc.path_length < 1:
            root = self._recertify_root(root, root_key)
        now = self.now()
        renewing = self.has_issuing
        key = self._signer()[1] if renewing else ec.generate_private_key(ec.SECP256R1())
        not_after = min(now + dt.timedelta(days=days), root.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUING_CN)]))
            .issuer_name(root.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
                critical=False,
            )
            .sign(root_key, hashes.SHA256())
        )
        if not renewing:
            write_private(self.issuing_key, _key_pem(key))
        write_public(self.issuing_pem, cert.public_bytes(serialization.Encoding.PEM))
        self._write_chain()
        self._record(cert, "issuing", self.issuing_pem, issuer="root")
        if renewing:  # the chain files of the server and gateway name the issuing CA
            for kind in ("server", "gateway", "control"):
                self._rechain(kind)
        self._write_root_crl(root, root_key)
        self.write_crl()
        log.info("issuing CA %x made under the root (valid until %s)", cert.serial_number,
                 f"{not_after:%Y-%m-%d}")
        return self.issuing_pem

    def _rechain(self, kind: str) -> None:
        path = self.path / f"{kind}.pem"
        if not path.exists():
            return
        leaf = x509.load_pem_x509_certificates(path.read_bytes())[0]
        if _issuer_kind(leaf) == "issuing":
            write_public(path, leaf.public_bytes(serialization.Encoding.PEM)
                         + self.issuing_pem.read_bytes())

    def _write_chain(self) -> None:
        write_public(self.path / "chain.pem", self.ca_pem.read_bytes() + self.issuing_pem.read_bytes())

    def _recertify_root(self, old: x509.Certificate,
                        key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
        """The same root (name, key, end of validity) allowing one CA below it."""
        builder = (
            x509.CertificateBuilder()
            .subject_name(old.subject)
            .issuer_name(old.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(old.not_valid_before_utc)
            .not_valid_after(old.not_valid_after_utc)
        )
        for ext in old.extensions:
            value = ext.value
            if isinstance(value, x509.BasicConstraints):
                value = x509.BasicConstraints(ca=True, path_length=ROOT_PATHLEN)
            builder = builder.add_extension(value, critical=ext.critical)
        cert = builder.sign(key, hashes.SHA256())
        write_public(self.path / "ca-pathlen0.pem", self.ca_pem.read_bytes())
        write_public(self.ca_pem, cert.public_bytes(serialization.Encoding.PEM))
        write_public(self.ca_der, cert.public_bytes(serialization.Encoding.DER))
        self._record(cert, "ca", self.ca_pem, issuer="root")
        log.info("re-certified the root CA (same key and name) to allow an issuing CA")
        return cert

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
        days: float,
        eku: x509.ObjectIdentifier,
        sans: Sequence[x509.GeneralName] = (),
        *,
        by_root: bool = False,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        return self._certify(cn, days, eku, key.public_key(), sans, by_root=by_root), key

    def _certify(
        self,
        cn: str,
        days: float,
        eku: x509.ObjectIdentifier,
        public_key: ec.EllipticCurvePublicKey,
        sans: Sequence[x509.GeneralName] = (),
        *,
        by_root: bool = False,
    ) -> x509.Certificate:
        if days <= 0:
            raise PkiError(f"validity must be positive, not {days} days")
        if by_root:
            ca_cert, ca_key = self._load_ca()
        else:
            ca_cert, ca_key, _ = self._signer()
        now = self.now()
        not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
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
        return builder.sign(ca_key, hashes.SHA256())

    def issue_server(self, sans: Iterable[str], cn: str = DEFAULT_SERVER_CN, days: float = SERVER_DAYS) -> Credentials:
        """The broker's certificate; nodes check it against `sans` (DNS names and IPs)."""
        names = _parse_sans(sans)
        cert, key = self._issue(cn, days, ExtendedKeyUsageOID.SERVER_AUTH, names,
                                by_root=self.legacy_root)
        self._write_pair("server", cert, key)
        return self.server

    def issue_gateway(self, cn: str = DEFAULT_GATEWAY_CN, days: float = GATEWAY_DAYS,
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

    def issue_control(self, cn: str = DEFAULT_CONTROL_CN, days: float = GATEWAY_DAYS) -> Credentials:
        """The certificate of the gateway's control connections (see DEFAULT_CONTROL_CN)."""
        validate_device_id(cn)
        if any(r.kind == "device" and r.cn == cn for r in self.list()):
            raise PkiError(f"{cn!r} is already a device id; choose another control name")
        cert, key = self._issue(cn, days, ExtendedKeyUsageOID.CLIENT_AUTH)
        self._write_pair("control", cert, key)
        return self.control

    def _write_pair(self, kind: Kind, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        """Key first, then the certificate (the broker reads both on SIGHUP; a key that
        does not match its certificate makes it keep the old pair). A certificate the
        issuing CA signed is followed by the issuing CA, so that peers who trust only the
        root can build the chain (Mosquitto's certfile is a chain file)."""
        issued_by = _issuer_kind(cert)
        body = cert.public_bytes(serialization.Encoding.PEM)
        if issued_by == "issuing":
            body += self.issuing_pem.read_bytes()
        cert_path = self.path / f"{kind}.pem"
        write_private(self.path / f"{kind}.key", _key_pem(key))
        write_public(cert_path, body)
        self._record(cert, kind, cert_path, issuer=issued_by)

    def issue_device(self, device_id: str, days: float = DEVICE_DAYS) -> DeviceCredentials:
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
        self._record(cert, "device", creds.cert_pem, issuer=_issuer_kind(cert))
        log.info("issued certificate %x for device %s", cert.serial_number, device_id,
                 extra={"device_id": device_id})
        return creds

    def issue_device_for_key(self, device_id: str, public_key: ec.EllipticCurvePublicKey,
                             days: float = DEVICE_DAYS) -> x509.Certificate:
        """A device certificate for a key the node made itself (from its certificate
        request): the private key never reaches this side. Earlier certificates of the
        device stay valid until revoked (gateway.pipeline.rotation revokes them once the
        node has connected with this one)."""
        validate_device_id(device_id)
        if not self.device_records(device_id, include_revoked=False):
            raise PkiError(f"device {device_id!r} has no valid certificate to rotate")
        cert = self._certify(device_id, days, ExtendedKeyUsageOID.CLIENT_AUTH, public_key)
        folder = self.path / "devices" / device_id / format(cert.serial_number, "x")
        private_dir(folder, within=self.path)
        write_public(folder / "cert.pem", cert.public_bytes(serialization.Encoding.PEM))
        write_public(folder / "cert.der", cert.public_bytes(serialization.Encoding.DER))
        self._record(cert, "device", folder / "cert.pem", issuer=_issuer_kind(cert))
        log.info("issued certificate %x for device %s from its own key", cert.serial_number,
                 device_id, extra={"device_id": device_id})
        return cert

    def rotate(self, device_id: str, days: int = DEVICE_DAYS) -> DeviceCredentials:
        """Issue a new certificate for a known device; revoke the old one once it is in use."""
        validate_device_id(device_id)
        if not self.device_records(device_id, include_revoked=False):
            raise PkiError(f"device {device_id!r} has no valid certificate to rotate; use `torpor pki device`")
        return self.issue_device(device_id, days)

    def device_credentials(self, device_id: str) -> DeviceCredentials:
        """The newest unrevoked credentials of a device whose key is here: a certificate
        issued for a key a node made itself (rotated over the air) has none."""
        records = self.device_records(device_id, include_revoked=False)
        if not records:
            raise PkiError(f"device {device_id!r} has no valid certificate")
        here = [r for r in records if ((self.path / r.path).parent / "key.der").exists()]
        if not here:
            raise PkiError(
                f"device {device_id!r} holds the only key of its valid certificate (rotated "
                f"over the air); to provision it again, issue a new pair with `torpor pki "
                f"rotate {device_id}`")
        rec: CertRecord = max(here, key=lambda r: r.not_before)
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
        serials newly revoked. The broker must reload the CRL (see gateway.transport.broker).
        With an issuing CA, a certificate the root signed earlier is revoked on the root's
        CRL, which needs the root key."""
        records = self.list()
        if isinstance(target, int):
            chosen = [r for r in records if r.serial == target]
            if not chosen:
                raise PkiError(f"no certificate with serial {target:x} in {self.index_path}")
            if chosen[0].kind in ("ca", "issuing"):
                raise PkiError(f"the {chosen[0].kind} CA certificate cannot be revoked here; "
                               "see the PKI guide (a compromised issuing CA needs a new root)")
        else:
            validate_device_id(target)
            chosen = [r for r in records if r.kind == "device" and r.cn == target]
            if not chosen:
                raise PkiError(f"unknown device {target!r}: `torpor pki list` shows the issued certificates")
        now = self.now()
        fresh = [r.serial for r in chosen if r.revoked_at is None]
        updated = [
            dataclasses.replace(r, revoked_at=now) if r.serial in fresh else r for r in records
        ]
        # The CRLs are signed before the index is saved: without the keys nothing changes.
        if self.has_issuing and any(r.issuer == "root" for r in chosen if r.serial in fresh):
            try:
                root, root_key = self._load_ca()
            except PkiError as exc:
                raise PkiError(
                    f"{target if isinstance(target, str) else format(target, 'x')} holds a "
                    f"certificate the root CA signed before the issuing CA existed; its "
                    f"revocation goes on the root's CRL: {exc}") from None
            self._write_root_crl(root, root_key, updated)
        self.write_crl(updated)
        self._save_index(updated)
        for r in chosen:
            log.info("revoked certificate %x of %s", r.serial, r.cn, extra={"device_id": r.cn})
        return fresh

    def write_crl(self, records: Sequence[CertRecord] | None = None, days: float = CRL_DAYS) -> Path:
        """(Re)issue the CRL from the index, signed by the issuing CA when there is one
        (then followed by the root's own CRL in crl.pem). The gateway renews it on its own
        (gateway.security.lifetimes); by hand: `torpor pki crl`."""
        ca_cert, ca_key, signer = self._signer()
        now = self.now()
        rows = self.list() if records is None else records
        crl = self._sign_crl(ca_cert, ca_key, [r for r in rows if r.issuer == signer],
                             now + dt.timedelta(days=days), self._current_crl())
        body = crl.public_bytes(serialization.Encoding.PEM)
        if signer == "issuing" and self.root_crl_path.exists():
            body += self.root_crl_path.read_bytes()
        write_public(self.crl_path, body)
        return self.crl_path

    def _sign_crl(self, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                  rows: Iterable[CertRecord], next_update: dt.datetime,
                  previous: x509.CertificateRevocationList | None = None,
                  number: int | None = None) -> x509.CertificateRevocationList:
        # previous: the issuer's CRL this one replaces; number: its CRL number (by default
        # one above previous's).
        # Mosquitto adds each reloaded CRL to those it holds and OpenSSL uses the valid one
        # with the latest lastUpdate (the first on a tie): a new CRL must be strictly later
        # than the one before it, or a revocation made in the same second could be missed.
        # Never past now, though: a CRL from the future is refused like an expired one.
        now = self.now()
        last_update = now - BACKDATE
        after = None if previous is None else previous.last_update_utc
        if number is None:
            number = crl_number(previous) + 1
        if after is not None and last_update <= after:
            last_update = min(after + dt.timedelta(seconds=1), now)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(last_update)
            .next_update(next_update)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            # RFC 5280 5.2.3: each CRL an issuer signs carries a number one above the last,
            # so that a reader can tell every re-issue apart, even two in the same second.
            .add_extension(x509.CRLNumber(number), critical=False)
        )
        for r in rows:
            if r.revoked_at is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(r.serial)
                    .revocation_date(r.revoked_at)
                    .build()
                )
        return builder.sign(ca_key, hashes.SHA256())

    def _write_root_crl(self, root: x509.Certificate, key: ec.EllipticCurvePrivateKey,
                        records: Sequence[CertRecord] | None = None) -> None:
        """The root's CRL once an issuing CA signs the rest: it must outlive every client
        certificate the root signed (Mosquitto checks a client against its issuer's CRL),
        and it is re-signed only when the root key is mounted."""
        signed = [r for r in (self.list() if records is None else records)
                  if r.issuer == "root" and r.kind != "ca"]
        rows = [r for r in signed if r.kind != "issuing"]
        now = self.now()
        # Valid until the last certificate the root signed expires, the issuing CA included:
        # a verifier that checks the whole chain needs the root's CRL as long as a chain
        # through the issuing CA is valid, and only the offline root key can re-sign it.
        last = max((r.not_after for r in signed if r.revoked_at is None),
                   default=now + dt.timedelta(days=CRL_DAYS))
        next_update = min(max(last + dt.timedelta(days=1), now + dt.timedelta(days=CRL_DAYS)),
                          root.not_valid_after_utc)
        current = None
        if self.root_crl_path.exists():
            with contextlib.suppress(ValueError):
                current = x509.load_pem_x509_crl(self.root_crl_path.read_bytes())
        # Before the issuing CA existed, the root's CRL was crl.pem: its numbers go on.
        earlier = self._current_crl()
        if earlier is not None and earlier.issuer != root.subject:
            earlier = None
        crl = self._sign_crl(root, key, rows, next_update, current,
                             max(crl_number(current), crl_number(earlier)) + 1)
        write_public(self.root_crl_path, crl.public_bytes(serialization.Encoding.PEM))

    def _current_crl(self) -> x509.CertificateRevocationList | None:
        """The signing CA's current CRL (None when there is none yet or it is unreadable)."""
        if not self.crl_path.exists():
            return None
        try:
            return self.crls()[0]
        except PkiError:
            return None

    def crls(self) -> builtins.list[x509.CertificateRevocationList]:
        """Every CRL in crl.pem, the signing CA's first."""
        try:
            data = self.crl_path.read_bytes()
        except OSError as exc:
            raise PkiError(f"cannot read the CRL {self.crl_path}: {exc.strerror or exc}") from None
        found = []
        for block in re.findall(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", data, re.S):
            try:
                found.append(x509.load_pem_x509_crl(block))
            except ValueError as exc:
                raise PkiError(f"{self.crl_path} holds a damaged CRL ({exc})") from None
        if not found:
            raise PkiError(f"{self.crl_path} holds no CRL: run `torpor pki crl`")
        return found

    def revoked_serials(self) -> set[int]:
        return {r.serial_number for crl in self.crls() for r in crl}

    # --- renewal (gateway.security.lifetimes runs these) -----------------------------------------
    def renew_server(self, days: float = SERVER_DAYS) -> Credentials:
        """A new server certificate with the current one's name and addresses."""
        old = x509.load_pem_x509_certificate(self.server.cert_pem.read_bytes())
        sans = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n.value) for n in sans]
        return self.issue_server(names, cn=self.server.cn, days=days)

    def renew_gateway(self, days: float = GATEWAY_DAYS) -> Credentials:
        """New gateway and control certificates with the current names."""
        control = self.control.cn if self.has_control else DEFAULT_CONTROL_CN
        return self.issue_gateway(self.gateway.cn, days=days, control_cn=control)

    def status(self, now: dt.datetime | None = None, soonest: int = 5,
               within_days: float = 30.0) -> PkiStatus:
        """Every lifetime the fleet depends on, with its time left (`torpor pki status`)."""
        if not self.ca_pem.exists():
            raise PkiError(f"no CA in {self.path}: run `torpor pki init --dir {self.path}` first")
        now = now or self.now()
        items: builtins.list[Lifetime] = []

        def cert(name: str, kind: str, path: Path) -> None:
            if not path.exists():
                return
            c = x509.load_pem_x509_certificate(path.read_bytes())
            cn = c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            items.append(Lifetime(name, kind, str(cn[0].value) if cn else "", format(c.serial_number, "x"),
                                  c.not_valid_after_utc, now, c.not_valid_before_utc))

        cert("root_ca", "ca", self.ca_pem)
        cert("issuing_ca", "ca", self.issuing_pem)
        cert("server", "server", self.path / "server.pem")
        cert("gateway", "gateway", self.path / "gateway.pem")
        cert("control", "control", self.path / "control.pem")
        for i, crl in enumerate(self.crls()):
            cn = crl.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
            nxt = crl.next_update_utc
            if nxt is None:
                continue
            items.append(Lifetime("crl" if i == 0 else "crl_root", "crl",
                                  str(cn[0].value) if cn else "", "", nxt, now,
                                  crl.last_update_utc))
        devices = sorted(
            (r for r in self.list() if r.kind == "device" and r.revoked_at is None),
            key=lambda r: r.not_after)
        # A device counts by its newest certificate: an older one left over from a rotation
        # is not what the node uses.
        newest: dict[str, CertRecord] = {}
        for r in devices:
            if r.cn not in newest or r.not_after > newest[r.cn].not_after:
                newest[r.cn] = r
        current = sorted(newest.values(), key=lambda r: r.not_after)
        horizon = now + dt.timedelta(days=within_days)
        return PkiStatus(
            now=now, credentials=tuple(items),
            devices=tuple(Lifetime("device", "device", r.cn, r.serial_hex, r.not_after, now,
                                   r.not_before) for r in current[:soonest]),
            devices_total=len(current),
            devices_expiring=sum(1 for r in current if r.not_after <= horizon),
            within_days=within_days,
            device_lifetimes=tuple(Lifetime("device", "device", r.cn, r.serial_hex, r.not_after,
                                            now, r.not_before) for r in current),
        )

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

    def _record(self, cert: x509.Certificate, kind: Kind, path: Path,
                issuer: Literal["root", "issuing"] = "root") -> None:
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        rec = CertRecord(
            serial=cert.serial_number,
            cn=str(cn),
            kind=kind,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            revoked_at=None,
            path=str(path.relative_to(self.path)),
            issuer=issuer,
        )
        self._save_index([*self.list(), rec])

    def _save_index(self, records: Sequence[CertRecord]) -> None:
        body = json.dumps({"certificates": [r.to_json() for r in records]}, indent=1)
        write_public(self.index_path, body.encode() + b"\n")
