"""The gateway's half of TLS-PSK session keys (gateway.pipeline.session_keys) on a real SQLite
file, with ingest's real core answering the node: who gets a key and when, that a key
reaches the broker's set only once the node has stored it, that renewal withdraws the old
key before a new one is queued, and that a quarantined or revoked device loses its key.
tests/system/test_session_keys.py runs it with Mosquitto and the firmware."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import proto
from gateway.config import PkiConfig
from gateway.errors import BrokerError
from gateway.pipeline.downlink import Downlink
from gateway.pipeline.ingest import Ingest
from gateway.pipeline.session_keys import SessionKeys
from gateway.security.pki import Pki
from gateway.store import db, rotations
from gateway.store import devices as registry
from gateway.store import downlink_queue as q
from gateway.store import session_keys as sk
from gateway.transport import broker

NOW = 1_800_000_000.0
DAY = 86400.0


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[sqlite3.Connection, Ingest, SessionKeys]]:
    conn = db.open_db(tmp_path / "gw.db")
    with db.transaction(conn):
        for d in ("d1", "d2"):
            registry.add(conn, d, now=NOW)
    keys = SessionKeys(8884, PkiConfig(session_key_days=7.0, session_key_lead_days=1.0))
    ingest = Ingest(conn, downlink=Downlink(clock=lambda: NOW), session_keys=keys, clock=lambda: NOW)
    try:
        yield conn, ingest, keys
    finally:
        conn.close()


def hello(device: str, session_key: int = 0) -> tuple[str, bytes]:
    return f"torpor/{device}/up", proto.encode_hello(proto.Hello(
        7, 3, proto.BootCause.TIMER, 3300, -60, 40_000, 0, 0, 900, 800, 1_700_000_000,
        proto.DeviceClass.SENSOR, session_key=session_key))


def result(device: str, cid: int, status: proto.ResultStatus) -> tuple[str, bytes]:
    return f"torpor/{device}/up", proto.encode_command_result(
        proto.CommandResult(9, cid, status, 0, "", ()))


def test_a_key_reaches_the_broker_only_once_the_node_stored_it(
        env: tuple[sqlite3.Connection, Ingest, SessionKeys]) -> None:
    conn, ingest, keys = env
    # Nobody has spoken yet: nobody gets a key.
    assert keys.plan(conn, NOW) == {}
    assert keys.issue(conn, NOW) == []
    ingest.process([hello("d1")])
    assert keys.issue(conn, NOW) == ["d1"]
    row = sk.get(conn, "d1")
    assert row is not None and row.state == sk.QUEUED and len(row.key) == 32
    item = q.get(conn, "d1", row.command_id or 0)
    assert (item.op, item.args, item.data) == (proto.CommandOp.INSTALL_PSK, (row.key_id, 8884), row.key)
    assert keys.plan(conn, NOW) == {}  # queued: not on the broker yet
    assert keys.issue(conn, NOW) == []  # one key at a time
    ingest.process([result("d1", item.command_id, proto.ResultStatus.OK)])
    assert keys.plan(conn, NOW) == {"d1": row.key}
    row = sk.get(conn, "d1")
    assert row is not None and row.state == sk.ACTIVE
    assert row.days_left(NOW) == pytest.approx(7.0)


def test_renewal_withdraws_the_old_key_before_queuing_a_new_one(
        env: tuple[sqlite3.Connection, Ingest, SessionKeys]) -> None:
    conn, ingest, keys = env
    ingest.process([hello("d1")])
    keys.issue(conn, NOW)
    old = sk.get(conn, "d1")
    assert old is not None
    ingest.process([result("d1", old.command_id or 0, proto.ResultStatus.OK)])
    keys.broker_applied(keys.plan(conn, NOW))
    # Six days on (one before the end): withdrawn. While the broker still holds it,
    # nothing new is issued.
    later = NOW + 6 * DAY
    assert keys.plan(conn, later) == {}
    assert sk.get(conn, "d1") is None
    assert keys.issue(conn, later) == []
    keys.broker_applied({})  # the broker reloaded without it and the sessions were cut
    assert keys.issue(conn, later) == ["d1"]
    new = sk.get(conn, "d1")
    assert new is not None and new.key != old.key and new.state == sk.QUEUED


def test_failed_delivery_and_old_firmware(env: tuple[sqlite3.Connection, Ingest, SessionKeys]) -> None:
    conn, ingest, keys = env
    ingest.process([hello("d1"), hello("d2")])
    keys.issue(conn, NOW)
    r1, r2 = sk.get(conn, "d1"), sk.get(conn, "d2")
    assert r1 is not None and r2 is not None
    ingest.process([result("d1", r1.command_id or 0, proto.ResultStatus.UNKNOWN_OP),
                    result("d2", r2.command_id or 0, proto.ResultStatus.ERROR)])
    assert keys.plan(conn, NOW) == {}
    u = sk.get(conn, "d1")
    assert u is not None and u.state == sk.UNSUPPORTED and u.key == b""
    assert sk.get(conn, "d2") is None  # a fresh key follows
    assert keys.issue(conn, NOW) == ["d2"]
    # Old firmware is asked again a day later.
    keys.plan(conn, NOW + DAY + 1)
    assert keys.issue(conn, NOW + DAY + 1) == ["d1"]


@pytest.mark.parametrize("status", [registry.QUARANTINED, registry.REVOKED])
def test_a_device_no_longer_served_loses_its_key(
        env: tuple[sqlite3.Connection, Ingest, SessionKeys], status: str) -> None:
    conn, ingest, keys = env
    ingest.process([hello("d1"), hello("d2")])
    keys.issue(conn, NOW)
    for d in ("d1", "d2"):
        row = sk.get(conn, d)
        assert row is not None
        ingest.process([result(d, row.command_id or 0, proto.ResultStatus.OK)])
    assert set(keys.plan(conn, NOW)) == {"d1", "d2"}
    with db.transaction(conn):
        registry.set_status(conn, "d1", status, "test", now=NOW)
    # Off the broker's set at once (even before its row is gone), and never issued again.
    assert set(sk.broker_keys(conn)) == {"d2"}
    assert set(keys.plan(conn, NOW)) == {"d2"}
    assert sk.get(conn, "d1") is None
    keys.broker_applied({"d2"})
    assert keys.issue(conn, NOW) == []


def test_the_psk_file_never_holds_the_gateways_identity(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.init_ca()
    pki.issue_server(["localhost"])
    pki.issue_gateway()
    key = bytes(range(32))
    assert broker.render_psk({"d1": key, "d2": key}, refused=["d2"]) == f"d1:{key.hex()}\n"
    with pytest.raises(BrokerError):
        broker.write_psk(tmp_path / "b", pki, {pki.gateway.cn: key})
    with pytest.raises(BrokerError):
        broker.render_psk({"d1": b"short"})
    path = broker.write_psk(tmp_path / "b", pki, {"d1": key})
    assert path.stat().st_mode & 0o777 == 0o600
    conf = broker.render_config(broker.BrokerSettings(port=8883, psk_port=8884, dynsec_plugin=None),
                                pki, tmp_path / "b" / "acl")
    psk_part = conf.split("listener 8884", 1)[1]
    assert "use_identity_as_username true" in psk_part and "require_certificate" not in psk_part
    assert "\npsk_file " not in broker.render_config(broker.BrokerSettings(dynsec_plugin=None), pki,
                                                  tmp_path / "b" / "acl")


def test_a_certificate_rotation_takes_the_key_away_until_it_ends(
        env: tuple[sqlite3.Connection, Ingest, SessionKeys]) -> None:
    conn, ingest, keys = env
    ingest.process([hello("d1")])
    keys.issue(conn, NOW)
    row = sk.get(conn, "d1")
    assert row is not None
    ingest.process([result("d1", row.command_id or 0, proto.ResultStatus.OK)])
    assert set(keys.plan(conn, NOW)) == {"d1"}
    with db.transaction(conn):
        rot = rotations.request(conn, "d1", "operator", now=NOW)
    assert keys.plan(conn, NOW) == {}
    keys.broker_applied({})
    assert keys.issue(conn, NOW) == []
    with db.transaction(conn):
        rotations.end(conn, rot.id, rotations.FAILED, "", "test", [], NOW)
    assert keys.issue(conn, NOW) == ["d1"]


def test_a_key_the_node_no_longer_holds_is_replaced_once_it_sleeps(
        env: tuple[sqlite3.Connection, Ingest, SessionKeys]) -> None:
    conn, ingest, keys = env
    ingest.process([hello("d1")])
    keys.issue(conn, NOW)
    row = sk.get(conn, "d1")
    assert row is not None
    ingest.process([result("d1", row.command_id or 0, proto.ResultStatus.OK)])
    keys.broker_applied(keys.plan(conn, NOW))
    later = NOW + 60
    ingest.clock = lambda: later
    ingest.process([hello("d1", session_key=row.key_id)])  # holds it: nothing changes
    assert sk.get(conn, "d1").state == sk.ACTIVE  # type: ignore[union-attr]
    ingest.process([hello("d1")])  # holds none (dropped after a refusal)
    assert sk.get(conn, "d1").state == sk.STALE  # type: ignore[union-attr]
    # Still on the broker while the node listens (a cut would end its session) ...
    assert keys.plan(conn, later) == {"d1": row.key}
    # ... withdrawn once its window is over, then a new key follows.
    assert keys.plan(conn, later + 5) == {}
    keys.broker_applied({})
    assert keys.issue(conn, later + 5) == ["d1"]
