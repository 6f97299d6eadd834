"""The gateway's side of node time and listening: bursts stamped on a node's unset clock
moved to gateway time, the next listening time from HELLO's next_listen_s, a stay_awake
that suppresses SLEEP_NOW and makes queued items go at once, and COMMAND's expires_at."""

from __future__ import annotations

from pathlib import Path

from gateway import proto
from gateway.pipeline import downlink
from gateway.store import db, devices, readings
from gateway.store import downlink_queue as q
from gateway.store import wakes as wake_store

T = 1_796_000_000.0


def _hello(**kw: object) -> proto.Hello:
    base: dict[str, object] = dict(
        msg_id=0x80000001, fw_version=1, boot_cause=proto.BootCause.TIMER, battery_mv=3700,
        rssi=-60, free_mem=100000, queue_depth=0, dropped=0, next_wake_s=60,
        awake_window_ms=3000, time=int(T), device_class=proto.DeviceClass.SENSOR)
    base.update(kw)
    return proto.Hello(**base)  # type: ignore[arg-type]


def _burst(ts: tuple[int, ...], node_clock: bool) -> proto.Burst:
    cols = (tuple(2000 for _ in ts), tuple(5000 for _ in ts), tuple(3700 for _ in ts))
    return proto.Burst(1, proto.SCHEMA_ENV3, 60, proto.Series(ts, cols), node_clock=node_clock)


def test_node_clock_bursts_move_by_the_hellos_offset_and_others_stay() -> None:
    cold = 946_684_800
    batch = [("n1", _burst((cold + 10, cold + 70), True)), ("n1", _burst((1000, 1060), False)),
             ("n2", _burst((cold, cold + 60), True))]
    out = readings.to_gateway_clock(batch, {"n1": T - (cold + 100)})
    assert out[0][1].readings.timestamps == (int(T) - 90, int(T) - 30)
    assert not out[0][1].node_clock
    assert out[1][1] is batch[1][1]
    assert out[2][1] is batch[2][1]  # no HELLO time known for n2: kept, with a warning


def test_the_registry_gives_the_offset_of_the_last_hello(tmp_path: Path) -> None:
    conn = db.open_db(tmp_path / "g.db")
    devices.add(conn, "n1")
    with db.transaction(conn):
        devices.record_hellos(conn, [devices.hello_row("n1", _hello(time=946_684_900,
                                                                      clock_unset=True), T)], T)
    assert devices.clock_offsets(conn, ["n1", "n2"]) == {"n1": T - 946_684_900}
    dev = devices.get(conn, "n1")
    assert dev.clock_unset == 1


def test_next_listen_sets_the_expected_wake_and_misses_are_counted_from_it(tmp_path: Path) -> None:
    conn = db.open_db(tmp_path / "g.db")
    devices.add(conn, "n1")
    dl = downlink.Downlink()
    with db.transaction(conn):
        dl.plan(conn, [("n1", _hello(next_wake_s=55, next_listen_s=595))], T)
    st = wake_store.wake_stats(conn, "n1")
    assert st is not None and st.expected_at == T + 595 and st.interval_s == 595
    # On time (ten sampling wakes later): nothing missed; two listens later: two missed.
    with db.transaction(conn):
        dl.plan(conn, [("n1", _hello(next_listen_s=600))], T + 600)
    with db.transaction(conn):
        dl.plan(conn, [("n1", _hello(next_listen_s=600))], T + 600 + 3 * 600)
    st = wake_store.wake_stats(conn, "n1")
    assert st is not None and st.missed_wakes == 2
    # A node of protocol 1.1 (no next_listen_s) is taken at its next_wake_s.
    with db.transaction(conn):
        dl.plan(conn, [("n1", _hello(next_wake_s=60))], T + 5000)
    st = wake_store.wake_stats(conn, "n1")
    assert st is not None and st.interval_s == 60


def test_stay_awake_plans_no_sleep_and_items_queued_meanwhile_go_at_once(tmp_path: Path) -> None:
    conn = db.open_db(tmp_path / "g.db")
    devices.add(conn, "n1")
    dl = downlink.Downlink()
    stay = q.enqueue_command(conn, "n1", "stay_awake", [30], now=T)
    with db.transaction(conn):
        plan = dl.plan(conn, [("n1", _hello())], T)[0]
    assert plan.ids == (stay,) and plan.awake_s == 30
    st = wake_store.wake_stats(conn, "n1")
    assert st is not None and st.awake_until == T + 30
    ping = q.enqueue_command(conn, "n1", "ping", now=T + 5)
    with db.transaction(conn):
        now = dl.plan_awake(conn, T + 5)
    assert [(d, p.ids) for d, p in now] == [("n1", (ping,))]
    with db.transaction(conn):
        assert dl.plan_awake(conn, T + 6) == []  # sent once; it awaits its result
    # After the stay, items wait for the next wake again.
    q.enqueue_command(conn, "n1", "ping", now=T + 40)
    with db.transaction(conn):
        assert dl.plan_awake(conn, T + 40) == []


def test_a_command_carries_its_expiry_on_the_gateways_clock(tmp_path: Path) -> None:
    conn = db.open_db(tmp_path / "g.db")
    devices.add(conn, "n1")
    cid = q.enqueue_command(conn, "n1", "set_interval", [120], ttl_s=90, now=T)
    with db.transaction(conn):
        plan = downlink.Downlink().plan(conn, [("n1", _hello())], T + 30)[0]
    frame = proto.decode(plan.frames[0])
    assert isinstance(frame, proto.Command) and frame.command_id == cid
    assert (frame.ttl_s, frame.expires_at) == (60, int(T + 90))
