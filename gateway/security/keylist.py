"""The signed firmware key list: which Ed25519 keys a node's bootloader trusts for images.

A list is canonical JSON `{"key_id": signer, "keys": {id: hex key}, "seq": n}` signed by a
key the node trusts now (firmware/trusted_keys.py applies it). The build machine makes and
signs one (`torpor fw keys add|retire`); the gateway checks it against the list before it
and sends it down (gateway.ops.keylists). On the wire and in a list file it travels as the
JSON bytes followed by the 64-byte signature.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway import proto
from gateway.security.manifest import key_id

SIGNATURE_SIZE = 64
# The set_keys command's `total` argument bounds a list with its signature (the spec).
MAX_BLOB = proto.OP_ARGS[proto.CommandOp.SET_KEYS].args[2].high


class KeyListError(Exception):
    """A key list is malformed, badly signed or would leave the fleet unable to boot."""


@dataclass(frozen=True, slots=True)
class KeyList:
    seq: int
    signer: str
    keys: dict[str, bytes]  # key id -> raw 32-byte public key

    def to_bytes(self) -> bytes:
        obj = {"key_id": self.signer, "keys": {k: v.hex() for k, v in sorted(self.keys.items())},
               "seq": self.seq}
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self.keys))

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyList:
        """Parse the signed bytes; the node parses them the same way (trusted_keys._parse)."""
        try:
            obj: dict[str, Any] = json.loads(data)
            seq, signer, raw = obj["seq"], obj["key_id"], obj["keys"]
            if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(signer, str) \
                    or not isinstance(raw, dict):
                raise ValueError("seq, key_id or keys has the wrong type")
            keys = {str(k): bytes.fromhex(v) for k, v in raw.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KeyListError(f"key list is malformed: {exc}") from exc
        for kid, pk in keys.items():
            if len(pk) != 32 or key_id(pk) != kid:
                raise KeyListError(f"key list entry {kid} is not the id of its 32-byte key")
        if not keys:
            raise KeyListError("key list holds no key")
        kl = cls(seq, signer, keys)
        if kl.to_bytes() != data:
            raise KeyListError("key list is not canonical JSON (sorted keys, no spaces)")
        return kl


def split(blob: bytes) -> tuple[KeyList, bytes, bytes]:
    """(list, its JSON bytes, signature) of a list file / set_keys stream."""
    if len(blob) <= SIGNATURE_SIZE:
        raise KeyListError(f"a signed key list is its JSON and a {SIGNATURE_SIZE}-byte signature; "
                           f"got {len(blob)} bytes")
    if len(blob) > MAX_BLOB:
        raise KeyListError(f"signed key list is {len(blob)} bytes; at most {MAX_BLOB} travel")
    data, sig = blob[:-SIGNATURE_SIZE], blob[-SIGNATURE_SIZE:]
    return KeyList.from_bytes(data), data, sig


def verify(data: bytes, signature: bytes, trusted: dict[str, bytes]) -> KeyList:
    """The list, if `trusted` (id -> key) holds its signer and the signature verifies."""
    kl = KeyList.from_bytes(data)
    pk = trusted.get(kl.signer)
    if pk is None:
        raise KeyListError(f"key list is signed by key {kl.signer}, which is not trusted now "
                           f"(trusted: {', '.join(sorted(trusted)) or 'none'})")
    try:
        Ed25519PublicKey.from_public_bytes(pk).verify(signature, data)
    except InvalidSignature as exc:
        raise KeyListError(f"key list signature by {kl.signer} does not verify") from exc
    return kl
