"""Session set-up of a routine send: mutual TLS against TLS-PSK session keys (docs/session-keys.md),
for `torpor bench energy`.

One run: the real gateway supervising Mosquitto with both listeners, and two sim nodes
on the ESP32 profile running the real firmware. One device keeps certificate sessions (its
session key is marked unsupported in the gateway's store, as for firmware without
install_psk); the other receives its key over a certificate session and then sends
routine wakes on the PSK listener. Each routine sending wake gives its energy ledger
(`L` line) and its wire figures (`T` line).

The chip's handshake time comes from the profile (boards/profiles.toml: tls_handshake_ms,
and for PSK that times tools/sim/profiles.PSK_CPU_FRACTION): a model, not a measurement of
a chip. Session set-up = the handshake's chip time plus the connect's loopback wall time
outside it (TCP, TLS and MQTT round trips), both at the profile's radio-on current.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gateway.store import db, session_keys
from gateway.store import devices as registry
from gateway.store import downlink_queue as dq
from gateway.store.status import read_status
from gateway.transport.broker import PSK_NAME
from tools.bench.node import (
    START_MS,
    BenchError,
    Stack,
    bench_pki,
    free_port,
    node_config,
    provision,
)
from tools.sim.field import FieldModel, parse_ledger
from tools.sim.node import ROOT, SimNode
from tools.sim.profiles import PSK_CPU_FRACTION, BoardProfile

BOARD = "esp32"
ROUTINE_WAKES = 5
TARGET_SETUP_FRACTION = 1 / 5  # PSK set-up at most this share of the mutual-TLS one
PATHS = (("mtls", "energy-mtls"), ("psk", "energy-psk"))
_SESSION = {0: "cert", 1: "psk", 2: "fallback"}


def _runs(text: str) -> list[dict[str, Any]]:
    """Per run of the node log: its T line (as ints) and its ledger."""
    out: list[dict[str, Any]] = []
    for chunk in text.split("--- run ")[1:]:
        t: dict[str, int] = {}
        ledger = None
        for line in chunk.splitlines():
            if line.startswith("T "):
                t = {k: int(v) for k, v in (kv.split("=") for kv in line[2:].split())}
            elif line.startswith("L "):
                ledger = parse_ledger(line)
        if t and ledger:
            out.append({"t": t, "ledger": ledger})
    return out


def _gateway(tmp: Path, devices: list[str]) -> tuple[subprocess.Popen[bytes], Stack, int]:
    pki = bench_pki(tmp / "pki", devices)
    port, psk_port = free_port(), free_port()
    data = tmp / "gateway"
    data.mkdir(parents=True)
    db_path = data / "gateway.db"
    conn = db.open_db(db_path)
    try:
        for d in devices:
            registry.add(conn, d)
        # Certificate sessions only for the baseline device, as for firmware without
        # install_psk: the gateway asks it again in 100 years.
        with db.transaction(conn):
            session_keys.queued(conn, "energy-mtls", 1, b"", 0, time.time())
            session_keys.unsupported(conn, "energy-mtls", time.time() + 100 * 365 * 86400.0)
    finally:
        conn.close()
    conf = tmp / "gateway.toml"
    conf.write_text(
        f'[gateway]\ndata_dir = "{data}"\nstatus_interval_s = 0.2\nlog_level = "info"\n'
        f'[broker]\nmode = "supervised"\nhost = "127.0.0.1"\nport = {port}\n'
        f'psk_port = {psk_port}\npki_dir = "{pki.path}"\n'
        "[ingest]\nbatch_max_ms = 2\nrate_limit_frames_per_min = 100000\n"
        "[pki]\nrotation_poll_s = 0.1\n")
    log = tmp / "gateway.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "gateway", "run", "--config",
                                 str(conf)], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                cwd=ROOT)
    deadline = time.monotonic() + 30
    while True:
        c = db.open_db(db_path)
        try:
            st = read_status(c)
            if st.running and st.detail.get("mqtt_connected"):
                break
        finally:
            c.close()
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise BenchError("the gateway with a PSK listener did not come up:\n"
                             + log.read_text(errors="replace")[-3000:])
        time.sleep(0.1)
    return proc, Stack(pki, "127.0.0.1", port, log, db_path), psk_port


def _settle(st: Stack, device: str, limit_s: float = 20.0) -> None:
    """What a node's sleep gives the gateway before its next wake. The sim's sleep takes no
    real time, so the bench waits for what the gateway does between two real wakes: a key
    the node has stored is activated on the gateway's next pass and written to the broker's
    psk_file (a wake before the broker's reload would find its key refused, then replaced
    over the certificate a few wakes later); a stale key leaves the broker once the node's
    awake window has passed, and a fresh key is queued on a later pass. Returns when the
    next wake finds a settled state: a key queued and not yet delivered, or an active key
    the broker holds."""
    psk_file = st.db_path.parent / "broker" / PSK_NAME
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        conn = db.open_db(st.db_path)
        try:
            row = session_keys.get(conn, device)
            delivered = False
            if row is not None and row.state == session_keys.QUEUED \
                    and row.command_id is not None:
                try:
                    delivered = dq.get(conn, device, row.command_id).status not in dq.ACTIVE
                except dq.QueueError:
                    delivered = True  # the row goes on the next pass
        finally:
            conn.close()
        if row is not None and (row.state == session_keys.UNSUPPORTED or (
                row.state == session_keys.QUEUED and not delivered)):
            return
        if row is not None and row.state == session_keys.ACTIVE:
            try:
                if any(line.split(":", 1)[0] == device
                       for line in psk_file.read_text().splitlines()):
                    time.sleep(0.3)  # the broker's reload after the file's rewrite
                    return
            except FileNotFoundError:
                pass
        time.sleep(0.05)
    raise BenchError(f"{device}: the gateway's session key did not settle in {limit_s:g} s "
                     f"(state {row.state if row else None})")


def measure(tmp: Path, p: BoardProfile, awake_scale: float) -> dict[str, Any]:
    """Both paths on profile `p` in one run; the figures as a JSON-able dict."""
    t0 = time.monotonic()
    proc, st, _ = _gateway(tmp, [d for _, d in PATHS])
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for path, device in PATHS:
            node = SimNode(tmp / device, seed=5, time_scale=0, start_ms=START_MS,
                           field=FieldModel(p, awake_scale=awake_scale))
            provision(node, node_config(st, device, 1, sample_interval_s=300, align_s=0),
                      st.pki, device)
            want = 1 if path == "psk" else 0
            got: list[dict[str, Any]] = []
            # The first wake (power-on) and, for PSK, the wakes until the key has arrived
            # are not routine: at most 4 of them, then ROUTINE_WAKES routine ones.
            for _ in range(4 + ROUTINE_WAKES):
                before = len(_runs((node.dir / "node.log").read_text(errors="replace"))
                             if (node.dir / "node.log").exists() else [])
                asyncio.run(node.run(1, wall_limit_s=60))
                if path == "psk":
                    _settle(st, device)
                new = _runs((node.dir / "node.log").read_text(errors="replace"))[before:]
                if before == 0:
                    continue
                got += [r for r in new if r["t"].get("session") == want and r["t"].get("sent")]
                if len(got) >= ROUTINE_WAKES:
                    break
            if len(got) < ROUTINE_WAKES:
                raise BenchError(f"{device}: {len(got)} routine {path} wakes of {ROUTINE_WAKES}; "
                                 f"see {node.dir / 'node.log'}")
            runs[path] = got[:ROUTINE_WAKES]
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    radio_ma = p.cpu_active_ma + p.radio_listen_ma
    out: dict[str, Any] = {"board": p.name, "routine_wakes": ROUTINE_WAKES}
    for path, rows in runs.items():
        n = len(rows)
        chip_ms = sum(r["ledger"]["tls"][0] for r in rows) / n
        chip_uah = sum(r["ledger"]["tls"][1] for r in rows) / n
        assoc_ms = sum(r["ledger"].get("assoc", (0, 0.0))[0] for r in rows) / n
        # The connect step's wall time minus the charged (compressed) association and
        # handshake: the loopback round trips of TCP, TLS and MQTT CONNECT/CONNACK.
        wire_ms = max(0.0, sum(r["t"]["connect"] for r in rows) / n
                      - (assoc_ms + chip_ms) / awake_scale)
        wake_uah = sum(sum(v[1] for k, v in r["ledger"].items() if k != "sleep")
                       for r in rows) / n
        out[path] = {
            "handshake_chip_ms": round(chip_ms),
            "connect_wire_ms": round(wire_ms, 1),
            "setup_uah": round(chip_uah + wire_ms * radio_ma / 3600.0, 3),
            "bytes_setup": round(sum(r["t"]["conn_bytes"] for r in rows) / n),
            "bytes_wake": round(sum(r["t"]["bytes_out"] + r["t"]["bytes_in"] for r in rows) / n),
            "uah_sending_wake": round(wake_uah, 3),
        }
    ratio = out["psk"]["setup_uah"] / out["mtls"]["setup_uah"]
    out["setup_ratio"] = round(ratio, 4)
    out["setup_target"] = f"<= {TARGET_SETUP_FRACTION:g} of mutual TLS"
    out["setup_target_met"] = ratio <= TARGET_SETUP_FRACTION
    out["wake_ratio"] = round(out["psk"]["uah_sending_wake"] / out["mtls"]["uah_sending_wake"], 4)
    out["model"] = (
        f"Chip handshake times from the {p.name} profile (tls_handshake_ms {p.tls_ms}; PSK: "
        f"{PSK_CPU_FRACTION:.3g} of it, the node CPU ratio measured in the unix port), at the "
        f"profile's radio-on current ({radio_ma:g} mA): a model, not a chip measurement. Wire "
        "time is loopback; bytes are what the node's socket counted (TCP/IP and radio framing "
        "come on top).")
    out["wall_s"] = round(time.monotonic() - t0, 1)
    return out


def table_rows(fig: dict[str, Any]) -> list[str]:
    rows = [f"session set-up of a routine send on the {fig['board']} profile, both paths in this run "
            f"({fig['routine_wakes']} routine wakes each):",
            "  path   handshake chip ms  wire ms  set-up µAh  bytes set-up  bytes wake  µAh sending wake"]
    for path in ("mtls", "psk"):
        f = fig[path]
        rows.append(f"  {path:6} {f['handshake_chip_ms']:17}  {f['connect_wire_ms']:7.1f}  "
                    f"{f['setup_uah']:10.3f}  {f['bytes_setup']:12}  {f['bytes_wake']:10}  "
                    f"{f['uah_sending_wake']:16.3f}")
    rows.append(f"  PSK set-up / mutual-TLS set-up: {fig['setup_ratio']:.3f} (target {fig['setup_target']}: "
                f"{'met' if fig['setup_target_met'] else 'not met'}); whole sending wake: "
                f"{fig['wake_ratio']:.3f}")
    rows.append(f"  {fig['model']}")
    return rows
