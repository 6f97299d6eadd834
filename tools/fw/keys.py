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

from gateway.security.keylist import KeyList as KeyList
from gateway.security.keylist import KeyListError as KeyListError
from gateway.security.keylist import split as split

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


# ---------------------------------------------------------------- key lists
# A signed key list replaces the set of keys nodes trust (gateway.security.keylist holds
# the model; firmware/trusted_keys.py applies it). These make the next one on the build
# machine, where the private key lives.
LIST_NAME = "keylist.bin"  # a list file: canonical JSON, then the 64-byte signature


def public_of(path: Path) -> bytes:
    """The raw public key from a .pub/PEM file, or from a key directory (`fw keygen --out`)."""
    return load_public(path / PUBLIC_NAME if path.is_dir() else path)


def next_list(current: dict[str, bytes], seq: int, signing_key: Ed25519PrivateKey, *,
              add: bytes | None = None, retire: str | None = None) -> tuple[KeyList, bytes]:
    """(list, signed blob) following `current` (the keys trusted now, at `seq`): one key
    added or one retired, signed by `signing_key`, which must be trusted now."""
    signer = key_id(public_raw(signing_key.public_key()))
    if signer not in current:
        raise KeyListError(f"signing key {signer} is not trusted by key list seq {seq} "
                           f"({', '.join(sorted(current))}): nodes would refuse the list")
    keys = dict(current)
    if add is not None:
        kid = key_id(add)
        if kid in keys:
            raise KeyListError(f"key {kid} is trusted already (key list seq {seq})")
        keys[kid] = add
    if retire is not None:
        if retire not in keys:
            raise KeyListError(f"key {retire} is not in key list seq {seq} "
                               f"({', '.join(sorted(current))})")
        if len(keys) == 1:
            raise KeyListError(f"key {retire} is the last trusted key: retiring it is refused "
                               "(add its successor first)")
        del keys[retire]
    kl = KeyList(seq + 1, signer, keys)
    data = kl.to_bytes()
    blob = data + signing_key.sign(data)
    split(blob)  # the same checks as the gateway's and the node's (size, shape)
    return kl, blob
