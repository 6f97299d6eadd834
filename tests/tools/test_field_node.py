"""The real firmware on a hostile sim board (a real board's profile) against Mosquitto with
mutual TLS: the heap limit holds, association and TLS take the profile's time, the clock
starts cold, outages fail the association, and every wake writes its energy ledger."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from tests.firmware.test_node_cycle import TestGateway, node_config, provision
from tests.fixtures.broker import RunningBroker
from tests.mpharness import micropython_binary
from tools.sim.field import FieldModel
from tools.sim.node import SimNode

pytestmark = pytest.mark.skipif(micropython_binary() is None, reason="no MicroPython unix port")

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
L_LINE = re.compile(r"^L (.*) total=([\d.]+)$", re.M)


def ledgers(node: SimNode) -> list[dict[str, tuple[int, float]]]:
    out = []
    for m in L_LINE.finditer((node.dir / "node.log").read_text()):
        phases = {}
        for part in m.group(1).split():
            k, _, v = part.partition("=")
            ms, _, uah = v.partition(":")
            phases[k] = (int(ms), float(uah))
        out.append(phases)
    return out


def test_esp32_profile_wakes_pay_association_tls_and_sleep_in_the_ledger(
    tmp_path: Path, broker: RunningBroker
) -> None:
    field = FieldModel.named("esp32", awake_scale=4.0)
    prof = field.profile
    creds = broker.pki.issue_device("node-f")  # type: ignore[union-attr]
    node = SimNode(tmp_path / "f", seed=3, time_scale=0, start_ms=START_MS, field=field)
    provision(node, node_config(broker, "node-f", send_every=2, awake_budget_ms=15000), creds)

    async def main() -> None:
        async with TestGateway(broker):
            summary = await node.run(4, wall_limit_s=120)
            assert summary.kinds["sleep"] == 4, summary.as_dict()

    asyncio.run(main())
    books = ledgers(node)
    assert len(books) == 4
    for book in books:
        # The chip's boot, plus the imports before board.init() (on a chip too, after boot).
        assert prof.boot_ms <= book["boot"][0] < prof.boot_ms + 2000
        assert "sample" in book and book["sleep"][0] > 0
        total = sum(uah for _, uah in book.values())
        assert total > 0
    sends = [b for b in books if "tls" in b]
    assert len(sends) == 2, books
    for book in sends:
        # The profile's handshake and a cold association (the firmware passes no hint yet).
        assert book["tls"][0] == prof.tls_ms
        assert book["assoc"][0] in (prof.wifi_cold_ms, prof.wifi_preset_ms)
        cpu_radio = prof.cpu_active_ma + prof.radio_listen_ma
        assert book["tls"][1] == pytest.approx(cpu_radio * prof.tls_ms / 3600, rel=1e-3)
    # A sending wake costs far more than a sampling one.
    samplers = [b for b in books if "tls" not in b]
    assert min(sum(u for _, u in b.values()) for b in sends) > 5 * max(
        sum(u for _, u in b.values()) - b["sleep"][1] for b in samplers
    )
    # The cold clock: the node's RTC started at the profile's cold-boot value.
    text = (node.dir / "node.log").read_text()
    assert "MemoryError" not in text
    state = (node.dir / "state.json").read_text()
    rtc = int(re.search(r'"rtc_ms": (\d+)', state).group(1))  # type: ignore[union-attr]
    assert prof.cold_boot_ms is not None
    assert prof.cold_boot_ms < rtc < prof.cold_boot_ms + 3600_000
