"""The relay against real upstream Mosquitto brokers and a real SQLite file.

A small TCP proxy between relay and broker lets tests hold back PUBACKs or keep the relay
out while a subscriber gets ready; the broker itself is really stopped and restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gateway.config import UpstreamConfig
from gateway.errors import ConfigError
from gateway.pipeline.formats import readings_payload
from gateway.pipeline.relay import UNDELETED_MAX, Relay, UpstreamSettings
from gateway.proto import SCHEMA_ENV3, Series
from gateway.store.db import transaction
from gateway.store.outbox import Outbox, OutboxItem, Queued, enqueue_queued
from tests.fixtures.broker import RunningBroker, free_port, mqtt_client

REPO = Path(__file__).resolve().parents[3]
TOPIC = "upstream/node-1/readings"


def settings(broker: RunningBroker | None = None, port: int | None = None,
             **kw: Any) -> UpstreamSettings:
    base = UpstreamSettings(
        enabled=True,
        host="127.0.0.1",
        port=port if port is not None else broker.port if broker else free_port(),
        tls=False,
        client_id=f"relay-{time.monotonic_ns()}",
        reconnect_min_s=0.1,
        reconnect_max_s=0.4,
    )
    return replace(base, **kw)


def fill(db: Path, n: int, start: int = 0, created: float | None = None,
         payload: Callable[[int], bytes] | None = None) -> None:
    box = Outbox(db)
    now = time.time() if created is None else created
    box.put(
        OutboxItem(TOPIC, payload(i) if payload else b"%06d" % i, now, "node-1", "readings")
        for i in range(start, start + n)
    )
    box.close()


def outbox_state(db: Path) -> tuple[int, int]:
    box = Outbox(db)
    try:
        return box.depth(), box.counters().delivered
    finally:
        box.close()


async def until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def collector(broker: RunningBroker) -> AsyncIterator[list[bytes]]:
    """Payloads arriving on the upstream broker, in arrival order (QoS 1 subscription)."""
    got: list[bytes] = []
    async with mqtt_client(broker, identifier=f"sink-{time.monotonic_ns()}") as client:
        await client.subscribe("#", qos=1)

        async def pump() -> None:
            async for msg in client.messages:
                got.append(bytes(msg.payload))  # type: ignore[arg-type]

        task = asyncio.create_task(pump())
        try:
            yield got
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


@contextlib.asynccontextmanager
async def running(relay: Relay) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(relay.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


class Proxy:
    """TCP relay-to-broker pass-through: `gate` false refuses new connections, `mute_acks`
    swallows everything the broker sends after CONNACK, `cut()` drops live connections."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.gate = True
        self.mute_acks = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if not self.gate:
            w.close()
            return
        try:
            br, bw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            w.close()
            return
        self._conns |= {w, bw}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, down: bool) -> None:
            first = True
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if down and not first and self.mute_acks:
                        continue
                    first = False
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(r, bw, False), pipe(br, w, True))
        self._conns -= {w, bw}

    def cut(self) -> None:
        for w in list(self._conns):
            w.close()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()


def test_delivers_in_order_and_deletes_after_puback(
    broker_factory: Callable[..., RunningBroker], tmp_path: Path
) -> None:
    upstream = broker_factory(tls=False)
    db = tmp_path / "gw.db"
    fill(db, 500)

    async def main() -> None:
        async with collector(upstream) as got:
            relay = Relay(db, settings(upstream), inflight=16)
            async with running(relay):
                await until(lambda: len(got) >= 500 and outbox_state(db)[0] == 0, 20, "delivery")
                # Items enqueued while running go out too, after the first ones.
                fill(db, 100, start=500)
                relay.notify()
                await until(lambda: len(got) >= 600 and outbox_state(db)[0] == 0, 20, "more")
                status = await relay.status()
        assert got == [b"%06d" % i for i in range(600)]
        assert status.connected and status.relayed == 600 and status.pending == 0
        assert status.counters.delivered == 600 and status.last_error is None

    asyncio.run(main())


def test_items_handed_over_go_out_without_being_read_back(
    broker_factory: Callable[..., RunningBroker], tmp_path: Path
) -> None:
    """Ingest hands the relay what it committed; an item nobody handed over (another
    process's event) is read from the outbox, in order, and nothing goes out twice."""
    upstream = broker_factory(tls=False)
    db = tmp_path / "gw.db"
    fill(db, 50)
    writer = Outbox(db)

    def commit(lo: int, hi: int) -> list[Queued]:
        with transaction(writer.conn):
            return enqueue_queued(writer.conn, [
                OutboxItem(TOPIC, b"%06d" % i, time.time(), "node-1", "readings")
                for i in range(lo, hi)])

    async def main() -> tuple[list[bytes], list[int]]:
        read_back: list[int] = []
        reads = [0]
        async with collector(upstream) as got:
            relay = Relay(db, settings(upstream), inflight=8, poll_s=30.0)
            async with running(relay):
                await until(lambda: len(got) >= 50 and outbox_state(db)[0] == 0, 20, "the first")
                box = relay._box()  # noqa: SLF001  (counts the relay's own reads)
                peek = box.peek

                def counted(n: int, after: int = 0) -> list[Queued]:
                    reads[0] += 1
                    items = peek(n, after)
                    read_back.extend(q.id for q in items)
                    return items

                box.peek = counted  # type: ignore[method-assign]
                handed = commit(50, 80)
                assert [q.id for q in handed] == list(range(51, 81))
                relay.notify(handed)
                await until(lambda: len(got) >= 80, 20, "the handed-over items")
                assert reads[0] == 0  # not even a read that finds nothing
                commit(80, 90)  # committed elsewhere: not handed over
                relay.notify(commit(90, 120))
                await until(lambda: len(got) >= 120 and outbox_state(db)[0] == 0, 20, "the rest")
        return got, read_back

    got, read_back = asyncio.run(main())
    writer.close()
    assert got == [b"%06d" % i for i in range(120)]
    assert not set(read_back) & set(range(51, 81))  # sent as handed over
    assert set(range(81, 91)) <= set(read_back)  # the gap was read from the outbox
    assert outbox_state(db) == (0, 120)


def test_nothing_is_deleted_without_puback(
    broker_factory: Callable[..., RunningBroker], tmp_path: Path
) -> None:
    upstream = broker_factory(tls=False)
    db = tmp_path / "gw.db"
    fill(db, 40)

    async def main() -> None:
        proxy = Proxy(upstream.port)
        await proxy.start()
        async with collector(upstream) as got:
            relay = Relay(db, settings(port=proxy.port), inflight=8, publish_timeout_s=1.5)
            proxy.mute_acks = True  # CONNACK passes, every PUBACK is swallowed
            async with running(relay):
                await until(lambda: len(got) >= 8, 10, "the first window")
                await asyncio.sleep(0.5)
                # The broker has them, the relay never heard back: all still stored, and the
                # window stopped more from going out.
                assert outbox_state(db) == (40, 0)
                assert len(got) == 8
                proxy.mute_acks = False
                # The publish timeout ends the session; the next one replays from the oldest.
                # (The broker's PUBACK can come before its delivery to our subscriber: wait
                # for both.)
                await until(lambda: outbox_state(db)[0] == 0 and len(set(got)) >= 40, 20, "replay")
                assert relay.reconnects >= 1
        await proxy.close()
        assert got[:8] == [b"%06d" % i for i in range(8)]
        assert sorted(set(got)) == [b"%06d" % i for i in range(40)]
        assert outbox_state(db) == (0, 40)

    asyncio.run(main())


def test_broker_down_outbox_grows_then_replays_in_order(
    broker_factory: Callable[..., RunningBroker], tmp_path: Path
) -> None:
    upstream = broker_factory(tls=False)
    db = tmp_path / "gw.db"
    fill(db, 100)

    async def main() -> None:
        proxy = Proxy(upstream.port)
        await proxy.start()
        relay = Relay(db, settings(port=proxy.port), publish_timeout_s=2.0)
        async with running(relay):
            async with collector(upstream) as got:
                await until(lambda: outbox_state(db)[0] == 0 and len(got) == 100, 20, "first 100")
            assert got == [b"%06d" % i for i in range(100)]
            await asyncio.to_thread(upstream.stop)
            await until(lambda: not relay.connected, 10, "the relay to see the broker gone")
            fill(db, 300, start=100)
            relay.notify()
            await asyncio.sleep(1.0)  # several reconnect attempts fail meanwhile
            assert outbox_state(db) == (300, 100)
            status = await relay.status()
            assert not status.connected and status.last_error and status.pending == 300
            proxy.gate = False  # keep the relay out until the new subscriber is in place
            proxy.cut()
            await asyncio.to_thread(upstream.start)
            async with collector(upstream) as got:
                proxy.gate = True
                await until(lambda: outbox_state(db)[0] == 0 and len(got) >= 300, 30, "replay")
            assert got == [b"%06d" % i for i in range(100, 400)]
            assert relay.connected and relay.reconnects >= 2
        await proxy.close()

    asyncio.run(main())


RELAY_SCRIPT = textwrap.dedent(
    """
    import asyncio, logging, sys
    logging.basicConfig(level=logging.INFO)
    from gateway.pipeline.relay import Relay, UpstreamSettings
    cfg = UpstreamSettings(enabled=True, host="127.0.0.1", port=int(sys.argv[2]), tls=False,
                           client_id="relay-proc", reconnect_min_s=0.1, reconnect_max_s=0.4)
    asyncio.run(Relay(sys.argv[1], cfg, inflight=32).run())
    """
)


def test_kill_9_mid_stream_loses_nothing(
    broker_factory: Callable[..., RunningBroker], tmp_path: Path
) -> None:
    upstream = broker_factory(tls=False)
    db = tmp_path / "gw.db"
    # Enough that the kill lands mid-stream although the collector reads slower than the
    # relay publishes (it sees a fiftieth while the relay is further on).
    total = 20000
    fill(db, total)
    script = tmp_path / "relay_proc.py"
    script.write_text(RELAY_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def spawn() -> subprocess.Popen[bytes]:
        with open(tmp_path / "relay.log", "ab") as logf:
            return subprocess.Popen([sys.executable, str(script), str(db), str(upstream.port)],
                                    env=env, stdout=logf, stderr=logf)

    async def main() -> tuple[list[bytes], int]:
        async with collector(upstream) as got:
            first = spawn()
            try:
                await until(lambda: len(got) >= total // 50, 30, "the first delivered")
            finally:
                first.send_signal(signal.SIGKILL)
                first.wait(10)
            await asyncio.sleep(0.2)
            left_after_kill = outbox_state(db)[0]
            second = spawn()
            try:
                await until(lambda: outbox_state(db)[0] == 0, 60, "the outbox to empty")
                await until(lambda: len(set(got)) >= total, 10, "every payload")
            finally:
                second.terminate()
                second.wait(10)
        return got, left_after_kill

    got, left = asyncio.run(main())
    relay_log = (tmp_path / "relay.log").read_text()
    assert "pending publish calls" not in relay_log
    assert 0 < left < total, "the kill must land mid-stream"
    assert set(got) == {b"%06d" % i for i in range(total)}
    firsts = list(dict.fromkeys(got))
    assert firsts == sorted(firsts), "first arrivals are in outbox order"
    dupes = len(got) - total
    print(f"\nkill -9 after {total - left} of {total} left the relay: "
          f"{len(got)} received, {dupes} duplicates, 0 lost")
    # At most what was sent and not yet deleted: the relay holds that to UNDELETED_MAX
    # windows of 32, however long a delete takes.
    assert dupes <= UNDELETED_MAX * 32


def test_tls_upstream_with_client_certificate(
    broker_factory: Callable[..., RunningBroker], tmp_path: Path
) -> None:
    # TLS, its own fleet CA; a client certificate of its own logs in (the collector has the
    # gateway's, and the broker gives every connection of one certificate the same id).
    upstream = broker_factory(extra_acl="\nuser relay-1\ntopic write upstream/#\n")
    assert upstream.pki is not None
    creds = upstream.pki.issue_device("relay-1")
    gw = replace(upstream.pki.gateway, cert_pem=creds.cert_pem, key_pem=creds.key_pem)
    db = tmp_path / "gw.db"
    fill(db, 50)

    async def main() -> None:
        async with collector(upstream) as got:
            cfg = settings(upstream, tls=True, ca=gw.ca_pem, cert=gw.cert_pem, key=gw.key_pem)
            relay = Relay(db, cfg)
            async with running(relay):
                await until(lambda: outbox_state(db)[0] == 0 and len(got) >= 50, 20, "delivery")
        assert got == [b"%06d" % i for i in range(50)]

    asyncio.run(main())


def test_bounds_hold_while_upstream_is_unreachable(tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    fill(db, 30, created=time.time() - 3600)  # an hour old: beyond max_age
    fill(db, 120, start=30)

    async def main() -> None:
        relay = Relay(db, settings(port=free_port(), outbox_max_items=50, outbox_max_age_s=600),
                      bounds_every_s=0.1)
        async with running(relay):
            await until(lambda: outbox_state(db)[0] == 50, 10, "bounds")
            status = await relay.status()
            box = Outbox(db)
            kept = [q.item.payload for q in box.peek(100)]
            box.close()
        assert not status.connected and status.last_error
        assert status.counters.dropped_age == 30 and status.counters.dropped_full == 70
        assert kept == [b"%06d" % i for i in range(100, 150)]  # the newest 50

    asyncio.run(main())


def test_runs_from_the_gateway_configuration(
    broker_factory: Callable[..., RunningBroker], tmp_path: Path
) -> None:
    upstream = broker_factory(tls=False)
    db = tmp_path / "gw.db"
    fill(db, 20)
    cfg = UpstreamConfig(enabled=True, host="127.0.0.1", port=upstream.port, tls=False)

    async def main() -> None:
        async with collector(upstream) as got:
            relay = Relay(db, cfg)
            async with running(relay):
                await until(lambda: outbox_state(db)[0] == 0 and len(got) >= 20, 20, "delivery")
        assert got == [b"%06d" % i for i in range(20)]

    asyncio.run(main())


def test_bad_settings_name_the_key(tmp_path: Path) -> None:
    def bad(**kw: Any) -> str:
        with pytest.raises(ConfigError) as err:
            Relay(tmp_path / "gw.db", settings(port=1883, **kw))
        return str(err.value)

    assert "upstream.format" in bad(format="xml")
    assert "upstream.qos" in bad(qos=3)
    assert "upstream.host" in bad(host="")
    assert "upstream.cert and upstream.key" in bad(tls=True, cert=str(tmp_path / "c.pem"))
    assert "upstream.ca: no file" in bad(tls=True, ca=str(tmp_path / "missing.pem"))
    assert "upstream.reconnect_min_s" in bad(reconnect_min_s=5.0, reconnect_max_s=1.0)


def test_disabled_relay_returns_at_once(tmp_path: Path) -> None:
    asyncio.run(asyncio.wait_for(Relay(tmp_path / "gw.db", UpstreamSettings()).run(), 2))


def _burst(i: int) -> bytes:
    t0 = 1_700_000_000 + 64 * 60 * i
    series = Series(tuple(range(t0, t0 + 64 * 60, 60)),
                    (tuple(2000 + (i + k) % 300 for k in range(64)),
                     tuple(4000 + k for k in range(64)), tuple(3300 - k for k in range(64))))
    return readings_payload("node-1", SCHEMA_ENV3, series, "json", msg_id=64 * i)


def test_throughput_against_bare_aiomqtt(
    broker_factory: Callable[..., RunningBroker], tmp_path: Path
) -> None:
    """Figures only (printed; never a wall-clock gate): relay vs a bare QoS 1 publisher
    with the same window, same broker, same payloads (one 64-reading burst each)."""
    upstream = broker_factory(tls=False)
    n = 2000
    payloads = [_burst(i) for i in range(n)]
    db = tmp_path / "gw.db"
    fill(db, n, payload=lambda i: payloads[i])

    async def bare() -> float:
        window = asyncio.Semaphore(32)
        async with aiomqtt.Client("127.0.0.1", upstream.port, identifier="bare",
                                  max_inflight_messages=32) as client:
            async def one(p: bytes) -> None:
                async with window:
                    await client.publish(TOPIC, p, qos=1)
            t = time.perf_counter()
            await asyncio.gather(*(one(p) for p in payloads))
            return time.perf_counter() - t

    async def relayed() -> float:
        relay = Relay(db, settings(upstream), inflight=32)
        t = time.perf_counter()
        async with running(relay):
            await until(lambda: relay.relayed >= n, 60, "relay")
        return time.perf_counter() - t

    async def main() -> tuple[float, float]:
        return await bare(), await relayed()

    t_bare, t_relay = asyncio.run(main())
    assert outbox_state(db) == (0, n)
    size = sum(map(len, payloads)) / n
    print(f"\nupstream throughput, {n} messages of one 64-reading burst ({size:.0f} B JSON), QoS 1")
    print(f"{'publisher':<28}{'msgs/s':>10}{'readings/s':>12}")
    for name, secs in (("bare aiomqtt, 32 in flight", t_bare), ("relay (SQLite outbox)", t_relay)):
        print(f"{name:<28}{n / secs:>10.0f}{64 * n / secs:>12.0f}")

