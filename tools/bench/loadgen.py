"""Load generator for `torpor bench gateway`: many node identities over mutual TLS.

A node is simulated by a small MQTT 3.1.1 client written on asyncio.Protocol and the
gateway's own codec (CONNECT, SUBSCRIBE, PUBLISH QoS 0/1, PUBACK both ways, DISCONNECT),
which writes each packet at once as a node does: a paho/aiomqtt client per
identity costs more CPU than the broker it is meant to load, and the generator must not
be what the benchmark measures. Workers run in their own processes (`worker()`), each
with its own event loop, and report through a multiprocessing queue. Every wait has a
timeout and every loop a count and a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gateway.proto as p
from gateway.transport import codec, topics
from gateway.transport.errors import MalformedPacket
from tools.bench.protocol import workload

CONNECT_TIMEOUT_S = 10.0
# mosquitto answers a burst of simultaneous handshakes one by one; more at once only
# queues them in the kernel's backlog
CONNECT_CONCURRENCY = 16

OnMessage = Callable[[str, bytes, float], None]


class MqttError(Exception):
    """The broker refused, closed the connection or did not answer in time."""


# Every byte goes through the gateway's own MQTT codec: one encoder for the project.
MAX_PACKET = codec.max_publish_packet(p.MAX_FRAME, 256)
UPSTREAM_MAX_PACKET = 1 << 20


def connect_packet(client_id: str, keepalive: int = 60, clean: bool = True) -> bytes:
    return codec.encode_connect(codec.Connect(client_id, keepalive, clean))


def publish_packet(topic: bytes, payload: bytes, qos: int, pid: int) -> bytes:
    return codec.publish_packet(_topic(topic), payload, qos, pid)


@functools.lru_cache(maxsize=4096)
def _topic(topic: bytes) -> codec.EncodedTopic:
    return codec.encode_topic(topic)


class _Stream(asyncio.Protocol):
    def __init__(self, conn: MqttConn) -> None:
        self.conn = conn
        self.decoder = codec.Decoder(conn.max_packet)

    def data_received(self, data: bytes) -> None:
        try:
            self.decoder.feed(data)
            for packet in self.decoder:
                self.conn.handle_packet(packet)
        except MalformedPacket as exc:
            self.conn.handle_lost(exc)
            self.conn.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.handle_lost(exc)


class MqttConn:
    """One MQTT connection. `on_message(topic, payload, arrival)` runs in the loop for
    every PUBLISH received; QoS 1 ones are acknowledged right away."""

    def __init__(self, on_message: OnMessage | None = None,
                 max_packet: int = MAX_PACKET) -> None:
        self.on_message = on_message
        self.max_packet = max_packet
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._connack: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._pid = 0

    @classmethod
    async def connect(cls, host: str, port: int, ssl_ctx: ssl.SSLContext | None,
                      client_id: str, *, on_message: OnMessage | None = None,
                      keepalive: int = 60, timeout: float = CONNECT_TIMEOUT_S,
                      max_packet: int = MAX_PACKET) -> MqttConn:
        conn = cls(on_message, max_packet)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(
                lambda: _Stream(conn), host, port, ssl=ssl_ctx,
                server_hostname=host if ssl_ctx is not None else None,
            )
            conn.transport = transport
            transport.write(connect_packet(client_id, keepalive))
            code = await conn._connack
        if code != 0:
            conn.abort()
            raise MqttError(f"{client_id}: CONNACK {code}")
        return conn

    def _next_pid(self) -> int:
        for _ in range(65535):
            self._pid = self._pid % 65535 + 1
            if self._pid not in self._waiting:
                return self._pid
        raise MqttError("no free packet id")

    def handle_packet(self, packet: codec.Packet) -> None:
        if isinstance(packet, codec.Publish):
            if packet.qos:
                assert self.transport is not None
                self.transport.write(codec.encode_puback(packet.packet_id))
            if self.on_message is not None:
                self.on_message(packet.topic, packet.payload, time.monotonic())
        elif isinstance(packet, codec.PubAck | codec.SubAck):
            fut = self._waiting.pop(packet.packet_id, None)
            if fut is not None and not fut.done():
                if isinstance(packet, codec.SubAck) and codec.SUBACK_FAILURE in packet.return_codes:
                    fut.set_exception(MqttError("subscription refused"))
                else:
                    fut.set_result(None)
        elif isinstance(packet, codec.ConnAck) and not self._connack.done():
            self._connack.set_result(packet.return_code)

    def handle_lost(self, exc: Exception | None) -> None:
        err = MqttError(f"connection lost: {exc}" if exc else "connection closed")
        if not self._connack.done():
            self._connack.set_exception(err)
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(err)
        self._waiting.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    def publish(self, topic: bytes, payload: bytes, qos: int = 1,
                want_ack: bool = True) -> asyncio.Future[None] | None:
        """Write one PUBLISH; for QoS 1 with `want_ack` a future resolved by the broker's
        PUBACK (without it the PUBACK is read and ignored)."""
        if self.transport is None or self.transport.is_closing():
            raise MqttError("not connected")
        if not qos:
            self.transport.write(publish_packet(topic, payload, 0, 0))
            return None
        pid = self._next_pid()
        if not want_ack:
            self.transport.write(publish_packet(topic, payload, qos, pid))
            return None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[pid] = fut
        self.transport.write(publish_packet(topic, payload, qos, pid))
        return fut

    async def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> None:
        await asyncio.wait_for(self.subscribe_nowait(topic, qos), timeout)

    def subscribe_nowait(self, topic: str, qos: int = 1) -> asyncio.Future[None]:
        """Write the SUBSCRIBE now; the future completes with its SUBACK. What is published
        after it finds the subscription in place (the broker keeps a connection's order),
        as a node does it: the firmware takes its SUBACK after HELLO and the bursts."""
        assert self.transport is not None
        pid = self._next_pid()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[pid] = fut
        self.transport.write(codec.encode_subscribe(codec.Subscribe(pid, ((topic, qos),))))
        return fut

    async def disconnect(self, timeout: float = 2.0) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(codec.DISCONNECT_BYTES)
            self.transport.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


# --- frames ----------------------------------------------------------------------------

class Frames:
    """Valid BURST frames with the protocol benchmark's series (64 readings unless told:
    a node's batch, see docs/benchmarks.md): per burst only the header's msg id and the
    timestamps move on."""

    def __init__(self, n: int = 64) -> None:
        self.base = workload(n=n)
        self.n = len(self.base.readings)

    def burst(self, msg_id: int) -> bytes:
        b = self.base
        shift = 60 * (msg_id - 1)
        ts = tuple(t + shift for t in b.readings.timestamps)
        return p.encode_burst(p.Burst(msg_id & 0xFFFFFFFF, b.schema, b.interval,
                                      p.Series(ts, b.readings.columns)))


def hello(msg_id: int) -> bytes:
    return p.encode_hello(p.Hello(
        msg_id=msg_id, fw_version=100, boot_cause=p.BootCause.TIMER, battery_mv=3700, rssi=-60,
        free_mem=80_000, queue_depth=64, dropped=0, next_wake_s=300, awake_window_ms=2000,
        time=int(time.time()), device_class=p.DeviceClass.SENSOR,
    ))


# --- worker processes ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Identity:
    device: str
    cert: str
    key: str


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What one worker process does. `mode`: 'burst' (send `frames` bursts per device as
    fast as the window allows), 'paced' (bursts at `rate` per second in total for
    `duration_s`, timing the ACKs and the upstream copies), 'session' (full wake
    sessions for `duration_s`) or 'handshake' (mTLS connect + CONNACK + disconnect)."""

    mode: str
    host: str
    port: int
    ca: str
    devices: tuple[Identity, ...]
    next_id: dict[str, int] = field(default_factory=dict)
    frames: int = 0
    window: int = 8
    rate: float = 0.0
    duration_s: float = 0.0
    concurrency: int = 1
    deadline_s: float = 120.0
    upstream_port: int = 0  # paced: also subscribe to the upstream broker (plain MQTT)
    leaf: str = "up"  # burst: publish to torpor/<id>/<leaf> (the baseline's: "bare")
    subscribe_down: bool = True
    readings: int = 64  # readings per BURST frame


def _ctx(ca: str, ident: Identity) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.load_cert_chain(ident.cert, ident.key)
    return ctx


def worker(spec: WorkerSpec, ready: Any, go: Any, results: Any) -> None:
    """Process entry point: connect, put ("ready", n) on `ready`, wait for `go` (an
    Event), run, put the result dict on `results`."""
    try:
        result = asyncio.run(_run(spec, ready, go))
    except BaseException as exc:  # reported to the parent, which fails the benchmark
        ready.put(("error", f"{type(exc).__name__}: {exc}"))
        results.put({"error": f"{type(exc).__name__}: {exc}"})
        return
    results.put(result)


async def _wait_go(go: Any, limit: float) -> None:
    deadline = time.monotonic() + limit
    while not go.is_set():
        if time.monotonic() > deadline:
            raise TimeoutError("no start signal from the benchmark")
        await asyncio.sleep(0.002)


async def _run(spec: WorkerSpec, ready: Any, go: Any) -> dict[str, Any]:
    if spec.mode == "burst":
        return await _burst(spec, ready, go)
    if spec.mode == "paced":
        return await _paced(spec, ready, go)
    if spec.mode in ("session", "handshake"):
        ready.put(("ready", 0))
        await _wait_go(go, spec.deadline_s)
        return await _sessions(spec)
    raise ValueError(f"unknown mode {spec.mode!r}")


async def _connect_all(spec: WorkerSpec, on_message: Callable[[str], OnMessage] | None
                       ) -> dict[str, MqttConn]:
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    conns: dict[str, MqttConn] = {}

    async def one(ident: Identity) -> None:
        async with gate:
            conn = await MqttConn.connect(
                spec.host, spec.port, _ctx(spec.ca, ident), ident.device,
                on_message=on_message(ident.device) if on_message else None)
            if spec.subscribe_down:
                await conn.subscribe(topics.down(ident.device), 1)
            conns[ident.device] = conn

    await asyncio.gather(*(one(i) for i in spec.devices))
    return conns


async def _burst(spec: WorkerSpec, ready: Any, go: Any) -> dict[str, Any]:
    frames = Frames(spec.readings)
    acks = [0]

    def counter(device: str) -> OnMessage:
        def on(topic: str, payload: bytes, at: float) -> None:
            if len(payload) > 1 and payload[1] == p.ACK:
                acks[0] += 1
        return on

    conns = await _connect_all(spec, counter)
    # Encoded ahead: the generator's own encode cost must not pace the publishing.
    todo = {d: [frames.burst(spec.next_id.get(d, 1) + k * frames.n) for k in range(spec.frames)]
            for d in conns}
    ready.put(("ready", len(conns)))
    await _wait_go(go, spec.deadline_s)
    t0 = time.monotonic()
    deadline = t0 + spec.deadline_s
    sent = 0
    next_id: dict[str, int] = {}

    async def device(dev: str, conn: MqttConn) -> None:
        nonlocal sent
        topic = f"{topics.ROOT}/{dev}/{spec.leaf}".encode()
        inflight: list[asyncio.Future[None]] = []
        done = 0
        for payload in todo[dev]:
            if time.monotonic() > deadline:
                break
            if len(inflight) >= spec.window:
                await asyncio.wait_for(inflight.pop(0), max(0.1, deadline - time.monotonic()))
            fut = conn.publish(topic, payload, 1)
            assert fut is not None
            inflight.append(fut)
            done += 1
            sent += 1
        for fut in inflight:
            await asyncio.wait_for(fut, max(0.1, deadline - time.monotonic()))
        next_id[dev] = spec.next_id.get(dev, 1) + done * frames.n

    await asyncio.gather(*(device(d, c) for d, c in conns.items()))
    t1 = time.monotonic()
    # ACKs still on their way are counted by the parent from the database, not here.
    await asyncio.sleep(0.2)
    await asyncio.gather(*(c.disconnect() for c in conns.values()))
    return {"t_start": t0, "t_end": t1, "frames": sent, "acks": acks[0], "next_id": next_id}


def _msg_id(payload: bytes) -> int:
    return int.from_bytes(payload[2:6], "little")


async def _paced(spec: WorkerSpec, ready: Any, go: Any) -> dict[str, Any]:
    frames = Frames(spec.readings)
    published: dict[tuple[str, int], float] = {}
    ack_lat: list[float] = []
    up_lat: list[float] = []

    def on_down(device: str) -> OnMessage:
        def on(topic: str, payload: bytes, at: float) -> None:
            if len(payload) > 6 and payload[1] == p.ACK:
                t = published.get((device, _msg_id(payload)))
                if t is not None:
                    ack_lat.append(at - t)
        return on

    def on_up(topic: str, payload: bytes, at: float) -> None:
        # The upstream JSON names the first stored reading's id early on: `"id":<n>`.
        head = payload[:200]
        i = head.find(b'"id":')
        if i < 0:
            return
        j = i + 5
        k = j
        while k < len(head) and 48 <= head[k] <= 57:
            k += 1
        dev = topic.split("/")[1]
        t = published.get((dev, int(head[j:k])))
        if t is not None:
            up_lat.append(at - t)

    conns = await _connect_all(spec, on_down)
    upstream: MqttConn | None = None
    if spec.upstream_port:
        # The upstream copies are JSON, larger than a node's frames (about 8 kB for 255
        # readings): the node-sized packet limit would drop the connection.
        upstream = await MqttConn.connect(spec.host, spec.upstream_port, None,
                                          f"bench-upstream-{time.monotonic_ns()}",
                                          on_message=on_up, max_packet=UPSTREAM_MAX_PACKET)
        await upstream.subscribe("torpor/+/readings", 1)
    devs = list(conns)
    ids = {d: spec.next_id.get(d, 1) for d in devs}
    count = int(spec.rate * spec.duration_s)
    todo = []
    for k in range(count):
        d = devs[k % len(devs)]
        todo.append((d, topics.up(d).encode(), ids[d], frames.burst(ids[d])))
        ids[d] += frames.n
    ready.put(("ready", len(conns)))
    await _wait_go(go, spec.deadline_s)
    t0 = time.monotonic()
    period = 1.0 / spec.rate
    for k, (d, topic, mid, payload) in enumerate(todo):
        delay = t0 + k * period - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        published[(d, mid)] = time.monotonic()
        conns[d].publish(topic, payload, 1, want_ack=False)
    t1 = time.monotonic()
    # Let the last answers arrive (bounded).
    settle = time.monotonic() + 5.0
    while time.monotonic() < settle and (
            len(ack_lat) < count or (upstream is not None and len(up_lat) < count)):
        await asyncio.sleep(0.01)
    await asyncio.gather(*(c.disconnect() for c in conns.values()))
    if upstream is not None:
        await upstream.disconnect()
    return {"t_start": t0, "t_end": t1, "frames": count, "ack_latency_s": ack_lat,
            "upstream_latency_s": up_lat, "next_id": ids}


async def _sessions(spec: WorkerSpec) -> dict[str, Any]:
    """`concurrency` loops, each taking identities round-robin from its own share, so no
    identity is connected twice at once (the broker would cut the older session)."""
    frames = Frames(spec.readings)
    ctxs = {i.device: _ctx(spec.ca, i) for i in spec.devices}
    ids = {i.device: spec.next_id.get(i.device, 1) for i in spec.devices}
    hello_ids = {i.device: 1 for i in spec.devices}
    shares = [spec.devices[k::spec.concurrency] for k in range(spec.concurrency)]
    t0 = time.monotonic()
    stop = t0 + spec.duration_s
    hard = t0 + spec.deadline_s
    done = [0]
    errors: list[str] = []
    durations: list[float] = []

    async def session(ident: Identity) -> None:
        dev = ident.device
        mid = ids[dev]
        hid = hello_ids[dev]
        got_ack = asyncio.Event()
        got_sleep = asyncio.Event()

        def on(topic: str, payload: bytes, at: float) -> None:
            if len(payload) < 6:
                return
            if payload[1] == p.ACK and _msg_id(payload) == mid:
                got_ack.set()
            elif payload[1] == p.SLEEP_NOW and _msg_id(payload) == hid:
                got_sleep.set()

        conn = await MqttConn.connect(spec.host, spec.port, ctxs[dev], dev, on_message=on)
        try:
            suback = conn.subscribe_nowait(topics.down(dev), 1)
            up = topics.up(dev).encode()
            conn.publish(up, hello(hid), 1, want_ack=False)
            conn.publish(up, frames.burst(mid), 1, want_ack=False)
            async with asyncio.timeout(10.0):
                await suback
                await got_ack.wait()
                await got_sleep.wait()
            ids[dev] = mid + frames.n
            hello_ids[dev] = hid + 1
        finally:
            await conn.disconnect()

    async def handshake(ident: Identity) -> None:
        conn = await MqttConn.connect(spec.host, spec.port, ctxs[ident.device], ident.device)
        await conn.disconnect()

    body = session if spec.mode == "session" else handshake

    async def loop(share: tuple[Identity, ...]) -> None:
        k = 0
        while time.monotonic() < stop and time.monotonic() < hard and share:
            ident = share[k % len(share)]
            k += 1
            s = time.monotonic()
            try:
                await body(ident)
            except (MqttError, OSError, TimeoutError, ssl.SSLError) as exc:
                errors.append(f"{ident.device}: {type(exc).__name__}: {exc}")
                if len(errors) > 50:
                    return
                continue
            durations.append(time.monotonic() - s)
            done[0] += 1

    # Start the loops spread over a few milliseconds: the handshakes must not arrive in
    # lockstep at the start.
    async def staggered(k: int, share: tuple[Identity, ...]) -> None:
        await asyncio.sleep(random.uniform(0, 0.01) * k / max(1, spec.concurrency))
        await loop(share)

    await asyncio.gather(*(staggered(k, s) for k, s in enumerate(shares)))
    t1 = time.monotonic()
    return {"t_start": t0, "t_end": t1, "count": done[0], "errors": errors[:5],
            "error_count": len(errors), "durations_s": durations, "next_id": ids}
