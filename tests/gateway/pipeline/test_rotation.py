"""The gateway's half of a device-key rotation, through ingest's real core on a real SQLite
file and a real PKI folder: what a request must pass, what issuing queues, and what the
node's HELLO confirms or ends. tests/system/test_key_rotation.py runs it with the firmware."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway import proto
from gateway.pipeline.downlink import Downlink
from gateway.pipeline.ingest import Ingest
from gateway.pipeline.rotation import RotationHandler
from gateway.security.pki import Pki
from gateway.store import db, deadletter
from gateway.store import devices as registry
from gateway.store import downlink_queue as q
from gateway.store import rotations as rs

NOW = 1_800_000_000.0
UP = "torpor/d1/up"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[sqlite3.Connection, Pki, Ingest, RotationHandler]]:
    pki = Pki(tmp_path / "pki")
    pki.init_ca()
    pki.init_issuing()
    pki.issue_device("d1")
    conn = db.open_db(tmp_path / "gw.db")
    with db.transaction(conn):
        registry.add(conn, "d1", now=NOW)
    handler = RotationHandler(pki, clock=lambda: NOW)
    ingest = Ingest(conn, downlink=Downlink(clock=lambda: NOW), rotation=handler,
                    clock=lambda: NOW)
    try:
        yield conn, pki, ingest, handler
    finally:
        conn.close()


def csr_for(cn: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    req = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))
    return req.public_bytes(serialization.Encoding.DER)


def csr_up(rid: int, der: bytes) -> bytes:
    return proto.encode_csr_up(proto.CsrUp(0x7000_0000, rid, der))


def hello(rid: int, outcome: proto.CredOutcome, serial: bytes = b"") -> bytes:
    return proto.encode_hello(proto.Hello(
        7, 3, proto.BootCause.TIMER, 3300, -60, 40_000, 0, 0, 900, 800, 1_700_000_000,
        proto.DeviceClass.SENSOR, cert_serial=serial, cred_outcome=outcome, cred_rotation=rid))


def letters(conn: sqlite3.Connection) -> list[str]:
    return sorted(d.reason for d in deadletter.list_recent(conn, "d1"))


def test_request_issue_and_fallback(env: tuple[sqlite3.Connection, Pki, Ingest, RotationHandler]) -> None:
    conn, pki, ingest, handler = env
    with db.transaction(conn):
        rot = rs.request(conn, "d1", "operator", now=NOW)
    cmd = q.get(conn, "d1", rot.command_id or 0)
    assert (cmd.op, cmd.args, cmd.priority) == (proto.CommandOp.ROTATE_KEY, (rot.id,), 6)
    # The key the device holds already is refused: a rotation makes a new one.
    old_key = serialization.load_pem_private_key(
        pki.device_credentials("d1").key_pem.read_bytes(), password=None)
    assert isinstance(old_key, ec.EllipticCurvePrivateKey)
    ingest.process([(UP, csr_up(rot.id, csr_for("d1", old_key)))])
    assert letters(conn) == ["csr_key_reused"]
    key = ec.generate_private_key(ec.SECP256R1())
    good = csr_for("d1", key)
    ingest.process([(UP, csr_up(rot.id, good))])
    assert rs.get(conn, rot.id).state == rs.CSR_OK  # type: ignore[union-attr]
    changed, _ = handler.work(conn, NOW)
    assert not changed
    rot = rs.get(conn, rot.id)  # type: ignore[assignment]
    assert rot.state == rs.ISSUED and rot.new_serial
    pieces = [q.get(conn, "d1", cid) for cid in rot.pieces]
    der = b"".join(p.data for p in pieces)
    cert = x509.load_der_x509_certificate(der)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert [p.args[1:] for p in pieces] == [(i * len(pieces[0].data), len(der))
                                           for i in range(len(pieces))]
    # The same request again is a repeat; a second one for the rotation is a replay.
    ingest.process([(UP, csr_up(rot.id, good))])
    ingest.process([(UP, csr_up(rot.id, csr_for("d1", ec.generate_private_key(ec.SECP256R1()))))])
    assert letters(conn) == ["csr_key_reused", "csr_replayed"]
    # The node's trial is refused: the rotation fails, its pieces are withdrawn and the
    # new certificate goes on the CRL; the old one stays valid.
    old = {r.serial for r in pki.device_records("d1")} - {int(rot.new_serial, 16)}
    ingest.process([(UP, hello(rot.id, proto.CredOutcome.REFUSED))])
    rot = rs.get(conn, rot.id)  # type: ignore[assignment]
    assert (rot.state, rot.outcome) == (rs.FAILED, "refused")
    assert all(q.get(conn, "d1", c).status == q.CANCELLED for c in rot.pieces)
    changed, _ = handler.work(conn, NOW)
    assert changed
    assert pki.revoked_serials() == {int(rot.new_serial or "0", 16)}
    assert old.isdisjoint(pki.revoked_serials())
    kinds = [e.kind for e in reversed(rs.events(conn, "d1"))]
    assert kinds == ["requested", "refused", "csr", "issued", "refused", "failed", "revoked"]


def test_confirmed_by_the_new_serial_only(env: tuple[sqlite3.Connection, Pki, Ingest, RotationHandler]) -> None:
    conn, pki, ingest, handler = env
    old = pki.device_credentials("d1").serial
    with db.transaction(conn):
        rot = rs.request(conn, "d1", "operator", now=NOW)
    ingest.process([(UP, csr_up(rot.id, csr_for("d1", ec.generate_private_key(ec.SECP256R1()))))])
    handler.work(conn, NOW)
    rot = rs.get(conn, rot.id)  # type: ignore[assignment]
    assert rot.new_serial is not None
    # A HELLO over the old certificate confirms nothing.
    ingest.process([(UP, hello(rot.id, proto.CredOutcome.NONE, old.to_bytes(20, "big")))])
    assert rs.get(conn, rot.id).state == rs.ISSUED  # type: ignore[union-attr]
    new = int(rot.new_serial, 16)
    ingest.process([(UP, hello(rot.id, proto.CredOutcome.ROTATED, new.to_bytes(20, "big")))])
    assert rs.get(conn, rot.id).state == rs.CONFIRMED  # type: ignore[union-attr]
    assert handler.work(conn, NOW)[0]
    assert rs.get(conn, rot.id).state == rs.DONE  # type: ignore[union-attr]
    assert pki.revoked_serials() == {old}
    # A rotation is not asked of a device that is not served.
    with db.transaction(conn):
        registry.quarantine(conn, "d1", "test", now=NOW)
    with pytest.raises(rs.RotationError, match="quarantined"):
        rs.request(conn, "d1", "operator", now=NOW)


def test_items_that_expired_while_the_node_was_away_are_queued_again(
        env: tuple[sqlite3.Connection, Pki, Ingest, RotationHandler]) -> None:
    # A node that cannot reach the broker (a long outage, a gateway host off) for longer than
    # the items' TTL: the rotation waits for it, it does not fail, and nothing is revoked.
    conn, pki, ingest, handler = env
    with db.transaction(conn):
        rot = rs.request(conn, "d1", "operator", now=NOW)
    first = rot.command_id
    later = NOW + rs.ROTATE_TTL_S + 1
    q.expire(conn, later)
    with db.transaction(conn):
        assert handler.sweep(conn, later) == []
    again = rs.get(conn, rot.id)
    assert again is not None and again.state == rs.REQUESTED and again.command_id != first
    cmd = q.get(conn, "d1", again.command_id or 0)
    assert (cmd.status, cmd.op, cmd.args) == (q.QUEUED, int(proto.CommandOp.ROTATE_KEY),
                                              (rot.id,))
    assert cmd.expires_at == later + rs.ROTATE_TTL_S
    # The request comes; the certificate's pieces expire undelivered too: queued again, the
    # same bytes, and the new certificate stays valid.
    ingest.process([(UP, csr_up(rot.id, csr_for("d1", ec.generate_private_key(ec.SECP256R1()))))])
    handler.work(conn, later)
    issued = rs.get(conn, rot.id)
    assert issued is not None and issued.state == rs.ISSUED
    old_pieces = [q.get(conn, "d1", c) for c in issued.pieces]
    latest = later + rs.ROTATE_TTL_S + 1
    q.expire(conn, latest)
    with db.transaction(conn):
        assert handler.sweep(conn, latest) == []
    now_rot = rs.get(conn, rot.id)
    assert now_rot is not None and now_rot.state == rs.ISSUED
    assert set(now_rot.pieces).isdisjoint(issued.pieces)
    new_pieces = [q.get(conn, "d1", c) for c in now_rot.pieces]
    assert [(p.args, p.data) for p in new_pieces] == [(p.args, p.data) for p in old_pieces]
    assert all(p.status == q.QUEUED for p in new_pieces)
    assert int(issued.new_serial or "0", 16) not in pki.revoked_serials()
    kinds = [e.kind for e in rs.events(conn, "d1")]
    assert kinds.count("requeued") == 2 and "failed" not in kinds


def test_items_the_queue_gave_up_on_end_the_rotation(
        env: tuple[sqlite3.Connection, Pki, Ingest, RotationHandler]) -> None:
    conn, pki, ingest, handler = env
    with db.transaction(conn):
        rot = rs.request(conn, "d1", "operator", now=NOW)
    assert handler.sweep(conn, NOW) == []
    # The rotate_key refused by the node: the rotation ends.
    with db.transaction(conn):
        q.retire(conn, "d1", rot.command_id or 0, q.FAILED, NOW, result="refused")
        assert handler.sweep(conn, NOW) == [rot.id]
    ended = rs.get(conn, rot.id)
    assert ended is not None and ended.state == rs.FAILED and "failed" in ended.detail
    # A certificate piece that failed: the rotation ends and its certificate is revoked.
    with db.transaction(conn):
        rot = rs.request(conn, "d1", "operator", now=NOW)
    ingest.process([(UP, csr_up(rot.id, csr_for("d1", ec.generate_private_key(ec.SECP256R1()))))])
    handler.work(conn, NOW)
    rot = rs.get(conn, rot.id)  # type: ignore[assignment]
    with db.transaction(conn):
        q.retire(conn, "d1", rot.pieces[0], q.FAILED, NOW, result="undelivered")
        assert handler.sweep(conn, NOW) == [rot.id]
    assert {q.get(conn, "d1", c).status for c in rot.pieces} == {q.FAILED, q.CANCELLED}
    assert handler.work(conn, NOW)[0]
    assert int(rot.new_serial or "0", 16) in pki.revoked_serials()
