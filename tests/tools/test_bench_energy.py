"""`torpor bench energy --quick --json`: one live calibration run of the firmware on a board
profile against Mosquitto (mutual TLS) and the gateway, every board's figures from it. The
figures are printed (-s), never held to their targets here; the test checks that they are
there, positive and consistent: phases add up to each wake's total, both baselines present."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.bench.energy import BOARDS

ROOT = Path(__file__).resolve().parents[2]


def test_bench_energy_quick_json() -> None:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}:/usr/sbin"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.cli", "bench", "energy", "--quick", "--json"],
        # The heap bisections (a TLS wake, an OTA download's wakes, a verify) take most of it.
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fig = json.loads(proc.stdout)
    print(json.dumps(fig["targets"], indent=1))
    assert "never a measurement of a real chip" in fig["model"]
    assert "heapsize" in fig["heap_method"]
    assert set(fig["boards"]) == set(BOARDS)
    assert any(e["live"] for e in fig["boards"].values())
    for name, e in fig["boards"].items():
        print(name, {k: e[k] for k in ("uah_per_sampling_wake", "uah_per_sending_wake",
                                       "battery_years_2aa_5min", "ratio_to_connect_per_reading")})
        for key in ("uah_per_sampling_wake", "uah_per_sending_wake", "average_ua_5min", "average_ua_1min",
                    "battery_years_2aa_5min", "battery_years_2aa_1min", "battery_years_18650_5min",
                    "battery_years_18650_1min", "ratio_to_connect_per_reading",
                    "baseline_connect_per_reading_ua_5min", "baseline_send_every_1_ua_5min"):
            assert e[key] > 0, (name, key)
        assert e["uah_per_sending_wake"] > e["uah_per_sampling_wake"]
        assert isinstance(e["heap_ok"], bool)
        assert e["heap_peak_bytes"]["sending_wake_tls"] > 0
        assert e["heap_peak_bytes"]["ed25519_verify"] > 0
        assert e["heap_peak_bytes"]["ota_chunk_wake"] > 0
        for variant in ("as_run", "fast_reconnect", "fast_reconnect_psk"):
            v = e["variants"][variant]
            for wake in ("sampling_wake", "sending_wake"):
                assert sum(v["phases"][wake].values()) == pytest.approx(v[f"uah_per_{wake}"], abs=0.01)
            # Both baselines draw more than Torpor batching a reading per hour.
            assert v["baseline_connect_per_reading_ua_5min"] > v["average_ua_5min"]
            assert v["baseline_send_every_1_ua_5min"] > v["average_ua_5min"]
            assert v["battery_years_2aa_5min"] > v["battery_years_2aa_1min"]
        assert set(e["phases"]["sending_wake"]) >= {"boot", "assoc", "tls", "publish"}
        # The fair baselines: a compiled firmware's cold scan costs more than the same
        # firmware with the fast association, and every ratio is against a positive draw.
        for v in e["variants"].values():
            assert v["baseline_connect_per_reading_ua_5min"] > v["baseline_connect_per_reading_fast_ua_5min"] > 0
        assert set(e["phases"]["sampling_wake"]) >= {"boot", "sample", "fs_read", "flash"}
    # The RP2 boards, held by their sleep current, are also figured with a power-cut timer,
    # which must lift their battery life well above MicroPython's sleep.
    for name in ("pico_w", "pico2_w"):
        v = fig["boards"][name]["variants"]
        assert v["power_cut_timer"]["battery_years_2aa_5min"] > 5 * v["fast_reconnect"]["battery_years_2aa_5min"]
        assert fig["boards"][name]["measured"].get("rtc_file_flash_ms_per_wake", 0) > 0
    live = [e for e in fig["boards"].values() if e["live"]]
    for e in live:
        m = e["measured"]
        assert m["sending_wakes"] >= 1 and m["sampling_wakes"] >= 1 and m["tls_ms"] > 0
        # Booted through the bootloader from littlefs: the wake reads its modules from flash.
        assert m["fs_reads_sampling"] > 0 and m["fs_read_bytes_sending"] > m["fs_read_bytes_sampling"]
        # Steady state: the first send associates cold, later ones with the kept hint.
        assert m["assoc_ms"] < m["assoc_ms_first_send"]
    for key in ("as_run", "fast_reconnect_psk", "every_heap_ok"):
        assert key in fig["targets"]
        if key != "every_heap_ok":
            assert "min_ratio_to_connect_per_reading_fast_5min" in fig["targets"][key]
