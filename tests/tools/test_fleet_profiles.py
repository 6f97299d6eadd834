"""A fleet on mixed board profiles against the real gateway: every reading stored once, and
the fleet summary adds up the nodes' energy ledgers. Figures are printed with -s."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.store import db
from gateway.store import devices as registry
from tests.tools.test_fleet import _check, _gateway_files, pytestmark, running_gateway
from tools.sim.field import FieldModel, parse_ledger
from tools.sim.fleet import Fleet, FleetConfig, FleetSummary

__all__ = ["pytestmark"]

PROFILES = ("esp32", "esp32s3", "esp32c3", "pico_w", "pico2_w")


def test_mixed_profiles_fleet_stores_every_reading_and_adds_up_the_ledgers(tmp_path: Path) -> None:
    gw = _gateway_files(tmp_path)
    # A few compressed hours; the association and TLS delays are compressed 20x so the wakes
    # stay short on a shared machine (the ledgers still book the profile's full times).
    fields = tuple(FieldModel.named(n, awake_scale=20.0, assoc_fail_rate=0.1) for n in PROFILES)
    cfg = FleetConfig(
        nodes=5, dir=tmp_path / "fleet", pki_dir=gw.pki_dir, broker_port=gw.port,
        db_path=gw.db_path, time_scale=120, wakes=6, send_every=(2, 3), duration_s=120,
        fields=fields,
    )
    fleet = Fleet(cfg)
    fleet.provision()
    # Each node is registered with its profile as its board: the gateway's energy model
    # for its wakes.
    conn = db.open_db(gw.db_path)
    assert {d.id: d.board for d in registry.list_devices(conn)} == dict(
        zip(cfg.node_ids(), PROFILES, strict=True))
    conn.close()

    async def main() -> FleetSummary:
        async with running_gateway(gw):
            return await fleet.run()

    summary = asyncio.run(main())
    _check(summary)
    assert {"boot", "sample", "assoc", "tls", "sleep"} <= set(summary.energy_phases)
    total = 0.0
    for device_id in cfg.node_ids():
        for line in (cfg.dir / device_id / "node.log").read_text().splitlines():
            book = parse_ledger(line)
            if book:
                total += sum(u for _, u in book.values())
    assert abs(summary.energy_uah - total) < 0.01 * total
    assert summary.as_dict()["energy_uah"] == summary.energy_uah
