"""`torpor bench gateway`: end-to-end gateway figures against baselines from the same run.

Everything runs on loopback and is started here in a temporary folder: a fleet PKI with
one certificate per simulated node, Mosquitto with the gateway's rendered mutual-TLS
configuration, a plain Mosquitto standing in for the upstream broker, and the gateway
itself as a `torpor gateway run --config ...` process with the upstream relay on. The
load comes from other processes (tools.bench.loadgen), one mTLS connection per node.

Figures (docs/benchmarks.md says what each one means):
- throughput: readings committed to SQLite AND acknowledged by the upstream broker (the
  outbox drained) per second, against a bare aiomqtt subscriber counting the same frames;
- latency at a fixed offered rate: publish -> ACK at the node, publish -> upstream copy;
- wake sessions (connect, HELLO, BURST, ACK, SLEEP_NOW, disconnect) against bare mTLS
  connect + CONNACK + disconnect.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import signal
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.bench.loadgen import Identity, WorkerSpec, worker

ROOT = Path(__file__).resolve().parents[2]
# Readings per BURST frame: a node's batch. The firmware sends its queue in bursts of at
# most 255 readings (firmware/app.py MAX_READINGS) once `send_every` (default 10) readings
# are queued; 64 is the protocol benchmark's series (about an hour at one reading a
# minute, or a backlog after a missed wake). `--readings-per-frame` sets it; every figure
# in readings is frames times this, stated in the output.
READINGS_PER_BURST = 64
WAKE_INTERVAL_S = 300.0
START_TIMEOUT_S = 20.0
_SPAWN = mp.get_context("spawn")

TARGETS = {
    "ingest_readings_per_s": ">= 1000000",
    "ratio_to_bare": ">= 1.0",
    "latency_p99_ms": "< 10",
    "session_ratio": ">= 0.7",
}


def met(targets: dict[str, str], fig: dict[str, Any]) -> dict[str, bool | None]:
    """Each target against the run's figure (None when the figure is missing)."""
    out: dict[str, bool | None] = {}
    for key, rule in targets.items():
        value = fig.get(key)
        op, _, bound = rule.partition(" ")
        if not isinstance(value, int | float):
            out[key] = None
        elif op == ">=":
            out[key] = value >= float(bound)
        elif op == "<":
            out[key] = value < float(bound)
        else:
            raise ValueError(f"unknown target rule {rule!r}")
    return out


@dataclass(frozen=True, slots=True)
class Scale:
    devices: int = 200
    frames_per_device: int = 40
    window: int = 8
    workers: int = 2
    latency_devices: int = 50
    latency_rate_readings_per_s: float = 50000.0
    latency_duration_s: float = 5.0
    session_concurrency: int = 8
    session_duration_s: float = 2.0
    phase_deadline_s: float = 120.0
    rounds: int = 3  # baseline/gateway pairs; the figures are the rounds' medians
    readings_per_frame: int = READINGS_PER_BURST


QUICK = Scale(devices=8, frames_per_device=6, workers=1, latency_devices=4,
              latency_rate_readings_per_s=5000.0, latency_duration_s=1.0, session_concurrency=2, session_duration_s=0.8,
              phase_deadline_s=30.0, rounds=1)


class BenchError(Exception):
    """The benchmark could not run (a part did not start, a phase did not finish)."""


# --- processes we start -----------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_s(pid: int | None, tid: int | None = None) -> float:
    """User + system CPU seconds of a process, or of one of its threads (Linux /proc)."""
    if pid is None:
        return 0.0
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(pid: int | None) -> float:
    """CPU seconds of a process and its children, recursively (the gateway's relay runs
    in a child process of its own)."""
    if pid is None:
        return 0.0
    total = _cpu_s(pid)
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return total
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        total += sum(_tree_cpu_s(int(c)) for c in children)
    return total


class Mosquitto:
    """One mosquitto child: the gateway's mTLS configuration, or plain MQTT (upstream)."""

    def __init__(self, folder: Path, pki: Any | None) -> None:
        self.folder = folder
        self.pki = pki
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = folder / "mosquitto.log"

    def start(self) -> None:
        from gateway.transport import broker as gwbroker

        self.folder.mkdir(parents=True, exist_ok=True)
        if self.pki is not None:
            settings = gwbroker.BrokerSettings(host="127.0.0.1", port=self.port, dynsec_plugin=None)
            # The baseline subscriber has an identity of its own: the broker gives every
            # connection its certificate's CN as client id, so with the gateway's it would
            # take the gateway's session.
            conf = gwbroker.write_config(settings, self.pki, self.folder,
                                         extra_acl=f"\nuser {BARE_ID}\ntopic read torpor/+/bare\n")
        else:
            conf = self.folder / "mosquitto.conf"
            conf.write_text(
                f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                "max_queued_messages 100000\nset_tcp_nodelay true\nlog_dest stderr\n"
                "log_type error\nlog_type warning\n"
            )
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([gwbroker.find_mosquitto(), "-c", str(conf)],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            try:
                if self._probe() == 0:
                    return
            except (OSError, ssl.SSLError, ConnectionError):
                pass
            time.sleep(0.05)
        raise BenchError("mosquitto did not accept a connection in time")

    def _probe(self) -> int:
        from gateway.transport import broker as gwbroker

        ctx = gwbroker.client_ssl_context(self.pki) if self.pki is not None else None
        return gwbroker.mqtt_probe("127.0.0.1", self.port, ctx, 2.0)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Gateway:
    """`torpor gateway run --config` as a child process (optionally under cProfile)."""

    def __init__(self, folder: Path, broker: Mosquitto, upstream: Mosquitto,
                 profile: Path | None = None, ingest: str = "",
                 relay_process: bool = False) -> None:
        assert broker.pki is not None
        self.folder = folder
        self.db_path = folder / "data" / "gateway.db"
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "gateway.toml"
        self.config.write_text(
            f'[gateway]\ndata_dir = "{folder / "data"}"\nstatus_interval_s = 0.5\n'
            'log_level = "warning"\n'
            f'[broker]\nmode = "external"\nhost = "127.0.0.1"\nport = {broker.port}\n'
            f'pki_dir = "{broker.pki.path}"\n'
            # The benchmark's nodes send far faster than a real one may.
            f'[ingest]\nrate_limit_frames_per_min = 1000000\n{ingest}'
            f'[upstream]\nenabled = true\nhost = "127.0.0.1"\nport = {upstream.port}\n'
            'tls = false\nclient_id = "torpor-bench-relay"\n'
            f'process = {str(relay_process).lower()}\n'
        )
        self.profile = profile
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = folder / "gateway.log"

    def start(self) -> None:
        cmd = [sys.executable]
        if self.profile is not None:
            cmd += ["-m", "cProfile", "-o", str(self.profile)]
        cmd += ["-m", "tools.cli", "gateway", "run", "--config", str(self.config)]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=out, cwd=ROOT,
                                         stdin=subprocess.DEVNULL)
        from gateway.store import db
        from gateway.store.status import read_status

        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the gateway exited: {self.log.read_text()[-2000:]}")
            conn = db.connect(self.db_path, readonly=True)
            try:
                st = read_status(conn)
                if st.running and st.detail.get("mqtt_connected") and st.detail.get("relay_connected"):
                    return
            except sqlite3.Error:
                pass
            finally:
                conn.close()
            time.sleep(0.05)
        raise BenchError(f"the gateway did not come up: {self.log.read_text()[-2000:]}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Progress:
    """Readings committed and outbox depth, read from the gateway's database."""

    def __init__(self, db_path: Path) -> None:
        from gateway.store import db

        self.conn = db.connect(db_path, readonly=True)

    def read(self) -> tuple[int, int]:
        from gateway.store import readings

        total = readings.total(self.conn)
        depth = int(self.conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
        return total, depth

    def close(self) -> None:
        self.conn.close()


# --- the load processes -----------------------------------------------------------------

def stop_run(gw: Gateway | None, brokers: Iterable[Mosquitto | None], tmp: Path,
             owned: bool) -> None:
    """A bench run's end: its gateway, then its brokers, then the folder it made (`owned`)."""
    if gw is not None:
        gw.stop()
    for b in brokers:
        if b is not None:
            b.stop()
    if owned:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_workers(specs: list[WorkerSpec], deadline_s: float,
                 extra: list[tuple[Any, ...]] | None = None,
                 on_go: Any = None) -> tuple[list[dict[str, Any]], Any]:
    """Start one process per spec (and `extra` (target, args) processes that put one
    ready message and one result), wait until all are ready, start them together, and
    collect their results. `on_go()` runs right after the start signal, in this process,
    and its value is returned."""
    ready = _SPAWN.Queue()
    results = _SPAWN.Queue()
    go = _SPAWN.Event()
    procs = [_SPAWN.Process(target=worker, args=(s, ready, go, results), daemon=True)
             for s in specs]
    for target, *args in extra or []:
        procs.append(_SPAWN.Process(target=target, args=(*args, ready, go, results), daemon=True))
    for proc in procs:
        proc.start()
    try:
        deadline = time.monotonic() + deadline_s
        for _ in procs:
            kind, detail = ready.get(timeout=max(0.1, deadline - time.monotonic()))
            if kind != "ready":
                raise BenchError(f"a load process failed to start: {detail}")
        go.set()
        observed = on_go() if on_go is not None else None
        out = [results.get(timeout=max(0.1, deadline - time.monotonic())) for _ in procs]
    except Exception as exc:
        if isinstance(exc, BenchError):
            raise
        raise BenchError(f"load processes did not finish: {type(exc).__name__}: {exc}") from exc
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    for r in out:
        if "error" in r:
            raise BenchError(f"a load process failed: {r['error']}")
    return out, observed


def bare_subscriber(host: str, port: int, ca: str, cert: str, key: str, expected: int,
                    deadline_s: float, ready: Any, go: Any, results: Any) -> None:
    """The baseline: an aiomqtt client with the gateway's client settings (and an identity
    of its own) that subscribes to every node's baseline leaf (torpor/+/bare, as the gateway does to
    torpor/+/up) at QoS 1 and only counts frames."""
    import aiomqtt

    async def main() -> dict[str, Any]:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        ctx.load_cert_chain(cert, key)
        async with aiomqtt.Client(host, port, identifier="torpor-bench-bare", tls_context=ctx,
                                  keepalive=30, max_inflight_messages=200) as client:
            await client.subscribe("torpor/+/bare", qos=1)
            ready.put(("ready", 1))
            cpu0 = time.process_time()
            count = 0
            last = 0.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline_s):
                    async for message in client.messages:
                        if isinstance(message.payload, bytes | bytearray):
                            count += 1
                            last = time.monotonic()
                            if count >= expected:
                                break
            return {"frames": count, "t_last": last, "cpu_s": time.process_time() - cpu0}

    try:
        results.put(asyncio.run(main()))
    except BaseException as exc:  # reported to the parent
        ready.put(("error", f"{type(exc).__name__}: {exc}"))
        results.put({"error": f"{type(exc).__name__}: {exc}"})


def broker_subscriber(host: str, port: int, ca: str, cert: str, key: str, expected: int,
                      deadline_s: float, folder: str, ready: Any, go: Any, results: Any) -> None:
    """The ceiling: Mosquitto's own QoS 1 pass-through, i.e. the same frames delivered to
    mosquitto_sub (C, libmosquitto) that subscribes like the bare subscriber and does
    nothing with them. Its debug lines (line-buffered into a file) say when the
    subscription is in place; it exits after `expected` frames, and that exit is the time
    of the last frame."""
    from gateway.transport import broker as gwbroker

    out_path = Path(folder) / f"mosquitto_sub-{time.monotonic_ns()}.log"
    sub = Path(gwbroker.find_mosquitto()).with_name("mosquitto_sub")
    cmd = ["stdbuf", "-oL", str(sub) if sub.exists() else "mosquitto_sub",
           "-h", host, "-p", str(port), "--cafile", ca, "--cert", cert, "--key", key,
           "-i", "torpor-bench-broker", "-t", "torpor/+/bare", "-q", "1",
           "-C", str(expected), "-W", str(int(deadline_s)), "-d", "-F", ""]
    try:
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        try:
            limit = time.monotonic() + START_TIMEOUT_S
            while b"received SUBACK" not in out_path.read_bytes()[:4096]:
                if proc.poll() is not None or time.monotonic() > limit:
                    raise BenchError(f"mosquitto_sub did not subscribe: "
                                     f"{out_path.read_bytes()[:500]!r}")
                time.sleep(0.01)
            ready.put(("ready", 1))
            code = proc.wait(deadline_s + 5)
            last = time.monotonic()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        frames = out_path.read_bytes().count(b"received PUBLISH")
        results.put({"frames": frames if code == 0 else min(frames, expected - 1),
                     "t_last": last, "broker": True})
    except BaseException as exc:  # reported to the parent
        ready.put(("error", f"{type(exc).__name__}: {exc}"))
        results.put({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        with contextlib.suppress(OSError):
            out_path.unlink()


def fsync_latencies(folder: Path, count: int = 200) -> list[float]:
    """The floor under every ACK: seconds per append + fsync of a file beside the
    gateway's database (a WAL commit with synchronous=FULL is one such write and fsync)."""
    path = folder / "fsync-probe"
    out: list[float] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        block = b"\0" * 4096
        for _ in range(count):
            t = time.perf_counter()
            os.write(fd, block)
            os.fsync(fd)
            out.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        path.unlink()
    return out


def _split(items: list[Identity], n: int) -> list[tuple[Identity, ...]]:
    n = max(1, min(n, len(items)))
    return [tuple(items[k::n]) for k in range(n)]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 2)


# --- the benchmark ----------------------------------------------------------------------

def _median(rounds: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def _rate(results: list[dict[str, Any]]) -> float:
    """Sessions or handshakes per second over a phase's workers."""
    span = max(r["t_end"] for r in results) - min(r["t_start"] for r in results)
    return sum(r["count"] for r in results) / span if span > 0 else 0.0


BARE_ID = "torpor-bench-bare"


def _bare_round(scale: Scale, shares: list[tuple[Identity, ...]], base: dict[str, Any],
                gwc: Any, broker: Mosquitto, ca: str, expected: int) -> dict[str, float]:
    """The baseline: the same bursts from the same identities, counted by a bare aiomqtt
    subscriber with a certificate of its own (BARE_ID)."""
    specs = [WorkerSpec("burst", devices=s, frames=scale.frames_per_device, leaf="bare",
                        window=scale.window, **base) for s in shares]
    bare = (bare_subscriber, "127.0.0.1", broker.port, ca, str(gwc.cert_pem),
            str(gwc.key_pem), expected, scale.phase_deadline_s)
    cpu0 = _cpu_s(broker.pid)
    out, _ = _run_workers(specs, scale.phase_deadline_s + 10, extra=[bare])
    # results come in finishing order; the subscriber's is the one with `t_last`
    gens = [r for r in out if "t_last" not in r]
    sub = next(r for r in out if "t_last" in r)
    t0 = min(g["t_start"] for g in gens)
    sent = sum(g["frames"] for g in gens)
    if sub["frames"] < sent:
        raise BenchError(f"the bare subscriber saw {sub['frames']} of {sent} frames")
    return {
        "bare_fps": sub["frames"] / (sub["t_last"] - t0),
        "bare_cpu_s": sub["cpu_s"],
        "loadgen_fps": sent / (max(g["t_end"] for g in gens) - t0),
        "broker_cpu_s_bare": _cpu_s(broker.pid) - cpu0,
    }


def _broker_round(scale: Scale, shares: list[tuple[Identity, ...]], base: dict[str, Any],
                  gwc: Any, broker: Mosquitto, ca: str, expected: int) -> dict[str, float]:
    """The ceiling: the same bursts from the same identities to torpor/<id>/bare, taken by
    mosquitto_sub (C) with the baseline's certificate: what Mosquitto itself passes
    through at QoS 1 on this machine with this load generator beside it."""
    specs = [WorkerSpec("burst", devices=s, frames=scale.frames_per_device, leaf="bare",
                        window=scale.window, **base) for s in shares]
    sub = (broker_subscriber, "127.0.0.1", broker.port, ca, str(gwc.cert_pem),
           str(gwc.key_pem), expected, scale.phase_deadline_s, str(broker.folder))
    out, _ = _run_workers(specs, scale.phase_deadline_s + 10, extra=[sub])
    gens = [r for r in out if "t_last" not in r]
    got = next(r for r in out if "t_last" in r)
    sent = sum(g["frames"] for g in gens)
    if got["frames"] < sent:
        raise BenchError(f"mosquitto_sub saw {got['frames']} of {sent} frames")
    t0 = min(g["t_start"] for g in gens)
    return {"broker_fps": got["frames"] / (got["t_last"] - t0)}


def _gateway_round(scale: Scale, shares: list[tuple[Identity, ...]], base: dict[str, Any],
                   progress: Progress, next_id: dict[str, int], expected: int
                   ) -> dict[str, float]:
    """The gateway: bursts committed AND acknowledged upstream (the outbox drained).
    `next_id` carries each node's next message id from round to round."""
    specs = [WorkerSpec("burst", devices=s, frames=scale.frames_per_device,
                        window=scale.window, next_id={d.device: next_id.get(d.device, 1)
                                                      for d in s}, **base)
             for s in shares]
    before, _ = progress.read()
    want = before + expected * scale.readings_per_frame
    committed_at = [0.0]

    def watch() -> tuple[float, int, int]:
        deadline = time.monotonic() + scale.phase_deadline_s
        total, depth = before, 0
        while time.monotonic() < deadline:
            total, depth = progress.read()
            if total >= want and not committed_at[0]:
                committed_at[0] = time.monotonic()
            if total >= want and depth == 0:
                return time.monotonic(), total, depth
            time.sleep(0.01)
        return 0.0, total, depth

    out, (t_done, total, depth) = _run_workers(specs, scale.phase_deadline_s + 10,
                                              on_go=watch)
    sent = sum(g["frames"] for g in out)
    if not t_done or sent != expected:
        raise BenchError(
            f"the gateway stored {total - before} of {sent * scale.readings_per_frame} readings "
            f"(outbox depth {depth}) within {scale.phase_deadline_s:.0f}s")
    for g in out:
        next_id.update(g["next_id"])
    t0 = min(g["t_start"] for g in out)
    return {
        "ingest_fps": sent / (t_done - t0),
        "commit_fps": sent / (committed_at[0] - t0),
        "elapsed_s": t_done - t0,
        "acks": sum(g["acks"] for g in out),
    }


def measure(scale: Scale = Scale(), workdir: Path | None = None,
            profile: Path | None = None, batch_ms: float | None = None,
            relay_process: bool = False) -> dict[str, Any]:
    from gateway.security.pki import Pki
    from gateway.store import db
    from gateway.store import devices as registry

    owned = workdir is None
    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-gw-")) if workdir is None else workdir
    fig: dict[str, Any] = {"load_average_start": round(os.getloadavg()[0], 2)}
    broker: Mosquitto | None = None
    upstream: Mosquitto | None = None
    gw: Gateway | None = None
    try:
        t_setup = time.monotonic()
        pki = Pki(tmp / "pki")
        pki.init_ca()
        pki.issue_server(["localhost", "127.0.0.1"])
        pki.issue_gateway()
        names = [f"bench-{i:04d}" for i in range(scale.devices)]
        idents = []
        for name in names:
            creds = pki.issue_device(name)
            idents.append(Identity(name, str(creds.cert_pem), str(creds.key_pem)))
        broker = Mosquitto(tmp / "broker", pki)
        broker.start()
        upstream = Mosquitto(tmp / "upstream", None)
        upstream.start()
        gw = Gateway(tmp / "gateway", broker, upstream, profile,
                     "" if batch_ms is None else f"batch_max_ms = {batch_ms}\n",
                     relay_process)
        fig["relay_process"] = relay_process
        conn = db.open_db(gw.db_path)
        try:
            for name in names:
                registry.add(conn, name)
        finally:
            conn.close()
        fig["setup_s"] = round(time.monotonic() - t_setup, 2)
        ca = str(pki.ca_pem)
        base = {"host": "127.0.0.1", "port": broker.port, "ca": ca,
                "readings": scale.readings_per_frame,
                "deadline_s": scale.phase_deadline_s}
        shares = _split(idents, scale.workers)
        expected_frames = scale.devices * scale.frames_per_device
        fig["devices"] = scale.devices
        fig["frames_per_run"] = expected_frames
        fig["readings_per_frame"] = scale.readings_per_frame

        # 1.+2. throughput, in rounds that alternate the baseline and the gateway, so that
        #    a neighbour's load on the machine weighs on both alike; the figures are the
        #    rounds' medians. The baseline's frames go to another leaf of the same topic
        #    tree (torpor/<id>/bare, which the gateway does not subscribe to), so the
        #    gateway can run throughout without seeing them.
        gwc = pki.issue_device(BARE_ID)
        gw.start()
        progress = Progress(gw.db_path)
        try:
            rounds: list[dict[str, float]] = []
            next_id: dict[str, int] = {}
            cpu = {"gw": 0.0, "loop": 0.0, "children": 0.0, "broker": 0.0, "upstream": 0.0}
            acks_at_nodes = 0
            for _ in range(scale.rounds):
                one = _bare_round(scale, shares, base, gwc, broker, ca, expected_frames)
                one.update(_broker_round(scale, shares, base, gwc, broker, ca,
                                         expected_frames))
                cpu_gw0, cpu_b0, cpu_u0 = (_tree_cpu_s(gw.pid), _cpu_s(broker.pid),
                                           _cpu_s(upstream.pid))
                # The gateway's main thread runs the event loop (MQTT in and out, the
                # relay's publishes); the rest is mostly the database writer thread.
                cpu_loop0 = _cpu_s(gw.pid, gw.pid)
                cpu_children0 = _tree_cpu_s(gw.pid) - _cpu_s(gw.pid)
                got = _gateway_round(scale, shares, base, progress, next_id, expected_frames)
                cpu["gw"] += _tree_cpu_s(gw.pid) - cpu_gw0
                cpu["loop"] += _cpu_s(gw.pid, gw.pid) - cpu_loop0
                cpu["children"] += _tree_cpu_s(gw.pid) - _cpu_s(gw.pid) - cpu_children0
                cpu["broker"] += _cpu_s(broker.pid) - cpu_b0
                cpu["upstream"] += _cpu_s(upstream.pid) - cpu_u0
                acks_at_nodes += int(got.pop("acks"))
                one.update(got)
                one["ratio"] = one["ingest_fps"] / one["bare_fps"]
                one["ratio_broker"] = one["ingest_fps"] / one["broker_fps"]
                one["bare_ratio_broker"] = one["bare_fps"] / one["broker_fps"]
                rounds.append(one)
            sent = expected_frames * len(rounds)
            fig["rounds"] = len(rounds)
            fig["bare_subscriber_frames_per_s"] = round(_median(rounds, "bare_fps"), 1)
            fig["loadgen_frames_per_s"] = round(_median(rounds, "loadgen_fps"), 1)
            fig["broker_cpu_s_bare"] = round(sum(r["broker_cpu_s_bare"] for r in rounds), 2)
            # What the baseline itself costs per frame, to set beside the gateway's.
            fig["bare_subscriber_cpu_us_per_frame"] = round(
                1e6 * sum(r["bare_cpu_s"] for r in rounds) / sent)
            fig["ingest_frames_per_s"] = round(_median(rounds, "ingest_fps"), 1)
            fig["ingest_readings_per_s"] = round(
                fig["ingest_frames_per_s"] * scale.readings_per_frame)
            fig["ratio_to_bare"] = round(_median(rounds, "ratio"), 3)
            fig["ratio_to_bare_rounds"] = [round(r["ratio"], 3) for r in rounds]
            # The physical ceiling: Mosquitto's own QoS 1 pass-through to a C subscriber.
            fig["broker_passthrough_frames_per_s"] = round(_median(rounds, "broker_fps"), 1)
            fig["broker_passthrough_readings_per_s"] = round(
                fig["broker_passthrough_frames_per_s"] * scale.readings_per_frame)
            fig["ratio_to_broker"] = round(_median(rounds, "ratio_broker"), 3)
            fig["ratio_to_broker_rounds"] = [round(r["ratio_broker"], 3) for r in rounds]
            fig["bare_ratio_to_broker"] = round(_median(rounds, "bare_ratio_broker"), 3)
            # Commit alone (before the outbox drained): tells ingest from relay limits.
            fig["commit_only_readings_per_s"] = round(
                _median(rounds, "commit_fps") * scale.readings_per_frame)
            fig["acks_at_nodes_before_disconnect"] = acks_at_nodes
            fig["gateway_cpu_s"] = round(cpu["gw"], 2)
            fig["gateway_cpu_us_per_frame"] = round(1e6 * cpu["gw"] / sent)
            fig["gateway_loop_cpu_us_per_frame"] = round(1e6 * cpu["loop"] / sent)
            # The relay's own process (none without --relay-process).
            fig["relay_process_cpu_us_per_frame"] = round(1e6 * cpu["children"] / sent)
            fig["broker_cpu_s"] = round(cpu["broker"], 2)
            fig["upstream_broker_cpu_s"] = round(cpu["upstream"], 2)
            fig["ingest_elapsed_s"] = round(sum(r["elapsed_s"] for r in rounds), 2)

            # 3. latency at a fixed offered rate, and the disk's fsync beside it
            syncs = fsync_latencies(gw.folder / "data")
            fig["fsync_p50_ms"] = _ms(_pct(syncs, 0.5))
            fig["fsync_p99_ms"] = _ms(_pct(syncs, 0.99))
            lat_devs = idents[:scale.latency_devices]
            rate = scale.latency_rate_readings_per_s / scale.readings_per_frame
            spec = WorkerSpec("paced", devices=tuple(lat_devs), rate=rate,
                              duration_s=scale.latency_duration_s, upstream_port=upstream.port,
                              next_id={d.device: next_id[d.device] for d in lat_devs},
                              **base)  # type: ignore[arg-type]
            (lat,), _ = _run_workers([spec], scale.phase_deadline_s + 10)
            next_id.update(lat["next_id"])
            acks, ups = lat["ack_latency_s"], lat["upstream_latency_s"]
            fig["latency_offered_readings_per_s"] = scale.latency_rate_readings_per_s
            fig["latency_samples"] = len(acks)
            fig["latency_frames_sent"] = lat["frames"]
            fig["latency_p50_ms"] = _ms(_pct(acks, 0.5))
            fig["latency_p99_ms"] = _ms(_pct(acks, 0.99))
            fig["latency_max_ms"] = _ms(max(acks) if acks else None)
            fig["upstream_latency_samples"] = len(ups)
            fig["upstream_latency_p50_ms"] = _ms(_pct(ups, 0.5))
            fig["upstream_latency_p99_ms"] = _ms(_pct(ups, 0.99))

            # 4. wake sessions against bare handshakes, same concurrency and duration, in
            #    alternating rounds as above
            per_worker = max(1, scale.session_concurrency // len(shares))
            hs: list[dict[str, Any]] = []
            se: list[dict[str, Any]] = []
            session_rounds: list[dict[str, float]] = []
            cpu_hs = 0.0
            cpu_se = {"gw": 0.0, "broker": 0.0}
            for _ in range(scale.rounds):
                cpu_b0 = _cpu_s(broker.pid)
                hs_specs = [WorkerSpec("handshake", devices=s, concurrency=per_worker,
                                       duration_s=scale.session_duration_s, **base)  # type: ignore[arg-type]
                            for s in shares]
                hs_one, _ = _run_workers(hs_specs, scale.phase_deadline_s + 10)
                cpu_hs += _cpu_s(broker.pid) - cpu_b0
                se_specs = [WorkerSpec("session", devices=s, concurrency=per_worker,
                                       duration_s=scale.session_duration_s,
                                       next_id={d.device: next_id[d.device] for d in s},
                                       **base)  # type: ignore[arg-type]
                            for s in shares]
                cpu_g0, cpu_b0 = _tree_cpu_s(gw.pid), _cpu_s(broker.pid)
                se_one, _ = _run_workers(se_specs, scale.phase_deadline_s + 10)
                cpu_se["gw"] += _tree_cpu_s(gw.pid) - cpu_g0
                cpu_se["broker"] += _cpu_s(broker.pid) - cpu_b0
                for r in se_one:
                    next_id.update(r["next_id"])
                hs += hs_one
                se += se_one
                one = {"handshakes": _rate(hs_one), "sessions": _rate(se_one)}
                one["ratio"] = one["sessions"] / one["handshakes"] if one["handshakes"] else 0.0
                session_rounds.append(one)
            n_hs = sum(r["count"] for r in hs)
            fig["bare_handshakes_per_s"] = round(_median(session_rounds, "handshakes"), 1)
            fig["broker_cpu_ms_per_handshake"] = round(1000 * cpu_hs / n_hs, 2) if n_hs else None
            n_se = sum(r["count"] for r in se)
            # What one whole session costs each side (the load generator's TLS client work,
            # which a real node does itself, shares the machine with both).
            fig["broker_cpu_ms_per_session"] = round(1000 * cpu_se["broker"] / n_se, 2) if n_se else None
            fig["gateway_cpu_ms_per_session"] = round(1000 * cpu_se["gw"] / n_se, 2) if n_se else None
            fig["sessions_per_s"] = round(_median(session_rounds, "sessions"), 1)
            fig["session_ratio"] = round(_median(session_rounds, "ratio"), 3)
            fig["session_ratio_rounds"] = [round(r["ratio"], 3) for r in session_rounds]
            durations = [d for r in se for d in r["durations_s"]]
            fig["session_p50_ms"] = _ms(_pct(durations, 0.5))
            fig["session_errors"] = sum(r["error_count"] for r in se) + sum(
                r["error_count"] for r in hs)
            errors = [e for r in se + hs for e in r["errors"]]
            if errors:
                fig["session_error_examples"] = errors[:3]
            fig["nodes_per_gateway_at_5min_wake"] = int(fig["sessions_per_s"] * WAKE_INTERVAL_S)
            fig["session_concurrency"] = per_worker * len(shares)
        finally:
            progress.close()
    finally:
        stop_run(gw, (broker, upstream), tmp, owned)
    fig["cpus"] = os.cpu_count()
    # The machine may be shared: the 1-minute load average says how busy it was.
    fig["load_average_end"] = round(os.getloadavg()[0], 2)
    fig["targets"] = TARGETS
    fig["targets_met"] = met(TARGETS, fig)
    return fig


# --- output -----------------------------------------------------------------------------

SECTIONS = (
    ("throughput (committed + relayed upstream)", (
        "ingest_readings_per_s", "ingest_frames_per_s", "bare_subscriber_frames_per_s",
        "ratio_to_bare", "ratio_to_bare_rounds", "broker_passthrough_frames_per_s",
        "broker_passthrough_readings_per_s", "ratio_to_broker", "ratio_to_broker_rounds",
        "bare_ratio_to_broker", "commit_only_readings_per_s", "loadgen_frames_per_s",
        "acks_at_nodes_before_disconnect", "gateway_cpu_s", "gateway_cpu_us_per_frame",
        "bare_subscriber_cpu_us_per_frame", "broker_cpu_s_bare",
        "gateway_loop_cpu_us_per_frame", "relay_process_cpu_us_per_frame", "broker_cpu_s",
        "upstream_broker_cpu_s", "ingest_elapsed_s")),
    ("latency at a fixed offered rate", (
        "latency_offered_readings_per_s", "latency_samples", "latency_p50_ms", "latency_p99_ms",
        "latency_max_ms", "fsync_p50_ms", "fsync_p99_ms", "upstream_latency_samples", "upstream_latency_p50_ms",
        "upstream_latency_p99_ms")),
    ("wake sessions", (
        "sessions_per_s", "bare_handshakes_per_s", "session_ratio", "session_ratio_rounds", "session_p50_ms",
        "broker_cpu_ms_per_handshake", "broker_cpu_ms_per_session", "gateway_cpu_ms_per_session",
        "session_concurrency", "session_errors",
        "nodes_per_gateway_at_5min_wake")),
    ("run", ("devices", "frames_per_run", "rounds", "readings_per_frame", "relay_process", "cpus",
             "load_average_start", "load_average_end", "setup_s")),
)


def table(fig: dict[str, Any]) -> str:
    lines = []
    for title, keys in SECTIONS:
        lines.append(f"{title}")
        for key in keys:
            if key in fig:
                target = fig["targets"].get(key, "")
                if target:
                    ok = fig.get("targets_met", {}).get(key)
                    target += "  " + {True: "met", False: "NOT met", None: "not measured"}[ok]
                lines.append(f"  {key:36} {fig[key]!s:>12}  {target}")
    hs = fig.get("nodes_per_gateway_at_5min_wake")
    if hs is not None:
        lines.append("")
        lines.append(f"At one wake every {WAKE_INTERVAL_S / 60:.0f} minutes, {fig['sessions_per_s']} "
                     f"sessions/s serve about {hs:,} nodes per gateway (broker TLS handshake CPU: "
                     f"{fig.get('broker_cpu_ms_per_handshake')} ms each).")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    scale = QUICK if args.quick else Scale()
    if args.readings_per_frame:
        if not 1 <= args.readings_per_frame <= 255:
            print("torpor: error: --readings-per-frame must be 1 to 255 (a BURST's limit)",
                  file=sys.stderr)
            return 2
        scale = dataclasses.replace(scale, readings_per_frame=args.readings_per_frame)
    if args.devices:
        scale = dataclasses.replace(scale, devices=args.devices,
                                    latency_devices=min(scale.latency_devices, args.devices))
    try:
        fig = measure(scale, profile=Path(args.profile).resolve() if args.profile else None,
                      batch_ms=args.batch_ms, relay_process=args.relay_process)
    except BenchError as exc:
        print(f"torpor: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(fig) if args.json else table(fig))
    return 0


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "gateway", help="gateway throughput, latency and wake sessions against bare MQTT/TLS")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds), for smoke tests")
    parser.add_argument("--devices", type=int, default=0, help="node identities (default 200)")
    parser.add_argument("--readings-per-frame", type=int, default=0,
                        help=f"readings per BURST frame, a node's batch (default "
                             f"{READINGS_PER_BURST}; a node sends at most 255)")
    parser.add_argument("--relay-process", action="store_true",
                        help="run the upstream relay in a process of its own "
                             "([upstream] process = true) instead of the gateway's")
    parser.add_argument("--profile", metavar="FILE", default=None,
                        help="run the gateway under cProfile and write its stats to FILE")
    parser.add_argument("--batch-ms", type=float, default=None,
                        help="the gateway's [ingest] batch_max_ms (default: its own default)")
    parser.set_defaults(func=run)
