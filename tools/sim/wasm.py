"""The wake's GC heap at a chip's word size: the same firmware on the 32-bit WebAssembly port.

MicroPython's WebAssembly port (npm `@micropython/micropython-webassembly-pyscript`, run with
Node.js; `make wasm`, part of `make test`, installs it into build/wasm through
tools/sim/wasm_port.py) is a 32-bit MicroPython: its objects have a
chip's size. It has no sockets or TLS, so it runs what can run there: the wire codec, the
flash queue, and whole wakes with the radio stubbed (a sampling wake, and a sending wake whose
association fails). Each workload runs the firmware compiled with mpy-cross, in one driver
script that both ports execute unchanged, so the two figures differ by the word size only.

`python -m tools.sim.wasm` prints the figures of both ports as JSON.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from gateway.proto import BootCause
from tools.sim.field import compile_firmware
from tools.sim.node import FIRMWARE_DIR, micropython_binary
from tools.sim.wasm_port import PACKAGE, VERSION, port_script


class WasmError(Exception):
    """The WebAssembly port is not installed or did not run."""


def wasm_port() -> Path:
    script = port_script()
    if not script.exists():
        raise WasmError(f"the MicroPython WebAssembly port is not installed: run `make wasm` ({PACKAGE}@{VERSION})")
    if shutil.which("node") is None:
        raise WasmError("Node.js (`node`) is not on PATH: run `make wasm`, which installs Debian's nodejs")
    return script


# The board the wake runs on in both ports: RTC memory and the clock in memory, sensors
# constant, the radio never comes up, deep sleep ends the wake.
STUB_BOARD = r'''
NAME = "stub"
FS_ROOT = "flash"
%(causes)sCAUSE = POWER_ON
_rtc = b""
def init(): pass
def boot_cause(): return CAUSE
def reset_cause(): return CAUSE
def wake_cause(): return CAUSE
def unique_id(): return b"\x02\x54\x00\x00\x00\x01"
def read_sensors(): return 2150, 4800
def battery_mv(): return 3700
def radio_up(ssid, password, deadline_ms, hint=None): return False
def radio_down(): pass
def rssi(): return 0
class Slept(BaseException): pass
def deep_sleep(ms): raise Slept()
def rtc_memory(): return _rtc
def rtc_memory_write(data):
    global _rtc
    _rtc = bytes(data)
def time(): return 1767225600
def time_ms(): return 1767225600000
def set_time(s): pass
def led(on): pass
def button(): return False
def watchdog_start(ms): pass
def watchdog_feed(): pass
def reset(): raise Slept()
def flash_block_device(): return None
def phase(name): pass
def pk_op(kind): pass
'''
# The boot causes as the spec numbers them (the real boards' _boot_cause.py).
_CAUSES = "".join(f"{c.name} = {int(c)}\n" for c in BootCause)


STUB_SOCKET = """SOCK_STREAM = 1
def getaddrinfo(*args):
    raise OSError(-2)
"""

# Runs in both ports: writes the compiled firmware and the stub board into ./lib, then runs
# the workloads and prints one `FIG name=value` line per figure.
DRIVER = r'''
import gc, os, sys, json
MODS = json.loads(MODS_JSON)
def mk(p):
    try:
        os.mkdir(p)
    except OSError:
        pass
mk("lib"); mk("flash")
for name, data in MODS.items():
    with open("lib/" + name, "wb") as f:
        f.write(bytes.fromhex(data))
with open("flash/config.json", "w") as f:
    f.write(CONFIG_JSON)
# The modules' bytes leave the heap once on "flash": they are most of it on the unix port.
del MODS, name, data
gc.collect()
sys.path.insert(0, "lib")
out = []
def fig(name, v):
    out.append("FIG %s=%d" % (name, v))

def measure(name, fn):
    # Bytes allocated while it runs with the collector off (the heap it needs with no
    # collection), and bytes still live after a collection (what it keeps).
    gc.collect()
    a = gc.mem_alloc()
    gc.disable()
    keep = fn()
    b = gc.mem_alloc()
    gc.enable()
    gc.collect()
    c = gc.mem_alloc()
    fig(name + "_alloc", b - a)
    fig(name + "_live", c - a)
    return keep

import proto, wire, flashq
def codec():
    buf = bytearray(1024)
    recs = bytearray(64 * wire.RECORD_SIZE_ENV3)
    for i in range(64):
        recs[i * wire.RECORD_SIZE_ENV3] = i
    n = proto.encode_burst(buf, 1, wire.SCHEMA_ENV3, 60, recs, 64)
    m = proto.encode_ack(buf, 2, 64, (66, 67), 1767225600, 0)
    ack = proto.decode_ack(memoryview(buf)[:m])
    return buf, recs, ack
measure("codec", codec)

def queue():
    mk("flash/qtest")
    q = flashq.FlashQueue("flash/qtest/q", wire.RECORD_SIZE_ENV3, 4096)
    rec = bytearray(wire.RECORD_SIZE_ENV3)
    for i in range(64):
        rec[0] = i
        q.append(rec)
    q.close()
    return None
measure("flashq", queue)

# A provisioned node's app starts after boot.py, whose modules stay loaded (bootstate,
# slots and what slots imports): the app's wakes find them there, as on a board.
import board, bootstate, slots, app
def wake(cause, every):
    board.CAUSE = cause
    cfg = json.loads(CONFIG_JSON)
    cfg["send_every"] = every
    with open("flash/config.json", "w") as f:
        f.write(json.dumps(cfg))
    gc.collect()
    a = gc.mem_alloc()
    try:
        app.run()
    except board.Slept:
        pass
    gc.collect()
    return gc.mem_alloc() - a
fig("wake_sample_live", wake(board.POWER_ON, 255))
fig("wake_send_live", wake(board.TIMER, 1))
for line in out:
    print(line)
'''

CONFIG = {
    "device_id": "wasm-node", "broker_host": "127.0.0.1", "sample_interval_s": 60,
    "send_every": 255, "awake_budget_ms": 15000,
}
M_LINE = re.compile(r"^M alloc=(\d+) tls=(\d+) import=(\d+) app=(\d+)", re.M)


def _driver(work: Path) -> str:
    mods: dict[str, str] = {}
    for mpy in sorted(compile_firmware(FIRMWARE_DIR, work / "mpy").glob("*.mpy")):
        if mpy.stem in ("main", "boot"):
            continue
        mods[mpy.name] = mpy.read_bytes().hex()
    mods["board.py"] = STUB_BOARD.replace("%(causes)s", _CAUSES).encode().hex()
    # The WebAssembly port has no `socket`: the radio never comes up, so only the import
    # has to work. The unix port's built-in module wins over this file there.
    mods["socket.py"] = STUB_SOCKET.encode().hex()
    return (
        f"MODS_JSON = {json.dumps(json.dumps(mods))}\n"
        f"CONFIG_JSON = {json.dumps(json.dumps(CONFIG))}\n" + DRIVER
    )


def _parse(text: str) -> dict[str, int]:
    figs = {m.group(1): int(m.group(2)) for m in re.finditer(r"^FIG (\w+)=(-?\d+)$", text, re.M)}
    wakes = M_LINE.findall(text)
    for label, row in zip(("wake_sample", "wake_send"), wakes, strict=False):
        figs[label + "_alloc"] = int(row[0])
        figs[label + "_app"] = int(row[3])
    return figs


def measure(heap: int = 512 * 1024) -> dict[str, Any]:
    """The workloads' heap figures on the 32-bit WebAssembly port and the 64-bit unix port."""
    port = wasm_port()
    unix = micropython_binary()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="torpor-wasm-") as tmp:
        work = Path(tmp)
        script = work / "driver.py"
        script.write_text(_driver(work))
        runs = {
            "wasm32": ["node", str(port), "-X", f"heapsize={heap}", str(script)],
            "unix64": [unix, "-X", f"heapsize={heap}", str(script)],
        }
        for name, argv in runs.items():
            cwd = work / name
            cwd.mkdir()
            proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)
            figs = _parse(proc.stdout)
            if proc.returncode != 0 or "codec_alloc" not in figs:
                raise WasmError(f"{name} run failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
            out[name] = figs
    out["ratio"] = {
        k: round(out["unix64"][k] / v, 2) for k, v in out["wasm32"].items() if v and k in out["unix64"]
    }
    return out


if __name__ == "__main__":
    print(json.dumps(measure(), indent=1))
