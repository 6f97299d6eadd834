"""paho with read-ahead and lean PUBACKs: the same messages and acknowledgements as paho alone."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest

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
            mqtt.lean(client)
            paho = client._client

            def on_message(_c: Any, _u: Any, message: Any) -> None:
                got.append(message.payload)
                if len(got) == n:
                    done.set()

            def on_publish(_c: Any, _u: Any, mid: int, *_: Any) -> None:
                acked.add(mid)

            paho.on_message = on_message
            paho.on_publish = on_publish
            mids = {paho.publish(f"lean/{i % 7}", b"%05d" % i, qos=1).mid for i in range(n)}
            await asyncio.wait_for(done.wait(), 30)
            for _ in range(500):
                if acked >= mids:
                    break
                await asyncio.sleep(0.01)
            return got, acked, len(mids)

    got, acked, sent = asyncio.run(main())
    assert sorted(got) == [b"%05d" % i for i in range(n)]
    assert len(acked) == sent == n
