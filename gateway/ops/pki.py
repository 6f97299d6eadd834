"""Operator actions on the fleet PKI (`torpor pki ...`): each opens the PKI folder, does one
thing and returns what it made; none prints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.errors import PkiError
from gateway.security.pki import (
    CRL_DAYS,
    DEFAULT_GATEWAY_CN,
    DEVICE_DAYS,
    ISSUING_DAYS,
    CertRecord,
    Credentials,
    DeviceCredentials,
    Lifetime,
    Pki,
    PkiStatus,
)

__all__ = [
    "CRL_DAYS", "DEFAULT_GATEWAY_CN", "DEVICE_DAYS", "ISSUING_DAYS", "CertRecord",
    "Credentials", "DeviceCredentials", "Issuing", "Lifetime", "PkiStatus", "Revoked",
    "init_ca", "init_issuing", "issue_device", "issue_gateway", "issue_server", "records",
    "revoke", "rotate", "status", "write_crl",
]


@dataclass(frozen=True, slots=True)
class Revoked:
    serials: tuple[int, ...]  # newly revoked (empty: already revoked)
    crl: Path  # the CRL written, for the broker to reload


@dataclass(frozen=True, slots=True)
class Issuing:
    path: Path  # the issuing CA's certificate
    chain: Path  # the broker's new cafile
    legacy_root: bool  # the root was re-certified: nodes provisioned before hold the old one


def init_ca(folder: Path, key_dir: Path | None = None) -> Path:
    return Pki(folder, key_dir).init_ca()


def init_issuing(folder: Path, key_dir: Path | None = None, days: int = ISSUING_DAYS) -> Issuing:
    pki = Pki(folder, key_dir)
    path = pki.init_issuing(days)
    return Issuing(path, pki.chain_pem, pki.legacy_root)


def issue_server(folder: Path, key_dir: Path | None, sans: list[str]) -> Credentials:
    return Pki(folder, key_dir).issue_server(sans)


def issue_gateway(folder: Path, key_dir: Path | None, cn: str) -> Credentials:
    return Pki(folder, key_dir).issue_gateway(cn)


def issue_device(folder: Path, key_dir: Path | None, device_id: str,
                 days: float = DEVICE_DAYS) -> DeviceCredentials:
    return Pki(folder, key_dir).issue_device(device_id, days)


def rotate(folder: Path, key_dir: Path | None, device_id: str,
           days: int = DEVICE_DAYS) -> DeviceCredentials:
    return Pki(folder, key_dir).rotate(device_id, days)


def revoke(folder: Path, key_dir: Path | None, target: str | int) -> Revoked:
    """Revoke a device's certificates (by id) or one certificate (by serial) and rewrite
    the CRL."""
    pki = Pki(folder, key_dir)
    return Revoked(tuple(pki.revoke(target)), pki.crl_path)


def write_crl(folder: Path, key_dir: Path | None, days: float = CRL_DAYS) -> Path:
    if days <= 0:
        raise PkiError(f"--days must be positive, not {days:g}")
    return Pki(folder, key_dir).write_crl(days=days)


def records(folder: Path, key_dir: Path | None = None) -> list[CertRecord]:
    return Pki(folder, key_dir).list()


def status(folder: Path, key_dir: Path | None = None, soonest: int = 5) -> PkiStatus:
    if soonest < 0:
        raise PkiError(f"--soonest must be 0 or more, not {soonest}")
    return Pki(folder, key_dir).status(soonest=soonest)
