"""Peak heap of an OTA wake and of an Ed25519 verify on each board profile (`torpor bench energy`).

The OTA wake: a sim node on the board's profile and heap boots its signed v1 image through
the bootloader, wakes, and takes a campaign's manifest and first chunks from the real gateway
over mutual TLS: the manifest's Ed25519 check runs in the middle of that wake, next to the
session and the frames. It fits a heap when the gateway hears the node report chunks of the
image beyond the manifest (it passed its check at the start of a wake, and the next chunk
wake reopened the download by its seal) with no MemoryError in the log.
Bisection as for the TLS wake (tools/bench/energy.py, `HEAP_METHOD`).

The Ed25519 verify: import and one verify of the compiled firmware in a bare script, bisected
on the 64-bit unix port and turned into chip bytes twice: by the word factor, and, where
`make wasm` installed it, by the ratio of the bytes the same script allocates on the 32-bit
WebAssembly port (the chip's word size, tools/sim/wasm.py) to those on the unix port. That
port grows its heap on demand, so no limit can be bisected there. The larger is the figure.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.ops import ota as ops_ota
from gateway.store import db, ota_store
from tools.bench.node import START_MS, node_config, provision
from tools.sim.field import FieldModel, compile_firmware
from tools.sim.node import FIRMWARE_DIR, SimNode, micropython_binary
from tools.sim.profiles import SIM_OVERHEAD_BYTES, WORD_FACTOR, BoardProfile

# Wakes of a trial beyond those that bring the manifest's prefix (see ota_wake).
EXTRA_WAKES = 2
# How long the gateway may take to record the last wake's OTA_STATUS.
INGEST_WAIT_S = 5.0

_ED_CODE = """
import gc, sys
sys.path.insert(0, %(lib)r)
from binascii import unhexlify
import ed25519
pk = unhexlify(%(pk)r)
msg = unhexlify(%(msg)r)
sig = unhexlify(%(sig)r)
gc.collect()
print('OK' if ed25519.verify(pk, msg, sig) else 'BAD')
"""

_WASM_LIB = """
import json, os
try:
    os.mkdir('lib')
except OSError:
    pass
for name, data in json.loads(%(mods)r).items():
    with open('lib/' + name, 'wb') as f:
        f.write(bytes.fromhex(data))
"""


def bisect(ok: Callable[[int], bool], lo: int, hi: int, step: int = 1024) -> int | None:
    """The smallest heap (chip bytes, to `step`) in (lo, hi] for which ok(heap) holds."""
    if not ok(hi):
        return None
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step or step
        if mid <= lo:
            break
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


class OtaImages:
    """A signing key and the signed sim images v1 (installed) and v2 (the update)."""

    def __init__(self, tmp: Path) -> None:
        from tools.fw import image, keys

        paths = keys.keygen(tmp / "fw-keys")
        self.pubkey_path = paths.public
        self.public = keys.load_public(paths.public)
        private = keys.load_private(paths.private)
        self.v1 = tmp / "v1"
        self.v2 = tmp / "v2"
        for version, out in ((1, self.v1), (2, self.v2)):
            image.build_image("sim", version, out)
            image.sign_image(out, private)


def _progress(db_path: Path, cid: int) -> tuple[str, int, int]:
    """(device status, progress, chunks of the manifest prefix) of the campaign's device."""
    conn = db.open_db(db_path)
    try:
        c = ota_store.get_campaign(conn, cid)
        d = c.devices[0]
        img = ota_store.get_image(conn, c.image_id)
        plan = ota_store.plan_of(conn, d.device, img)
        return d.status, d.progress, plan.prefix_chunks()
    finally:
        conn.close()


def _new_campaign(db_path: Path, imgs: OtaImages, device: str) -> int:
    """A fresh campaign for `device`, the one it was in (an earlier trial's) cancelled."""
    conn = db.open_db(db_path)
    try:
        act = ota_store.active(conn, device)
        if act is not None:
            ota_store.cancel_campaign(conn, act[0])
        made = ops_ota.create_campaign(conn, imgs.v2, devices=device, rate=1,
                                       timeout_s=3600, pubkey=imgs.pubkey_path)
        return made.campaign.id
    finally:
        conn.close()


def ota_wake(tmp: Path, st: Any, p: BoardProfile, device: str, imgs: OtaImages,
             field: Callable[[BoardProfile, int], FieldModel]) -> int | None:
    """Peak heap of the wake that checks an OTA manifest amid its chunks, chip bytes."""
    from tools.fw import image

    trials = [0]

    def ok(heap: int) -> bool:
        # A trial whose wakes end short of the goal for another reason than the heap (a slow
        # moment of a shared machine) is run again, as for the TLS wake.
        for _ in range(2):
            trials[0] += 1
            cid = _new_campaign(st.db_path, imgs, device)
            prefix = _progress(st.db_path, cid)[2]
            node = SimNode(tmp / f"ota-{p.name}-{trials[0]}", seed=7, time_scale=0,
                           start_ms=START_MS, field=field(p, heap))
            provision(node, node_config(st, device, 1, sample_interval_s=300, align_s=0),
                      st.pki, device)
            image.install_sim(node.dir, imgs.v1, public_key=imgs.public)
            node.entry = "boot"
            # The wakes that bring the manifest (a chunk of the stream's prefix a wake at the
            # sensor class's budget), the one that checks it, and the next chunk wake, which
            # checks it again in its fresh process before it writes a chunk of the image.
            wakes = prefix + EXTRA_WAKES
            asyncio.run(node.run(wakes, wall_limit_s=30 + 20 * wakes))
            text = (node.dir / "node.log").read_text(errors="replace")
            shutil.rmtree(node.dir, ignore_errors=True)
            if "MemoryError" in text:
                return False
            deadline = time.monotonic() + INGEST_WAIT_S
            while True:
                status, progress, _ = _progress(st.db_path, cid)
                if status in (ota_store.DOWNLOADING, ota_store.VERIFYING) and progress > prefix:
                    return True
                if status in (ota_store.REFUSED, ota_store.FAILED) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            if status in (ota_store.REFUSED, ota_store.FAILED):
                return False
        return False

    return bisect(ok, 8 * 1024, p.gc_heap_wifi_bytes)


def _signed_code(lib: Path) -> str:
    from tools.bench.ed25519 import _signed_sample

    pk, msg, sig, _ = _signed_sample()
    return _ED_CODE % {"lib": str(lib), "pk": pk.hex(), "msg": msg.hex(), "sig": sig.hex()}


def ed25519_unix(tmp: Path, hi: int) -> int | None:
    """Import and one verify on the 64-bit unix port, in chip bytes by the word factor."""
    lib = compile_firmware(FIRMWARE_DIR, tmp / "ed-mpy-unix")
    code = _signed_code(lib)

    def ok(heap: int) -> bool:
        proc = subprocess.run(
            [micropython_binary(), "-X", f"heapsize={int(heap * WORD_FACTOR)}", "-c", code],
            env={"MICROPYPATH": str(lib), "PATH": "/usr/bin:/bin"},
            capture_output=True, text=True, timeout=120,
        )
        return proc.returncode == 0 and "OK" in proc.stdout

    return bisect(ok, 2 * 1024, hi)


_ALLOC_CODE = """
import gc, sys
sys.path.insert(0, %(lib)r)
from binascii import unhexlify
pk = unhexlify(%(pk)r)
msg = unhexlify(%(msg)r)
sig = unhexlify(%(sig)r)
gc.collect()
a = gc.mem_alloc()
gc.disable()
import ed25519
ok = ed25519.verify(pk, msg, sig)
print('ALLOC', gc.mem_alloc() - a, 'OK' if ok else 'BAD')
"""


def _alloc(argv: list[str], cwd: Path) -> int | None:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)
    m = re.search(r"^ALLOC (\d+) OK$", proc.stdout, re.M)
    return int(m.group(1)) if proc.returncode == 0 and m else None


def ed25519_word_ratio(tmp: Path) -> float | None:
    """Bytes one import-and-verify allocates with the collector off on the 32-bit
    WebAssembly port over the same on the 64-bit unix port; None without the port.

    The WebAssembly port grows its heap on demand, so no heap limit can be bisected there:
    this ratio turns the unix port's bisected peak into the chip's word size for this code
    (big integers: digit arrays do not shrink with the word, object headers do)."""
    from tools.sim.wasm import WasmError, wasm_port

    try:
        port = wasm_port()
    except WasmError:
        return None
    from tools.bench.ed25519 import _signed_sample

    work = tmp / "ed-ratio"
    mods = {mpy.name: mpy.read_bytes().hex()
            for mpy in compile_firmware(FIRMWARE_DIR, work / "mpy").glob("*.mpy")
            if mpy.stem in ("ed25519", "sha512")}
    pk, msg, sig, _ = _signed_sample()
    code = _ALLOC_CODE % {"lib": "lib", "pk": pk.hex(), "msg": msg.hex(), "sig": sig.hex()}
    # The WebAssembly port runs in its own file system: the script writes the modules there.
    script = work / "verify.py"
    script.write_text(_WASM_LIB % {"mods": json.dumps(mods)} + code)
    wasm = _alloc(["node", str(port), str(script)], work)
    unix = _alloc([micropython_binary(), "-X", "heapsize=16M", str(script)], work)
    if not wasm or not unix:
        return None
    return wasm / unix


def measure(tmp: Path, st: Any, boards: list[BoardProfile], device: str,
            field: Callable[[BoardProfile, int], FieldModel]) -> dict[str, Any]:
    """Per board: the OTA wake's peak on that board's profile; the Ed25519 verify (the same
    code on every board) once on each port, held against each board's heap."""
    imgs = OtaImages(tmp / "ota-images")
    hi = max(p.gc_heap_wifi_bytes for p in boards)
    unix = ed25519_unix(tmp, hi)
    ratio = ed25519_word_ratio(tmp)
    wasm = None if unix is None or ratio is None else round(unix * WORD_FACTOR * ratio)
    out: dict[str, Any] = {
        # The larger of the two conversions to the chip's word size.
        "ed25519_verify": None if unix is None else max(unix, wasm or 0),
        "ed25519_verify_unix64_by_word_factor": unix,
        "ed25519_verify_by_wasm32_ratio": wasm,
        "ed25519_wasm32_to_unix64_alloc_ratio": None if ratio is None else round(ratio, 3),
        "ota_chunk_wake": {p.name: ota_wake(tmp, st, p, device, imgs, field) for p in boards},
    }
    return out


METHOD = (
    "OTA chunk wake: a sim node (sensor class) on each board's profile boots its signed v1 image "
    "through the bootloader and takes a campaign's manifest and chunks from the gateway over "
    "mutual TLS, a chunk a wake; it fits a heap when it reports image chunks beyond the manifest "
    "(checked at the start of the next sending wake, then reopened by its seal in the next "
    f"chunk wake) with no MemoryError; bisection as above (minus {SIM_OVERHEAD_BYTES} bytes, "
    f"divided by {WORD_FACTOR}). Ed25519 verify: import and one verify in a bare script, bisected "
    f"on the unix port and divided by {WORD_FACTOR}, and also scaled by the ratio of the bytes the "
    "same script allocates on the 32-bit WebAssembly port (the chip's word size; `make wasm`) to "
    "those on the unix port; the larger figure is held against every board's heap."
)

