"""Cross-runtime checks: signatures made by `cryptography` (OpenSSL) verify in the
MicroPython unix port exactly when they should, and its SHA-512 equals hashlib's."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.mpharness import run_micropython

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, P - 2, P) % P

SMALL_ORDER = (
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
)

# Reads "<pk> <msg> <sig>" hex lines ('-' for an empty message), prints one 0/1 per line.
_VERIFY_FILE = """
from binascii import unhexlify
from ed25519 import verify
out = []
with open('cases.txt') as f:
    for line in f:
        pk, msg, sig = line.split()
        out.append('1' if verify(unhexlify(pk), b'' if msg == '-' else unhexlify(msg),
                                 unhexlify(sig)) else '0')
print(''.join(out))
"""


# ---- a slow, obviously-written affine reference, to check the test's own inputs ----


def _decode(enc: bytes) -> tuple[int, int]:
    y = int.from_bytes(enc, "little")
    sign, y = y >> 255, y & (2**255 - 1)
    assert y < P
    xx = (y * y - 1) * pow(D * y * y + 1, P - 2, P) % P
    x = pow(xx, (P + 3) // 8, P)
    if (x * x - xx) % P:
        x = x * pow(2, (P - 1) // 4, P) % P
    assert (x * x - xx) % P == 0, "not on the curve"
    if x & 1 != sign:
        x = P - x
    return x, y


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2) = a, b
    t = D * x1 * x2 * y1 * y2 % P
    x3 = (x1 * y2 + x2 * y1) * pow(1 + t, P - 2, P) % P
    y3 = (y1 * y2 + x1 * x2) * pow(1 - t, P - 2, P) % P
    return x3, y3


def _mul(n: int, a: tuple[int, int]) -> tuple[int, int]:
    r = (0, 1)
    while n:
        if n & 1:
            r = _add(r, a)
        a = _add(a, a)
        n >>= 1
    return r


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _verify_in_micropython(tmp_path: Path, cases: list[tuple[bytes, bytes, bytes]]) -> list[bool]:
    lines = [f"{pk.hex()} {msg.hex() or '-'} {sig.hex()}\n" for pk, msg, sig in cases]
    (tmp_path / "cases.txt").write_text("".join(lines))
    proc = run_micropython(_VERIFY_FILE, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.strip()
    assert len(out) == len(cases)
    return [c == "1" for c in out]


def test_openssl_signatures_verify_and_tampered_ones_do_not(tmp_path: Path) -> None:
    rng = random.Random(8032)
    good: list[tuple[bytes, bytes, bytes]] = []
    bad: list[tuple[bytes, bytes, bytes]] = []
    keys = [Ed25519PrivateKey.from_private_bytes(rng.randbytes(32)) for _ in range(200)]
    for i, key in enumerate(keys):
        msg = rng.randbytes(rng.choice((0, 1, 31, 64, 127, 128, 200, 700)))
        sig = key.sign(msg)
        pk = _raw(key)
        good.append((pk, msg, sig))
        kind = i % 4
        if kind == 0:  # one bit of the signature
            s = bytearray(sig)
            s[rng.randrange(64)] ^= 1 << rng.randrange(8)
            bad.append((pk, msg, bytes(s)))
        elif kind == 1:  # one bit of the message, or one byte more
            if msg:
                m = bytearray(msg)
                m[rng.randrange(len(m))] ^= 1 << rng.randrange(8)
                bad.append((pk, bytes(m), sig))
            else:
                bad.append((pk, b"\x00", sig))
        elif kind == 2:  # another key
            bad.append((_raw(keys[(i + 1) % len(keys)]), msg, sig))
        else:  # S + L: same scalar modulo L, non-canonical
            s_int = int.from_bytes(sig[32:], "little") + L
            bad.append((pk, msg, sig[:32] + s_int.to_bytes(32, "little")))
    results = _verify_in_micropython(tmp_path, good + bad)
    assert results[: len(good)] == [True] * len(good)
    assert results[len(good):] == [False] * len(bad)


def test_small_order_keys_are_rejected_even_when_the_equation_holds(tmp_path: Path) -> None:
    # For each small-order A, forge (R, S) = ([s]B, s) with no private key and search a
    # message whose k = H(R || A || M) is 0 mod 8, so [k]A is the identity and the
    # cofactorless equation [S]B = R + [k]A holds. Only the small-order check refuses it.
    seed = bytes(range(32))
    h = hashlib.sha512(seed).digest()
    a = int.from_bytes(h[:32], "little") & ((1 << 254) - 8) | (1 << 254)
    s = a % L
    r_enc = _raw(Ed25519PrivateKey.from_private_bytes(seed))  # [a]B = [s]B
    base = _decode(bytes.fromhex("58" + "66" * 31))
    assert _mul(s, base) == _decode(r_enc)
    cases = []
    for enc_hex in SMALL_ORDER:
        enc = bytes.fromhex(enc_hex)
        point = _decode(enc)
        assert _mul(8, point) == (0, 1), f"{enc_hex} is not of small order"
        for n in range(200):
            msg = b"forged manifest %d" % n
            k = int.from_bytes(hashlib.sha512(r_enc + enc + msg).digest(), "little") % L
            if k % 8 == 0:
                break
        else:
            raise AssertionError("no message with k = 0 mod 8 found")
        assert _add(_decode(r_enc), _mul(k, point)) == _mul(s, base)
        cases.append((enc, msg, r_enc + s.to_bytes(32, "little")))
    assert _verify_in_micropython(tmp_path, cases) == [False] * len(cases)


def test_sha512_matches_hashlib_for_lengths_0_to_300(tmp_path: Path) -> None:
    rng = random.Random(180)
    msgs = [rng.randbytes(n) for n in range(301)]
    code = (
        "from binascii import unhexlify, hexlify\n"
        "from sha512 import sha512\n"
        "for line in open('msgs.txt'):\n"
        "    m = line.strip()\n"
        "    m = b'' if m == '-' else unhexlify(m)\n"
        "    h = sha512(wide=False)\n"
        "    h.update(m[:len(m) // 3])\n"
        "    h.update(memoryview(m)[len(m) // 3:])\n"
        "    print(sha512(m).hexdigest(), h.hexdigest())\n"
    )
    (tmp_path / "msgs.txt").write_text("".join((m.hex() or "-") + "\n" for m in msgs))
    proc = run_micropython(code, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.split("\n")[: len(msgs)]
    for m, line in zip(msgs, lines, strict=True):
        want = hashlib.sha512(m).hexdigest()
        assert line.split() == [want, want], f"length {len(m)}"


def test_benchmark_reports_every_figure() -> None:
    # Figures only: wall-clock numbers never gate the suite.
    from tools.bench.ed25519 import measure

    figures = measure(rounds=1)
    for key in (
        "ed25519_verify_ms_unix",
        "sha512_mb_per_s",
        "baseline_openssl_verify_ms_cpython",
        "baseline_hashlib_sha512_mb_per_s",
        "ed25519_verify_ms_esp32_estimate",
    ):
        assert figures[key] > 0, key


def test_verify_fits_a_64k_heap() -> None:
    # The bootloader runs before the app, but on a port whose free heap may be small.
    key = Ed25519PrivateKey.from_private_bytes(bytes(32))
    msg = bytes(600)
    sig = key.sign(msg)
    code = (
        "import gc\n"
        "from ed25519 import verify\n"
        f"print(verify(bytes.fromhex('{_raw(key).hex()}'), bytes(600), "
        f"bytes.fromhex('{sig.hex()}')))\n"
        "gc.collect()\n"
        "print(gc.mem_free())\n"
    )
    proc = run_micropython(code, heapsize="64K", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split()[0] == "True"


# Fills the heap with `size`-byte buffers (held in a list made first), then lets go of
# every `every`-th one: a heap whose free room is in holes of that size, as in the middle
# of a wake. Prints the verify's result, or MemoryError.
_CROWDED = """
import gc
from binascii import unhexlify
from ed25519 import verify
pk = unhexlify({pk!r})
sig = unhexlify({sig!r})
msg = bytes(600)
hold = [None] * 4000
n = 0
try:
    while n < 4000:
        hold[n] = bytearray({size})
        n += 1
except MemoryError:
    pass
for i in range(0, n, {every}):
    hold[i] = None
gc.collect()
try:
    r = verify(pk, msg, sig)
except MemoryError:
    r = 'MemoryError'
hold = None
print(r)
"""


def _crowded(size: int, every: int) -> str:
    key = Ed25519PrivateKey.from_private_bytes(bytes(32))
    code = _CROWDED.format(pk=_raw(key).hex(), sig=key.sign(bytes(600)).hex(), size=size,
                           every=every)
    proc = run_micropython(code, heapsize="96K", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.split()[-1]


def test_verify_needs_no_large_block_on_a_fragmented_heap() -> None:
    # Half the heap free, in 1 KB holes only: a good signature still verifies (an OTA
    # manifest is checked in the middle of a wake, on a heap fragmented like this).
    assert _crowded(1000, 2) == "True"


def test_running_out_of_heap_is_not_a_bad_signature() -> None:
    # A few hundred bytes free: the verify cannot run, and says so with MemoryError
    # rather than reporting the good signature as bad.
    assert _crowded(256, 1000) == "MemoryError"
