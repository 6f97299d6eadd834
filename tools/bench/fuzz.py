"""`torpor bench fuzz`: random, mutated and boundary frames from a device with a valid
certificate, through the real broker to the real gateway, while well-behaved nodes keep
sending bursts and timing their ACKs.

Everything runs on loopback in a temporary folder: a fleet PKI, Mosquitto with the
gateway's rendered mutual-TLS configuration, and `torpor gateway run --config ...` as a
process. The attack's frames come from the spec (tools.proto.spec): every frame type with
its fields at their limits (integers at both ends of their type, enums, empty and full
strings, bytes and arrays, series of 1 and of the most readings, message ids 0, 1 and
2^32 - 1), then mutations of those (bit flips, truncation, junk, spliced headers, overlong
varints) and random bytes. The attackers are devices of their own: when the gateway
quarantines one (it answers ERROR quarantined), the fuzzer releases it as an operator
would (`torpor device release`) and goes on with the next one, so the decoder keeps
seeing frames. Bounded in frames and in time.

Pass: no ingest restart, no traceback in the gateway's log, every well-behaved node's
ACK within its awake window and every reading it sent stored, the gateway's memory
bounded, every attacker dead-lettered, and the last one quarantined at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import random
import shutil
import signal
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import proto
from tools.bench.loadgen import MqttConn, MqttError

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 20.0
U32 = (1 << 32) - 1  # message ids are the header's u32 (the spec's frame header)


class FuzzError(Exception):
    """The fuzz run could not be set up or ran out of time."""


@dataclass(frozen=True, slots=True)
class FuzzConfig:
    frames: int = 20_000  # attack frames to publish
    duration_s: float = 60.0  # and at most this long
    nodes: int = 4  # well-behaved nodes
    attackers: int = 3  # attacker identities (released in turn when quarantined)
    seed: int = 1
    window: int = 256  # attack publishes awaiting their PUBACK
    ahead: int = 200  # attack frames published but not yet taken in by the gateway
    node_period_s: float = 0.05  # a well-behaved node's pause between bursts
    baseline_s: float = 2.0  # the nodes alone first: their ACK delays without the attack
    awake_window_ms: int = 2000  # the nodes' window: their ACK must come within it
    malformed_threshold: int = 1000  # the gateway's, for this run (see the module doc)
    rss_bound_mb: float = 128.0  # the gateway's growth in resident memory that passes


# ------------------------------------------------------------------ frames from the spec

def _camel(name: str) -> str:
    return "".join(p.capitalize() for p in name.lower().split("_"))


class Corpus:
    """Frames with every field at its limits, built from the spec through the generated
    encoder (combinations the encoder refuses are skipped and counted)."""

    def __init__(self, rng: random.Random) -> None:
        from tools.proto import spec as specmod

        self.spec = specmod.load()
        self.ranges = specmod.INT_RANGES
        self.rng = rng
        self.skipped = 0
        self.frames: list[bytes] = []
        for fr in self.spec.frames:
            self.frames += self._variants(fr)
        if not self.frames:
            raise FuzzError("the spec gave no frame the encoder accepts")

    def _ints(self, t: str) -> list[int]:
        lo, hi = self.ranges[t]
        return sorted({lo, hi, 0, 1, lo + 1, hi - 1, (lo + hi) // 2} & set(range(lo, hi + 1))
                      if hi - lo < 1 << 16 else {lo, hi, 0, 1, lo + 1, hi - 1, (lo + hi) // 2})

    def _values(self, f: Any, frame: Any) -> list[Any]:
        t = f.type
        if t in self.ranges:
            if any(g.schema_field == f.name for g in frame.fields):
                return sorted(proto.SCHEMAS) + [0, 255]
            return self._ints(t)
        if t == "bool":
            return [False, True]
        if t == "enum":
            cls = getattr(proto, _camel(f.enum))
            return [cls(v) for _, v in self.spec.enum(f.enum).values]
        if t == "f32":
            return [0.0, math.inf, -math.inf, math.nan, 3.4028234e38, -3.4028234e38, 1e-45]
        if t == "str":
            return ["", "x" * f.max, "\u00e9" * (f.max // 2), "\u20ac" * (f.max // 3)]
        if t == "bytes":
            return [b"", bytes(f.max), b"\xff" * f.max]
        if t == "array":
            if f.of in self.ranges:
                lo, hi = self.ranges[f.of]
                return [(), (hi,) * f.max, (lo,) * f.max, (0,)]
            rec = self.spec.record(f.of)
            cls = getattr(proto, _camel(rec.name))
            items = [cls(*(self.rng.choice(self._values(g, frame)) for g in rec.fields))
                     for _ in range(f.max)]
            return [(), tuple(items), tuple(items[:1])]
        if t == "series":
            return ["series"]  # built with the frame's schema and interval (below)
        raise FuzzError(f"{frame.name}.{f.name}: no boundary values for type {t}")

    def _series(self, schema: int, interval: int, count: int, extreme: bool) -> proto.Series:
        _, measurements = proto.SCHEMAS[schema]
        cols = []
        for k, m in enumerate(measurements):
            lo, hi = self.ranges[m.type]
            if extreme:  # the largest differences: every delta at its widest
                cols.append(tuple(lo if (i + k) % 2 else hi for i in range(count)))
            else:
                cols.append(tuple(self.rng.randint(lo, hi) for _ in range(count)))
        if interval:
            t0 = U32 - interval * (count - 1) if extreme else 0
            ts = tuple(t0 + interval * i for i in range(count))
        else:
            ts = tuple((0 if i % 2 else U32) if extreme else self.rng.randint(0, U32)
                       for i in range(count))
            ts = tuple(sorted(ts)) if not extreme else ts
        return proto.Series(ts, tuple(cols))

    def _variants(self, fr: Any) -> list[bytes]:
        cls = getattr(proto, _camel(fr.name))
        values = {f.name: self._values(f, fr) for f in fr.fields}
        out = []
        for msg_id in (0, 1, U32 - 254, U32 - 1, U32):
            for pick in ("lo", "hi", "mix", "mix", "mix"):
                kwargs: dict[str, Any] = {}
                for f in fr.fields:
                    vs = values[f.name]
                    kwargs[f.name] = (vs[0] if pick == "lo" else vs[-1] if pick == "hi"
                                      else self.rng.choice(vs))
                for f in fr.fields:
                    if f.type == "series":
                        schema = kwargs[f.schema_field]
                        if schema not in proto.SCHEMAS:
                            schema = kwargs[f.schema_field] = sorted(proto.SCHEMAS)[0]
                        count = 1 if pick == "lo" else f.max if pick == "hi" else \
                            self.rng.choice([1, 2, f.max])
                        kwargs[f.name] = self._series(schema, kwargs[f.interval_field], count,
                                                      pick != "mix")
                try:
                    out.append(proto.encode(cls(msg_id, **kwargs)))
                except (proto.ProtocolError, ValueError, TypeError, OverflowError):
                    self.skipped += 1
        return out


def mutate(rng: random.Random, frame: bytes, corpus: list[bytes]) -> bytes:
    """One to four mutations of `frame`, at most MAX_FRAME bytes."""
    b = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(10)
        if op == 0 and b:  # flip a bit
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # an interesting byte
            b[rng.randrange(len(b))] = rng.choice((0, 1, 0x7F, 0x80, 0xFE, 0xFF))
        elif op == 2 and b:  # truncate
            del b[rng.randrange(len(b)):]
        elif op == 3:  # junk at the end
            b += rng.randbytes(rng.randint(1, 64))
        elif op == 4 and len(b) >= 6:  # a boundary message id
            b[2:6] = rng.choice((0, 1, U32 - 1, U32)).to_bytes(4, "little")
        elif op == 5 and len(b) >= 2:  # another frame type or version
            b[rng.randrange(2)] = rng.randrange(256) if rng.random() < 0.3 else (
                proto.VERSION_BYTE if b[0] != proto.VERSION_BYTE else rng.randrange(1, 16))
        elif op == 6 and b:  # duplicate a slice
            i = rng.randrange(len(b))
            j = rng.randrange(i, min(len(b), i + 64) + 1)
            b[j:j] = b[i:j]
        elif op == 7:  # the longest or an overlong varint
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.choice((b"\xff\xff\xff\xff\x0f", b"\x80\x00", b"\xff\xff\xff\xff\xff",
                                 b"\x80\x80\x80\x80\x80\x01"))
        elif op == 8:  # another frame's body on this header
            other = rng.choice(corpus)
            b = b[:6] + bytearray(other[6:])
        elif op == 9 and len(b) > 6:  # a length or count byte at its limits
            b[rng.randrange(6, len(b))] = rng.choice((0, 0xFF, 64, 65, 255))
    return bytes(b[:proto.MAX_FRAME])


def frames(rng: random.Random, corpus: Corpus) -> Iterator[tuple[str, bytes]]:
    """(kind, frame) for ever: boundary frames as they are, mutated ones, random ones."""
    base = corpus.frames
    while True:
        r = rng.random()
        if r < 0.25:
            yield "boundary", rng.choice(base)
        elif r < 0.85:
            yield "mutated", mutate(rng, rng.choice(base), base)
        elif r < 0.95:
            n = rng.choice((0, 1, 5, 6, 7, 16, 255, rng.randint(0, proto.MAX_FRAME)))
            head = bytes([proto.VERSION_BYTE, rng.randrange(1, 16)]) if n >= 2 else b""
            yield "random", (head + rng.randbytes(max(0, n - len(head))))[:proto.MAX_FRAME]
        else:
            yield "random", rng.randbytes(rng.randint(0, 64))


# ------------------------------------------------------------------ processes

def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status_kb(pid: int | None, key: str) -> int:
    """A /proc/<pid>/status figure in kB (VmHWM: peak resident memory), 0 when gone."""
    if pid is None:
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class _Process:
    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=out, cwd=ROOT,
                                         stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc.poll() is None else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _start_broker(folder: Path, pki: Any, port: int) -> _Process:
    from gateway.transport import broker as gwbroker

    folder.mkdir(parents=True, exist_ok=True)
    settings = gwbroker.BrokerSettings(host="127.0.0.1", port=port, dynsec_plugin=None)
    conf = gwbroker.write_config(settings, pki, folder)
    proc = _Process([gwbroker.find_mosquitto(), "-c", str(conf)], folder / "mosquitto.log")
    deadline = time.monotonic() + START_TIMEOUT_S
    ctx = gwbroker.client_ssl_context(pki)
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise FuzzError(f"mosquitto exited: {proc.text()[-2000:]}")
        with contextlib.suppress(OSError, ssl.SSLError, ConnectionError):
            if gwbroker.mqtt_probe("127.0.0.1", port, ctx, 2.0) == 0:
                return proc
        time.sleep(0.05)
    proc.stop()
    raise FuzzError("mosquitto did not accept a connection in time")


def _start_gateway(folder: Path, pki: Any, port: int, cfg: FuzzConfig) -> _Process:
    from gateway.store import db
    from gateway.store.status import read_status

    config = folder / "gateway.toml"
    config.write_text(
        f'[gateway]\ndata_dir = "{folder / "data"}"\nstatus_interval_s = 0.1\n'
        'log_level = "warning"\n'
        f'[broker]\nmode = "external"\nhost = "127.0.0.1"\nport = {port}\n'
        f'pki_dir = "{pki.path}"\n'
        # The attackers send far faster than a real node may: the rate limit would
        # quarantine them before the decoder saw much.
        f'[ingest]\nrate_limit_frames_per_min = 10000000\n'
        f'malformed_threshold = {cfg.malformed_threshold}\nmalformed_window_s = 60.0\n')
    proc = _Process([sys.executable, "-m", "tools.cli", "gateway", "run", "--config",
                     str(config)], folder / "gateway.log")
    deadline = time.monotonic() + START_TIMEOUT_S
    db_path = folder / "data" / "gateway.db"
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise FuzzError(f"the gateway exited: {proc.text()[-2000:]}")
        if db_path.exists():
            conn = db.connect(db_path, readonly=True)
            try:
                st = read_status(conn)
                if st.running and st.detail.get("mqtt_connected"):
                    return proc
            except sqlite3.Error:
                pass
            finally:
                conn.close()
        time.sleep(0.05)
    proc.stop()
    raise FuzzError(f"the gateway did not come up: {proc.text()[-2000:]}")


# ------------------------------------------------------------------ the run

@dataclass(slots=True)
class NodeStats:
    frames: int = 0  # HELLOs and bursts published
    sent_bursts: int = 0
    acked: int = 0
    late: list[float] = dataclasses.field(default_factory=list)  # when a burst went
    # unacknowledged within the window (it is sent again)
    delays: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (sent, delay)
    next_id: int = 1


def _pct(values: list[float], q: float) -> float | None:
    return values[int(q * (len(values) - 1))] if values else None


def _ms(v: float | None) -> float | None:
    return None if v is None else round(1000 * v, 1)


def tls_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def node_burst(first: int, n: int = 8) -> bytes:
    base = 1_700_000_000 + 60 * first
    s = proto.Series(tuple(base + 60 * i for i in range(n)),
                     (tuple(2000 + i for i in range(n)), tuple(5000 + i for i in range(n)),
                      (3300,) * n))
    return proto.encode_burst(proto.Burst(first, proto.SCHEMA_ENV3, 60, s))


def _node_hello(msg_id: int, window_ms: int) -> bytes:
    return proto.encode_hello(proto.Hello(
        msg_id, 100, proto.BootCause.TIMER, 3700, -60, 80_000, 8, 0, 60, window_ms,
        int(time.time()), proto.DeviceClass.SENSOR))


async def well_behaved_node(name: str, ctx: ssl.SSLContext, port: int, cfg: FuzzConfig,
                        st: NodeStats, stop: asyncio.Event) -> None:
    """A node that sends a burst, waits for its ACK (at most its window), and again; a
    burst not acknowledged in time is sent again, as the firmware does."""
    acks: asyncio.Queue[proto.Ack] = asyncio.Queue()

    def on(topic: str, payload: bytes, at: float) -> None:
        with contextlib.suppress(proto.ProtocolError):
            frame = proto.decode(payload)
            if isinstance(frame, proto.Ack):
                acks.put_nowait(frame)

    conn = await MqttConn.connect("127.0.0.1", port, ctx, name, on_message=on)
    try:
        await conn.subscribe(f"torpor/{name}/down", qos=1)
        window = cfg.awake_window_ms / 1000.0
        n = 8
        hello_id = 1
        while not stop.is_set():
            if st.sent_bursts % 20 == 0:
                conn.publish(f"torpor/{name}/up".encode(), _node_hello(hello_id, cfg.awake_window_ms),
                             qos=1, want_ack=False)
                st.frames += 1
                hello_id = hello_id % U32 + 1
            first = st.next_id
            t0 = time.monotonic()
            conn.publish(f"torpor/{name}/up".encode(), node_burst(first, n), qos=1,
                         want_ack=False)
            st.sent_bursts += 1
            st.frames += 1
            deadline = t0 + window
            got = False
            while not got:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    ack = await asyncio.wait_for(acks.get(), left)
                except TimeoutError:
                    break
                if ack.msg_id == first and ack.cumulative >= first + n - 1:
                    got = True
            delay = time.monotonic() - t0
            if got:
                st.acked += 1
                st.delays.append((t0, delay))
                st.next_id = first + n
            else:
                st.late.append(t0)
            await asyncio.sleep(cfg.node_period_s)
    finally:
        await conn.disconnect()


@dataclass(slots=True)
class _Attack:
    sent: int = 0
    kinds: dict[str, int] = dataclasses.field(default_factory=dict)
    quarantines: int = 0
    releases: int = 0
    reconnects: int = 0
    errors_seen: dict[str, int] = dataclasses.field(default_factory=dict)


async def _attack(names: list[str], ctxs: dict[str, ssl.SSLContext], port: int, db_path: Path,
                  cfg: FuzzConfig, gen: Iterator[tuple[str, bytes]], att: _Attack,
                  deadline: float, node_frames: Any) -> None:
    """Publish `cfg.frames` frames (or until `deadline`), at most `cfg.ahead` ahead of
    what the gateway has taken in (its status row): a fuzzer far ahead of the gateway
    would learn of a quarantine only thousands of frames later, and those frames would
    be refused before the decoder saw them."""
    from gateway.store import db
    from gateway.store import devices as registry
    from gateway.store.status import read_status

    status = db.connect(db_path, readonly=True)
    taken = [0]

    def gateway_frames() -> int:
        with contextlib.suppress(sqlite3.Error, ValueError):
            detail = read_status(status).detail
            return int(detail.get("ingest", {}).get("frames", 0))
        return 0

    async def wait_for_gateway() -> None:
        end = time.monotonic() + 10.0
        while att.sent - (taken[0] - node_frames()) > cfg.ahead and time.monotonic() < end:
            await asyncio.sleep(0.05)
            taken[0] = await asyncio.to_thread(gateway_frames)

    quarantined: dict[str, bool] = dict.fromkeys(names, False)
    conns: dict[str, MqttConn] = {}

    def on(name: str) -> Any:
        def handler(topic: str, payload: bytes, at: float) -> None:
            with contextlib.suppress(proto.ProtocolError):
                frame = proto.decode(payload)
                if isinstance(frame, proto.Error):
                    key = frame.code.name.lower()
                    att.errors_seen[key] = att.errors_seen.get(key, 0) + 1
                    if frame.code == proto.ErrorCode.QUARANTINED and not quarantined[name]:
                        quarantined[name] = True
                        att.quarantines += 1
        return handler

    async def connect(name: str) -> MqttConn:
        conn = await MqttConn.connect("127.0.0.1", port, ctxs[name], name, on_message=on(name))
        await conn.subscribe(f"torpor/{name}/down", qos=1)
        conns[name] = conn
        return conn

    def release(name: str) -> None:
        conn = db.connect(db_path)
        try:
            with db.transaction(conn):
                if registry.get(conn, name).status == registry.QUARANTINED:
                    registry.release(conn, name)
        finally:
            conn.close()

    for name in names:
        await connect(name)
    releasing: dict[str, asyncio.Task[None]] = {}
    inflight: deque[asyncio.Future[None]] = deque()
    current = 0
    try:
        while att.sent < cfg.frames and time.monotonic() < deadline:
            name = names[current]
            if quarantined[name]:
                if name not in releasing:
                    async def free(n: str) -> None:
                        await asyncio.to_thread(release, n)
                        att.releases += 1
                        await asyncio.sleep(0.6)  # the gateway's status cache refresh
                        quarantined[n] = False
                        releasing.pop(n, None)
                    releasing[name] = asyncio.create_task(free(name))
                # The next attacker not quarantined; none: this one's frames are refused.
                for k in range(1, len(names) + 1):
                    if not quarantined[names[(current + k) % len(names)]]:
                        current = (current + k) % len(names)
                        break
                name = names[current]
            if att.sent - (taken[0] - node_frames()) > cfg.ahead:
                await wait_for_gateway()
            kind, frame = next(gen)
            conn = conns[name]
            try:
                fut = conn.publish(f"torpor/{name}/up".encode(), frame, qos=1)
            except MqttError:
                att.reconnects += 1
                await connect(name)
                continue
            att.sent += 1
            att.kinds[kind] = att.kinds.get(kind, 0) + 1
            if fut is not None:
                inflight.append(fut)
            while len(inflight) >= cfg.window:
                with contextlib.suppress(MqttError, TimeoutError):
                    await asyncio.wait_for(inflight.popleft(), 10.0)
        for fut in inflight:
            with contextlib.suppress(MqttError, TimeoutError):
                await asyncio.wait_for(fut, 10.0)
        for task in list(releasing.values()):
            await task
        # The end: the first attacker sends malformed frames until it is quarantined.
        last = names[0]
        if quarantined[last]:
            await asyncio.to_thread(release, last)
            await asyncio.sleep(0.6)
            quarantined[last] = False
        bad = bytes([proto.VERSION_BYTE, proto.BURST, 1, 0, 0, 0, 0xFF])
        for _ in range(cfg.malformed_threshold + 10):  # its guard starts afresh on release
            if quarantined[last]:
                break
            fut = conns[last].publish(f"torpor/{last}/up".encode(), bad, qos=1)
            att.sent += 1
            att.kinds["malformed"] = att.kinds.get("malformed", 0) + 1
            if fut is not None:
                with contextlib.suppress(MqttError, TimeoutError):
                    await asyncio.wait_for(fut, 10.0)
        end = time.monotonic() + 5.0
        while not quarantined[last] and time.monotonic() < end:
            await asyncio.sleep(0.05)
    finally:
        status.close()
        for conn in conns.values():
            await conn.disconnect()


def measure(cfg: FuzzConfig = FuzzConfig(), workdir: Path | None = None) -> dict[str, Any]:
    """Run the fuzz and return its figures (see `table`) with `passed` and `failures`."""
    from gateway.security.pki import Pki
    from gateway.store import db, deadletter, readings
    from gateway.store import devices as registry
    from gateway.store.status import read_status

    owned = workdir is None
    tmp = Path(tempfile.mkdtemp(prefix="torpor-fuzz-")) if workdir is None else workdir
    tmp.mkdir(parents=True, exist_ok=True)
    fig: dict[str, Any] = {"seed": cfg.seed}
    broker: _Process | None = None
    gw: _Process | None = None
    try:
        rng = random.Random(cfg.seed)
        corpus = Corpus(rng)
        fig["boundary_frames"] = len(corpus.frames)
        fig["boundary_skipped"] = corpus.skipped
        pki = Pki(tmp / "pki")
        pki.init_ca()
        pki.issue_server(["localhost", "127.0.0.1"])
        pki.issue_gateway()
        nodes = [f"fuzz-node-{i}" for i in range(cfg.nodes)]
        attackers = [f"fuzz-attacker-{i}" for i in range(cfg.attackers)]
        ctxs = {}
        for name in nodes + attackers:
            creds = pki.issue_device(name)
            ctxs[name] = tls_context(pki.ca_pem, creds.cert_pem, creds.key_pem)
        port = _free_port()
        broker = _start_broker(tmp / "broker", pki, port)
        db_path = tmp / "gateway" / "data" / "gateway.db"
        conn = db.open_db(db_path)
        try:
            for name in nodes + attackers:
                registry.add(conn, name)
        finally:
            conn.close()
        gw = _start_gateway(tmp / "gateway", pki, port, cfg)
        rss0 = _status_kb(gw.pid, "VmRSS")

        stats = {n: NodeStats() for n in nodes}
        att = _Attack()
        peak = {"gw": 0, "broker": 0}

        async def main() -> float:
            stop = asyncio.Event()
            deadline = time.monotonic() + cfg.duration_s
            node_tasks = [asyncio.create_task(well_behaved_node(n, ctxs[n], port, cfg, stats[n], stop))
                          for n in nodes]
            # The baseline: the same nodes before the attack.
            await asyncio.sleep(cfg.baseline_s)

            async def watch() -> None:
                while not stop.is_set():
                    peak["gw"] = max(peak["gw"], _status_kb(gw.pid if gw else None, "VmHWM"))
                    peak["broker"] = max(peak["broker"],
                                         _status_kb(broker.pid if broker else None, "VmHWM"))
                    await asyncio.sleep(0.2)

            watcher = asyncio.create_task(watch())
            t0 = attack_t0[0] = time.monotonic()
            try:
                await _attack(attackers, ctxs, port, db_path, cfg, frames(rng, corpus), att,
                              deadline, lambda: sum(s.frames for s in stats.values()))
                elapsed = time.monotonic() - t0
                await asyncio.sleep(max(0.5, cfg.awake_window_ms / 1000.0))
            finally:
                stop.set()
                await asyncio.gather(*node_tasks, return_exceptions=False)
                await watcher
            return elapsed

        attack_t0 = [0.0]
        elapsed = asyncio.run(main())
        peak["gw"] = max(peak["gw"], _status_kb(gw.pid, "VmHWM"))
        peak["broker"] = max(peak["broker"], _status_kb(broker.pid, "VmHWM"))
        time.sleep(0.5)  # the last status row
        fig["frames"] = att.sent
        fig["frames_by_kind"] = dict(sorted(att.kinds.items()))
        fig["elapsed_s"] = round(elapsed, 2)
        fig["frames_per_s"] = round(att.sent / elapsed, 1) if elapsed > 0 else 0.0
        fig["quarantines"] = att.quarantines
        fig["releases"] = att.releases
        fig["attacker_reconnects"] = att.reconnects
        fig["errors_answered"] = dict(sorted(att.errors_seen.items()))
        base = sorted(d for s in stats.values() for t, d in s.delays if t < attack_t0[0])
        under = sorted(d for s in stats.values() for t, d in s.delays if t >= attack_t0[0])
        fig["node_bursts_acked"] = sum(s.acked for s in stats.values())
        fig["node_acks_late_or_missing"] = sum(len(s.late) for s in stats.values())
        fig["baseline_worst_ack_ms"] = _ms(base[-1] if base else None)
        fig["baseline_p99_ack_ms"] = _ms(_pct(base, 0.99))
        fig["worst_ack_ms"] = _ms(under[-1] if under else None)
        fig["p99_ack_ms"] = _ms(_pct(under, 0.99))
        fig["ack_window_ms"] = cfg.awake_window_ms
        fig["gateway_rss_start_mb"] = round(rss0 / 1024, 1)
        fig["gateway_peak_rss_mb"] = round(peak["gw"] / 1024, 1)
        fig["broker_peak_rss_mb"] = round(peak["broker"] / 1024, 1)
        log = gw.text()
        fig["tracebacks"] = log.count("Traceback")
        gw.stop()
        conn = db.connect(db_path, readonly=True)
        try:
            st = read_status(conn)
            fig["ingest_restarts"] = int(st.detail.get("restarts", {}).get("ingest", 0))
            ing = st.detail.get("ingest", {})
            fig["gateway_frames"] = ing.get("frames")
            fig["gateway_device_errors"] = ing.get("device_errors")
            lost = {}
            for n in nodes:
                want = stats[n].next_id - 1
                have = readings.count_rows(conn, n)
                if have < want:
                    lost[n] = want - have
            fig["node_readings_lost"] = sum(lost.values())
            fig["node_readings_stored"] = sum(readings.count_rows(conn, n) for n in nodes)
            counts = {a: sum(c.frames for c in deadletter.refused(conn, a)) for a in attackers}
            fig["attacker_frames_dead_lettered"] = sum(counts.values())
            held_back = sum(c.frames for a in attackers for c in deadletter.refused(conn, a)
                            if c.reason == registry.QUARANTINED)
            fig["frames_decoded"] = att.sent - held_back
            fig["dead_letter_rows"], dl_bytes = deadletter.totals(conn)
            fig["dead_letter_mb"] = round(dl_bytes / 2**20, 2)
            fig["last_attacker_status"] = registry.get(conn, attackers[0]).status
        finally:
            conn.close()
        failures = []
        if fig["ingest_restarts"]:
            failures.append(f"ingest restarted {fig['ingest_restarts']} times")
        if fig["tracebacks"]:
            failures.append(f"{fig['tracebacks']} tracebacks in the gateway log")
        if fig["node_acks_late_or_missing"]:
            failures.append(f"{fig['node_acks_late_or_missing']} node bursts not acknowledged "
                            f"within {cfg.awake_window_ms} ms")
        if fig["node_readings_lost"]:
            failures.append(f"node readings lost: {lost}")
        if not fig["node_bursts_acked"]:
            failures.append("the well-behaved nodes got no ACK at all")
        if (peak["gw"] - rss0) / 1024 > cfg.rss_bound_mb:
            failures.append(f"the gateway grew by {(peak['gw'] - rss0) / 1024:.0f} MB "
                            f"(bound {cfg.rss_bound_mb:g} MB)")
        if any(v == 0 for v in counts.values()):
            failures.append(f"attackers with no dead letter: {counts}")
        if fig["last_attacker_status"] != registry.QUARANTINED or not att.quarantines:
            failures.append(f"the offender was not quarantined ({fig['last_attacker_status']})")
        fig["failures"] = failures
        fig["passed"] = not failures
        if failures:
            fig["gateway_log_tail"] = log[-3000:]
        return fig
    finally:
        if gw is not None:
            gw.stop()
        if broker is not None:
            broker.stop()
        if owned:
            shutil.rmtree(tmp, ignore_errors=True)


_ROWS = (
    ("frames", "attack frames published"), ("frames_by_kind", "by kind"),
    ("frames_per_s", "attack rate (frames/s)"),
    ("frames_decoded", "... reaching the decoder (not refused as quarantined)"), ("elapsed_s", "attack time (s)"),
    ("boundary_frames", "boundary frames from the spec"), ("quarantines", "quarantines seen"),
    ("releases", "releases by the fuzzer"), ("errors_answered", "ERROR frames by code"),
    ("node_bursts_acked", "well-behaved bursts acknowledged"),
    ("node_acks_late_or_missing", "... late or missing"),
    ("baseline_worst_ack_ms", "worst ACK delay, nodes alone (ms)"),
    ("baseline_p99_ack_ms", "p99 ACK delay, nodes alone (ms)"),
    ("worst_ack_ms", "worst ACK delay under attack (ms)"),
    ("p99_ack_ms", "p99 ACK delay under attack (ms)"),
    ("ack_window_ms", "the nodes' window (ms)"), ("node_readings_lost", "node readings lost"),
    ("gateway_rss_start_mb", "gateway RSS at start (MB)"),
    ("gateway_peak_rss_mb", "gateway peak RSS (MB)"), ("broker_peak_rss_mb", "broker peak RSS (MB)"),
    ("ingest_restarts", "ingest restarts"), ("tracebacks", "tracebacks in the gateway log"),
    ("attacker_frames_dead_lettered", "attack frames dead-lettered (counted)"),
    ("dead_letter_rows", "dead-letter rows kept"), ("dead_letter_mb", "dead-letter bytes kept (MB)"),
    ("last_attacker_status", "the offender at the end"), ("passed", "passed"),
)


def table(fig: dict[str, Any]) -> str:
    width = max(len(label) for _, label in _ROWS)
    lines = [f"{label:<{width}}  {fig.get(key)}" for key, label in _ROWS]
    lines += [f"FAIL: {f}" for f in fig.get("failures", [])]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cfg = FuzzConfig(frames=args.frames, duration_s=args.duration, nodes=args.nodes,
                     seed=args.seed)
    try:
        fig = measure(cfg)
    except FuzzError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(fig, indent=2) if args.json else table(fig))
    return 0 if fig["passed"] else 1


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "fuzz", help="random, mutated and boundary frames through the real broker and gateway",
        description=__doc__)
    parser.add_argument("--frames", type=int, default=20_000, help="attack frames (default 20000)")
    parser.add_argument("--duration", type=float, default=60.0,
                        help="at most this many seconds of attack (default 60)")
    parser.add_argument("--nodes", type=int, default=4, help="well-behaved nodes (default 4)")
    parser.add_argument("--seed", type=int, default=1, help="the random seed (default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)
