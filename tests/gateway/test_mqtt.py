"""The lean MQTT path (packet splitting reader, publisher, joined writes): the same bytes
and callbacks as paho alone."""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Callable
from typing import Any

import pytest
from paho.mqtt.client import MQTT_ERR_AGAIN, MQTT_ERR_SUCCESS, CallbackAPIVersion, Client, MQTTv311
from paho.mqtt.enums import MQTTErrorCode

from gateway import broker as gwbroker
from gateway import mqtt, proto
from tests.fixtures.broker import RunningBroker, mqtt_client


def _publish(topic: bytes, payload: bytes, qos: int, mid: int = 0) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"") + payload
    return mqtt._fixed_header(0x30 | qos << 1, len(body)) + body


def test_reader_splits_packets_however_the_bytes_arrive() -> None:
    """Every packet whole, whatever the read boundaries: a byte at a time, then all at once."""
    big = bytes(range(256)) * 70  # a three-byte remaining length
    stream = b"".join([
        _publish(b"t/a", b"one", 1, mid=7),
        _publish(b"t/b", big, 0),
        b"\x40\x02\x00\x05",  # PUBACK of the publisher's packet id 5
        b"\xd0\x00",  # PINGRESP: paho's own handler
        _publish(b"t/c", b"", 1, mid=8),
    ])
    for chunk in (1, 7, len(stream)):
        a, b = socket.socketpair()
        with a, b:
            a.setblocking(False)
            paho = Client(CallbackAPIVersion.VERSION2, protocol=MQTTv311)
            paho._sock = a
            paho._ping_t = 1.0
            got: list[tuple[str, bytes]] = []
            publisher = mqtt.Publisher(paho)
            publisher.inflight[5] = "token"
            tokens: list[str] = []
            publisher.on_ack = tokens.append
            read = mqtt._reader(paho, lambda t, p, into=got: into.append((t, p)), publisher,
                                max_packet=1 << 20)
            for i in range(0, len(stream), chunk):
                b.sendall(stream[i:i + chunk])
                while read() == MQTT_ERR_SUCCESS:
                    pass
            assert got == [("t/a", b"one"), ("t/b", big), ("t/c", b"")]
            assert tokens == ["token"] and not publisher.inflight
            assert paho._ping_t == 0  # the PINGRESP reached paho
            b.setblocking(False)
            assert b.recv(64) == b"\x40\x02\x00\x07\x40\x02\x00\x08"  # our PUBACKs
            paho._sock = None


def test_reader_refuses_a_remaining_length_over_four_bytes() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        paho = Client(CallbackAPIVersion.VERSION2, protocol=MQTTv311)
        paho._sock = a
        read = mqtt._reader(paho, lambda t, p: None, mqtt.Publisher(paho))
        b.sendall(b"\x30\xff\xff\xff\xff\x01")
        assert read() == MQTTErrorCode.MQTT_ERR_PROTOCOL
        b.close()
        assert read() == MQTTErrorCode.MQTT_ERR_CONN_LOST  # end of stream
        paho._sock = None


def test_publisher_delivers_in_order_and_hands_back_every_token(
    broker_factory: Callable[..., RunningBroker],
) -> None:
    broker = broker_factory(tls=True)
    assert broker.pki is not None
    node = broker.pki.issue_device("n1")
    # One- and two-byte remaining lengths, up to the largest frame the broker takes.
    sizes = [0, 1, 120, 122, 4000, proto.MAX_FRAME - 6]
    payloads = [b"%05d:" % i + bytes(sizes[i % len(sizes)]) for i in range(300)]

    async def main() -> tuple[list[bytes], list[int], int]:
        got: list[bytes] = []
        tokens: list[int] = []
        done = asyncio.Event()
        # Two identities: the broker gives every connection of one certificate one id.
        async with mqtt_client(broker) as sink, mqtt_client(broker, node) as source:
            await sink.subscribe("torpor/#", qos=1)

            async def collect() -> None:
                async for message in sink.messages:
                    assert isinstance(message.payload, bytes)
                    got.append(message.payload)
                    if len(got) == len(payloads):
                        done.set()

            task = asyncio.create_task(collect())
            publisher = mqtt.lean(source)
            assert mqtt.lean(source) is publisher  # once per connection
            publisher.on_ack = tokens.append
            for i, payload in enumerate(payloads):
                assert publisher.publish(b"torpor/n1/up", payload, i)
                if i % 50 == 49:
                    publisher.send()
            publisher.send()
            await asyncio.wait_for(done.wait(), 30)
            for _ in range(500):
                if len(tokens) == len(payloads):
                    break
                await asyncio.sleep(0.01)
            task.cancel()
            return got, tokens, len(publisher.inflight)

    got, tokens, left = asyncio.run(main())
    assert got == payloads
    assert sorted(tokens) == list(range(len(payloads))) and left == 0


@pytest.mark.parametrize("tls", [True, False])
def test_lean_client_gets_every_message_and_puback(
    broker_factory: Callable[..., RunningBroker], tls: bool
) -> None:
    broker = broker_factory(tls=tls)
    n = 2000

    async def main() -> tuple[list[bytes], set[int], int]:
        got: list[bytes] = []
        acked: set[int] = set()
        done = asyncio.Event()
        async with mqtt_client(broker, max_inflight_messages=0) as client:
            await client.subscribe("lean/#", qos=1)

            def received(topic: str, payload: bytes) -> None:
                assert topic == f"lean/{int(payload) % 7}"
                got.append(payload)
                if len(got) == n:
                    done.set()

            mqtt.lean(client, received=received)
            paho = client._client

            def on_publish(_c: Any, _u: Any, mid: int, *_: Any) -> None:
                acked.add(mid)

            paho.on_publish = on_publish
            # Every third one at QoS 0; the rest arrive at QoS 1 and need our PUBACKs, or
            # the broker stops at its in-flight limit.
            infos = [paho.publish(f"lean/{i % 7}", b"%05d" % i, qos=0 if i % 3 == 0 else 1)
                     for i in range(n)]
            mids = {info.mid for i, info in enumerate(infos) if i % 3}
            await asyncio.wait_for(done.wait(), 30)
            for _ in range(500):
                if acked >= mids:
                    break
                await asyncio.sleep(0.01)
            assert acked >= mids
            return got, acked, len(mids)

    got, acked, sent = asyncio.run(main())
    assert sorted(got) == [b"%05d" % i for i in range(n)]
    assert sent == n - len(range(0, n, 3))  # every QoS 1 publish got its PUBACK


class _Paho:
    """What the joined writer uses of paho: the packet queue, `_sock_send`, the fallback."""

    def __init__(self, accept: list[int]) -> None:
        self._out_packet: collections.deque[dict[str, Any]] = collections.deque()
        self.accept = accept  # bytes taken by each send; 0: the socket is full
        self.wire = bytearray()
        self.sends = 0
        self.fallbacks = 0

    def queue(self, command: int, data: bytes, qos: int = 1) -> None:
        self._out_packet.append({"command": command, "mid": 0, "qos": qos, "pos": 0,
                                 "to_process": len(data), "packet": data, "info": None})

    def _sock_send(self, buf: bytes) -> int:
        self.sends += 1
        n = self.accept.pop(0) if self.accept else len(buf)
        if n == 0:
            raise BlockingIOError
        self.wire += buf[:n]
        return min(n, len(buf))

    def _packet_write(self) -> MQTTErrorCode:
        self.fallbacks += 1
        while self._out_packet:
            p = self._out_packet.popleft()
            self.wire += p["packet"][p["pos"]:]
        return MQTT_ERR_SUCCESS

    def _easy_log(self, *args: Any) -> None:
        pass


def test_joined_writer_sends_packets_together_and_resumes_partial_writes() -> None:
    packets = [bytes([0x40, 2, 0, i]) for i in range(1, 6)] + [b"\x32\x05abcde"]
    fake = _Paho(accept=[7, 0, 3])  # part of the second packet, a full socket, then 3 bytes
    for data in packets:
        fake.queue(data[0], data)
    write = mqtt._joined_writer(fake)
    assert write() == MQTT_ERR_AGAIN  # 7 bytes out, then the socket is full
    assert bytes(fake.wire) == b"".join(packets)[:7] and len(fake._out_packet) == 5
    assert fake._out_packet[0]["pos"] == 3
    assert write() == MQTT_ERR_SUCCESS
    assert bytes(fake.wire) == b"".join(packets) and not fake._out_packet
    assert fake.sends == 4 and fake.fallbacks == 0
    # A QoS 0 PUBLISH or a DISCONNECT at the head goes to paho's own writer.
    fake.queue(0x30, b"\x30\x03abc", qos=0)
    fake.queue(0x40, b"\x40\x02\x00\x09")
    assert write() == MQTT_ERR_SUCCESS and fake.fallbacks == 1 and not fake._out_packet


def _lean_pair(max_packet: int = gwbroker.MAX_PACKET_SIZE) -> tuple[Any, Any, Any, list[tuple[str, bytes]], mqtt.Publisher]:
    a, b = socket.socketpair()
    a.setblocking(False)
    paho = Client(CallbackAPIVersion.VERSION2, protocol=MQTTv311)
    paho._sock = a
    got: list[tuple[str, bytes]] = []
    publisher = mqtt.Publisher(paho)
    read = mqtt._reader(paho, lambda t, p: got.append((t, p)), publisher, max_packet)
    return a, b, (paho, read), got, publisher


def _drain_reads(read: Callable[[], MQTTErrorCode]) -> None:
    while read() == MQTT_ERR_SUCCESS:
        pass


def test_reader_drops_an_oversized_packet_unread_and_acknowledges_it() -> None:
    """The announced length is past the bound: nothing of it is kept beyond its topic and
    packet id, it is acknowledged (no redelivery), and the packets behind it arrive."""
    import tracemalloc

    a, b, (paho, read), got, publisher = _lean_pair()
    body_size = 16 * 1024 * 1024
    head = _publish(b"torpor/bad/up", b"", 1, mid=9)  # topic and packet id, no payload yet
    topic_part = head[2:]  # without the fixed header
    header = mqtt._fixed_header(0x32, len(topic_part) + body_size)
    with a, b:
        b.setblocking(False)
        tracemalloc.start()
        try:
            b.sendall(header + topic_part)
            _drain_reads(read)
            chunk = bytes(60_000)
            left = body_size
            while left:
                n = min(left, len(chunk))
                b.sendall(chunk[:n])
                left -= n
                _drain_reads(read)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        b.sendall(_publish(b"torpor/good/up", b"fine", 1, mid=10))
        _drain_reads(read)
        assert got == [("torpor/good/up", b"fine")]
        assert publisher.oversized == 1
        assert b.recv(64) == b"\x40\x02\x00\x09\x40\x02\x00\x0a"  # both acknowledged
        assert peak < 1024 * 1024, peak  # 16 MB went by; a few reads' worth was held
        paho._sock = None


def test_reader_refuses_an_announced_256_mb_before_reading_it() -> None:
    a, b, (paho, read), got, publisher = _lean_pair()
    with a, b:
        # 256 MB announced (the four-byte maximum), then the stream goes on with a packet
        # that can never be reached: the connection stays, the reader just skips.
        b.sendall(b"\x30\xff\xff\xff\x7f" + b"\x00\x03t/x" + bytes(1000))
        _drain_reads(read)
        assert publisher.oversized == 1 and got == []
        paho._sock = None


def test_reader_cost_is_linear_in_a_packet_read_in_small_pieces() -> None:
    """A packet arriving in many small reads is copied a bounded number of times (the
    reader used to join each read onto what it held). Printed, not asserted: the time."""
    import time

    size = 8 * 1024 * 1024
    a, b, (paho, read), got, publisher = _lean_pair(max_packet=2 * size)
    with a, b:
        packet = _publish(b"t/big", bytes(size), 0)
        t0 = time.perf_counter()
        for i in range(0, len(packet), 16384):
            b.sendall(packet[i:i + 16384])
            _drain_reads(read)
        elapsed = time.perf_counter() - t0
        assert got == [("t/big", bytes(size))]
        print(f"8 MB in 16 KB reads: {elapsed * 1000:.0f} ms")
        paho._sock = None
