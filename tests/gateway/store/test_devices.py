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
