"""Operator actions on firmware updates that need more than the store: importing a signed
image checks it against its manifest (and signature) first."""

from __future__ import annotations

import fnmatch
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from gateway import proto
from gateway.security import manifest as fw
from gateway.store import devices as registry
from gateway.store import ota_store

OtaError = ota_store.OtaError
Campaign = ota_store.Campaign
PENDING, RUNNING, TERMINAL = ota_store.PENDING, ota_store.RUNNING, ota_store.TERMINAL


@dataclass(frozen=True, slots=True)
class Created:
    """A new campaign, with the image it rolls out."""

    campaign: ota_store.Campaign
    image: ota_store.Image

    @property
    def id(self) -> int:
        return self.campaign.id

    @property
    def devices(self) -> tuple[ota_store.DeviceStatus, ...]:
        return self.campaign.devices

    def counts(self) -> dict[str, int]:
        return self.campaign.counts()

    def as_dict(self) -> dict[str, object]:
        return self.campaign.as_dict()


def import_image(conn: sqlite3.Connection, image_dir: Path, *, public_key: bytes | None = None,
                 now: float | None = None) -> ota_store.Image:
    """Store a signed image directory (manifest.json, manifest.sig, files). The gateway can
    check the files against the manifest, and the signature when given the public key; it
    cannot sign. The same image twice is stored once."""
    now = time.time() if now is None else now
    try:
        m = fw.verify_image(image_dir, public_key) if public_key else fw.read_manifest(image_dir)
        fw.check_files(image_dir, m)
        sig = (image_dir / fw.SIGNATURE).read_bytes()
    except fw.ImageError as exc:
        raise ota_store.OtaError(f"{image_dir}: {exc}") from exc
    except OSError as exc:
        raise ota_store.OtaError(f"{image_dir}: image is not signed ({exc.strerror})") from exc
    if len(sig) != 64:
        raise ota_store.OtaError(f"{image_dir}: {fw.SIGNATURE} is {len(sig)} bytes, not 64")
    manifest = (image_dir / fw.MANIFEST).read_bytes()
    stream = b"".join((image_dir / f.path).read_bytes() for f in m.files)
    return ota_store.add_image(conn, version=m.version, board=m.board, display=m.display,
                               key_id=m.key_id, manifest=manifest, signature=sig,
                               stream=stream, source=str(image_dir), now=now)


def load_public_key(path: Path) -> bytes:
    """The fleet's public key from a file, or an OtaError saying why not."""
    try:
        return fw.load_public(path)
    except Exception as exc:  # a bad key file of any kind
        raise OtaError(f"{path}: not a public key ({exc})") from exc


def select_devices(conn: sqlite3.Connection, group: str | None,
                   devices: str | None) -> list[str]:
    """--devices a,b,c, or --group: `all`, a device class, or a pattern over device ids."""
    if devices:
        out = [d.strip() for d in devices.split(",") if d.strip()]
        if not out:
            raise OtaError("--devices names no device")
        return out
    assert group is not None
    rows = registry.in_service(conn)
    if group == "all":
        out = [r[0] for r in rows]
    elif group in proto.DEVICE_CLASSES:
        out = [r[0] for r in rows if r[1] == group]
    else:
        out = [r[0] for r in rows if fnmatch.fnmatchcase(r[0], group)]
    if not out:
        raise OtaError(f"group {group!r} matches no device (a class, `all`, or a pattern "
                           "like 'site1-*')")
    return out


def create_campaign(
    conn: sqlite3.Connection, image_dir: Path, *, group: str | None = None,
    devices: str | None = None, rate: int = 1, rate_percent: bool = False,
    abort_threshold: float = 10.0, timeout_s: float = 7 * 86400, pubkey: Path | None = None,
    overrides: dict[str, Path] | None = None,
) -> Created:
    """Import the image (and each device's override), checked against the fleet key when
    given, and start a campaign to `devices` (a,b,c) or a `group`; the first wave is
    queued at once."""
    pub = load_public_key(pubkey) if pubkey is not None else None
    img = import_image(conn, image_dir, public_key=pub)
    targets = select_devices(conn, group, devices)
    pinned = {dev: import_image(conn, path, public_key=pub).id
              for dev, path in (overrides or {}).items()}
    from gateway.ops import keylists  # it imports this module

    keylists.check_campaign(conn, img.key_id, [d for d in targets if d not in pinned])
    for dev, image_id in pinned.items():
        keylists.check_campaign(conn, ota_store.get_image(conn, image_id).key_id, [dev])
    cid = ota_store.create_campaign(conn, img.id, targets, rate=rate, rate_percent=rate_percent,
                                    abort_threshold=abort_threshold, timeout_s=timeout_s,
                                    overrides=pinned)
    return Created(ota_store.get_campaign(conn, cid), img)


def campaigns(conn: sqlite3.Connection) -> list[ota_store.Campaign]:
    """Every campaign, after timeouts and widening are brought up to date."""
    ota_store.sweep(conn)
    return ota_store.campaigns(conn)


def campaign(conn: sqlite3.Connection, cid: int) -> ota_store.Campaign:
    """One campaign, after timeouts and widening are brought up to date."""
    ota_store.sweep(conn)
    return ota_store.get_campaign(conn, cid)


def cancel_campaign(conn: sqlite3.Connection, cid: int) -> ota_store.Campaign:
    return ota_store.cancel_campaign(conn, cid)
