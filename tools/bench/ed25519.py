"""Ed25519 verify and SHA-512 speed of the firmware's pure-MicroPython code.

`measure()` runs firmware/ed25519.py and firmware/sha512.py in the MicroPython unix
port and, as the baseline from the same run, `cryptography` (OpenSSL) and hashlib in
CPython. The ESP32 figure is an estimate, not a measurement: the unix verify time is
expressed in 255-bit multiply-mod equivalents (both timed in the same MicroPython
process) and multiplied by an assumed ESP32 cost per multiply-mod (see ESP32_MULMOD_US).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from tools import venvbin

ROOT = Path(__file__).resolve().parents[2]

# Assumed cost of one `a * b % p` on 255-bit ints in MicroPython on an ESP32 at 240 MHz.
# Model: the ports' big ints use 16-bit digits, so the product is 16 x 16 = 256 digit
# multiply-adds and the reduction about as many divide steps again (~4,000 cycles with
# loop overhead), plus ~2 allocations and ~4 bytecodes (~2,000-4,000 cycles): about
# 6,000-10,000 cycles, 25-40 us. The upper end is used.
ESP32_MULMOD_US = 40.0

_MP_CODE = """
import gc, time, json
from binascii import unhexlify
import ed25519
from sha512 import sha512
pk = unhexlify(%(pk)r)
msg = unhexlify(%(msg)r)
sig = unhexlify(%(sig)r)

def best(f, n):
    b = 10**9
    for _ in range(n):
        gc.collect()
        t = time.ticks_us()
        f()
        b = min(b, time.ticks_diff(time.ticks_us(), t))
    return b

def cold():
    ed25519._btab = None
    assert ed25519.verify(pk, msg, sig)

def warm():
    assert ed25519.verify(pk, msg, sig)

P = 2**255 - 19
a = 3**150 %% P
b = 7**90 %% P
def mulmods():
    x = a
    for _ in range(2000):
        x = x * b %% P

data = bytes(16384)
out = {
    "verify_cold_us": best(cold, %(rounds)d),
    "verify_warm_us": best(warm, %(rounds)d),
    "mulmod_us": best(mulmods, 5) / 2000,
    "sha512_wide_us": best(lambda: sha512(data).digest(), 3),
    "sha512_64bit_us": best(lambda: sha512(data, wide=False).digest(), 3),
}
print(json.dumps(out))
"""


def _micropython() -> str:
    found = venvbin.find("micropython")
    if found is None:
        raise RuntimeError("the MicroPython unix port (`micropython`) is not installed")
    return found


def _signed_sample() -> tuple[bytes, bytes, bytes, float]:
    # A 512-byte stand-in for an OTA manifest, signed by OpenSSL; also times its verify.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    pub = key.public_key()
    pk = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    msg = bytes((i * 37) & 0xFF for i in range(512))
    sig = key.sign(msg)
    best = float("inf")
    for _ in range(200):
        t = time.perf_counter()
        pub.verify(sig, msg)
        best = min(best, time.perf_counter() - t)
    return pk, msg, sig, best * 1000


def measure(rounds: int = 10) -> dict[str, float]:
    """Figures for one verify of a 512-byte manifest and for SHA-512 throughput."""
    import hashlib

    pk, msg, sig, openssl_ms = _signed_sample()
    code = _MP_CODE % {"pk": pk.hex(), "msg": msg.hex(), "sig": sig.hex(), "rounds": rounds}
    env = dict(os.environ)
    env["MICROPYPATH"] = str(ROOT / "firmware")
    proc = subprocess.run(
        [_micropython(), "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        raise RuntimeError(f"MicroPython benchmark failed:\n{proc.stdout}{proc.stderr}")
    mp = json.loads(proc.stdout.strip().splitlines()[-1])

    data = bytes(1 << 20)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        hashlib.sha512(data).digest()
        best = min(best, time.perf_counter() - t)

    equiv = mp["verify_cold_us"] / mp["mulmod_us"]
    return {
        "ed25519_verify_ms_unix": mp["verify_cold_us"] / 1000,
        "ed25519_verify_warm_ms_unix": mp["verify_warm_us"] / 1000,
        "ed25519_verify_mulmod_equivalents": equiv,
        "ed25519_verify_ms_esp32_estimate": equiv * ESP32_MULMOD_US / 1000,
        "baseline_openssl_verify_ms_cpython": openssl_ms,
        "sha512_mb_per_s": 16384 / mp["sha512_wide_us"],
        "sha512_64bit_words_mb_per_s": 16384 / mp["sha512_64bit_us"],
        "baseline_hashlib_sha512_mb_per_s": (1 << 20) / best / 1e6,
    }


def table(figures: dict[str, float]) -> str:
    width = max(len(k) for k in figures)
    return "\n".join(f"{k:<{width}}  {v:10.3f}" for k, v in figures.items())


if __name__ == "__main__":
    print(table(measure()))
