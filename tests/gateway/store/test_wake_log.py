"""The wake log on a real SQLite file: a row per HELLO, readings and the last frame added
to the current wake, nothing added to a wake long over, and the log kept bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import proto
from gateway.config import EnergyModel
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


# ------------------------------------------------------------------ energy facts, ledger
MODEL = EnergyModel(board="esp32", cpu_active_ma=45.0, radio_listen_ma=100.0,
                    deep_sleep_ua=10.0, boot_ms=650.0, capacity_mah=2500.0, empty_mv=2000.0)


def test_the_previous_wakes_energy_facts_are_logged_and_old_hellos_have_none(
        tmp_path: Path) -> None:
    conn = db.open_db(tmp_path / "g.db")
    registry.add(conn, "a")
    t = 1_700_000_000.0
    with db.transaction(conn):
        # A HELLO of protocol 1.4 (no facts), then one of 1.5 that has them.
        wake_log.record(conn, [("a", hello())], ["a"], [], t)
        wake_log.record(conn, [("a", hello(prev_awake_ms=4000, prev_radio_ms=3000,
                                           prev_sent=True, boots_without_send=2))],
                        ["a"], [], t + 300)
    new, old = wake_log.of_device(conn, "a")
    assert (old.prev_awake_ms, old.prev_radio_ms, old.prev_sent) == (None, None, None)
    assert old.energy_uah(MODEL) is None
    assert (new.prev_awake_ms, new.prev_radio_ms, new.prev_sent,
            new.boots_without_send) == (4000, 3000, 1, 2)
    # (boot 650 ms + 4,000 ms awake) at 45 mA + 3,000 ms of radio at 100 mA, in µAh.
    assert new.energy_uah(MODEL) == pytest.approx(((650 + 4000) * 45 + 3000 * 100) / 3600)
    assert new.energy_uah(None) is None
    d = new.as_dict()
    assert d["prev_awake_ms"] == 4000 and d["prev_sent"] == 1


def test_charge_left_follows_the_2aa_curve() -> None:
    assert wake_log.charge_left(3300) == 1.0 and wake_log.charge_left(1900) == 0.0
    assert wake_log.charge_left(2900) == pytest.approx(0.825)  # between 2,800 and 3,000 mV
    assert [wake_log.charge_left(mv) for mv, _ in wake_log.AA2_CURVE] == [
        f for _, f in wake_log.AA2_CURVE]


def _wakes(conn: object, device: str, t: float, n: int, every_s: float, mv: int,
           **facts: object) -> None:
    for i in range(n):
        with db.transaction(conn):  # type: ignore[arg-type]
            wake_log.record(conn, [(device, hello(mv, **facts))], [device], [],  # type: ignore[arg-type]
                            t + every_s * i)


def test_ledger_forecast_from_sending_wakes(tmp_path: Path) -> None:
    conn = db.open_db(tmp_path / "g.db")
    registry.add(conn, "a")
    t = 1_700_000_000.0
    _wakes(conn, "a", t, 10, 300.0, 2900, prev_awake_ms=4000, prev_radio_ms=3000,
           prev_sent=True)
    f = wake_log.ledger_forecast(conn, "a", MODEL, t + 2700)
    assert f is not None
    wake = ((650 + 4000) * 45 + 3000 * 100) / 3600  # µAh
    span = 2700.0
    sleep = 10.0 * (span - 9 * 4.65) / 3600  # µAh of deep sleep between the 9 wakes
    drain = (9 * wake + sleep) / (span / 3600)
    left = 0.825 * 2500  # mAh above 2,000 mV at 2,900 mV
    assert (f.wakes, f.span_s, f.battery_mv, f.sampling_uah) == (9, span, 2900, None)
    assert f.sending_uah == pytest.approx(wake)
    assert f.drain_ua == pytest.approx(drain)
    assert f.left_mah == pytest.approx(left)
    assert f.days == pytest.approx(left * 1000 / drain / 24)
    # Another empty level: the charge left above it.
    g = wake_log.ledger_forecast(conn, "a", MODEL, t + 2700, empty_mv=2800)
    assert g is not None and g.left_mah == pytest.approx((0.825 - 0.75) * 2500)


def test_ledger_counts_the_wakes_that_only_sampled(tmp_path: Path) -> None:
    """send_every = 3: each HELLO reports the sampling wake before it and counts two."""
    conn = db.open_db(tmp_path / "g.db")
    registry.add(conn, "a")
    t = 1_700_000_000.0
    _wakes(conn, "a", t, 8, 180.0, 3100, prev_awake_ms=700, prev_radio_ms=0,
           prev_sent=False, boots_without_send=2)
    f = wake_log.ledger_forecast(conn, "a", MODEL, t + 7 * 180)
    assert f is not None
    sample = (650 + 700) * 45 / 3600
    assert f.sampling_uah == pytest.approx(sample)
    # No sending wake reported: they take the sampling wakes' figure (none larger known).
    assert f.sending_uah == pytest.approx(sample)
    assert f.wakes == 7 + 7 * 2
    span = 7 * 180.0
    sleep = 10.0 * (span - 21 * 1.35) / 3600
    assert f.drain_ua == pytest.approx((21 * sample + sleep) / (span / 3600))


def test_no_ledger_forecast_without_enough_facts(tmp_path: Path) -> None:
    conn = db.open_db(tmp_path / "g.db")
    registry.add(conn, "a")
    registry.add(conn, "b")
    t = 1_700_000_000.0
    _wakes(conn, "a", t, wake_log.LEDGER_MIN_WAKES - 1, 300.0, 2900, prev_awake_ms=4000,
           prev_radio_ms=3000, prev_sent=True)
    assert wake_log.ledger_forecast(conn, "a", MODEL, t + 3600) is None
    _wakes(conn, "b", t, 20, 300.0, 2900)  # protocol 1.4 HELLOs: no facts
    assert wake_log.ledger_forecast(conn, "b", MODEL, t + 6000) is None
    # Wakes older than the window do not count.
    _wakes(conn, "a", t + 10, 3, 300.0, 2900, prev_awake_ms=4000, prev_radio_ms=3000,
           prev_sent=True)
    assert wake_log.ledger_forecast(conn, "a", MODEL, t + 8 * 86400) is None
