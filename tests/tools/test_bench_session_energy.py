"""The session set-up part of `torpor bench energy` (tools/bench/session_energy.py): one run of
the real gateway with both listeners and two sim nodes on the ESP32 profile. The figures are
printed (-s), never held to their target here; the test checks that both paths ran as
labelled and that the figures are there and consistent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tools.bench import session_energy
from tools.sim.node import micropython_binary
from tools.sim.profiles import load_profiles

pytestmark = [
    pytest.mark.skipif(micropython_binary() is None, reason="no MicroPython unix port"),
    pytest.mark.skipif(shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
                       reason="mosquitto is not installed"),
]


def test_session_setup_figures_for_both_paths(tmp_path: Path) -> None:
    fig = session_energy.measure(tmp_path, load_profiles()[session_energy.BOARD], 20.0)
    print("\n" + "\n".join(session_energy.table_rows(fig)))
    json.dumps(fig)
    for path in ("mtls", "psk"):
        f = fig[path]
        for key in ("handshake_chip_ms", "setup_uah", "bytes_setup", "bytes_wake", "uah_sending_wake"):
            assert f[key] > 0, (path, key)
        assert f["uah_sending_wake"] > f["setup_uah"]
        assert f["bytes_wake"] > f["bytes_setup"]
    # The profile model: the PSK handshake is charged its share of the mutual-TLS one.
    assert fig["psk"]["handshake_chip_ms"] < fig["mtls"]["handshake_chip_ms"]
    # No certificate on the PSK path: fewer bytes, whatever the timing.
    assert fig["psk"]["bytes_setup"] < fig["mtls"]["bytes_setup"]
    assert "a model" in fig["model"]
    assert isinstance(fig["setup_target_met"], bool)
