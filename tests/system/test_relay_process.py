"""The upstream relay's own process, killed with SIGKILL in the middle of a load.

The gateway runs as `torpor gateway run` against a Mosquitto with mutual TLS and a plain
upstream Mosquitto; its relay is a child process (gateway.pipeline.relay_process). Nodes
(one mutual-TLS connection per identity) publish BURST frames at QoS 1 while the test
kills the relay process twice. The supervisor starts a new one each time, and:

- every burst is acknowledged and every reading is stored exactly once (the relay's crash
  never touches ingest: ACK after commit, dedup by (device, id));
- every reading arrives upstream, the first copies in the outbox's order; the only
  duplicates are re-sends of the same message (same id, same bytes) that the killed relay
  had sent and not yet deleted, at most UNDELETED_MAX windows per kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import gateway.proto as p
from gateway.pipeline.relay import DEFAULT_INFLIGHT, UNDELETED_MAX
from gateway.security.pki import DeviceCredentials, Pki
from gateway.store import db, readings
from gateway.store.status import read_status
from gateway.transport import topics
from tests.fixtures.broker import RunningBroker
from tests.system.test_gateway_faults import (
    Gateway,
    Received,
    gateway_config,
    subscribe_upstream,
    until,
)
from tools.bench.loadgen import Frames, MqttConn

pytestmark = pytest.mark.slow

NODES = 4
BURSTS = 150  # per node
READINGS = 16  # per burst
WINDOW = 8  # unacknowledged PUBLISHes per node
KILLS = 2


def _config(tmp: Path, pki: Pki, broker: RunningBroker, up: RunningBroker) -> Path:
    path = gateway_config(tmp, pki, broker_port=broker.port, external=True,
                          upstream_port=up.port)
    with path.open("a") as f:  # [upstream] is the file's last section
        f.write("process = true\n")
    return path


def _status(gw: Gateway) -> dict[str, Any]:
    with contextlib.closing(db.connect(gw.db_path, readonly=True)) as conn:
        st = read_status(conn)
    return st.detail if st is not None and st.running else {}


def _stored(gw: Gateway) -> int:
    with contextlib.closing(db.connect(gw.db_path, readonly=True)) as conn:
        return readings.total(conn)


def _alive(pid: int) -> bool:
    """Running (a zombie that its new parent has not reaped yet counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _outbox_depth(gw: Gateway) -> int:
    return int(gw.query("SELECT count(*) FROM outbox")[0][0])


async def _node(name: str, creds: DeviceCredentials, ca: Path, broker: RunningBroker,
                acked: set[tuple[str, int]], frames: Frames, deadline: float) -> list[int]:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.load_cert_chain(str(creds.cert_pem), str(creds.key_pem))

    def on(topic: str, payload: bytes, at: float) -> None:
        if len(payload) > 6 and payload[1] == p.ACK:
            acked.add((name, int.from_bytes(payload[2:6], "little")))

    conn = await MqttConn.connect(broker.host, broker.port, ctx, name, on_message=on)
    await conn.subscribe(topics.down(name), 1)
    up = topics.up(name).encode()
    sent: list[int] = []
    inflight: list[asyncio.Future[None]] = []
    for k in range(BURSTS):
        if time.monotonic() > deadline:
            break
        if len(inflight) >= WINDOW:
            await asyncio.wait_for(inflight.pop(0), max(0.1, deadline - time.monotonic()))
        msg_id = 1 + k * READINGS
        fut = conn.publish(up, frames.burst(msg_id), 1)
        assert fut is not None
        inflight.append(fut)
        sent.append(msg_id)
        await asyncio.sleep(0.01)  # a load spread over seconds, so the kills land inside it
    for fut in inflight:
        await asyncio.wait_for(fut, max(0.1, deadline - time.monotonic()))
    await until(lambda: all((name, m) in acked for m in sent), 30, f"{name}'s ACKs")
    await conn.disconnect()
    return sent


def test_relay_process_killed_mid_load_loses_nothing(
        tmp_path: Path, pki: Pki, broker_factory: Any) -> None:
    broker: RunningBroker = broker_factory(pki)
    up: RunningBroker = broker_factory(tls=False)
    gw = Gateway(_config(tmp_path, pki, broker, up))
    names = [f"relay-kill-{i}" for i in range(NODES)]
    creds = gw.register(pki, *names)
    gw.start()
    try:
        gw.wait_running()

        async def main() -> tuple[Received, list[int], list[list[int]]]:
            got = Received()
            ready = asyncio.Event()
            consumer = asyncio.create_task(
                subscribe_upstream(up, got, ready, time.monotonic() + 150))
            await asyncio.wait_for(ready.wait(), 20)
            await until(lambda: _status(gw).get("relay_connected"), 20, "the relay process")
            frames = Frames(READINGS)
            acked: set[tuple[str, int]] = set()
            deadline = time.monotonic() + 90
            load = asyncio.gather(*(_node(n, creds[n], pki.ca_pem, broker, acked, frames,
                                          deadline) for n in names))
            total = NODES * BURSTS * READINGS
            killed: list[int] = []
            for k in range(KILLS):
                # Kill at a third and at two thirds of the load, while frames still come in.
                await until(lambda k=k: _stored(gw) >= total * (k + 1) // (KILLS + 1)
                            or load.done(), 60, "readings stored")
                assert not load.done(), "the load ended before the kill"
                pid = _status(gw).get("relay_pid")
                assert isinstance(pid, int) and pid not in killed, _status(gw)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                # The supervisor starts the next one (after its backoff).
                await until(lambda: _status(gw).get("relay_pid") not in (None, *killed),
                            30, "a new relay process")
            sent = await load
            assert not load.exception()
            await until(lambda: _stored(gw) >= total and _outbox_depth(gw) == 0, 60,
                        "the outbox drained")
            want = {(n, 1 + k * READINGS + j) for n in names for k in range(BURSTS)
                    for j in range(READINGS)}
            await until(lambda: want <= set(got.rows()), 30, "every reading upstream")
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
            return got, killed, sent

        got, killed, sent = asyncio.run(main())
        detail = _status(gw)
        assert detail.get("restarts", {}).get("relay", 0) >= KILLS, detail
    finally:
        code = gw.stop()
    log = gw.log.read_text(errors="replace")
    assert code == 0, log[-4000:]
    for pid in [*killed, detail["relay_pid"]]:  # no relay process outlives its gateway
        assert not _alive(pid), pid

    # Stored exactly once: every reading of every burst sent, no id twice.
    total = 0
    with contextlib.closing(db.connect(gw.db_path, readonly=True)) as conn:
        for name, msg_ids in zip(names, sent, strict=True):
            ids = [r[1] for r in readings.iter_readings(conn, name)]
            assert len(msg_ids) == BURSTS
            assert ids == [m + j for m in msg_ids for j in range(READINGS)], name
            total += len(ids)
    assert total == NODES * BURSTS * READINGS

    # Upstream: nothing lost; first copies in order; duplicates only re-sends, bounded.
    first: dict[str, list[int]] = {}
    seen: set[tuple[str, int]] = set()
    for msg in got.readings:
        key = (msg["device"], msg["id"])
        if key not in seen:
            seen.add(key)
            first.setdefault(msg["device"], []).append(msg["id"])
    for name in names:
        assert first[name] == sorted(first[name]), f"{name}: upstream out of outbox order"
        assert first[name] == [1 + k * READINGS for k in range(BURSTS)], name
    copies = Counter(got.raw)
    by_id = Counter((m["device"], m["id"]) for m in got.readings)
    extra = sum(n - 1 for n in by_id.values())
    # A message sent twice is the same bytes twice (the outbox item, sent again).
    assert sum(n - 1 for n in copies.values()) == extra
    assert extra <= KILLS * UNDELETED_MAX * DEFAULT_INFLIGHT, extra
    print(f"\n{total} readings stored once; {len(got.readings)} upstream messages for "
          f"{NODES * BURSTS} bursts ({extra} re-sent after {KILLS} relay kills)")


def test_the_relay_process_ends_with_a_killed_gateway(
        tmp_path: Path, pki: Pki, broker_factory: Any) -> None:
    """SIGKILL to the gateway leaves no relay publishing beside the next one."""
    broker: RunningBroker = broker_factory(pki)
    up: RunningBroker = broker_factory(tls=False)
    gw = Gateway(_config(tmp_path, pki, broker, up))
    gw.register(pki, "relay-orphan-0")
    gw.start()
    try:
        gw.wait_running()
        deadline = time.monotonic() + 20
        while not isinstance(_status(gw).get("relay_pid"), int):
            assert time.monotonic() < deadline, _status(gw)
            time.sleep(0.05)
        pid = _status(gw)["relay_pid"]
        assert _alive(pid)
        gw.kill()
        # A liveness bound, not a speed one: under a loaded host SIGTERM delivery and the
        # relay's own shutdown can take seconds.
        deadline = time.monotonic() + 20
        while _alive(pid):
            assert time.monotonic() < deadline, f"relay {pid} outlived its gateway"
            time.sleep(0.02)
    finally:
        gw.stop()
