"""The poison frame: a BURST with message id 2^32 - 1 and 5 readings, published by a
hand-written MQTT client (raw TLS socket) with a valid device certificate through the real broker to the real
gateway process, while well-behaved nodes keep sending. It is refused (ERROR malformed, a
dead letter), nothing past u32 is stored, ingest never restarts, the other nodes keep
getting their ACKs within their window and lose nothing, also after a gateway restart;
and a dedup state past u32 that an older gateway stored does not stop a new one."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from gateway import proto
from gateway.security.pki import Pki
from gateway.store import deadletter, devices, readings
from gateway.store.status import read_status
from tests.mpharness import micropython_binary
from tests.system.stack import Stack, StackNode
from tools.bench.fuzz import FuzzConfig, NodeStats, tls_context, well_behaved_node

U32 = 0xFFFFFFFF
NODES = ("n0", "n1", "n2")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("mosquitto_pub") is None,
        reason="mosquitto-clients (mosquitto_pub) is not installed"),
    pytest.mark.skipif(micropython_binary() is None, reason="no MicroPython unix port"),
]


def poison() -> bytes:
    n = 5
    s = proto.Series(tuple(1_700_000_000 + 60 * i for i in range(n)),
                     (tuple(range(n)), tuple(range(n)), (3000,) * n))
    return proto.encode_burst(proto.Burst(U32, proto.SCHEMA_ENV3, 60, s))


def tls_args(stack: Stack, device: str) -> list[str]:
    creds = Pki(stack.pki.path).device_credentials(device)
    return ["-h", "localhost", "-p", str(stack.port), "--cafile", str(stack.pki.ca_pem),
            "--cert", str(creds.cert_pem), "--key", str(creds.key_pem), "-i", device,
            "-V", "mqttv311"]


def mosquitto_pub(stack: Stack, device: str, payload: Path) -> None:
    subprocess.run(["mosquitto_pub", *tls_args(stack, device), "-t", f"torpor/{device}/up",
                    "-q", "1", "-f", str(payload)], check=True, timeout=20,
                   capture_output=True)


def _packet(kind: int, body: bytes) -> bytes:
    n, length = len(body), bytearray()
    while True:
        n, digit = divmod(n, 128)
        length.append(digit | (0x80 if n else 0))
        if not n:
            return bytes([kind]) + bytes(length) + body


def _string(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def _read_packet(sock: ssl.SSLSocket) -> tuple[int, bytes]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the broker closed the connection")
            data += chunk
        return data

    kind = exactly(1)[0]
    length, shift = 0, 0
    while True:
        digit = exactly(1)[0]
        length |= (digit & 0x7F) << shift
        shift += 7
        if not digit & 0x80:
            return kind, exactly(length)


def publish_and_listen(stack: Stack, device: str, payload: Path) -> list[str]:
    """Publish `payload` as `device` and return the gateway's answer on its down topic
    (hex). One connection does both, as a node does: the broker gives every connection of a
    certificate the same client id, so a second client of `device` listening beside a
    publisher would be cut off. mosquitto_pub cannot listen and mosquitto_rr 2.0 sends no
    binary payload, so this is MQTT 3.1.1 by hand over a TLS socket."""
    creds = Pki(stack.pki.path).device_credentials(device)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(stack.pki.ca_pem))
    ctx.load_cert_chain(str(creds.cert_pem), str(creds.key_pem))
    with socket.create_connection(("localhost", stack.port), timeout=20) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(_packet(0x10, _string("MQTT") + b"\x04\x02\x00\x3c" + _string(device)))
        kind, body = _read_packet(sock)
        assert kind == 0x20 and body[1] == 0, ("CONNACK", kind, body)
        sock.sendall(_packet(0x82, b"\x00\x01" + _string(f"torpor/{device}/down") + b"\x01"))
        kind, body = _read_packet(sock)
        assert kind == 0x90 and body[2] != 0x80, ("SUBACK", kind, body)
        sock.sendall(_packet(0x32, _string(f"torpor/{device}/up") + b"\x00\x02"
                             + payload.read_bytes()))
        while True:
            kind, body = _read_packet(sock)
            if kind >> 4 != 3:
                continue  # the PUBACK of the poison
            topic_end = 2 + int.from_bytes(body[:2], "big")
            assert body[2:topic_end] == f"torpor/{device}/down".encode()
            frame = body[topic_end:]
            if kind & 0x06:  # QoS 1: acknowledge it
                sock.sendall(_packet(0x40, frame[:2]))
                frame = frame[2:]
            sock.sendall(b"\xe0\x00")  # DISCONNECT
            return [frame.hex()]


def ingest_restarts(stack: Stack) -> int:
    with stack.db() as conn:
        return int(read_status(conn).detail.get("restarts", {}).get("ingest", 0))


async def attack_while_nodes_send(stack: Stack, payload: Path, evil: str,
                                  stats: dict[str, NodeStats], times: int,
                                  sim: StackNode | None = None) -> list[str]:
    """Nodes send throughout (and `sim`, the real firmware, wakes three times); after a
    second alone, `evil` publishes the poison `times` times. Returns what evil's down
    topic carried (hex payloads)."""
    cfg = FuzzConfig(awake_window_ms=2000, node_period_s=0.05)
    ctxs = {}
    for n in NODES:
        creds = Pki(stack.pki.path).device_credentials(n)
        ctxs[n] = tls_context(stack.pki.ca_pem, creds.cert_pem, creds.key_pem)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(well_behaved_node(n, ctxs[n], stack.port, cfg, stats[n], stop))
             for n in NODES]
    down: list[str] = []
    wakes = asyncio.create_task(sim.wake(3)) if sim is not None else None
    try:
        await asyncio.sleep(1.0)
        for _ in range(times):
            # evil listens on its own down topic on the connection it publishes on
            down += await asyncio.to_thread(publish_and_listen, stack, evil, payload)
            await asyncio.sleep(0.3)
        if wakes is not None:
            summary = await asyncio.wait_for(wakes, 60)
            assert summary.kinds["sleep"] == 3, summary.as_dict()
        await asyncio.sleep(1.0)  # the nodes go on after the attack
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return down


def check_nodes(stack: Stack, stats: dict[str, NodeStats], attack_at: float) -> float:
    """Every node's bursts acknowledged within the window and stored; the worst ACK
    delay (s) of those sent from `attack_at` on."""
    with stack.db() as conn:
        for n in NODES:
            st = stats[n]
            assert not st.late, f"{n}: {len(st.late)} bursts not acknowledged within 2 s"
            assert st.acked >= 5, f"{n} got {st.acked} ACKs"
            assert readings.count_rows(conn, n) == st.next_id - 1, f"{n} lost readings"
    return max((d for s in stats.values() for t, d in s.delays if t >= attack_at), default=0.0)


def test_the_poison_burst_is_refused_and_the_others_keep_their_acks(
        stack: Stack, tmp_path: Path) -> None:
    evil = "evil"
    for name in (evil, *NODES):
        stack.cli("device", "add", name, "--issue-cert")
    # What an older gateway stored after taking this frame: a range past u32. The new
    # gateway starts on it all the same.
    with stack.db() as conn:
        conn.execute("INSERT INTO dedup(device, hwm, ranges, total) VALUES (?, 0, ?, 5)",
                     (evil, f"{U32}-{U32 + 4}"))
    sim = stack.add_node("sim0", seed=5, send_every=1)
    stack.start()
    payload = tmp_path / "poison.bin"
    payload.write_bytes(poison())

    stats = {n: NodeStats() for n in NODES}
    t_attack = time.monotonic() + 1.0
    down = asyncio.run(attack_while_nodes_send(stack, payload, evil, stats, times=3, sim=sim))
    worst = check_nodes(stack, stats, t_attack)
    # The real firmware's readings all reached the store; the node holds none unacked.
    sampled = sim.log().readings
    with stack.db() as conn:
        assert readings.count_rows(conn, "sim0") == len(sampled) > 0
    assert sim.log().timings[-1]["depth"] == 0, sim.log().timings[-1]
    print(f"\npoison frame: worst ACK delay of the well-behaved nodes {1000 * worst:.1f} ms "
          f"(window 2000 ms), {sum(s.acked for s in stats.values())} bursts acknowledged")

    # evil was answered ERROR malformed, each time, and nothing past u32 is stored.
    frames = [proto.decode(bytes.fromhex(h)) for h in down]
    assert [type(f) for f in frames] == [proto.Error] * 3, frames
    assert all(isinstance(f, proto.Error) and f.code == proto.ErrorCode.MALFORMED
               and f.ref == U32 for f in frames), frames
    with stack.db() as conn:
        assert readings.count_rows(conn, evil) == 0
        hwm, ranges = conn.execute("SELECT hwm, ranges FROM dedup WHERE device=?",
                                   (evil,)).fetchone()
        assert hwm <= U32 and all(int(x) <= U32 for r in ranges.split(",") if r
                                  for x in r.split("-"))
        letters = deadletter.list_recent(conn, evil)
        assert len(letters) == 3 and all(d.reason == "malformed" and d.raw == poison()
                                         for d in letters)
        assert devices.get(conn, evil).status in devices.SERVED  # 3 < the threshold (5)
    assert ingest_restarts(stack) == 0
    assert "Traceback" not in stack.log_text()

    # A restarted gateway starts on what this one stored and serves everyone, evil too.
    stack.stop()
    stack.start()
    stats2 = {n: NodeStats(next_id=stats[n].next_id) for n in NODES}
    again = asyncio.run(attack_while_nodes_send(stack, payload, evil, stats2, times=1))
    check_nodes(stack, stats2, time.monotonic())
    assert [proto.decode(bytes.fromhex(h)).code for h in again] == [  # type: ignore[union-attr]
        proto.ErrorCode.MALFORMED]
    good = tmp_path / "good.bin"
    n = 5
    good.write_bytes(proto.encode_burst(proto.Burst(1, proto.SCHEMA_ENV3, 60, proto.Series(
        tuple(1_700_000_000 + 60 * i for i in range(n)),
        (tuple(range(n)), tuple(range(n)), (3000,) * n)))))
    mosquitto_pub(stack, evil, good)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with stack.db() as conn:
            if readings.count_rows(conn, evil) == 5:
                break
        time.sleep(0.1)
    with stack.db() as conn:
        assert readings.count_rows(conn, evil) == 5
    assert ingest_restarts(stack) == 0
    assert "Traceback" not in stack.log_text()
