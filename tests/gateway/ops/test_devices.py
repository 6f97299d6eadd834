"""Operator actions on a device's identity with a key rotation under way, on a real PKI
folder and a real SQLite file: `device show` tells the rotation, and revoking the device
cancels it in the same transaction as the revocation."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import BrokerConfig, GatewayConfig, GatewaySection
from gateway.ops import actions
from gateway.ops import devices as devices_ops
from gateway.security.pki import Pki
from gateway.store import db
from gateway.store import devices as registry
from gateway.store import rotations as rs


@pytest.fixture
def cfg(tmp_path: Path) -> GatewayConfig:
    # A supervised broker that is not running: revoke stops before any broker reload.
    c = GatewayConfig(gateway=GatewaySection(data_dir=str(tmp_path)),
                      broker=BrokerConfig(mode="supervised"))
    pki = Pki(c.pki_dir)
    pki.init_ca()
    pki.init_issuing()
    pki.issue_device("d1")
    conn = db.open_db(c.db_path)
    try:
        with db.transaction(conn):
            registry.add(conn, "d1")
    finally:
        conn.close()
    return c


def test_show_tells_the_rotation_and_revoke_cancels_it(cfg: GatewayConfig) -> None:
    conn = db.open_db(cfg.db_path)
    try:
        assert devices_ops.detail(conn, "d1").rotation is None
        rot = actions.rotate_key(conn, cfg.pki_dir, "d1")
        shown = devices_ops.detail(conn, "d1").rotation
        assert shown is not None and (shown.id, shown.state) == (rot.id, rs.REQUESTED)

        revoked = devices_ops.revoke(conn, cfg, "d1")
        assert revoked.device.status == registry.REVOKED and len(revoked.serials) == 1
        assert not revoked.broker_running  # nothing to reload: it reads the CRL at start
        [after] = rs.of_device(conn, "d1", limit=1)
        assert (after.id, after.state) == (rot.id, rs.CANCELLED)
        assert after.detail == "the device was revoked"
        # No new rotation for a revoked device.
        with pytest.raises(actions.ActionError):
            actions.rotate_key(conn, cfg.pki_dir, "d1")
    finally:
        conn.close()
