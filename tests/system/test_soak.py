"""The soak, shortened to 90 days: sim nodes on board profiles against the real gateway and
its Mosquitto, every part on one compressed clock through libfaketime, with lifetimes
shortened so that the full run's checks apply (30-day device certificates rotated 14 days
ahead, a 14-day CRL renewed at half its life), gateway kills, broker kills, an upstream
outage, a revocation and a trusted firmware key rotation (a new key sent to the nodes in a
signed key list, then a campaign of an image signed by it). And the negative control:
without renewal the CRL really expires and the broker really refuses the nodes.
`torpor soak --years 3` runs the full one."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from gateway.security.pki import Pki
from tools.demo import free_port, stop_children
from tools.sim.soak import (
    FieldClock,
    Soak,
    SoakError,
    SoakOptions,
    find_libfaketime,
    format_verdict,
)

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _needs_libfaketime() -> None:
    try:
        find_libfaketime()
    except SoakError as exc:
        pytest.skip(str(exc))


# Every board profile (the negative control's three nodes take the first three).
PROFILES = ("esp32", "esp32s3", "esp32c3", "pico_w", "pico2_w")
# The 90-day run's four nodes; the last (Pico W) is the one revoked. The ESP32 has the
# smallest heap of the boards; test_ninety_days_on_the_esp32_heap_rotate_keys_with_no_crash
# runs three of it.
ROTATION_PROFILES = ("esp32", "esp32c3", "pico2_w", "pico_w")


# The wall limit bounds a loaded host's run (152 s here with 4 nodes).
@pytest.mark.timeout(900)
def test_ninety_days_renew_and_rotate_on_their_own_and_lose_nothing(tmp_path: Path) -> None:
    opts = SoakOptions(
        years=90 / 365, nodes=4, sample_interval_s=86400, send_every=(2, 2), wall_target_s=60.0,
        wall_limit_s=720.0, device_days=30.0, crl_days=14.0, rotate_lead_days=14.0,
        gateway_kills=1, broker_kills=1, upstream_outage=(0.45, 3.0), revoke_at=0.5,
        # Right after the revocation: the list takes a few sends and the campaign (about 90
        # chunks of 1 KB, about 8 a sending wake, a send every 2 days) about 25 field days,
        # the ESP32-C3 up to about 37 (confirmed at day 87.6 with the step at 0.56).
        key_rotation_at=0.51, profiles=ROTATION_PROFILES, seed=2, dir=tmp_path / "soak", keep=True,
        live=False,
    )
    v = asyncio.run(Soak(opts).run())
    report = "\n".join(format_verdict(v))
    assert v.ok, report
    doc = v.as_dict()
    assert {"lost", "duplicated", "refused_for_expiry", "rotations_done",
            "operator_actions"} <= doc.keys()
    json.dumps(doc)
    assert v.lost == v.duplicated == v.refused_for_expiry == v.operator_actions == 0, report
    assert v.rotations_min >= 2 and v.crl_renewals >= 10, report
    assert v.revoked is not None and v.revoked_stays_out, report
    assert v.probes > 20 and v.lapses == 0, report
    assert v.key_rotation.startswith("done"), report
    served = [d for d in v.key_rotation_nodes if d != v.revoked]
    assert v.revoked not in v.key_rotation_nodes and len(served) == 3, report
    assert v.campaign_confirmed == 3, report
    assert all(r["campaign"] == "confirmed" for r in v.key_rotation_nodes.values()), report
    kinds = [s["kind"] for s in v.scripted]
    assert {"gateway_kill", "broker_kill", "upstream_down", "upstream_up", "revoke",
            "key_rotation"} <= set(kinds), report
    print(report)


# The wall limit bounds a loaded host's run.
@pytest.mark.timeout(900)
def test_ninety_days_on_the_esp32_heap_rotate_keys_with_no_crash(tmp_path: Path) -> None:
    # Three ESP32 nodes (the last revoked), booting through the bootloader, rotating 30-day
    # certificates 14 days ahead through a gateway kill and a broker kill, with no failed
    # wake. On this profile's heap the rotation's wakes ran out of memory, crashed until
    # safe mode, and safe mode refused the next rotation (docs/soak.md, "What it found").
    # The trusted key rotation and its campaign on the ESP32 are judged by the verdict of
    # the run above (ROTATION_PROFILES): with them, a loaded run here saw one wake fail
    # for heap and its readings sent at the retry.
    opts = SoakOptions(
        years=90 / 365, nodes=3, sample_interval_s=86400, send_every=(2, 2), wall_target_s=60.0,
        wall_limit_s=720.0, device_days=30.0, crl_days=14.0, rotate_lead_days=14.0,
        gateway_kills=1, broker_kills=1, upstream_outage=(0.45, 3.0), revoke_at=0.55,
        key_rotation_at=None, profiles=("esp32",), seed=4, dir=tmp_path / "soak", keep=True,
        live=False,
    )
    v = asyncio.run(Soak(opts).run())
    report = "\n".join(format_verdict(v))
    assert v.ok, report
    assert v.lost == v.refused_for_expiry == v.tls_refused == 0, report
    assert v.rotations_min >= 2 and v.revoked_stays_out, report
    for node in sorted((tmp_path / "soak" / "nodes").iterdir()):
        if node.name == v.revoked:
            continue
        log = (node / "node.log").read_text(errors="replace")
        assert "boot: slot a v1" in log, node.name
        assert "wake failed" not in log and " safe=1 " not in log, (node.name, report)
    print(report)


def test_without_renewal_the_crl_expires_and_the_broker_refuses_every_node(
    tmp_path: Path,
) -> None:
    opts = SoakOptions(
        years=30 / 365, nodes=3, sample_interval_s=86400, send_every=(2, 2), wall_target_s=30.0,
        wall_limit_s=120.0, device_days=30.0, crl_days=10.0, rotate_lead_days=10.0,
        renew=False, gateway_kills=0, broker_kills=0, upstream_outage=None, revoke_at=None,
        key_rotation_at=None, profiles=PROFILES, seed=3, dir=tmp_path / "soak", keep=True,
        live=False,
    )
    v = asyncio.run(Soak(opts).run())
    report = "\n".join(format_verdict(v))
    assert not v.ok, report
    assert v.crl_renewals == 0 and v.refused_for_expiry > 0, report
    assert any("CRL has expired" in e for e in v.refusal_examples), report
    # The broker really refused them: their readings stayed on the nodes.
    assert v.tls_refused > 0 and v.lost > 0, report


def test_a_gateway_started_after_its_crl_lapsed_renews_it_before_the_broker(
    tmp_path: Path,
) -> None:
    # A gateway host off for longer than its CRL had left: Mosquitto would refuse every
    # client, the gateway's own too. The gateway holds the issuing key: it renews first.
    async def scenario() -> tuple[float, float]:
        soak = Soak(SoakOptions(crl_days=1.0, live=False))
        soak.dir = tmp_path / "gw"
        soak.dir.mkdir()
        soak.lib = find_libfaketime()
        soak.clock = clock = FieldClock(soak.dir / "clock", 4 * 86400.0)
        clock.start()
        try:
            soak.pki_dir = soak.make_pki()
            soak.issue_devices(["sim-001"])
            soak.up_port = await soak.start_upstream()
            soak.config = soak.gateway_config(free_port())
            soak.db_path = soak.dir / "gateway" / "gateway.db"
            clock.run()  # the gateway is off while the field lives two days
            await asyncio.sleep(0.5)
            clock.pause()
            lapsed_for = clock.now_ms() / 1000 - Pki(soak.pki_dir).crls()[0].next_update_utc.timestamp()
            await soak.start_gateway()  # SoakError unless it comes up with its broker
            left = Pki(soak.pki_dir).crls()[0].next_update_utc.timestamp() - clock.now_ms() / 1000
            return lapsed_for, left
        finally:
            await stop_children(soak.procs, soak.broker_pid)
            clock.stop()

    lapsed_for, left = asyncio.run(scenario())
    assert lapsed_for > 3600, "the CRL had not lapsed: the scenario proves nothing"
    assert left > 0.5 * 86400
