"""Ingest end to end: a real Mosquitto, real device certificates, a real SQLite file."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gateway import proto
from gateway.config import parse_config
from gateway.pipeline.ingest import Ingest
from gateway.security.pki import Pki
from gateway.service import Service
from gateway.store import db, deadletter, readings, wake_log
from gateway.store import devices as registry
from gateway.transport import topics
from tests.fixtures.broker import RunningBroker, mqtt_client, transport_client


def aio(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test body in its own event loop (bounded in time)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 60))

    return run


def burst(first: int, n: int = 64) -> bytes:
    s = proto.Series(tuple(1_700_000_000 + 60 * i for i in range(n)),
                     (tuple(range(n)), tuple(range(n)), (3000,) * n))
    return proto.encode_burst(proto.Burst(first, proto.SCHEMA_ENV3, 60, s))


HELLO = proto.encode_hello(proto.Hello(
    7, 3, proto.BootCause.TIMER, 3300, -60, 40_000, 0, 0, 900, 800, 1_700_000_000,
    proto.DeviceClass.SENSOR))


def gateway_config(broker: RunningBroker, tmp: Path, **ingest: Any) -> Any:
    assert broker.pki is not None
    return parse_config({
        "gateway": {"data_dir": str(tmp / "data"), "status_interval_s": 0.2},
        "broker": {"mode": "external", "host": broker.host, "port": broker.port,
                   "pki_dir": str(broker.pki.path)},
        "ingest": {"batch_max_ms": 2, "malformed_threshold": 3, **ingest},
    })


@contextlib.asynccontextmanager
async def running(cfg: Any) -> AsyncIterator[Service]:
    svc = Service(cfg)
    task = asyncio.create_task(svc.run())
    for _ in range(200):
        if svc.mqtt_connected:
            break
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)  # the subscription
    try:
        yield svc
    finally:
        svc.stop()
        await asyncio.wait_for(task, 10)


class Node:
    """A device: its own certificate, publishing up and reading its down topic."""

    def __init__(self, broker: RunningBroker, pki: Pki, device: str) -> None:
        self.device = device
        self.client = mqtt_client(broker, pki.device_credentials(device))
        self.down: asyncio.Queue[Any] = asyncio.Queue()
        self.qos: dict[str, set[int]] = {}  # frame type name -> the QoS it arrived at
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Node:
        await self.client.__aenter__()
        await self.client.subscribe(topics.down(self.device), qos=1)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.client.__aexit__(None, None, None)

    async def _read(self) -> None:
        async for m in self.client.messages:
            assert isinstance(m.payload, bytes)
            frame = proto.decode(m.payload)
            self.qos.setdefault(type(frame).__name__, set()).add(m.qos)
            await self.down.put(frame)

    async def send(self, payload: bytes, topic: str | None = None) -> None:
        await self.client.publish(topic or topics.up(self.device), payload, qos=1)

    async def recv(self, timeout: float = 5.0) -> Any:
        return await asyncio.wait_for(self.down.get(), timeout)


def provision(broker: RunningBroker, tmp: Path, *devices: str) -> Pki:
    assert broker.pki is not None
    conn = db.open_db(tmp / "data" / "gateway.db")
    for d in devices:
        broker.pki.issue_device(d)
        registry.add(conn, d)
    conn.close()
    return broker.pki


@aio
async def test_burst_stored_once_acked_and_duplicates_reacked(broker: RunningBroker, tmp_path: Path) -> None:
    pki = provision(broker, tmp_path, "n1")
    cfg = gateway_config(broker, tmp_path)
    async with running(cfg) as svc, Node(broker, pki, "n1") as node:
        await node.send(HELLO)
        ack, sleep = await node.recv(), await node.recv()
        assert isinstance(ack, proto.Ack) and ack.cumulative == 0 and ack.time > 1_700_000_000
        assert sleep == proto.SleepNow(7, 0, 0)  # the node keeps its own schedule
        await node.send(burst(1))
        assert await node.recv() == proto.Ack(1, 64, ())
        await node.send(burst(1))  # the ack was lost: the node sends again
        assert await node.recv() == proto.Ack(1, 64, ())
        await node.send(burst(129))  # a gap: 65..128 still on the node
        gap = await node.recv()
        assert gap.cumulative == 64 and gap.selective == tuple(range(129, 193))
        await node.send(burst(65))
        assert await node.recv() == proto.Ack(65, 192, ())
        assert svc.ingest is not None and svc.ingest.metrics.readings_duplicate == 64
        # Answers within the session come at QoS 0: no PUBACK each way.
        assert node.qos == {"Ack": {0}, "SleepNow": {0}}
    conn = db.open_db(cfg.db_path)
    assert [r[1] for r in readings.iter_readings(conn)] == list(range(1, 193))
    d = registry.get(conn, "n1")
    assert d.status == "active" and d.fw_version == 3 and d.next_wake_s == 900
    assert d.next_wake_at is not None and d.last_hello_at is not None
    assert abs(d.next_wake_at - d.last_hello_at - 900) < 1e-6
    # The wake is logged with what its HELLO said and the readings it brought (not the
    # duplicate send).
    (w,) = wake_log.of_device(conn, "n1")
    assert (w.boot_cause, w.battery_mv, w.rssi, w.fw_version, w.readings) == (
        "timer", 3300, -60, 3, 192)
    assert w.seen_s is not None and 0 <= w.seen_s < 30


@aio
async def test_unknown_device_and_other_devices_topic_are_refused(broker: RunningBroker, tmp_path: Path) -> None:
    pki = provision(broker, tmp_path, "n1", "n2")
    pki.issue_device("stranger")  # a valid certificate, not in the registry
    cfg = gateway_config(broker, tmp_path)
    async with running(cfg), Node(broker, pki, "n1") as n1, Node(broker, pki, "stranger") as s:
        # The ACL drops a publish on another device's topic: nothing reaches the gateway.
        await n1.send(burst(1), topic=topics.up("n2"))
        await s.send(burst(1))
        err = await s.recv()
        assert isinstance(err, proto.Error) and err.code == proto.ErrorCode.NOT_PROVISIONED
        await n1.send(burst(1))
        assert (await n1.recv()).cumulative == 64
    conn = db.open_db(cfg.db_path)
    assert readings.count_rows(conn, "n2") == 0 and readings.count_rows(conn, "stranger") == 0
    assert deadletter.count(conn, "stranger", "not_provisioned") == 1
    assert deadletter.count(conn, "n2") == 0


@aio
async def test_malformed_frames_dead_letter_then_quarantine_then_release(broker: RunningBroker, tmp_path: Path) -> None:
    pki = provision(broker, tmp_path, "n1")
    cfg = gateway_config(broker, tmp_path)
    async with running(cfg), Node(broker, pki, "n1") as node:
        bad = [b"\x10\x02\x01\x00", b"\x20\x02\x01\x00\x00\x00\x01\x00", b"\x10\x63\x01\x00\x00\x00",
               proto.encode_ack(proto.Ack(1, 1, ()))]
        await node.send(bad[0])
        e = await node.recv()
        assert e.code == proto.ErrorCode.MALFORMED
        await node.send(bad[1])
        assert (await node.recv()).code == proto.ErrorCode.UNSUPPORTED_VERSION
        await node.send(bad[2])  # third malformed frame within the window: quarantined
        assert (await node.recv()).code == proto.ErrorCode.UNKNOWN_FRAME
        assert (await node.recv()).code == proto.ErrorCode.QUARANTINED
        await node.send(burst(1))  # not served any more: no ack
        with pytest.raises(TimeoutError):
            await node.recv(timeout=0.5)
        conn = db.open_db(cfg.db_path)
        assert registry.get(conn, "n1").status == "quarantined"
        assert deadletter.count(conn, "n1", "malformed") == 3
        assert deadletter.count(conn, "n1", "quarantined") == 1
        raw = deadletter.list_recent(conn, "n1")[-1]
        assert raw.raw == bad[0] and "truncated" in raw.detail
        registry.release(conn, "n1")
        await asyncio.sleep(0.8)  # the gateway notices the registry change
        await node.send(bad[3])  # a down frame sent up is malformed too
        assert (await node.recv()).code == proto.ErrorCode.UNKNOWN_FRAME
        await node.send(burst(1))
        assert await node.recv() == proto.Ack(1, 64, ())
    assert readings.count_rows(conn, "n1") == 64


@aio
async def test_rate_limit_quarantines(broker: RunningBroker, tmp_path: Path) -> None:
    pki = provision(broker, tmp_path, "n1")
    cfg = gateway_config(broker, tmp_path, rate_limit_frames_per_min=5)
    async with running(cfg), Node(broker, pki, "n1") as node:
        for i in range(7):
            await node.send(burst(1 + 64 * i))
        got = [await node.recv() for _ in range(6)]
        assert [type(g).__name__ for g in got] == ["Ack"] * 5 + ["Error"]
        assert got[-1].code == proto.ErrorCode.QUARANTINED
    conn = db.open_db(cfg.db_path)
    assert registry.get(conn, "n1").status == "quarantined"
    assert readings.count_rows(conn) == 5 * 64


@aio
async def test_many_devices_concurrently(broker: RunningBroker, tmp_path: Path) -> None:
    names = [f"m{i}" for i in range(6)]
    pki = provision(broker, tmp_path, *names)
    cfg = gateway_config(broker, tmp_path, rate_limit_frames_per_min=10_000)
    async with running(cfg), contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(Node(broker, pki, n)) for n in names]

        async def one(node: Node) -> None:
            for k in range(20):
                await node.send(burst(1 + 64 * k))
            acks = [await node.recv() for _ in range(20)]
            assert acks[-1].cumulative == 20 * 64

        await asyncio.gather(*(one(n) for n in nodes))
    conn = db.open_db(cfg.db_path)
    assert readings.count_rows(conn) == 6 * 20 * 64
    assert aiomqtt  # the client library under test


@aio
async def test_frames_queued_while_the_gateway_was_away_are_all_stored(
        broker: RunningBroker, tmp_path: Path) -> None:
    # The gateway's persistent session keeps them in the broker, which sends them right
    # with the CONNACK of the next connection, before ingest has subscribed.
    pki = provision(broker, tmp_path, "n1")
    cfg = gateway_config(broker, tmp_path, rate_limit_frames_per_min=10_000)
    async with running(cfg):
        pass
    async with Node(broker, pki, "n1") as node:
        for k in range(40):
            await node.send(burst(1 + 64 * k))
        async with running(cfg):
            acks = [await node.recv() for _ in range(40)]
    assert max(a.cumulative for a in acks) == 40 * 64
    conn = db.open_db(cfg.db_path)
    assert readings.count_rows(conn, "n1") == 40 * 64


@aio
async def test_ingest_serves_again_on_its_next_connection(broker: RunningBroker, tmp_path: Path) -> None:
    # The service runs the same Ingest again after a lost connection.
    pki = provision(broker, tmp_path, "n1")
    cfg = gateway_config(broker, tmp_path)
    conn = db.open_db(cfg.db_path)
    ingest = Ingest(conn, cfg.ingest)
    async with Node(broker, pki, "n1") as node:
        for k in range(2):
            async with transport_client(broker, client_id=f"gw-{k}") as client:
                run = asyncio.create_task(ingest.run(client))
                await asyncio.sleep(0.2)  # the subscription
                await node.send(burst(1 + 64 * k))
                assert (await node.recv()).cumulative == 64 * (k + 1)
                run.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await run
    assert readings.count_rows(conn, "n1") == 128


@aio
async def test_a_wake_is_answered_by_one_commit(broker: RunningBroker, tmp_path: Path) -> None:
    """HELLO and the bursts right behind it go into one commit (one fsync for the wake);
    a HELLO with nothing behind it is answered once the linger is over."""
    pki = provision(broker, tmp_path, "n1")
    cfg = gateway_config(broker, tmp_path, batch_max_ms=0, hello_linger_ms=50)
    async with running(cfg) as svc, Node(broker, pki, "n1") as node:
        assert svc.ingest is not None
        m = svc.ingest.metrics
        before = m.batches
        await node.send(HELLO)
        await asyncio.sleep(0.005)  # the bursts follow a moment later
        await node.send(burst(1))
        got = [await node.recv() for _ in range(3)]
        assert {type(f).__name__ for f in got} == {"Ack", "SleepNow"}
        assert m.batches - before == 1 and m.hellos == 1 and m.bursts == 1
        t0 = time.monotonic()
        await node.send(HELLO)  # nothing behind it
        ack, sleep = await node.recv(), await node.recv()
        waited = time.monotonic() - t0
        assert isinstance(ack, proto.Ack) and isinstance(sleep, proto.SleepNow)
        assert 0.05 <= waited < 2.0 and m.batches - before == 2
