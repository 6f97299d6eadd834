"""Operator actions on firmware updates that need more than the store: importing a signed
image checks it against its manifest (and signature) first."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from gateway.security import manifest as fw
from gateway.store import ota_store


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
