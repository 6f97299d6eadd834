"""The gateway's energy per wake against the sim board's own energy ledger: the real
firmware on the esp32 profile (its association, TLS and boot times charged and waited in
real time) sends its wakes' awake and radio-on ticks in its HELLOs through a real
Mosquitto to the real gateway; the estimate from them and the profile's currents must
match what the sim board booked for the same wake."""

from __future__ import annotations

import asyncio

import pytest

from gateway.config import EnergyModel
from gateway.store import wake_log
from tests.system.stack import Stack
from tools.sim.field import FieldModel, parse_ledger
from tools.sim.profiles import load_profiles


@pytest.mark.parametrize("send_every", [1, 2])
def test_the_estimate_matches_the_sim_boards_ledger(stack: Stack, send_every: int) -> None:
    p = load_profiles()["esp32"]
    model = EnergyModel("esp32", p.cpu_active_ma, p.radio_listen_ma, p.deep_sleep_ua,
                        p.boot_ms)

    async def main() -> None:
        stack.start()
        node = stack.add_node("en-1", seed=5, field=FieldModel(p, awake_scale=1.0),
                              send_every=send_every, awake_window_ms=500)
        await node.wake(4, wall_limit_s=120)

    asyncio.run(asyncio.wait_for(main(), 240))
    ledgers = [b for b in map(parse_ledger, stack.nodes["en-1"].log_text().splitlines()) if b]
    assert len(ledgers) == 4, ledgers
    with stack.db() as conn:
        rows = list(reversed(wake_log.of_device(conn, "en-1")))
    sending = [j for j, b in enumerate(ledgers) if "tls" in b]
    assert len(rows) == len(sending) >= 2, (rows, sending)
    compared = 0
    for row, j in zip(rows, sending, strict=True):
        if j == 0:  # the first wake after power-on has no wake before it to report
            assert row.prev_awake_ms is None, row
            continue
        before = ledgers[j - 1]  # the wake this HELLO reports
        assert row.prev_sent == (1 if "tls" in before else 0), (row, before)
        booked = sum(uah for phase, (_, uah) in before.items() if phase != "sleep")
        est = row.energy_uah(model)
        assert est is not None
        # The ledger books flash programs and erases at the chip's times without waiting
        # for them (the node's ticks do not see them): a few tenths of a µAh a wake.
        assert est == pytest.approx(booked, rel=0.1, abs=1.0), (row, before)
        compared += 1
    assert compared >= 1
