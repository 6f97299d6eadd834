"""The downlink queue and wake planning against a real SQLite file (no broker needed)."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import proto
from gateway.pipeline import downlink
from gateway.store import db
from gateway.store import devices as registry
from gateway.store import downlink_queue as q
from gateway.store import wakes as wake_store

T0 = 1_800_000_000.0


def hello(next_wake_s: int = 600, window_ms: int = 2000, config_version: int = 0) -> proto.Hello:
    return proto.Hello(1, 3, proto.BootCause.TIMER, 3300, -60, 40_000, 0, 0, next_wake_s,
                       window_ms, int(T0), proto.DeviceClass.SENSOR, config_version)


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    c = db.open_db(tmp_path / "gateway.db")
    registry.add(c, "n1", now=T0)
    registry.add(c, "m1", "monitor", now=T0)
    return c


def plan(conn: sqlite3.Connection, h: proto.Hello, now: float,
         dl: downlink.Downlink | None = None) -> downlink.WakePlan:
    dl = dl or downlink.Downlink()
    with db.transaction(conn):
        return dl.plan(conn, [("n1", h)], now)[0]


def decoded(p: downlink.WakePlan) -> list[proto.Frame]:
    return [proto.decode(f) for f in p.frames]


def test_ids_unique_and_bound_with_clear_error(conn: sqlite3.Connection) -> None:
    ids = [q.enqueue_command(conn, "m1", "ping", now=T0) for _ in range(16)]
    assert len(set(ids)) == 16 and ids == sorted(ids)
    with pytest.raises(q.QueueFull, match=r"m1 is full: 16 items.*class monitor is 16"):
        q.enqueue_command(conn, "m1", "ping", now=T0)
    with pytest.raises(q.QueueFull):
        q.set_config(conn, "m1", {"send_every": 3}, now=T0)
    q.cancel(conn, "m1", ids[0], now=T0)
    assert q.enqueue_command(conn, "m1", "ping", now=T0) not in ids
    assert len(q.pending(conn, "m1")) == 16


def test_refusals(conn: sqlite3.Connection) -> None:
    with pytest.raises(q.QueueError, match="no device 'nx'"):
        q.enqueue_command(conn, "nx", "ping")
    with pytest.raises(q.QueueError, match="unknown op 'fly'"):
        q.enqueue_command(conn, "n1", "fly")
    with pytest.raises(q.BadArguments, match=r"argument 1 \(sample_interval_s\) must be in 1..86400 s, got 2147483648"):
        q.enqueue_command(conn, "n1", "set_interval", [2**31])
    with pytest.raises(q.BadArguments, match=r"set_thresholds takes 2 to 3 arguments, got 9"):
        q.enqueue_command(conn, "n1", "set_thresholds", list(range(9)))
    with pytest.raises(q.QueueError, match="unknown configuration key 'bogus'"):
        q.set_config(conn, "n1", {"bogus": 1})
    with pytest.raises(q.QueueError, match="priority"):
        q.enqueue_command(conn, "n1", "ping", priority=300)
    registry.set_status(conn, "n1", registry.REVOKED)
    with pytest.raises(q.QueueError, match="revoked"):
        q.enqueue_command(conn, "n1", "ping")
    with pytest.raises(q.QueueError, match="not an encoded frame"):
        q.enqueue_frame(conn, "m1", proto.OTA_CHUNK, b"\x10\x04\x00\x00\x00\x00")


def test_priority_order_config_first_and_fifo(conn: sqlite3.Connection) -> None:
    low = q.enqueue_command(conn, "n1", "ping", priority=1, now=T0)
    a = q.enqueue_command(conn, "n1", "set_interval", [120], priority=5, now=T0 + 1)
    b = q.enqueue_command(conn, "n1", "ping", priority=5, now=T0 + 2)
    q.set_config(conn, "n1", {"send_every": 4}, priority=5, now=T0 + 3)
    top = q.enqueue_command(conn, "n1", "sync_time", [int(T0)], priority=9, now=T0 + 4)
    order = [(i.kind_name, i.command_id) for i in q.pending(conn, "n1")]
    assert [k for k, _ in order] == ["command", "config", "command", "command", "command"]
    assert [cid for _, cid in order if cid != order[1][1]] == [top, a, b, low]
    frames = decoded(plan(conn, hello(), T0 + 10))
    assert isinstance(frames[1], proto.ShadowDelta)
    assert [f.command_id for f in frames if isinstance(f, proto.Command)] == [top, a, b, low]


def test_config_set_twice_travels_once_with_the_newer_value(conn: sqlite3.Connection) -> None:
    v1 = q.set_config(conn, "n1", {"sample_interval_s": 30, "send_every": 5}, now=T0)
    v2 = q.set_config(conn, "n1", {"sample_interval_s": 60}, now=T0 + 1)
    assert v2 == v1 + 1
    assert len(q.pending(conn, "n1")) == 1
    (delta,) = decoded(plan(conn, hello(), T0 + 2))
    assert isinstance(delta, proto.ShadowDelta) and delta.config_version == v2
    assert dict((e.key, e.value) for e in delta.entries) == {
        proto.ConfigKey.SAMPLE_INTERVAL_S: 60, proto.ConfigKey.SEND_EVERY: 5}
    # An older report retires nothing; the one with the delta's version retires it.
    with db.transaction(conn):
        assert q.record_report(conn, "n1", v1, (), T0 + 3) == 0
    assert q.pending(conn, "n1")[0].status == q.SENT
    with db.transaction(conn):
        downlink.Downlink().handle_up(conn, [("n1", proto.ShadowReport(9, v2, delta.entries))], T0 + 4)
    assert q.pending(conn, "n1") == []
    assert all(c.applied and c.reported_value == c.value for c in q.config_state(conn, "n1"))
    # The next value starts above what the node runs.
    assert q.set_config(conn, "n1", {"send_every": 2}, now=T0 + 5) == v2 + 1


def test_hello_config_version_retires_a_delta_whose_report_was_lost(conn: sqlite3.Connection) -> None:
    v = q.set_config(conn, "n1", {"temp_high": 3000}, now=T0)
    assert len(plan(conn, hello(), T0 + 1).frames) == 1
    assert plan(conn, hello(config_version=v), T0 + 700).frames == ()
    assert q.history(conn, "n1")[0].status == q.DONE


def test_expired_items_are_never_delivered(conn: sqlite3.Connection) -> None:
    gone = q.enqueue_command(conn, "n1", "ping", ttl_s=60, now=T0)
    kept = q.enqueue_command(conn, "n1", "ping", ttl_s=3600, now=T0)
    p = plan(conn, hello(), T0 + 61)
    assert p.ids == (kept,)
    assert q.get(conn, "n1", gone).status == q.EXPIRED
    assert q.get(conn, "n1", gone).delivered_at is None
    (cmd,) = decoded(p)
    assert isinstance(cmd, proto.Command) and 3538 <= cmd.ttl_s <= 3539
    # The periodic sweep expires items of nodes that never wake.
    q.enqueue_command(conn, "m1", "ping", ttl_s=10, now=T0)
    assert downlink.Downlink().sweep(conn, now=T0 + 11) == 1


def test_results_retire_once(conn: sqlite3.Connection) -> None:
    cid = q.enqueue_command(conn, "n1", "ping", now=T0)
    dl = downlink.Downlink()
    plan(conn, hello(), T0 + 1, dl)
    ok = proto.CommandResult(5, cid, proto.ResultStatus.OK, 0, "", (42,))
    for _ in range(3):  # the node (or the broker) repeats the result
        with db.transaction(conn):
            dl.handle_up(conn, [("n1", ok)], T0 + 2)
    with db.transaction(conn):
        dl.handle_up(conn, [("n1", proto.CommandResult(6, cid, proto.ResultStatus.DUPLICATE))], T0 + 3)
    it = q.get(conn, "n1", cid)
    assert (it.status, it.result_status, it.result_values, it.retired_at) == (q.DONE, "ok", (42,), T0 + 2)
    assert dl.metrics.results == 1 and dl.metrics.repeats == 3
    # The gateway checks arguments by the spec; a node with stricter rules still says no.
    bad = q.enqueue_command(conn, "n1", "set_thresholds", [3000, 2000], now=T0)
    with db.transaction(conn):
        dl.handle_up(conn, [("n1", proto.CommandResult(7, bad, proto.ResultStatus.BAD_ARGS, 0, "range"))], T0 + 4)
        dl.handle_up(conn, [("n1", proto.CommandResult(8, 12345, proto.ResultStatus.OK))], T0 + 4)
    assert q.get(conn, "n1", bad).status == q.FAILED and dl.metrics.unknown_results == 1


def test_unanswered_items_are_resent_then_fail(conn: sqlite3.Connection) -> None:
    cid = q.enqueue_command(conn, "n1", "reboot", now=T0)
    dl = downlink.Downlink(downlink.DownlinkConfig(max_attempts=3))
    for k in range(3):
        assert plan(conn, hello(), T0 + 600 * k, dl).ids == (cid,)
    assert q.get(conn, "n1", cid).attempts == 3
    assert plan(conn, hello(), T0 + 1800, dl).ids == ()
    it = q.get(conn, "n1", cid)
    assert it.status == q.FAILED and "3 deliveries" in (it.result_detail or "")


def test_window_and_budget_split_items_across_wakes(conn: sqlite3.Connection) -> None:
    ids = [q.enqueue_command(conn, "n1", "ping", data=b"d" * 20, now=T0 + i) for i in range(5)]
    dl = downlink.Downlink(downlink.DownlinkConfig(frame_cost_ms=150, window_reserve_ms=100))
    p = plan(conn, hello(window_ms=400), T0 + 10, dl)  # (400 - 100) // 150 = 2 items
    assert p.ids == tuple(ids[:2]) and p.left == 3
    # A 1 s sleep gives a sensor 2048 * 1/60 = 34 bytes: one (38-byte) frame still goes.
    p = plan(conn, hello(next_wake_s=1, window_ms=5000), T0 + 20, dl)
    assert p.ids == (ids[0],) and p.left == 4
    # Nothing when the node does not listen at all.
    assert plan(conn, hello(window_ms=0), T0 + 30, dl).left == 5
    # A frame past the class's max_message (the device changed class) fails instead of
    # blocking the queue forever.
    chunk = proto.encode_ota_chunk(proto.OtaChunk(1, 7, 0, b"x" * 900))
    big = q.enqueue_frame(conn, "n1", proto.OTA_CHUNK, chunk, priority=9, now=T0 + 40)
    conn.execute("UPDATE devices SET class='monitor' WHERE id='n1'")
    assert plan(conn, hello(), T0 + 50, dl).ids == tuple(ids)
    it = q.get(conn, "n1", big)
    assert it.status == q.FAILED and it.result_status == "too_large"


def test_wake_statistics_count_missed_wakes(conn: sqlite3.Connection) -> None:
    dl = downlink.Downlink(downlink.DownlinkConfig(grace_s=30))
    plan(conn, hello(next_wake_s=600), T0, dl)
    plan(conn, hello(next_wake_s=600), T0 + 620, dl)  # on time (within grace)
    plan(conn, hello(next_wake_s=600), T0 + 620 + 600 * 3 + 100, dl)  # missed 3
    s = wake_store.wake_stats(conn, "n1")
    assert s is not None and s.wakes == 3 and s.missed_wakes == 3
    assert s.listen_window == (T0 + 620 + 1900 + 600, T0 + 620 + 1900 + 600 + 2.0)
    assert wake_store.missed_wakes(100.0, 60, 100.0 + 30 + 60, 30) == 2


def test_a_planning_failure_sends_nothing_and_keeps_the_batch(conn: sqlite3.Connection) -> None:
    cid = q.enqueue_command(conn, "n1", "ping", now=T0)
    conn.execute("UPDATE downlink_items SET op=99")  # a row no codec can encode
    with db.transaction(conn):
        conn.execute("UPDATE devices SET last_seen=1 WHERE id='n1'")
        (p,) = downlink.Downlink().plan(conn, [("n1", hello())], T0)
    assert p.frames == () and q.get(conn, "n1", cid).attempts == 0
    assert registry.get(conn, "n1").last_seen == 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["cmd", "cfg", "cancel", "wake", "result"]),
                          st.integers(0, 9), st.integers(0, 2000)), max_size=40))
def test_queue_invariants(tmp_path_factory: pytest.TempPathFactory,
                          ops: list[tuple[str, int, int]]) -> None:
    c = db.open_db(tmp_path_factory.mktemp("q") / "g.db")
    registry.add(c, "n1", "monitor", now=T0)
    dl = downlink.Downlink(downlink.DownlinkConfig(max_attempts=3))
    now = T0
    sent: list[int] = []
    for op, a, b in ops:
        now += 1 + b
        try:
            if op == "cmd":
                q.enqueue_command(c, "n1", "ping", priority=a, ttl_s=1 + b * 3, now=now)
            elif op == "cfg":
                q.set_config(c, "n1", {1 + a: b}, priority=a, now=now)
            elif op == "cancel" and sent:
                q.cancel(c, "n1", sent[a % len(sent)], now=now)
        except q.QueueError:
            pass
        if op == "wake":
            with db.transaction(c):
                p = dl.plan(c, [("n1", hello(window_ms=100 + 100 * a))], now)[0]
            sent.extend(p.ids)
            keys = [(it.priority, it.kind == proto.SHADOW_DELTA) for it in
                    (q.get(c, "n1", i) for i in p.ids)]
            assert keys == sorted(keys, reverse=True)
            assert all(q.get(c, "n1", i).expires_at is None or q.get(c, "n1", i).expires_at > now
                       for i in p.ids)
        if op == "result" and sent:
            with db.transaction(c):
                dl.handle_up(c, [("n1", proto.CommandResult(1, sent[a % len(sent)],
                                                             proto.ResultStatus.OK))], now)
        items = q.history(c, "n1", limit=1000)
        assert sum(i.status in q.ACTIVE for i in items) <= 16
        assert sum(i.status in q.ACTIVE and i.kind == proto.SHADOW_DELTA for i in items) <= 1
        assert all(i.attempts <= 3 for i in items)
        assert all(i.retired_at is None for i in items if i.status in q.ACTIVE)
    c.close()


def test_enqueue_fleet_is_all_or_nothing(conn: sqlite3.Connection) -> None:
    registry.add(conn, "n2", now=T0)
    first = q.enqueue_command(conn, "n1", "ping", now=T0)
    assert q.enqueue_fleet(conn, ["n1", "n2", "m1"], "sync_time", [int(T0)], now=T0) == 3
    assert q.enqueue_fleet(conn, ["n1", "n2"], "ping", now=T0) == 2
    ids = [i.command_id for i in q.pending(conn, "n1")]
    assert len(set(ids)) == 3 and ids[0] == first
    with pytest.raises(q.QueueError, match="no device 'zz'"):
        q.enqueue_fleet(conn, ["n2", "zz"], "ping", now=T0)
    for _ in range(15):
        q.enqueue_command(conn, "m1", "ping", now=T0)
    with pytest.raises(q.QueueFull, match="m1 is full"):
        q.enqueue_fleet(conn, ["n2", "m1"], "ping", now=T0)
    assert len(q.pending(conn, "n2")) == 2


def _at(args: list[int], i: int, v: int) -> list[int]:
    return args[:i] + [v] + args[i + 1:]


@pytest.mark.parametrize("op", list(proto.CommandOp), ids=lambda op: op.name.lower())
def test_arguments_checked_by_the_spec_at_every_edge(conn: sqlite3.Connection,
                                                      op: proto.CommandOp) -> None:
    table = proto.OP_ARGS[op]
    low = [a.low for a in table.args]
    high = [a.high for a in table.args]
    name = op.name.lower()
    refused: list[tuple[list[int], str]] = [(low + [0], f"{name} takes")]
    if table.required:
        refused.append((low[:table.required - 1], f"{name} takes"))
    for i, a in enumerate(table.args):
        rng = re.escape(f"argument {i + 1} ({a.name}) must be in {a.span}")
        refused += [(_at(low, i, a.low - 1), rng), (_at(high, i, a.high + 1), rng)]
    for args, message in refused:
        with pytest.raises(q.BadArguments, match=message):
            q.enqueue_command(conn, "n1", op, args, now=T0)
        with pytest.raises(q.BadArguments, match=message):
            q.enqueue_fleet(conn, ["n1", "m1"], op, args, now=T0)
    assert q.pending(conn, "n1") == [] and q.pending(conn, "m1") == []
    for args in (low, high, low[:table.required]):
        cid = q.enqueue_command(conn, "n1", name, args, now=T0)
        assert q.get(conn, "n1", cid).args == tuple(args)
    assert q.enqueue_fleet(conn, ["n1", "m1"], name, low, now=T0) == 2


def test_stay_awake_beyond_its_range_names_the_range(conn: sqlite3.Connection) -> None:
    with pytest.raises(q.BadArguments) as err:
        q.enqueue_command(conn, "n1", "stay_awake", [900], now=T0)
    assert str(err.value) == "stay_awake: argument 1 (seconds) must be in 0..600 s, got 900"
    with pytest.raises(q.BadArguments, match=r"stay_awake takes 1 argument, got 0 \(usage: stay_awake SECONDS\)"):
        q.enqueue_command(conn, "n1", "stay_awake", [], now=T0)
    with pytest.raises(q.BadArguments, match=r"argument 1 \('9'\) is not an integer"):
        q.enqueue_command(conn, "n1", "stay_awake", ["9"], now=T0)  # type: ignore[list-item]
    assert q.pending(conn, "n1") == []
