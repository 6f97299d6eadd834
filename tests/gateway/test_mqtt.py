"""paho with read-ahead, lean PUBACKs and joined writes: the same bytes and callbacks as paho alone."""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Callable
from typing import Any

import pytest
from paho.mqtt.client import MQTT_ERR_AGAIN, MQTT_ERR_SUCCESS
from paho.mqtt.enums import MQTTErrorCode

from gateway import mqtt
from tests.fixtures.broker import RunningBroker, mqtt_client


def test_buffered_socket_serves_small_reads_from_one_recv() -> None:
    a, b = socket.socketpair()
    with a, b:
        reads: list[int] = []

        class Counting:
            def recv(self, n: int) -> bytes:
                reads.append(n)
                return a.recv(n)

            def fileno(self) -> int:
                return a.fileno()

        buffered = mqtt.BufferedSocket(Counting())
        b.sendall(b"\x40\x02\x00\x01" + b"\x40\x02\x00\x02")  # two PUBACKs
        got = [buffered.recv(1), buffered.recv(1), buffered.recv(2)]
        assert got == [b"\x40", b"\x02", b"\x00\x01"]
        assert buffered.pending() == 4
        assert [buffered.recv(1), buffered.recv(1), buffered.recv(8)] == [b"\x40", b"\x02", b"\x00\x02"]
        assert buffered.pending() == 0 and len(reads) == 1
        b.sendall(b"xyz")
        assert buffered.recv(8) == b"xyz"  # nothing held: straight through
        a.setblocking(False)
        with pytest.raises(BlockingIOError):
            buffered.recv(1)
        b.close()
        assert buffered.recv(1) == b""  # end of stream reaches paho as before
        assert buffered.fileno() == a.fileno()


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
