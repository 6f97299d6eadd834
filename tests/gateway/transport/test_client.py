"""The transport's asyncio client against a real Mosquitto on loopback with real mutual-TLS
certificates; devices and checks use clients that share no code with it (mosquitto_pub,
aiomqtt, raw sockets)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.security.pki import Credentials, DeviceCredentials, Pki
from gateway.transport import broker as gwbroker
from gateway.transport import codec
from gateway.transport.client import ClientOptions, MqttClient
from gateway.transport.codec import Publish
from gateway.transport.errors import (
    ConnectionLost,
    ErrorCode,
    NotConnected,
    PacketTooLarge,
    SubscribeRefused,
    TransportError,
)
from tests.fixtures.broker import RunningBroker, make_pki, mqtt_client

pytestmark = pytest.mark.timeout(120)


def tls(pki: Pki, creds: Credentials | DeviceCredentials | None = None) -> ssl.SSLContext:
    creds = creds or pki.gateway
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_pem))
    ctx.load_cert_chain(str(creds.cert_pem), str(creds.key_pem))
    return ctx


def options(broker: RunningBroker, **kw: Any) -> ClientOptions:
    assert broker.pki is not None
    base: dict[str, Any] = dict(host=broker.host, port=broker.port, client_id=broker.pki.gateway.cn,
                                ssl=tls(broker.pki), connect_timeout=10.0)
    base.update(kw)
    return ClientOptions(**base)


def mosquitto_pub(broker: RunningBroker, device: DeviceCredentials, topic: str,
                  payload: bytes, *extra: str) -> None:
    exe = shutil.which("mosquitto_pub")
    if exe is None:
        pytest.skip("mosquitto_pub is not installed")
    subprocess.run(
        [exe, "-h", broker.host, "-p", str(broker.port), "--cafile", str(device.ca_pem),
         "--cert", str(device.cert_pem), "--key", str(device.key_pem), "-i", device.device_id,
         "-t", topic, "-q", "1", "-s", *extra],
        input=payload, check=True, timeout=20, capture_output=True,
    )


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(main())  # type: ignore[arg-type]


# --- with Mosquitto -----------------------------------------------------------------------

def test_connect_with_mtls_subscribe_and_receive(broker: RunningBroker) -> None:
    assert broker.pki is not None
    dev = broker.pki.issue_device("node-1")

    async def main() -> list[Publish]:
        async with MqttClient(options(broker)) as client:
            assert client.connected and not client.session_present
            assert await client.subscribe(("torpor/+/up", 1)) == (1,)
            await asyncio.to_thread(mosquitto_pub, broker, dev, "torpor/node-1/up", b"\x01burst")
            await asyncio.to_thread(mosquitto_pub, broker, dev, "torpor/node-1/up", b"\x02hello")
            got: list[Publish] = []
            async with asyncio.timeout(10):
                while len(got) < 2:
                    got += await client.receive()
            return got

    got = run(main)
    assert [(m.topic, m.payload, m.qos) for m in got] == [
        ("torpor/node-1/up", b"\x01burst", 1), ("torpor/node-1/up", b"\x02hello", 1)]


def device_options(broker: RunningBroker, device: DeviceCredentials, **kw: Any) -> ClientOptions:
    """A second client beside the gateway's: the broker binds client ids to certificates
    (one connection per identity), so it presents a node's certificate of its own."""
    assert broker.pki is not None
    return options(broker, client_id=device.device_id, ssl=tls(broker.pki, device), **kw)


def test_publish_qos1_gets_every_puback_and_everything_arrives(broker: RunningBroker) -> None:
    n = 3000
    assert broker.pki is not None
    node = broker.pki.issue_device("node-1")

    async def main() -> list[bytes]:
        received: list[bytes] = []
        # the checker is the node the downlinks are for: its own identity, its own topics
        async with mqtt_client(broker, node) as checker:
            await checker.subscribe("torpor/node-1/down", qos=1)

            async def collect() -> None:
                async for m in checker.messages:
                    assert isinstance(m.payload, bytes)
                    received.append(m.payload)
                    if len(received) == n + 1:
                        return

            collector = asyncio.create_task(collect())
            async with MqttClient(options(broker, max_inflight=32)) as client:
                futs = []
                for i in range(n):
                    futs.append(await client.start_publish("torpor/node-1/down", b"%06d" % i))
                    assert client.inflight <= 32
                async with asyncio.timeout(30):
                    await asyncio.gather(*futs)
                assert client.inflight == 0
                await client.publish("torpor/node-1/down", b"last-qos0", qos=0)
            async with asyncio.timeout(30):
                await collector
        return received

    received = run(main)
    # MQTT orders messages within one QoS: the broker may pass the QoS 0 one ahead of
    # QoS 1 ones still queued behind its in-flight window to the checker.
    assert b"last-qos0" in received
    received.remove(b"last-qos0")
    assert received == [b"%06d" % i for i in range(n)]


@pytest.mark.parametrize("size", [10, 200, 20_000, 2_200_000], ids=["1B", "2B", "3B", "4B"])
def test_remaining_lengths_of_1_to_4_bytes_through_the_broker(
        broker_factory: Callable[..., RunningBroker], size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    assert len(codec.encode_remaining_length(size + 20)) == {10: 1, 200: 2, 20_000: 3}.get(size, 4)
    # The gateway's broker refuses packets over MAX_PACKET_SIZE (its bound has tests of its
    # own), which 3- and 4-byte lengths exceed: the client's encoding is the subject here,
    # so this broker's bound is raised for the larger packets.
    settings = gwbroker.BrokerSettings(max_packet_size=max(gwbroker.MAX_PACKET_SIZE, 3_000_000))
    broker = broker_factory(settings=settings)

    async def main() -> Publish:
        async with MqttClient(options(broker, max_packet=3_000_000)) as client:
            await client.subscribe(("torpor/big/#", 1))
            await client.publish("torpor/big/x", payload, qos=1, timeout=20)
            async with asyncio.timeout(20):
                return (await client.receive(1))[0]

    got = run(main)
    assert got.payload == payload and got.topic == "torpor/big/x"


def test_oversized_packet_from_the_broker_ends_the_connection_with_its_code(
        broker: RunningBroker) -> None:
    assert broker.pki is not None
    dev = broker.pki.issue_device("node-2")
    # A packet the broker accepts and forwards (under its MAX_PACKET_SIZE) that is over the
    # client's own, lower limit.
    client_limit, size = 1024, 4000
    assert size + 64 < gwbroker.MAX_PACKET_SIZE

    async def main() -> tuple[ConnectionLost | None, BaseException | None]:
        client = MqttClient(options(broker, max_packet=client_limit))
        await client.connect()
        await client.subscribe(("torpor/+/up", 1))
        await asyncio.to_thread(mosquitto_pub, broker, dev, "torpor/node-2/up", bytes(size))
        async with asyncio.timeout(10):
            err = await client.wait_closed()
        try:
            await client.receive()
        except ConnectionLost as exc:
            return err, exc
        return err, None

    err, raised = run(main)
    assert err is not None and err.code is ErrorCode.PACKET_TOO_LARGE
    assert isinstance(err.__cause__, PacketTooLarge) and err.__cause__.announced > size
    assert raised is err


def test_a_slow_consumer_stops_the_reading_and_loses_nothing(broker: RunningBroker) -> None:
    n, bound, size = 1000, 20, 1000
    assert broker.pki is not None
    node = broker.pki.issue_device("node-9")

    async def main() -> tuple[int, int, list[bytes]]:
        async with MqttClient(options(broker, max_queued=bound)) as client:
            await client.subscribe(("torpor/+/up", 1))
            async with MqttClient(device_options(broker, node)) as pub:
                futs = [await pub.start_publish("torpor/node-9/up", b"%04d" % i + bytes(size))
                        for i in range(n)]
                # nobody reads: the client stops reading the socket once past its bound
                await asyncio.sleep(0.5)
                paused = client.queued
                await asyncio.sleep(0.5)
                still = client.queued
                got: list[bytes] = []
                async with asyncio.timeout(20):
                    while len(got) < n:
                        got += [m.payload[:4] for m in await client.receive(7)]
                    await asyncio.gather(*futs)
            return paused, still, got

    paused, still, got = run(main)
    # the read that crossed the bound is kept whole: at most 256 KiB of these messages
    assert bound <= paused == still <= bound + 256 * 1024 // size
    assert got == [b"%04d" % i for i in range(n)]


def test_on_message_gets_every_message_as_it_is_read(broker: RunningBroker) -> None:
    assert broker.pki is not None
    node = broker.pki.issue_device("node-8")

    async def main() -> list[Publish]:
        got: list[Publish] = []
        done = asyncio.Event()

        def on_message(m: Publish) -> None:
            got.append(m)
            if len(got) == 50:
                done.set()

        async with MqttClient(options(broker), on_message=on_message) as client:
            await client.subscribe(("torpor/+/up", 1), ("torpor/+/status", 0))
            async with MqttClient(device_options(broker, node)) as pub:
                for i in range(25):
                    await pub.publish("torpor/node-8/up", b"u%d" % i, qos=1)
                    await pub.publish("torpor/node-8/status", b"s%d" % i, qos=0)
                async with asyncio.timeout(10):
                    await done.wait()
            with pytest.raises(TransportError):
                await client.receive()  # the callback has them, not the queue
        return got

    got = run(main)
    ups = [m.payload for m in got if m.topic.endswith("/up")]
    assert ups == [b"u%d" % i for i in range(25)]
    assert {m.qos for m in got if m.topic.endswith("/status")} == {0}


def test_persistent_session_keeps_subscriptions_and_messages(broker: RunningBroker) -> None:
    assert broker.pki is not None
    dev = broker.pki.issue_device("node-3")

    async def main() -> tuple[bool, bool, list[Publish]]:
        opts = options(broker, clean_session=False)
        client = MqttClient(opts)
        first = await client.connect()
        await client.subscribe(("torpor/+/up", 1))
        await client.disconnect()
        # while the gateway is away, a node publishes
        await asyncio.to_thread(mosquitto_pub, broker, dev, "torpor/node-3/up", b"while-away")
        second = await client.connect()
        async with asyncio.timeout(10):
            got = await client.receive()
        await client.disconnect()
        # a clean session wipes it
        await MqttClient(options(broker)).connect()
        return first, second, got

    first, second, got = run(main)
    assert (first, second) == (False, True)
    assert [(m.topic, m.payload) for m in got] == [("torpor/node-3/up", b"while-away")]


def test_certificate_of_another_fleet_is_refused_clearly(
        broker: RunningBroker, tmp_path: Path) -> None:
    assert broker.pki is not None
    other = make_pki(tmp_path / "other")
    stranger = other.issue_device("node-1")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(broker.pki.ca_pem))
    ctx.load_cert_chain(str(stranger.cert_pem), str(stranger.key_pem))

    async def main() -> None:
        with pytest.raises(ConnectionLost) as e:
            await MqttClient(options(broker, client_id="node-1", ssl=ctx)).connect()
        assert e.value.code in (ErrorCode.CONNECTION_LOST, ErrorCode.CONNECT_FAILED)
        assert f"{broker.host}:{broker.port}" in str(e.value)

    run(main)


def test_broker_restart_gives_clear_errors_then_reconnects(broker: RunningBroker) -> None:
    async def main() -> None:
        client = MqttClient(options(broker, max_inflight=4))
        await client.connect()
        await client.subscribe(("torpor/+/up", 1))
        reader = asyncio.create_task(client.receive())
        await asyncio.sleep(0.05)
        await asyncio.to_thread(broker.stop)
        async with asyncio.timeout(10):
            err = await client.wait_closed()
        assert err is not None and err.code is ErrorCode.CONNECTION_LOST
        assert "broker closed the connection" in str(err)
        with pytest.raises(ConnectionLost) as e:
            await reader
        assert e.value is err
        with pytest.raises(ConnectionLost):
            await client.publish("torpor/a/down", b"x", qos=1)
        with pytest.raises(ConnectionLost) as e2:
            await client.connect()
        assert e2.value.code is ErrorCode.CONNECT_FAILED
        assert "cannot reach the broker" in str(e2.value)
        assert await asyncio.wait_for(client.wait_closed(), 2) is e2.value
        with pytest.raises(ConnectionLost):
            await client.receive()

        await asyncio.to_thread(broker.start)
        client.options = options(broker, max_inflight=4)  # same port unless it was taken
        await client.connect()
        await client.publish("torpor/a/down", b"again", qos=1, timeout=10)
        await client.disconnect()
        assert await client.wait_closed() is None
        with pytest.raises(NotConnected):
            await client.publish("torpor/a/down", b"x")

    run(main)


def test_inflight_publishes_fail_when_the_connection_drops(broker: RunningBroker) -> None:
    async def main() -> None:
        client = MqttClient(options(broker, max_inflight=8))
        await client.connect()
        futs = [await client.start_publish("torpor/a/down", b"x") for _ in range(8)]
        waiting = asyncio.create_task(client.start_publish("torpor/a/down", b"ninth"))
        broker.kill()
        results = await asyncio.gather(*futs, return_exceptions=True)
        # those acknowledged before the kill succeeded, the rest failed with the reason
        assert all(r is None or isinstance(r, ConnectionLost) for r in results)
        try:
            await waiting
        except ConnectionLost:
            pass

    run(main)


# --- with a scripted server on a raw socket -------------------------------------------------

class Scripted:
    """A TCP server that answers CONNECT with CONNACK, then runs `then(writer)`, and
    records every byte the client sent."""

    def __init__(self, then: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                      Awaitable[None]]) -> None:
        self.then = then
        self.seen = bytearray()
        self.closed = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readexactly(2)  # CONNECT (short client id: one length byte)
        await reader.readexactly(head[1])
        writer.write(b"\x20\x02\x00\x00")
        await self.then(reader, writer)
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                self.seen += data
        self.closed.set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])


def test_oversized_length_refused_before_the_body_arrives() -> None:
    async def main() -> None:
        async def huge(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # 256 MB announced, 1 KB sent: the client must hang up on the header alone
            writer.write(b"\x30\xff\xff\xff\x7f" + bytes(1024))
            await writer.drain()

        srv = Scripted(huge)
        port = await srv.start()
        client = MqttClient(ClientOptions("127.0.0.1", port, "c", max_packet=4096))
        await client.connect()
        t0 = time.monotonic()
        async with asyncio.timeout(5):
            err = await client.wait_closed()
            await srv.closed.wait()
        assert err is not None and err.code is ErrorCode.PACKET_TOO_LARGE
        assert "268435460" in str(err) and "4096" in str(err)
        assert time.monotonic() - t0 < 2
        assert srv.server is not None
        srv.server.close()

    run(main)


def test_keepalive_pings_and_detects_a_dead_broker() -> None:
    async def main() -> None:
        async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            pass  # never answers PINGREQ

        srv = Scripted(silent)
        port = await srv.start()
        client = MqttClient(ClientOptions("127.0.0.1", port, "c", keepalive=1))
        await client.connect()
        async with asyncio.timeout(5):
            err = await client.wait_closed()
            await srv.closed.wait()
        assert err is not None and err.code is ErrorCode.KEEPALIVE_TIMEOUT
        assert b"\xc0\x00" in srv.seen  # it did ping
        assert srv.server is not None
        srv.server.close()

    run(main)


def test_keepalive_holds_a_live_connection(broker: RunningBroker) -> None:
    async def main() -> None:
        async with MqttClient(options(broker, keepalive=1)) as client:
            await asyncio.sleep(2.6)  # over two keepalive periods of silence
            assert client.connected
            await client.publish("torpor/a/down", b"still here", qos=1, timeout=5)

    run(main)


def test_malformed_bytes_from_the_server_end_the_connection_with_their_code() -> None:
    async def main() -> None:
        async def garbage(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"\x40\x02\x00\x00")  # PUBACK with packet id 0
            await writer.drain()

        srv = Scripted(garbage)
        port = await srv.start()
        client = MqttClient(ClientOptions("127.0.0.1", port, "c"))
        await client.connect()
        async with asyncio.timeout(5):
            err = await client.wait_closed()
        assert err is not None and err.code is ErrorCode.BAD_PACKET_ID
        assert srv.server is not None
        srv.server.close()

    run(main)


def test_a_refused_filter_is_a_subscribe_refused() -> None:
    # Mosquitto 2.0 grants what its ACL denies (and then delivers nothing), so the refusal
    # comes from a scripted server.
    async def refuse_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readexactly(2)
        assert head[0] == 0x82
        body = await reader.readexactly(head[1])
        writer.write(b"\x90\x04" + body[:2] + b"\x01\x80")
        await writer.drain()

    async def main() -> None:
        srv = Scripted(refuse_second)
        port = await srv.start()
        async with MqttClient(ClientOptions("127.0.0.1", port, "c")) as client:
            with pytest.raises(SubscribeRefused) as e:
                await client.subscribe(("torpor/node-4/down", 1), ("torpor/node-5/down", 1))
            assert e.value.refused == ("torpor/node-5/down",)
            assert e.value.code is ErrorCode.SUBSCRIBE_REFUSED
            assert "torpor/node-5/down" in str(e.value)
        assert srv.server is not None
        srv.server.close()

    run(main)
