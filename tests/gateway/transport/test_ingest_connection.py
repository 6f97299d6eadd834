"""The gateway's busy MQTT paths on its own transport: answers written without waiting
(`publish_nowait`), every message and PUBACK against a real Mosquitto, and the packet
bound of the ingest connection (an oversized packet let go unread and acknowledged)."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import Callable

import pytest

from gateway import proto
from gateway.transport import codec
from gateway.transport.client import MqttClient
from gateway.transport.codec import Decoder, Oversized, Publish
from tests.fixtures.broker import RunningBroker, transport_client


def _publish(topic: bytes, payload: bytes, qos: int, mid: int = 0) -> bytes:
    return codec.encode_publish(topic, payload, qos, mid)


def _drain(d: Decoder) -> list[Publish | Oversized]:
    out: list[Publish | Oversized] = []
    while (item := d.next_item()) is not None:
        assert isinstance(item, Publish | Oversized)
        out.append(item)
    return out


def test_decoder_drops_an_oversized_packet_unread_and_the_stream_goes_on() -> None:
    """The announced length is past the bound: nothing of it is kept beyond its topic and
    packet id, and the packets behind it arrive."""
    d = Decoder(4096, drop_oversized=True)
    body_size = 16 * 1024 * 1024
    topic_part = _publish(b"torpor/bad/up", b"", 1, mid=9)[2:]  # topic and packet id
    header = b"\x32" + codec.encode_remaining_length(len(topic_part) + body_size)
    got: list[Publish | Oversized] = []
    tracemalloc.start()
    try:
        d.feed(header + topic_part)
        got += _drain(d)
        chunk = bytes(60_000)
        left = body_size
        while left:
            n = min(left, len(chunk))
            d.feed(chunk[:n])
            left -= n
            got += _drain(d)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    d.feed(_publish(b"torpor/good/up", b"fine", 1, mid=10))
    got += _drain(d)
    assert got == [Oversized(codec.PacketType.PUBLISH, len(header) + len(topic_part) + body_size,
                             "torpor/bad/up", 1, 9),
                   Publish("torpor/good/up", b"fine", 1, packet_id=10)]
    assert peak < 1024 * 1024, peak  # 16 MB went by; a few reads' worth was held
    assert d.buffered == 0


def test_decoder_lets_an_announced_256_mb_go_without_reading_it() -> None:
    d = Decoder(4096, drop_oversized=True)
    # 256 MB announced (the four-byte maximum), then bytes that all belong to it.
    d.feed(b"\x30\xff\xff\xff\x7f" + b"\x00\x03t/x" + bytes(1000))
    assert _drain(d) == [Oversized(codec.PacketType.PUBLISH, 268_435_460, "t/x")]
    assert d.buffered == 0


def test_decoder_without_dropping_still_refuses_an_oversized_packet() -> None:
    d = Decoder(4096)
    with pytest.raises(codec.PacketTooLarge):
        d.feed(b"\x30\xff\xff\xff\x7f")


def test_decoder_split_anywhere_drops_the_same_packet() -> None:
    """The oversized packet and its neighbours cut at every offset decode the same."""
    stream = (_publish(b"a/1", b"x", 1, 1) + _publish(b"big/2", bytes(300), 1, 2)
              + _publish(b"a/3", b"y", 0))
    want = [Publish("a/1", b"x", 1, packet_id=1),
            Oversized(codec.PacketType.PUBLISH, len(_publish(b"big/2", bytes(300), 1, 2)),
                      "big/2", 1, 2),
            Publish("a/3", b"y")]
    for cut in range(1, len(stream)):
        d = Decoder(64, drop_oversized=True)
        got: list[Publish | Oversized] = []
        for part in (stream[:cut], stream[cut:]):
            d.feed(part)
            got += _drain(d)
        assert got == want, cut


def test_decoder_cost_is_linear_in_a_packet_read_in_small_pieces() -> None:
    """A packet arriving in many small reads is copied a bounded number of times.
    Printed, not asserted: the time."""
    size = 8 * 1024 * 1024
    d = Decoder(2 * size)
    packet = _publish(b"t/big", bytes(size), 0)
    t0 = time.perf_counter()
    got = []
    for i in range(0, len(packet), 16384):
        d.feed(packet[i:i + 16384])
        got += _drain(d)
    elapsed = time.perf_counter() - t0
    assert got == [Publish("t/big", bytes(size))]
    print(f"8 MB in 16 KB reads: {elapsed * 1000:.0f} ms")


def test_publish_nowait_delivers_in_order_and_every_puback_arrives(
    broker_factory: Callable[..., RunningBroker],
) -> None:
    broker = broker_factory(tls=True)
    assert broker.pki is not None
    node = broker.pki.issue_device("n1")
    # One- and two-byte remaining lengths, up to the largest frame the broker takes.
    sizes = [0, 1, 120, 122, 4000, proto.MAX_FRAME - 6]
    payloads = [b"%05d:" % i + bytes(sizes[i % len(sizes)]) for i in range(300)]

    async def main() -> tuple[list[bytes], int, int]:
        got: list[bytes] = []
        done = asyncio.Event()

        def received(m: Publish) -> None:
            got.append(m.payload)
            if len(got) == len(payloads):
                done.set()

        # Two identities: the broker gives every connection of one certificate one id.
        sink = transport_client(broker, max_packet=1 << 20)
        sink.on_message = received
        async with sink, transport_client(broker, node, max_inflight=1000) as source:
            await sink.subscribe(("torpor/#", 1))
            futures = [source.publish_nowait("torpor/n1/up", p, qos=1 if i % 3 else 0)
                       for i, p in enumerate(payloads)]
            await asyncio.wait_for(done.wait(), 30)
            acks = [f for f in futures if f is not None]
            await asyncio.wait_for(asyncio.gather(*acks), 30)
            return got, len(acks), source.inflight

    got, acked, left = asyncio.run(main())
    # The QoS 1 ones in order; the broker may pass a QoS 0 one ahead of those it holds
    # back for the subscriber's in-flight window.
    assert [p for p in got if int(p[:5]) % 3] == [p for i, p in enumerate(payloads) if i % 3]
    assert sorted(got) == payloads
    assert acked == 200 and left == 0


def test_an_oversized_message_is_dropped_acknowledged_and_not_sent_again(
    broker_factory: Callable[..., RunningBroker],
) -> None:
    """Over the client's bound: counted, reported with its topic, and PUBACKed, so the
    persistent session does not hold it for the next connection; the next one arrives."""
    broker = broker_factory(tls=False)
    bound = 1024

    async def main() -> tuple[list[Oversized], list[bytes], int, list[bytes]]:
        dropped: list[Oversized] = []
        got: list[bytes] = []
        arrived = asyncio.Event()

        def received(m: Publish) -> None:
            got.append(m.payload)
            arrived.set()

        def client() -> MqttClient:
            c = transport_client(broker, client_id="bounded", clean_session=False,
                                 max_packet=bound, drop_oversized=True)
            c.on_message = received
            c.on_oversized = dropped.append
            return c

        async with client() as c:
            await c.subscribe(("big/#", 1))
            async with transport_client(broker) as pub:
                await pub.publish("big/1", bytes(4 * bound), qos=1)
                await pub.publish("big/2", b"small", qos=1)
            await asyncio.wait_for(arrived.wait(), 10)
            count = c.oversized
        again: list[bytes] = []
        got_before = list(got)
        got.clear()
        async with client():
            await asyncio.sleep(0.5)  # what the session still held would come now
            again = list(got)
        return dropped, got_before, count, again

    dropped, got, count, again = asyncio.run(main())
    assert got == [b"small"] and count == 1
    assert [(o.topic, o.qos) for o in dropped] == [("big/1", 1)] and dropped[0].size > bound
    assert again == []

