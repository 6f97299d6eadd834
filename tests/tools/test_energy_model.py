"""The energy model on the board profiles: phases add up, the sleep current dominates where
it should, and more readings per send cost less per reading (figures printed with -s)."""

from __future__ import annotations

import json

import pytest

from tools.bench.energy_model import (
    WakeShape,
    average_ua,
    battery_years,
    board_figures,
    ledger_shape,
    send_every_for,
    sending_wake,
)
from tools.sim.profiles import get_profile, load_profiles


def test_figures_for_every_real_board() -> None:
    shape = WakeShape()
    for name, p in load_profiles().items():
        if p.ideal:
            continue
        f = board_figures(p, shape)
        print(name, json.dumps(f))
        assert f["uah_per_sending_wake"] > f["uah_per_sampling_wake"] > 0  # type: ignore[operator]
        assert f["ratio_to_connect_per_reading_5min"] > 1  # type: ignore[operator]
        assert "not a measurement" in str(f["model"])


def test_phase_energies_are_current_times_time() -> None:
    p = get_profile("esp32c3")
    w = sending_wake(p, WakeShape(), preset=False)
    assert w.phases["tls"] == pytest.approx((p.cpu_active_ma + p.radio_listen_ma) * p.tls_ms / 3600)
    assert w.phases["assoc"] == pytest.approx((p.cpu_active_ma + p.radio_rx_ma) * p.wifi_cold_ms / 3600)
    assert w.uah == pytest.approx(sum(w.phases.values()))


def test_sleep_current_limits_the_pico_w_and_batching_helps_everyone() -> None:
    shape = WakeShape()
    pico = get_profile("pico_w")
    # At one reading per 5 min the Pico W's MicroPython sleep current is most of its budget.
    ua = average_ua(pico, shape, 300, 12)
    assert pico.deep_sleep_ua / ua > 0.8
    for name in ("esp32", "esp32c3", "pico_w"):
        p = get_profile(name)
        assert average_ua(p, shape, 300, 12) < average_ua(p, shape, 300, 1)
    assert send_every_for(300, 3600) == 12 and send_every_for(60, 3600) == 60
    assert battery_years(2500, 2500 * 1000 / 8766) == pytest.approx(1.0, rel=1e-3)


def test_shape_from_sim_ledgers() -> None:
    books = [
        {"boot": (650, 8.0), "sample": (40, 0.5), "flash": (2, 0.1), "sleep": (60000, 0.2)},
        {"boot": (650, 8.0), "sample": (20, 0.5), "assoc": (2000, 80.0), "tls": (1500, 60.0),
         "publish": (200, 5.0), "flash": (4, 0.1), "sleep": (60000, 0.2)},
    ]
    s = ledger_shape(books)
    assert s.sample_ms == 40 and s.session_ms == 200 and s.flash_ms_send == 4
