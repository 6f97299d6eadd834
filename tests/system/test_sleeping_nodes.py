"""Sleeping nodes are first-class, across the whole stack: sim nodes running the real
firmware, a real Mosquitto with mutual TLS, the real gateway process and its SQLite file,
and the operator's `torpor device` commands. Between wakes a node is asleep (no process):
whatever the operator queues then waits in the gateway for its next HELLO.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from gateway import proto
from gateway.store import downlink_queue as q
from gateway.store import wakes as wake_store
from tests.mpharness import micropython_binary
from tests.system.stack import Stack, StackNode, kill_node_process

pytestmark = [
    pytest.mark.skipif(micropython_binary() is None, reason="no MicroPython unix port"),
]

OK = int(proto.ResultStatus.OK)
DUPLICATE = int(proto.ResultStatus.DUPLICATE)
QUEUED = re.compile(r"queued command (\d+) ")


def aio(coro: Any) -> None:
    asyncio.run(asyncio.wait_for(coro, 90))


async def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"not met within {timeout:g}s: {what}"
        await asyncio.sleep(0.02)


def send(stack: Stack, device: str, op: str, *args: Any, flags: tuple[str, ...] = ()) -> int:
    """`torpor device send`; returns the command id it printed."""
    out = stack.cli("device", "send", device, op, *map(str, args), *flags).stdout
    m = QUEUED.search(out)
    assert m, out
    return int(m.group(1))


def item(stack: Stack, device: str, cid: int) -> q.Item:
    with stack.db() as conn:
        return q.get(conn, device, cid)


def show(stack: Stack, device: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(stack.cli("device", "show", device, "--json").stdout)
    return doc


async def hellos_seen(stack: Stack, device: str, n: int) -> None:
    def seen() -> bool:
        wakes = show(stack, device)["downlink"]["wakes"]
        return wakes is not None and wakes["wakes"] >= n

    await until(seen, f"{n} HELLOs from {device}")


async def first_wake(stack: Stack, node: StackNode) -> None:
    """The node's first wake: the gateway learns when it listens next; nothing is queued."""
    summary = await node.wake()
    assert summary.kinds["sleep"] == 1, summary.as_dict()
    await hellos_seen(stack, node.id, 1)


def test_command_queued_while_asleep_runs_at_next_wake_and_is_retired(stack: Stack) -> None:
    async def main() -> None:
        stack.start()
        node = stack.add_node("n1", seed=3)
        await first_wake(stack, node)
        cid = send(stack, "n1", "set_interval", 120)  # the node is asleep
        assert item(stack, "n1", cid).status == q.QUEUED
        assert node.executions() == []
        summary = await node.wake()
        assert summary.kinds["sleep"] == 1, summary.as_dict()
        await until(lambda: item(stack, "n1", cid).status == q.DONE, "command retired")
        it = item(stack, "n1", cid)
        assert (it.result_status, it.attempts, it.result_values) == ("ok", 1, (120,))
        assert node.executions() == [
            ex for ex in node.executions() if ex.command_id == cid and ex.status == OK]
        assert len(node.executions()) == 1
        # Later wakes bring nothing new and do not run it again.
        await node.wake(2)
        await hellos_seen(stack, "n1", 4)
        assert len(node.executions()) == 1, "executed again"
        assert item(stack, "n1", cid) == it

    aio(main())


def test_items_queued_while_asleep_arrive_in_priority_order(stack: Stack) -> None:
    async def main() -> None:
        stack.start()
        node = stack.add_node("n2", seed=4)
        await first_wake(stack, node)
        prios = [1, 9, 4, 7, 4]
        ids = []
        for i, p in enumerate(prios):
            ids.append(send(stack, "n2", "ping", i, flags=("--priority", str(p))))
        with stack.db() as conn:
            planned = [it.command_id for it in q.pending(conn, "n2")]
        # Higher priority first; the same priority in the order queued.
        want = [ids[1], ids[3], ids[2], ids[4], ids[0]]
        assert planned == want
        await node.wake()
        await until(lambda: all(item(stack, "n2", c).status == q.DONE for c in ids), "all retired")
        ran = node.executions()
        assert [ex.command_id for ex in ran] == want
        assert all(ex.status == OK for ex in ran)
        # The firmware's own log says the same: one "command <id> ..." line per execution.
        logged = [int(m) for m in re.findall(r"^I \d+ command (\d+) ", node.log_text(), re.M)]
        assert logged == want
        # One wake held them all (a 3 s window holds 19 items of 150 ms).
        st = show(stack, "n2")["downlink"]["wakes"]
        assert (st["last_delivered"], st["max_delivered"]) == (5, 5)

    aio(main())


def test_config_set_twice_while_asleep_arrives_once_with_the_newer_value(stack: Stack) -> None:
    async def main() -> None:
        stack.start()
        node = stack.add_node("n3", seed=5)
        await first_wake(stack, node)
        stack.cli("device", "config", "n3", "sample_interval_s=120", "send_every=2")
        stack.cli("device", "config", "n3", "sample_interval_s=300")
        with stack.db() as conn:
            deltas = [it for it in q.pending(conn, "n3") if it.kind == proto.SHADOW_DELTA]
        assert len(deltas) == 1
        delta = deltas[0]
        await node.wake()
        await until(lambda: item(stack, "n3", delta.command_id).status == q.DONE, "delta applied")
        it = item(stack, "n3", delta.command_id)
        assert it.attempts == 1 and it.result_status == "applied"
        with stack.db() as conn:
            state = {c.key: c for c in q.config_state(conn, "n3")}
        # What the node reported in its SHADOW_REPORT: the newer value, and both keys.
        assert state["sample_interval_s"].reported_value == 300
        assert state["send_every"].reported_value == 2
        assert all(c.applied for c in state.values())
        text = node.log_text()
        assert "shadow delta refused" not in text
        # The node runs it: its next HELLO carries the new version, and once it has no
        # downlink hint left it plans its sleeps on the 300 s grid.
        await node.wake(2)
        assert show(stack, "n3")["config_version"] == it.config_version
        # A send that fails on a loaded machine retries on its backoff first (a short
        # sleep); the grid shows on the next wake that completes, within a few.
        for _ in range(4):
            if 60_000 < node.log().timings[-1]["sleep"] <= 300_000:
                break
            await node.wake()
        assert 60_000 < node.log().timings[-1]["sleep"] <= 300_000, node.log().timings
        with stack.db() as conn:
            assert [x for x in q.history(conn, "n3") if x.kind == proto.SHADOW_DELTA] == [it]

    aio(main())


def test_expired_item_is_never_delivered(stack: Stack) -> None:
    async def main() -> None:
        stack.start()
        node = stack.add_node("n4", seed=6)
        await first_wake(stack, node)
        stale = send(stack, "n4", "reboot", flags=("--priority", "9", "--ttl", "1"))
        fresh = send(stack, "n4", "ping", 7)
        # The node sleeps past the TTL: the gateway's sweep marks the item expired.
        await until(lambda: item(stack, "n4", stale).status == q.EXPIRED, "expired by the sweep")
        await node.wake()
        await until(lambda: item(stack, "n4", fresh).status == q.DONE, "the fresh one retired")
        it = item(stack, "n4", stale)
        assert (it.status, it.attempts, it.delivered_at, it.result_status) == (
            q.EXPIRED, 0, None, None)
        assert [ex.command_id for ex in node.executions()] == [fresh]
        summary = await node.wake()
        assert summary.kinds["sleep"] == 1, "the node rebooted: the expired command ran"
        assert [ex.command_id for ex in node.executions()] == [fresh]

    aio(main())


def test_power_cut_after_executing_before_reporting_runs_the_command_once(stack: Stack) -> None:
    async def main() -> None:
        stack.start()
        node = stack.add_node("n5", seed=7)
        await first_wake(stack, node)
        cid = send(stack, "n5", "set_thresholds", -500, 4000)
        node.hold_next()
        run = asyncio.create_task(node.wake())
        pid, held = await node.wait_held()
        assert held == cid
        kill_node_process(pid)  # the command ran and its result is on flash; not yet sent
        summary = await run
        assert summary.runs[-1].kind == "killed", summary.as_dict()
        it = item(stack, "n5", cid)
        assert (it.status, it.attempts, it.result_status) == (q.SENT, 1, None)
        # The next wake (a cold boot: RTC memory lost) reports the stored result; a
        # redelivery of the same id is answered `duplicate` without running it again.
        summary = await node.wake()
        assert summary.runs[-1].cause == 0 and summary.kinds["sleep"] == 1, summary.as_dict()
        await until(lambda: item(stack, "n5", cid).status == q.DONE, "retired after the cut")
        it = item(stack, "n5", cid)
        assert it.result_status in ("ok", "duplicate")
        assert it.result_values[:2] == (-500, 4000) or it.result_status == "duplicate"
        ran = [ex for ex in node.executions() if ex.command_id == cid]
        assert [ex.status for ex in ran if ex.status == OK] == [OK], ran
        assert all(ex.status == DUPLICATE for ex in ran[1:]), ran
        await node.wake()
        assert [ex for ex in node.executions() if ex.command_id == cid] == ran
        assert item(stack, "n5", cid) == it

    aio(main())


def test_gateway_kill_9_between_send_and_result_neither_loses_nor_duplicates(stack: Stack) -> None:
    async def main() -> None:
        stack.start()
        node = stack.add_node("n6", seed=8)
        await first_wake(stack, node)
        cid = send(stack, "n6", "ping", 42)
        node.hold_next()
        run = asyncio.create_task(node.wake())
        _pid, held = await node.wait_held()
        assert held == cid
        stack.kill()  # the item went out; its result is not published yet
        assert item(stack, "n6", cid).status == q.SENT
        node.release()  # the node publishes its result while the gateway is down
        summary = await run
        assert summary.kinds["sleep"] == 1, summary.as_dict()
        stack.start()
        await until(lambda: item(stack, "n6", cid).status == q.DONE, "retired after restart")
        it = item(stack, "n6", cid)
        assert (it.attempts, it.result_status) == (1, "ok")
        await node.wake(2)
        assert [ex.command_id for ex in node.executions()] == [cid]
        assert item(stack, "n6", cid) == it

    aio(main())


def test_device_show_predicts_the_next_listening_time_within_one_interval(stack: Stack) -> None:
    # In real time, on the gateway's clock: the node takes the gateway's time, so a node in
    # compressed time would see its clock step back at every wake.
    async def main() -> None:
        stack.start()
        node = stack.add_node("n7", seed=9, time_scale=1, start_ms=None, sample_interval_s=3,
                              align_s=0)
        # When each wake began (its process started): the run's end less its awake time.
        began: list[float] = []
        run = asyncio.create_task(node.sim.run(
            4, wall_limit_s=60, on_run=lambda r: began.append(time.time() - r.awake_ms / 1000)))
        seen: list[dict[str, Any]] = []
        while not run.done():
            with stack.db() as conn:
                st = wake_store.wake_stats(conn, "n7")
            if st is not None and (not seen or st.wakes != seen[-1]["wakes"]):
                seen.append(st.as_dict())
            await asyncio.sleep(0.05)
        await run
        await hellos_seen(stack, "n7", 4)
        with stack.db() as conn:
            st = wake_store.wake_stats(conn, "n7")
        assert st is not None
        if st.wakes != seen[-1]["wakes"]:
            seen.append(st.as_dict())
        assert len(seen) >= 3, seen
        # The node wakes on its grid: the prediction is off by the time a wake takes to
        # reach its HELLO (boot, association, TLS), long on a loaded host. So it is held
        # against the moment the wake began, and the HELLO must come after that moment.
        # The first wake announces its next listen before the gateway's ACK sets its clock,
        # and its grid moves with that step: its prediction is held to two intervals, the
        # others to one.
        assert len(began) == 4 and all(s["wakes"] <= 4 for s in seen), (began, seen)
        errors = {b["wakes"]: began[b["wakes"] - 1] - a["expected_at"]
                  for a, b in zip(seen, seen[1:], strict=False) if b["wakes"] == a["wakes"] + 1}
        later = [e for w, e in errors.items() if w > 2]
        assert later and all(abs(e) <= 3.0 for e in later), (errors, seen, began)
        assert abs(errors.get(2, 0.0)) <= 6.0, (errors, seen, began)
        assert all(s["last_hello_at"] >= began[s["wakes"] - 1] for s in seen), (seen, began)
        assert all(s["missed_wakes"] == 0 for s in seen), seen
        doc = show(stack, "n7")["downlink"]
        assert doc["next_listen_until"] - doc["next_listen_at"] == pytest.approx(3.0)
        text = stack.cli("device", "show", "n7").stdout
        assert "next listening:" in text and "for 3.0s" in text

    aio(main())


def test_gateway_supervising_its_own_broker_delivers_at_the_first_hello(
        supervised_stack: Stack) -> None:
    stack = supervised_stack

    async def main() -> None:
        stack.start()
        node = stack.add_node("n8", seed=10)
        out = stack.cli("device", "send", "n8", "ping", "5").stdout
        assert "delivered at its first HELLO" in out  # never seen yet
        cid = send(stack, "n8", "ping", 6)
        await node.wake()
        await until(lambda: item(stack, "n8", cid).status == q.DONE, "retired")
        assert [ex.status for ex in node.executions()] == [OK, OK]

    aio(main())
