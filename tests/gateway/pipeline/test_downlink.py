"""Downlink to sleeping nodes end to end: a real Mosquitto with device certificates, the
real gateway service (in-process, and as a process killed with SIGKILL), a real SQLite file,
aiomqtt clients acting as nodes, and the `torpor device` commands."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from gateway import proto
from gateway.store import db, devices
from gateway.store import downlink_queue as q
from gateway.store import wakes as wake_store
from tests.fixtures.broker import RunningBroker
from tests.gateway.pipeline.test_ingest import Node, aio, gateway_config, provision, running
from tests.gateway.test_service import start_gateway, wait_running, write_config
from tools.cli import main as torpor


def hello(msg_id: int, next_wake_s: int = 900, window_ms: int = 2000,
          config_version: int = 0) -> bytes:
    return proto.encode_hello(proto.Hello(
        msg_id, 3, proto.BootCause.TIMER, 3300, -60, 40_000, 0, 0, next_wake_s, window_ms,
        int(time.time()), proto.DeviceClass.SENSOR, config_version))


async def wake(node: Node, msg_id: int, **kw: Any) -> tuple[proto.Ack, list[Any], proto.SleepNow]:
    """One wake as the gateway sees it: HELLO out; ACK, downlink, SLEEP_NOW back."""
    await node.send(hello(msg_id, **kw))
    ack = await node.recv()
    assert isinstance(ack, proto.Ack), ack
    frames = [await node.recv() for _ in range(ack.pending)]
    sleep = await node.recv()
    assert isinstance(sleep, proto.SleepNow), sleep
    return ack, frames, sleep


async def answer(node: Node, frames: list[Any], status: proto.ResultStatus = proto.ResultStatus.OK) -> None:
    for i, f in enumerate(frames):
        if isinstance(f, proto.Command):
            await node.send(proto.encode_command_result(
                proto.CommandResult(100 + i, f.command_id, status, 0, "", (f.op,))))
        elif isinstance(f, proto.ShadowDelta):
            await node.send(proto.encode_shadow_report(
                proto.ShadowReport(100 + i, f.config_version, f.entries)))


async def until(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def status_of(db_path: Path, device: str, cid: int) -> str:
    conn = db.connect(db_path)
    try:
        return q.get(conn, device, cid).status
    finally:
        conn.close()


@aio
async def test_queued_while_asleep_delivered_in_order_and_retired(
        broker: RunningBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = provision(broker, tmp_path, "n1")
    cfg = gateway_config(broker, tmp_path)
    conn = db.open_db(cfg.db_path)
    low = q.enqueue_command(conn, "n1", "ping", priority=1)
    high = q.enqueue_command(conn, "n1", "set_interval", [300], priority=7)
    q.set_config(conn, "n1", {"send_every": 5, "sample_interval_s": 30})
    version = q.set_config(conn, "n1", {"sample_interval_s": 60})  # replaces the pending 30
    async with running(cfg), Node(broker, pki, "n1") as node:
        ack, frames, sleep = await wake(node, 1, next_wake_s=900)
        assert ack.pending == 3 and sleep.pending == 0
        assert [type(f).__name__ for f in frames] == ["Command", "ShadowDelta", "Command"]
        # What the node must not miss comes at QoS 1; the session's answers at QoS 0.
        assert node.qos == {"Ack": {0}, "SleepNow": {0}, "Command": {1}, "ShadowDelta": {1}}
        assert [frames[0].command_id, frames[2].command_id] == [high, low]
        assert frames[0].op == proto.CommandOp.SET_INTERVAL and frames[0].args == (300,)
        assert frames[1].config_version == version
        assert {(e.key.name.lower(), e.value) for e in frames[1].entries} == {
            ("send_every", 5), ("sample_interval_s", 60)}
        await answer(node, frames)
        await answer(node, frames[:1], proto.ResultStatus.DUPLICATE)  # a repeat: no change
        await until(lambda: q.pending(conn, "n1") == [])
        done = q.get(conn, "n1", high)
        assert (done.status, done.result_status, done.attempts) == (q.DONE, "ok", 1)
        # The next wake brings nothing: every item was retired exactly once.
        ack, frames, sleep = await wake(node, 2)
        assert (ack.pending, frames, sleep.pending) == (0, [], 0)
    assert q.get(conn, "n1", high) == done
    assert all(c.applied for c in q.config_state(conn, "n1"))
    # `device show` predicts the next listening time from the last HELLO + next_wake_s.
    capsys.readouterr()
    assert torpor(["device", "show", "n1", "--json", "--config", str(tmp_path / "gw.toml")]) == 2
    (tmp_path / "gw.toml").write_text(f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n')
    capsys.readouterr()
    assert torpor(["device", "show", "n1", "--json", "--config", str(tmp_path / "gw.toml")]) == 0
    doc = json.loads(capsys.readouterr().out)
    d = devices.get(conn, "n1")
    assert d.last_hello_at is not None
    assert abs(doc["downlink"]["next_listen_at"] - (d.last_hello_at + 900)) < 1e-3
    assert abs(doc["downlink"]["next_listen_until"] - doc["downlink"]["next_listen_at"] - 2.0) < 1e-6
    assert doc["downlink"]["wakes"]["wakes"] == 2 and doc["downlink"]["pending"] == []


@aio
async def test_expired_never_delivered_and_window_splits_across_wakes(
        broker: RunningBroker, tmp_path: Path) -> None:
    pki = provision(broker, tmp_path, "n1")
    cfg = gateway_config(broker, tmp_path)
    conn = db.open_db(cfg.db_path)
    stale = q.enqueue_command(conn, "n1", "reboot", priority=9, ttl_s=0.3)
    ids = [q.enqueue_command(conn, "n1", "ping", args=[i]) for i in range(3)]
    await asyncio.sleep(0.4)
    async with running(cfg), Node(broker, pki, "n1") as node:
        got: list[int] = []
        for k in range(3):
            # 300 ms of listening holds one item (150 ms each after 100 ms reserved).
            ack, frames, sleep = await wake(node, 10 + k, window_ms=300)
            assert ack.pending == 1 and sleep.pending == 2 - k
            got += [f.command_id for f in frames]
            await answer(node, frames)
        assert got == ids
        ack, frames, sleep = await wake(node, 20, window_ms=300)
        assert (ack.pending, sleep.pending) == (0, 0)
        await until(lambda: all(q.get(conn, "n1", i).status == q.DONE for i in ids))
    it = q.get(conn, "n1", stale)
    assert it.status == q.EXPIRED and it.attempts == 0 and it.delivered_at is None
    st = wake_store.wake_stats(conn, "n1")
    assert st is not None and (st.wakes, st.max_delivered, st.delivered_total) == (4, 1, 3)


@aio
async def test_results_and_reports_no_longer_dead_lettered(broker: RunningBroker, tmp_path: Path) -> None:
    pki = provision(broker, tmp_path, "n1")
    cfg = gateway_config(broker, tmp_path)
    async with running(cfg) as svc, Node(broker, pki, "n1") as node:
        await node.send(proto.encode_command_result(proto.CommandResult(1, 777, proto.ResultStatus.OK)))
        await node.send(proto.encode_shadow_report(proto.ShadowReport(2, 3, ())))
        await until(lambda: svc.downlink.metrics.reports == 1 and svc.downlink.metrics.unknown_results == 1)
        with pytest.raises(TimeoutError):  # nothing to answer, no ERROR frame
            await node.recv(timeout=0.3)
    conn = db.open_db(cfg.db_path)
    assert conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0


@aio
async def test_kill_9_between_send_and_result_neither_loses_nor_duplicates(
        broker: RunningBroker, tmp_path: Path) -> None:
    config = write_config(broker, tmp_path)
    db_path = tmp_path / "data" / "gateway.db"
    pki = provision(broker, tmp_path, "n1")
    conn = db.open_db(db_path)
    cid = q.enqueue_command(conn, "n1", "set_interval", [120])
    conn.close()
    log = tmp_path / "gateway.log"
    proc = start_gateway(config, log)
    try:
        wait_running(db_path)
        await asyncio.sleep(0.2)
        async with Node(broker, pki, "n1") as node:
            _, frames, _ = await wake(node, 1)
            assert [f.command_id for f in frames] == [cid]
            # The gateway dies before the node's result; the node loses power before
            # sending it (it executed the command and keeps that on flash).
            proc.kill()
            proc.wait(10)
            assert status_of(db_path, "n1", cid) == q.SENT
            proc = start_gateway(config, log)
            wait_running(db_path)
            await asyncio.sleep(0.2)
            _, frames, _ = await wake(node, 2)  # the item goes again, same command id
            assert [f.command_id for f in frames] == [cid]
            await answer(node, frames, proto.ResultStatus.DUPLICATE)
            await until(lambda: status_of(db_path, "n1", cid) == q.DONE, 10)
            await answer(node, frames, proto.ResultStatus.DUPLICATE)
            _, frames, _ = await wake(node, 3)
            assert frames == []
    finally:
        proc.kill()
        proc.wait(10)
    conn = db.open_db(db_path)
    rows = conn.execute("SELECT status, attempts, result_status FROM downlink_items").fetchall()
    assert rows == [(q.DONE, 2, "duplicate")], log.read_text()[-3000:]


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n')
    conn = db.open_db(tmp_path / "data" / "gateway.db")
    devices.add(conn, "n1", "monitor")
    c = ["--config", str(cfg)]

    def run(*argv: str) -> tuple[int, str, str]:
        code = torpor(["device", *argv, *c])
        out = capsys.readouterr()
        return code, out.out, out.err

    assert run("send", "nx", "ping")[0] == 2
    code, _, err = run("send", "n1", "fly")
    assert code == 2 and "unknown op 'fly'" in err
    assert run("send", "n1", "set_interval", "abc")[0] == 2
    assert run("send", "n1", "ping", "--ttl", "-5")[0] == 2
    code, _, err = run("config", "n1", "colour=3")
    assert code == 2 and "unknown configuration key" in err
    assert run("config", "n1", "send_every=x")[0] == 2
    assert run("config", "n1", "send_every")[0] == 2
    code, out, _ = run("send", "n1", "set_interval", "120", "--priority", "8", "--ttl", "2h")
    assert code == 0 and "queued command" in out and "first HELLO" in out
    cid = int(out.split("queued command ")[1].split()[0])
    assert run("config", "n1", "send_every=3", "temp_high=2800")[0] == 0
    for _ in range(14):
        assert run("send", "n1", "ping")[0] == 0
    code, _, err = run("send", "n1", "ping")
    assert code == 2 and "full" in err and "16" in err
    code, out, _ = run("list", "--pending")
    assert code == 0 and "n1" in out and " 16 " in out
    code, out, _ = run("show", "n1")
    assert code == 0 and "16 pending" in out and "set_interval 120" in out
    assert out.index("set_interval 120") < out.index("config v1")  # priority 8 first
    assert run("cancel", "n1", str(cid))[0] == 0
    assert run("cancel", "n1", str(cid))[0] == 2  # already cancelled
    assert run("cancel", "n1", "12345")[0] == 2
    assert q.get(conn, "n1", cid).status == q.CANCELLED
