"""Firmware signing keys: an Ed25519 key pair per fleet.

The private key stays on the build/release machine (never on the gateway or a node); it is
written with mode 0600 and refused when others can read it. The public key is baked into
the bootloader as the `fleet_keys` module; its id is the first 8 hex digits of SHA-256 of
the raw 32-byte key.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# The key model is the gateway's (it verifies signatures); re-exported for the build tools.
from gateway.security.manifest import KeyFileError as KeyFileError
from gateway.security.manifest import key_id as key_id
from gateway.security.manifest import load_public as load_public
from gateway.security.manifest import public_raw as public_raw

PRIVATE_NAME = "firmware-signing.key"
PUBLIC_NAME = "firmware-signing.pub"
FLEET_KEYS_NAME = "fleet_keys.py"


@dataclass(frozen=True, slots=True)
class KeyPaths:
    private: Path
    public: Path
    fleet_keys: Path
    key_id: str


def fleet_keys_source(keys: dict[str, bytes]) -> str:
    """The `fleet_keys` module for the bootloader: key id -> raw public key."""
    lines = [
        "# Firmware signing keys trusted by the bootloader (written by `torpor fw keygen`).",
        "KEYS = {",
    ]
    lines += [f"    {kid!r}: {raw!r}," for kid, raw in sorted(keys.items())]
    lines.append("}")
    return "\n".join(lines) + "\n"


def keygen(out_dir: Path) -> KeyPaths:
    """Create a new key pair in out_dir; never overwrites an existing key."""
    out_dir.mkdir(parents=True, exist_ok=True)
    priv_path = out_dir / PRIVATE_NAME
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise KeyFileError(f"{priv_path} exists; refusing to overwrite a signing key") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(priv_path, 0o600)
    raw = public_raw(key.public_key())
    kid = key_id(raw)
    pub_path = out_dir / PUBLIC_NAME
    pub_path.write_text(raw.hex() + "\n")
    fleet = out_dir / FLEET_KEYS_NAME
    fleet.write_text(fleet_keys_source({kid: raw}))
    return KeyPaths(priv_path, pub_path, fleet, kid)


def load_private(path: Path) -> Ed25519PrivateKey:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {path}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{path} is readable by others (mode {mode & 0o777:o}); chmod 600 it")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 key")
    return key
