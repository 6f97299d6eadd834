"""Clients nobody on the project wrote, holding a valid device certificate, against the real
broker and gateway: Debian's mosquitto_pub and mosquitto_sub, and raw TLS sockets.

- Client-id takeover: the attacker connects again and again with another node's id and with
  the gateway's (`torpor-gateway`, clean and persistent sessions). The broker gives it its
  own id instead: no other session is closed, none replaced.
- Oversized packets: a 64 MB PUBLISH from mosquitto_pub and 8 raw connections announcing
  256 MB. The broker closes each at its header (max_packet_size); memory stays flat.
- A broker restart: frames sent after it and before the gateway is back wait in the
  gateway's session.

Meanwhile well-behaved nodes publish bursts and wait for their ACKs: every one must come
within a node's awake window, and every reading must be stored once. The worst ACK delay
and the peak RSS of broker and gateway are printed.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import pytest

from gateway import proto
from gateway.security.pki import DeviceCredentials, Pki
from gateway.transport import topics
from tests.fixtures.broker import RunningBroker
from tests.system.test_gateway_faults import Gateway, gateway_config, stored

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("mosquitto_pub") is None or shutil.which("mosquitto_sub") is None,
                       reason="mosquitto-clients is not installed (`make mosquitto`)"),
]

WINDOW_S = 3.0  # a node's awake window (firmware config awake_window_ms)
ATTACK_S = 6.0
GOOD = ("n1", "n2", "n3")
READINGS = 4


def burst(first: int) -> bytes:
    series = proto.Series(tuple(1_767_225_600 + 60 * i for i in range(READINGS)),
                          (tuple(2000 + i for i in range(READINGS)), (5000,) * READINGS,
                           (3700,) * READINGS))
    return proto.encode_burst(proto.Burst(first, proto.SCHEMA_ENV3, 60, series))


@dataclass
class Stack:
    gw: Gateway
    broker: RunningBroker
    pki: Pki
    creds: dict[str, DeviceCredentials]
    tmp: Path


@pytest.fixture
def stack(tmp_path: Path, broker: RunningBroker) -> Iterator[Stack]:
    assert broker.pki is not None
    gw = Gateway(gateway_config(tmp_path, broker.pki, broker_port=broker.port, external=True,
                                upstream_port=None))
    creds = gw.register(broker.pki, *GOOD, "mallory")
    gw.start()
    try:
        gw.wait_running()
        yield Stack(gw, broker, broker.pki, creds, tmp_path)
    finally:
        code = gw.stop()
    assert code == 0, gw.log.read_text()[-3000:]


@dataclass
class Node:
    """A well-behaved node: a burst, its ACK, the next burst; every ACK's delay kept."""

    name: str
    creds: DeviceCredentials
    delays: list[float] = field(default_factory=list)
    sent: int = 0
    next_first: int = 1

    async def run(self, s: Stack, stop: asyncio.Event, window: float = WINDOW_S,
                  persistent: bool = False) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(s.pki.ca_pem))
        ctx.load_cert_chain(str(self.creds.cert_pem), str(self.creds.key_pem))
        async with aiomqtt.Client("127.0.0.1", s.broker.port, identifier=self.name,
                                  tls_context=ctx, timeout=10, clean_session=not persistent) as c:
            await c.subscribe(topics.down(self.name), qos=1)
            messages = aiter(c.messages)
            while not stop.is_set():
                first = self.next_first
                t0 = time.monotonic()
                await c.publish(topics.up(self.name), burst(first), qos=1)
                self.sent += 1
                async with asyncio.timeout(window):
                    while True:
                        m = await anext(messages)
                        f = proto.decode(bytes(m.payload))  # type: ignore[arg-type]
                        if isinstance(f, proto.Ack) and f.msg_id == first:
                            break
                self.delays.append(time.monotonic() - t0)
                self.next_first += READINGS
                await asyncio.sleep(0.1)


def _creds_args(s: Stack, name: str) -> list[str]:
    c = s.creds[name]
    return ["-h", "127.0.0.1", "-p", str(s.broker.port), "--cafile", str(s.pki.ca_pem),
            "--cert", str(c.cert_pem), "--key", str(c.key_pem)]


async def _run(*argv: str, timeout: float = 30.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


def peak_rss_kb(pid: int | None) -> int:
    """VmHWM: the process's peak resident set since it started."""
    if pid is None:
        return -1
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


async def _with_nodes(s: Stack, attack: Callable[[], object]) -> list[Node]:
    nodes = [Node(n, s.creds[n]) for n in GOOD]
    stop = asyncio.Event()
    runs = [asyncio.create_task(n.run(s, stop)) for n in nodes]
    await asyncio.sleep(0.5)
    try:
        await attack()  # type: ignore[misc]
    finally:
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*runs)
    return nodes


def _check_nodes(s: Stack, nodes: list[Node], what: str) -> float:
    worst = max(max(n.delays) for n in nodes)
    for n in nodes:
        assert n.sent == len(n.delays) > 0, (n.name, n.sent, len(n.delays))
        rows = stored(s.gw, n.name)
        assert len(rows) == n.sent * READINGS, (n.name, len(rows), n.sent)
    print(f"{what}: {sum(len(n.delays) for n in nodes)} bursts acknowledged, worst ACK "
          f"delay {worst * 1000:.0f} ms; peak RSS broker {peak_rss_kb(s.broker.pid)} kB, "
          f"gateway {peak_rss_kb(s.gw.proc.pid if s.gw.proc else None)} kB")
    return worst


def test_client_id_takeovers_are_refused_and_the_victims_keep_their_sessions(stack: Stack) -> None:
    s = stack
    attempts: list[tuple[str, int, str]] = []

    async def attack() -> None:
        deadline = time.monotonic() + ATTACK_S
        i = 0
        while time.monotonic() < deadline:
            victim = ("torpor-gateway", "n1")[i % 2]
            if i % 4 < 2:  # connect, publish, go
                code, out = await _run("mosquitto_pub", *_creds_args(s, "mallory"), "-i", victim,
                                       "-t", topics.up("mallory"), "-m", "x", "-q", "1")
            else:  # a persistent session under the victim's id, held for a moment
                code, out = await _run("mosquitto_sub", *_creds_args(s, "mallory"), "-i", victim,
                                       "-c", "-q", "1", "-t", "#", "-W", "1")
            attempts.append((victim, code, out))
            i += 1

    nodes = asyncio.run(_with_nodes(s, attack))
    worst = _check_nodes(s, nodes, f"takeover ({len(attempts)} attempts)")
    assert worst < WINDOW_S and len(attempts) >= 4
    logs = s.broker.logs
    # Every attacker connection got the attacker's own id; no session was closed for it.
    assert logs.count("as mallory (") >= len(attempts), logs[-3000:]
    assert "Client torpor-gateway already connected" not in logs, logs[-3000:]
    assert "Client n1 already connected" not in logs, logs[-3000:]
    # The gateway never lost its connection: one "connected", no restart of ingest.
    gwlog = s.gw.log.read_text()
    assert gwlog.count("connected to the broker") == 1, gwlog[-3000:]
    assert "ingest failed" not in gwlog and "Traceback" not in gwlog, gwlog[-3000:]


def _raw_announce(s: Stack, size_bytes: bytes) -> tuple[bool, int]:
    """A raw TLS connection with mallory's certificate: CONNECT, then a PUBLISH header
    announcing a huge remaining length, then junk. (closed by the broker, bytes it took)"""
    c = s.creds["mallory"]
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(s.pki.ca_pem))
    ctx.load_cert_chain(str(c.cert_pem), str(c.key_pem))
    cid = b"mallory"
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    sent = 0
    with socket.create_connection(("127.0.0.1", s.broker.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(bytes([0x10, len(body)]) + body)
        assert tls.recv(4)[:2] == b"\x20\x02"
        try:
            tls.sendall(b"\x32" + size_bytes + b"\x00\x10torpor/mallory/up\x00\x01")
            junk = bytes(256 * 1024)
            for _ in range(64):  # up to 16 MB of the announced body
                tls.sendall(junk)
                sent += len(junk)
            tls.settimeout(2)
            closed = tls.recv(1) == b""
        except (OSError, ssl.SSLError):
            closed = True
    return closed, sent


def test_oversized_publishes_are_refused_and_memory_stays_flat(stack: Stack) -> None:
    s = stack
    big = s.tmp / "big.bin"
    with open(big, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    results: dict[str, object] = {}

    async def attack() -> None:
        code, out = await _run("mosquitto_pub", *_creds_args(s, "mallory"), "-i", "mallory",
                               "-t", topics.up("mallory"), "-f", str(big), "-q", "1", timeout=60)
        results["mosquitto_pub"] = (code, out)
        # 256 MB announced (the largest remaining length MQTT can say), 8 connections at once.
        raws = await asyncio.gather(*(asyncio.to_thread(_raw_announce, s, b"\xff\xff\xff\x7f")
                                      for _ in range(8)))
        results["raw"] = raws

    nodes = asyncio.run(_with_nodes(s, attack))
    worst = _check_nodes(s, nodes, "oversized (64 MB publish, 8 x 256 MB announced)")
    assert worst < WINDOW_S
    code, out = results["mosquitto_pub"]  # type: ignore[misc]
    raws = results["raw"]
    assert all(closed for closed, _ in raws), raws  # type: ignore[union-attr]
    # The broker closed each before its body: the gateway never saw any of it.
    assert not stored(s.gw, "mallory")
    gwlog = s.gw.log.read_text()
    assert "dropped a packet" not in gwlog and "Traceback" not in gwlog, gwlog[-3000:]
    assert gwlog.count("connected to the broker") == 1, gwlog[-3000:]
    broker_rss = peak_rss_kb(s.broker.pid)
    assert 0 < broker_rss < 64 * 1024, f"the broker's peak RSS reached {broker_rss} kB"
    print(f"mosquitto_pub -f 64 MB: exit {code}; raw sockets closed after "
          f"{[n for _, n in raws]} bytes")  # type: ignore[union-attr]


def test_the_gateway_session_survives_a_broker_restart(stack: Stack) -> None:
    """A burst published after the broker restarted and before the gateway reconnected is
    kept in the gateway's session and acknowledged once the gateway is back: sent once."""
    s = stack

    s.broker.stop()
    time.sleep(2.0)  # the gateway retries with a growing backoff meanwhile
    s.broker.start()
    node = asyncio.run(asyncio.wait_for(_one_burst(Node("n2", s.creds["n2"]), s), 30))
    assert node.sent == 1 and len(node.delays) == 1
    assert len(stored(s.gw, "n2")) == READINGS
    logs = s.gw.log.read_text()
    assert logs.count("connected to the broker") == 2, logs[-3000:]
    print(f"burst sent right after the broker restart acknowledged after "
          f"{node.delays[0] * 1000:.0f} ms (the gateway's reconnect)")


async def _one_burst(node: Node, s: Stack) -> Node:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(s.pki.ca_pem))
    ctx.load_cert_chain(str(node.creds.cert_pem), str(node.creds.key_pem))
    async with aiomqtt.Client("127.0.0.1", s.broker.port, identifier=node.name,
                              tls_context=ctx, timeout=10) as c:
        await c.subscribe(topics.down(node.name), qos=1)
        gwlog = s.gw.log.read_text()
        # The point: the gateway is not back yet when the burst goes out.
        assert gwlog.count("connected to the broker") == 1, "the gateway reconnected too soon"
        t0 = time.monotonic()
        await c.publish(topics.up(node.name), burst(1), qos=1)
        node.sent += 1
        async with asyncio.timeout(20):
            async for m in c.messages:
                f = proto.decode(bytes(m.payload))  # type: ignore[arg-type]
                if isinstance(f, proto.Ack) and f.msg_id == 1:
                    break
        node.delays.append(time.monotonic() - t0)
    return node
