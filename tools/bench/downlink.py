"""`torpor bench downlink`: wake-to-first-downlink latency and gateway memory at fleet scale.

A real SQLite file holds N registered devices with 3 queued items each (two commands and a
configuration delta); the real gateway process (`torpor gateway run`) serves a real
Mosquitto with mutual TLS; a load generator plays `--nodes` waking nodes, each with its own
device certificate (a device is its certificate), publishing HELLO at `--rate` per second.
Measured: HELLO publish to the first COMMAND/SHADOW_DELTA received (p50/p99), with the same
HELLO's ACK latency as the baseline (the wake without downlink), and the gateway's RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt

from gateway import proto
from gateway.pipeline import downlink
from gateway.security.pki import Pki
from gateway.store import db
from gateway.store import devices as registry
from gateway.store import downlink_queue as q
from gateway.store import status as status_store
from gateway.transport import broker as gwbroker
from gateway.transport import topics

ROOT = Path(__file__).resolve().parents[2]
TARGET_RSS_MB = 500.0
TARGET_P99_MS = 20.0


def register(bsub: Any) -> None:
    p = bsub.add_parser("downlink", help="wake-to-first-downlink latency and gateway RSS at scale")
    p.add_argument("--devices", type=int, default=100_000, help="registered devices (default 100000)")
    p.add_argument("--nodes", type=int, default=200, help="nodes that wake (own certificates)")
    p.add_argument("--rate", type=float, default=100.0, help="HELLOs per second (default 100)")
    p.add_argument("--rounds", type=int, default=2, help="wakes per node (default 2)")
    p.add_argument("--seed", type=int, default=7,
                   help="random seed of the order in which nodes wake (default 7)")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_main)


def _pct(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(pct / 100.0 * len(s) + 0.5) - 1))]


def _rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, MB."""
    fields: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(rest.split()[0]) / 1024.0
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


def populate(db_path: Path, devices: int, woken: list[str]) -> dict[str, float]:
    """Register `devices` devices and queue 3 items for each, in one transaction."""
    t0 = time.perf_counter()
    conn = db.open_db(db_path)
    names = woken + [f"idle{i:06d}" for i in range(devices - len(woken))]
    now = time.time()
    with db.transaction(conn):
        for n in names:
            registry.add(conn, n, "sensor", now=now)
    t1 = time.perf_counter()
    with db.transaction(conn):
        q.enqueue_fleet(conn, names, "sync_time", [int(now)], priority=6, now=now)
        q.enqueue_fleet(conn, names, "ping", priority=2, now=now)
    t2 = time.perf_counter()
    # The configuration delta goes through the per-device API (what an operator runs).
    with db.transaction(conn):
        for n in names:
            q.set_config(conn, n, {"send_every": 5, "sample_interval_s": 120}, now=now)
    t3 = time.perf_counter()
    conn.close()
    return {"register_s": t1 - t0, "enqueue_fleet_s": t2 - t1, "set_config_s": t3 - t2}


def _start_broker(pki: Pki, folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    settings = gwbroker.BrokerSettings(host="127.0.0.1", port=port, max_inflight_messages=200)
    gwbroker.write_config(settings, pki, folder)
    log = open(folder / "mosquitto.log", "ab")  # noqa: SIM115 - lives as long as the broker
    proc = subprocess.Popen([gwbroker.find_mosquitto(), "-c", str(folder / gwbroker.CONFIG_NAME)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    ctx = gwbroker.client_ssl_context(pki)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ssl.SSLError, ConnectionError):
            if gwbroker.mqtt_probe("127.0.0.1", port, ctx, 1.0) == 0:
                return proc, port
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("mosquitto did not come up")


def _wait_gateway(db_path: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the gateway exited at start")
        conn = db.connect(db_path)
        try:
            st = status_store.read_status(conn)
            if st.running and st.detail.get("mqtt_connected"):
                return
        finally:
            conn.close()
        time.sleep(0.1)
    raise RuntimeError("the gateway did not come up")


class _Node:
    def __init__(self, pki: Pki, device: str, port: int) -> None:
        creds = pki.device_credentials(device)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_pem))
        ctx.load_cert_chain(str(creds.cert_pem), str(creds.key_pem))
        self.device = device
        self.client = aiomqtt.Client("127.0.0.1", port, identifier=device, tls_context=ctx,
                                     timeout=20)
        self.sent_at = 0.0
        self.ack_ms: list[float] = []
        self.first_ms: list[float] = []
        self.got_first = True
        self.done = asyncio.Event()
        self.answer = False
        self.items = 0

    async def read(self) -> None:
        async for m in self.client.messages:
            assert isinstance(m.payload, bytes | bytearray)
            t = time.perf_counter()
            f = proto.decode(bytes(m.payload))
            if isinstance(f, proto.Ack):
                self.ack_ms.append((t - self.sent_at) * 1000)
            elif isinstance(f, proto.Command | proto.ShadowDelta):
                self.items += 1
                if not self.got_first:
                    self.got_first = True
                    self.first_ms.append((t - self.sent_at) * 1000)
                if self.answer and isinstance(f, proto.Command):
                    await self.client.publish(topics.up(self.device), proto.encode_command_result(
                        proto.CommandResult(f.command_id, f.command_id, proto.ResultStatus.OK)), qos=1)
                elif self.answer and isinstance(f, proto.ShadowDelta):
                    await self.client.publish(topics.up(self.device), proto.encode_shadow_report(
                        proto.ShadowReport(1, f.config_version, f.entries)), qos=1)
            elif isinstance(f, proto.SleepNow):
                self.done.set()

    async def wake(self, msg_id: int, answer: bool) -> None:
        hello = proto.encode_hello(proto.Hello(
            msg_id, 1, proto.BootCause.TIMER, 3300, -60, 40_000, 0, 0, 600, 2000,
            int(time.time()), proto.DeviceClass.SENSOR))
        self.done.clear()
        self.got_first = False
        self.answer = answer
        self.sent_at = time.perf_counter()
        await self.client.publish(topics.up(self.device), hello, qos=0)
        await asyncio.wait_for(self.done.wait(), 30)


async def _load(pki: Pki, port: int, names: list[str], rate: float, rounds: int,
                seed: int) -> list[_Node]:
    nodes = [_Node(pki, n, port) for n in names]
    async with contextlib.AsyncExitStack() as stack:
        sem = asyncio.Semaphore(20)

        async def connect(node: _Node) -> None:
            async with sem:
                await stack.enter_async_context(node.client)
                await node.client.subscribe(topics.down(node.device), qos=1)

        await asyncio.gather(*(connect(n) for n in nodes))
        readers = [asyncio.create_task(n.read()) for n in nodes]
        rng = random.Random(seed)
        for r in range(rounds):
            order = list(nodes)
            rng.shuffle(order)
            wakes = []
            start = time.perf_counter()
            for i, node in enumerate(order):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                wakes.append(asyncio.create_task(node.wake(r + 1, answer=r == rounds - 1)))
            await asyncio.gather(*wakes)
        await asyncio.sleep(0.5)  # the last results reach the gateway
        for t in readers:
            t.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    return nodes


def _plan_cost(db_path: Path, names: list[str]) -> list[float]:
    """The gateway's own share of a wake: planning one node's downlink on this database
    (expire, select, encode, mark sent, wake statistics), rolled back afterwards."""
    conn = db.connect(db_path)
    dl = downlink.Downlink()
    h = proto.Hello(1, 1, proto.BootCause.TIMER, 3300, -60, 40_000, 0, 0, 600, 2000,
                    int(time.time()), proto.DeviceClass.SENSOR)
    out = []
    try:
        for n in names:
            conn.execute("BEGIN IMMEDIATE")
            t = time.perf_counter()
            dl.plan(conn, [(n, h)], time.time())
            out.append((time.perf_counter() - t) * 1000)
            conn.execute("ROLLBACK")
    finally:
        conn.close()
    return out


def run_bench(devices: int, nodes: int, rate: float, rounds: int, seed: int,
              work: Path) -> dict[str, Any]:
    pki = Pki(work / "pki")
    pki.init_ca()
    pki.issue_server(["localhost", "127.0.0.1"])
    pki.issue_gateway()
    names = [f"node{i:04d}" for i in range(nodes)]
    t0 = time.perf_counter()
    for n in names:
        pki.issue_device(n)
    certs_s = time.perf_counter() - t0
    db_path = work / "data" / "gateway.db"
    timings = populate(db_path, devices, names)
    broker, port = _start_broker(pki, work / "broker")
    cfg = work / "gateway.toml"
    cfg.write_text(
        f'[gateway]\ndata_dir = "{work / "data"}"\nstatus_interval_s = 1.0\nlog_level = "warning"\n'
        f'[broker]\nmode = "external"\nhost = "127.0.0.1"\nport = {port}\npki_dir = "{pki.path}"\n')
    log = open(work / "gateway.log", "ab")  # noqa: SIM115 - lives as long as the gateway
    gw = subprocess.Popen([sys.executable, "-m", "tools.cli", "gateway", "run", "--config", str(cfg)],
                          stdout=log, stderr=log, cwd=ROOT)
    try:
        t0 = time.perf_counter()
        _wait_gateway(db_path, gw)
        start_s = time.perf_counter() - t0
        rss_idle, _ = _rss_mb(gw.pid)
        woke = asyncio.run(_load(pki, port, names, rate, rounds, seed))
        rss, hwm = _rss_mb(gw.pid)
    finally:
        gw.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            gw.wait(15)
        if gw.poll() is None:
            gw.kill()
        broker.terminate()
        broker.wait(10)
    plan_ms = _plan_cost(db_path, [f"idle{i:06d}" for i in range(min(500, devices - nodes))])
    conn = db.connect(db_path)
    try:
        status = dict(conn.execute(
            "SELECT status, count(*) FROM downlink_items WHERE device LIKE 'node%' GROUP BY status"
        ).fetchall())
        queued = conn.execute("SELECT count(*) FROM downlink_items").fetchone()[0]
    finally:
        conn.close()
    first = [x for n in woke for x in n.first_ms]
    acks = [x for n in woke for x in n.ack_ms]
    return {
        "devices": devices,
        "queued_items": int(queued),
        "waking_nodes": nodes,
        "wakes": len(acks),
        "hello_rate_per_s": rate,
        "items_delivered": sum(n.items for n in woke),
        "woken_items_by_status": status,
        "wake_to_first_downlink_p50_ms": round(_pct(first, 50), 2),
        "wake_to_first_downlink_p99_ms": round(_pct(first, 99), 2),
        "wake_to_first_downlink_max_ms": round(max(first, default=float("nan")), 2),
        "plan_one_wake_p50_ms": round(_pct(plan_ms, 50), 3),
        "plan_one_wake_p99_ms": round(_pct(plan_ms, 99), 3),
        "baseline_hello_to_ack_p50_ms": round(_pct(acks, 50), 2),
        "baseline_hello_to_ack_p99_ms": round(_pct(acks, 99), 2),
        "gateway_rss_mb": round(rss, 1),
        "gateway_peak_rss_mb": round(hwm, 1),
        "gateway_rss_idle_mb": round(rss_idle, 1),
        "gateway_start_s": round(start_s, 2),
        "db_mb": round(db_path.stat().st_size / 1e6, 1),
        "issue_certs_s": round(certs_s, 2),
        **{k: round(v, 2) for k, v in timings.items()},
        "targets": {"gateway_rss_mb": TARGET_RSS_MB, "wake_to_first_downlink_p99_ms": TARGET_P99_MS},
    }


def _main(args: argparse.Namespace) -> int:
    if args.nodes > args.devices:
        print("torpor: error: --nodes cannot exceed --devices", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="torpor-bench-downlink-"))
    try:
        res = run_bench(args.devices, args.nodes, args.rate, args.rounds, args.seed, work)
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        ok_rss = res["gateway_rss_mb"] < TARGET_RSS_MB
        ok_p99 = res["wake_to_first_downlink_p99_ms"] < TARGET_P99_MS
        print(f"downlink: {res['devices']} devices, {res['queued_items']} queued items, "
              f"{res['waking_nodes']} nodes waking at {res['hello_rate_per_s']:g}/s, "
              f"{res['wakes']} wakes")
        print(f"{'figure':<34} {'p50':>9} {'p99':>9}  target")
        print(f"{'wake -> first downlink (ms)':<34} {res['wake_to_first_downlink_p50_ms']:>9.2f} "
              f"{res['wake_to_first_downlink_p99_ms']:>9.2f}  < {TARGET_P99_MS:g} "
              f"{'ok' if ok_p99 else 'MISSED'}")
        print(f"{'baseline: hello -> ack (ms)':<34} {res['baseline_hello_to_ack_p50_ms']:>9.2f} "
              f"{res['baseline_hello_to_ack_p99_ms']:>9.2f}")
        print(f"{'downlink planning, one wake (ms)':<34} {res['plan_one_wake_p50_ms']:>9.3f} "
              f"{res['plan_one_wake_p99_ms']:>9.3f}")
        print(f"{'gateway RSS (MB) now / peak':<34} {res['gateway_rss_mb']:>9.1f} "
              f"{res['gateway_peak_rss_mb']:>9.1f}  < {TARGET_RSS_MB:g} {'ok' if ok_rss else 'MISSED'}")
        print(f"set-up: register {res['register_s']}s, enqueue_fleet {res['enqueue_fleet_s']}s, "
              f"set_config {res['set_config_s']}s, db {res['db_mb']} MB, gateway start "
              f"{res['gateway_start_s']}s; woken items: {res['woken_items_by_status']}")
    return 0
