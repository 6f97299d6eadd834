# The public keys that may sign firmware manifests: key id -> 32-byte Ed25519 public key.
# The baked-in set is the module `fleet_keys` (a KEYS dict written by `torpor fw keygen`),
# installed next to the bootloader when a node is provisioned; OTA never writes it.
# A key list signed by a key trusted now can replace the set (add and retire keys): it is
# checked once, when applied, then kept as fw/keys.json and used instead of the baked set.
# Key list, canonical JSON: {"key_id": signer id, "keys": {id: hex key, ...}, "seq": n};
# seq must grow, so an old list cannot bring a retired key back.
import binascii
import hashlib
import json
import os

import bootstate


def key_id(public_key):
    """First 8 hex digits of SHA-256 of the raw 32-byte public key."""
    return binascii.hexlify(hashlib.sha256(public_key).digest()).decode()[:8]


def baked():
    try:
        import fleet_keys  # type: ignore[import-not-found]  # written at provisioning
    except ImportError:
        return {}
    return dict(fleet_keys.KEYS)


def _load_list(root):
    try:
        with open(bootstate.boot_dir(root) + "/keys.json") as f:
            return _parse(f.read())
    except (OSError, ValueError):
        return None


def _parse(text):
    # (seq, signer, {id: key}) of a key list, or ValueError.
    d = json.loads(text)
    if not isinstance(d, dict):
        raise ValueError("key list")
    seq, signer, raw = d.get("seq"), d.get("key_id"), d.get("keys")
    if not isinstance(seq, int) or not isinstance(signer, str) or not isinstance(raw, dict):
        raise ValueError("key list")
    out = {}
    for kid in raw:
        pk = binascii.unhexlify(raw[kid])
        if len(pk) != 32 or key_id(pk) != kid:
            raise ValueError("key id")
        out[kid] = pk
    if not out:
        raise ValueError("empty key list")
    return seq, signer, out


def keys(root):
    """The keys trusted now: the applied key list if there is one, else the baked set."""
    lst = _load_list(root)
    return lst[2] if lst else baked()


def seq(root):
    lst = _load_list(root)
    return lst[0] if lst else 0


def update(root, data, signature):
    """Apply a signed key list; returns bootstate.NONE or the ota_reason it was refused for."""
    try:
        text = data.decode() if isinstance(data, (bytes, bytearray)) else data
        new_seq, signer, _ = _parse(text)
    except (ValueError, TypeError, UnicodeError):
        return bootstate.BAD_MANIFEST
    current = keys(root)
    pk = current.get(signer)
    if pk is None:
        return bootstate.UNKNOWN_KEY
    import ed25519  # only here: a normal boot never loads the verifier

    if not ed25519.verify(pk, text.encode(), bytes(signature)):
        return bootstate.BAD_SIGNATURE
    if new_seq <= seq(root):
        return bootstate.DOWNGRADE
    d = bootstate.boot_dir(root)
    try:
        os.mkdir(d)
    except OSError:
        pass
    with open(d + "/keys.tmp", "w") as f:
        f.write(text)
    os.rename(d + "/keys.tmp", d + "/keys.json")
    return bootstate.NONE
