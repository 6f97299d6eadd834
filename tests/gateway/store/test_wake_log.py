"""The wake log on a real SQLite file: a row per HELLO, readings and the last frame added
to the current wake, nothing added to a wake long over, and the log kept bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import proto
from gateway.store import db, readings, wake_log
from gateway.store import devices as registry


def hello(battery_mv: int = 3300, rssi: int = -60, **kw: object) -> proto.Hello:
    return proto.Hello(1, 4, proto.BootCause.TIMER, battery_mv, rssi, 40_000, 12, 0, 300, 800,
                       1_700_000_000, proto.DeviceClass.SENSOR, **kw)  # type: ignore[arg-type]


def run(device: str, n: int) -> readings.Committed:
    """`n` readings of `device` stored in the batch."""
    return readings.Committed(device, 1, proto.SCHEMA_ENV3, proto.Series(
        tuple(range(n)), ((0,) * n, (0,) * n, (0,) * n)))


def test_a_wake_per_hello_with_what_came_after_it(tmp_path: Path) -> None:
    conn = db.open_db(tmp_path / "g.db")
    registry.add(conn, "a")
    registry.add(conn, "b")
    t = 1_700_000_000.0
    with db.transaction(conn):
        wake_log.record(conn, [("a", hello(ota_state=proto.OtaState.DOWNLOADING,
                                           cred_rotation=3,
                                           cred_outcome=proto.CredOutcome.ROTATED))],
                        ["a"], [run("a", 6), run("a", 4)], t)
    with db.transaction(conn):
        wake_log.record(conn, [], ["a", "b"], [run("a", 5), run("b", 7)], t + 2.5)  # b: no wake
    (w,) = wake_log.of_device(conn, "a")
    assert (w.seq, w.readings, w.queue_depth, w.seen_s) == (1, 15, 12, 2.5)
    assert (w.ota_state, w.cred_rotation, w.cred_outcome) == ("downloading", 3, "rotated")
    assert wake_log.of_device(conn, "b") == []
    # Frames long after the wake began are not its own.
    with db.transaction(conn):
        wake_log.record(conn, [], ["a"], [run("a", 99)], t + wake_log.WAKE_SPAN_S + 1)
    assert wake_log.of_device(conn, "a")[0].readings == 15
    # The next HELLO opens the next wake; newest first.
    with db.transaction(conn):
        wake_log.record(conn, [("a", hello(3100, -70))], ["a"], [], t + 300)
    ws = wake_log.of_device(conn, "a")
    assert [(x.seq, x.battery_mv, x.rssi, x.readings) for x in ws] == [
        (2, 3100, -70, 0), (1, 3300, -60, 15)]
    assert [x.seq for x in wake_log.of_device(conn, "a", since=t + 1)] == [2]


def test_the_log_is_bounded_per_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wake_log, "KEEP_WAKES", 5)
    conn = db.open_db(tmp_path / "g.db")
    registry.add(conn, "a")
    registry.add(conn, "b")
    t = 1_700_000_000.0
    with db.transaction(conn):
        wake_log.record(conn, [("b", hello())], ["b"], [], t - 40 * 86400)
    for i in range(12):
        with db.transaction(conn):
            wake_log.record(conn, [("a", hello())], ["a"], [], t + 300 * i)
    assert [w.seq for w in wake_log.of_device(conn, "a")] == [12, 11, 10, 9, 8]
    # Age: a wake older than KEEP_DAYS goes at the device's next wake.
    assert wake_log.count(conn, "b") == 1
    with db.transaction(conn):
        wake_log.record(conn, [("b", hello())], ["b"], [], t)
    assert [w.seq for w in wake_log.of_device(conn, "b")] == [2]
