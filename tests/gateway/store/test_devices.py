"""The device registry: states, HELLO fields, errors naming the device."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import proto
from gateway.store import db, devices


def hello(next_wake_s: int = 600) -> proto.Hello:
    return proto.Hello(5, 42, proto.BootCause.TIMER, 3210, -71, 50_000, 12, 3, next_wake_s,
                       1500, 1_700_000_000, proto.DeviceClass.SENSOR, safe_mode=True)


def test_add_list_and_refusals(tmp_path: Path) -> None:
    conn = db.open_db(tmp_path / "g.db")
    dev = devices.add(conn, "n1", "sensor", "ab12", now=100.0)
    assert (dev.status, dev.device_class, dev.cert_serial, dev.created_at) == (
        "provisioned", "sensor", "ab12", 100.0)
    assert dev.limits == proto.DEVICE_CLASSES["sensor"]
    devices.add(conn, "n2", "actuator")
    with pytest.raises(devices.RegistryError, match="already registered"):
        devices.add(conn, "n1")
    with pytest.raises(devices.RegistryError, match="unknown device class 'toaster'"):
        devices.add(conn, "n3", "toaster")
    with pytest.raises(devices.RegistryError, match="invalid device id"):
        devices.add(conn, "bad/id")
    assert [d.id for d in devices.list_devices(conn)] == ["n1", "n2"]
    assert devices.list_devices(conn, "active") == []
    with pytest.raises(devices.RegistryError, match="no device 'zz'"):
        devices.get(conn, "zz")


def test_hello_activates_and_records_fields(tmp_path: Path) -> None:
    conn = db.open_db(tmp_path / "g.db")
    devices.add(conn, "n1")
    with db.transaction(conn):
        devices.record_hellos(conn, [devices.hello_row("n1", hello(), 1000.0)], 1000.0)
    d = devices.get(conn, "n1")
    assert d.status == "active"
    assert (d.fw_version, d.battery_mv, d.rssi, d.boot_cause, d.safe_mode) == (42, 3210, -71, "timer", 1)
    assert (d.last_hello_at, d.next_wake_at, d.awake_until) == (1000.0, 1600.0, 1001.5)


def test_quarantine_and_release(tmp_path: Path) -> None:
    conn = db.open_db(tmp_path / "g.db")
    devices.add(conn, "n1")
    with pytest.raises(devices.RegistryError, match="not quarantined"):
        devices.release(conn, "n1")
    devices.quarantine(conn, "n1", "too many malformed frames")
    d = devices.get(conn, "n1")
    assert (d.status, d.status_reason) == ("quarantined", "too many malformed frames")
    assert devices.release(conn, "n1").status == "active"
    devices.set_status(conn, "n1", "revoked")
    devices.quarantine(conn, "n1", "x")  # a revoked device stays revoked
    assert devices.get(conn, "n1").status == "revoked"


def test_an_old_registry_gains_the_board_and_keeps_its_devices(tmp_path: Path) -> None:
    """A database written by the registry before the board (its first three steps): its
    devices are kept, with no board, and take one afterwards."""
    path = tmp_path / "old.db"
    steps = devices._STEPS  # noqa: SLF001  (white-box: the schema as it was before the board)
    conn = db.connect(path)
    db.apply(conn, devices.STORE, steps[:3])
    conn.execute("INSERT INTO devices(id, class, cert_serial, status, created_at, status_at, "
                 "fw_version, next_listen_s) VALUES ('old-1', 'sensor', 'ab', 'active', 1.0, "
                 "2.0, 7, 60)")
    conn.commit()
    assert "board" not in {r[1] for r in conn.execute("PRAGMA table_info(devices)")}
    conn.close()
    conn = db.open_db(path)
    assert db.version(conn, devices.STORE) == len(steps) == 4
    old = devices.get(conn, "old-1")
    assert (old.status, old.cert_serial, old.fw_version, old.next_listen_s, old.board) == (
        "active", "ab", 7, 60, None)
    assert devices.board_of(conn, "old-1") is None
    assert devices.set_board(conn, "old-1", "esp32s3").board == "esp32s3"
    assert devices.add(conn, "new-1", board="pico_w").board == "pico_w"
    assert devices.board_of(conn, "new-1") == "pico_w" and devices.board_of(conn, "zz") is None
    assert devices.set_board(conn, "old-1", None).board is None
    with pytest.raises(devices.RegistryError, match="no device 'zz'"):
        devices.set_board(conn, "zz", "esp32")
    # Registering again (a reflash) sets the board of a device already there.
    assert devices.add_missing(conn, {"old-1": "ab", "new-2": "cd"},
                               boards={"old-1": "esp32c3", "new-2": "esp32"}) == 1
    assert (devices.board_of(conn, "old-1"), devices.board_of(conn, "new-2")) == (
        "esp32c3", "esp32")
    conn.close()
    conn = db.open_db(path)  # opened again: nothing more to migrate, nothing lost
    assert [(d.id, d.board) for d in devices.list_devices(conn)] == [
        ("new-1", "pico_w"), ("new-2", "esp32"), ("old-1", "esp32c3")]
