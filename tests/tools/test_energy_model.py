"""The energy model on the board profiles: phases add up, the sleep current dominates where
it should, and more readings per send cost less per reading (figures printed with -s)."""

from __future__ import annotations

import json

import pytest

from tools.bench.energy_model import (
    WakeShape,
    average_ua,
    baseline_profile,
    baseline_shape,
    battery_years,
    board_figures,
    flash_read_ms,
    ledger_shape,
    rtc_flash_ms,
    sampling_wake,
    send_every_for,
    sending_wake,
    with_power_cut_timer,
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


def test_filesystem_reads_rtc_file_and_the_baseline_are_charged_as_stated() -> None:
    p = get_profile("esp32c3")
    # 1,000 reads of 100 bytes: 1,000 x 10 us + 100 kB at 20 MB/s.
    assert flash_read_ms(100_000, 1000) == pytest.approx(10.0 + 5.0)
    shape = WakeShape(fs_read_ms_sample=15.0, fs_read_ms_send=30.0)
    w = sampling_wake(p, shape)
    assert w.phases["fs_read"] == pytest.approx(p.cpu_active_ma * 15.0 / 3600)
    assert sending_wake(p, shape).phases["fs_read"] == pytest.approx(p.cpu_active_ma * 30.0 / 3600)
    # RTC memory in flash: four 2 KB file writes a wake on the RP2 boards, none on the ESP32s.
    pico = get_profile("pico_w")
    assert rtc_flash_ms(pico) == pytest.approx(4 * (pico.flash_erase_4k_ms + 9 * pico.flash_program_256_ms))
    assert rtc_flash_ms(p) == 0
    # The connect-per-reading node boots as compiled firmware and reads only its sensor: it
    # draws less per wake than Torpor's sending wake with the same association.
    base = baseline_profile(p)
    assert base.boot_ms < p.boot_ms
    b = baseline_shape(shape, preset_wifi=True)
    assert b.fs_read_ms_send == 0 and b.flash_ms_send == 0 and b.sample_ms < shape.sample_ms
    assert sending_wake(base, b).uah < sending_wake(p, WakeShape(fs_read_ms_send=30.0)).uah
    # A power-cut timer leaves the timer's own current between wakes.
    cut = with_power_cut_timer(pico)
    assert cut.deep_sleep_ua < 0.1
    assert average_ua(cut, shape, 300, 12) < average_ua(pico, shape, 300, 12) / 5
