"""The signed firmware manifest: what an image holds, and the checks the bootloader makes.

The gateway verifies images with this model before it stores them; `tools/fw` builds and
signs images with it. Its limits come from the generated protocol module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway import proto

BOOTLOADER_VERSION = proto.BOOTLOADER_VERSION  # the bootloader an image needs at least
MAX_MANIFEST = proto.MAX_MANIFEST  # the OTA_MANIFEST frame's manifest field
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"


class ImageError(Exception):
    """An image cannot be built, signed, verified or installed; the message says why."""


@dataclass(frozen=True, slots=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Manifest:
    version: int
    display: str
    board: str
    files: tuple[FileEntry, ...]
    min_bootloader: int = 1
    key_id: str = ""

    def to_bytes(self) -> bytes:
        obj = {
            "board": self.board,
            "display": self.display,
            "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in self.files],
            "key_id": self.key_id,
            "min_bootloader": self.min_bootloader,
            "version": self.version,
        }
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            obj: dict[str, Any] = json.loads(data)
            files = tuple(
                FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in obj["files"]
            )
            m = cls(
                version=int(obj["version"]),
                display=str(obj.get("display", "")),
                board=str(obj["board"]),
                files=files,
                min_bootloader=int(obj.get("min_bootloader", 1)),
                key_id=str(obj.get("key_id", "")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ImageError(f"manifest is malformed: {exc}") from exc
        if m.to_bytes() != data:
            raise ImageError("manifest is not canonical JSON (sorted keys, no spaces)")
        return m


class KeyFileError(Exception):
    """A key file is missing, malformed or too widely readable."""


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:8]


def public_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public(path: Path) -> bytes:
    """A raw 32-byte public key from a .pub file (hex) or a PEM public key."""
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeError) as exc:
        raise KeyFileError(f"cannot read public key {path}") from exc
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode())
        except ValueError as exc:
            raise KeyFileError(f"{path} is not a PEM public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{path} is not an Ed25519 key")
        return public_raw(key)
    try:
        raw = bytes.fromhex(text)
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a hex public key") from exc
    if len(raw) != 32:
        raise KeyFileError(f"{path} holds {len(raw)} bytes, an Ed25519 public key has 32")
    return raw


def read_manifest(image_dir: Path) -> Manifest:
    path = image_dir / MANIFEST
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{image_dir} is not an image directory (no {MANIFEST})") from exc
    return Manifest.from_bytes(data)


def check_files(image_dir: Path, manifest: Manifest) -> None:
    for f in manifest.files:
        path = image_dir / f.path
        if not path.exists():
            raise ImageError(f"missing file {f.path}")
        data = path.read_bytes()
        if len(data) != f.size or hashlib.sha256(data).hexdigest() != f.sha256:
            raise ImageError(f"file {f.path} does not match the manifest (size or SHA-256)")


def verify_image(image_dir: Path, public_key: bytes) -> Manifest:
    """Check what the bootloader checks: key id, signature, every file's size and hash."""
    manifest = read_manifest(image_dir)
    try:
        sig = (image_dir / SIGNATURE).read_bytes()
    except OSError as exc:
        raise ImageError(f"image is not signed (no {SIGNATURE})") from exc
    kid = key_id(public_key)
    if manifest.key_id != kid:
        raise ImageError(f"manifest is signed by key {manifest.key_id or '(none)'}, not {kid}")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(sig, (image_dir / MANIFEST).read_bytes())
    except InvalidSignature as exc:
        raise ImageError("manifest signature does not verify") from exc
    check_files(image_dir, manifest)
    return manifest
