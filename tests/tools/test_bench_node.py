"""`torpor bench node` at a tiny scale: every figure is there and sane (no speed checks)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mpharness import micropython_binary
from tools.bench import node as bench

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.skipif(micropython_binary() is None, reason="no MicroPython unix port"),
    pytest.mark.skipif(
        shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
        reason="mosquitto is not installed",
    ),
]


def test_parse_wakes_groups_lines_by_run() -> None:
    text = (
        "--- run 0 cause=POWER_ON vt=x\nR id=1 t=5 temp=1 hum=2 mv=3\n"
        "T boot=3 sample=1 connect=0 publish=0 wait=0 total=4 bytes_out=0 bytes_in=0 sent=0 depth=1\n"
        "M alloc=100 tls=0 import=0 app=100 free=9\nF prog=256 erase=1\n"
        "--- run 0 ended: sleep rc=75 awake=40ms sleep=60000ms\n"
        "--- run 1 cause=TIMER vt=y\n--- run 1 ended: power_cut rc=-9 awake=3ms sleep=0ms\n"
    )
    wakes = bench.parse_wakes(text)
    assert [w.kind for w in wakes] == ["sleep", "power_cut"]
    assert wakes[0].t["total"] == 4 and wakes[0].m["alloc"] == 100 and wakes[0].f["prog"] == 256
    assert wakes[1].t == {} and wakes[1].sent == 0


def test_bench_node_json_at_tiny_scale() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tools.cli", "bench", "node", "--json", "--wakes", "3"],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fig = json.loads(proc.stdout)
    assert fig["wakes"] == 3 and fig["readings_per_burst"] == 3
    awake = fig["awake_ms"]
    assert set(awake) == {"boot", "sample", "connect", "publish", "wait", "total"}
    assert awake["connect"] > 0 and awake["total"] >= awake["connect"] + awake["publish"]
    # Socket bytes: the burst is a small part of a session that the handshake dominates.
    assert 0 < fig["burst_socket_bytes"] < fig["connect_socket_bytes"]
    assert fig["burst_socket_bytes_per_reading"] > 0
    session = fig["session_socket_bytes"]
    assert session["total"] == session["out"] + session["in"] > fig["connect_socket_bytes"]
    assert fig["socket_bytes_per_reading_all_in"] == pytest.approx(session["total"] / 3, abs=0.01)
    for mode in ("source", "mpy"):
        a = fig["alloc_bytes_per_wake"][mode]
        assert 0 < a["sampling_wake"] < a["sending_wake"]
        assert 0 < a["sending_wake_tls_handshake"] < a["sending_wake"]
        assert a["sending_wake_code_loading"] > 0
    # Loading precompiled bytecode allocates less than compiling the source on the node.
    alloc = fig["alloc_bytes_per_wake"]
    assert alloc["mpy"]["sending_wake_code_loading"] < alloc["source"]["sending_wake_code_loading"]
    # The baseline: the least a node allocates to send one burst over MQTT with mutual TLS.
    floor = fig["alloc_bytes_floor"]
    for mode in ("source", "mpy"):
        f = floor[mode]
        for key in ("total_without_tls_handshake", "tls_handshake", "buffer", "certificates",
                    "ssl_context", "code_loading", "payload_bytes"):
            assert f[key] > 0, (mode, key)
        for key in ("load_certificates", "tcp_connect", "tls_wrap_handshake", "mqtt_connect",
                    "publish", "close"):
            assert f[key] >= 0, (mode, key)
        assert f["tls_handshake"] == f["tcp_connect"] + f["tls_wrap_handshake"] + f["mqtt_connect"]
        assert f["buffer_bytes"] > f["payload_bytes"]
    assert floor["sampling_wake"] == alloc["mpy"]["sampling_wake"]
    assert floor["sending_wake_app"] == alloc["mpy"]["sending_wake_app"]
    assert floor["sampling_wake_plus_floor"] == (
        floor["sampling_wake"] + floor["mpy"]["total_without_tls_handshake"])
    assert floor["sending_wake_app_to_floor"] > 0
    assert isinstance(floor["sampling_wake_plus_floor_under_target"], bool)
    assert fig["flash_bytes_per_reading"] > 0
    assert fig["tls_connections_per_send"] == 1
    # The dead network costs about the budget (a loaded CI host may add a little).
    budget = fig["dead_network_budget_ms"]
    assert budget * 0.8 <= fig["dead_network_awake_ms"] <= budget + 1000
    assert isinstance(fig["dead_network_within_budget"], bool)
    assert fig["handshake"]["bytes"] == fig["connect_socket_bytes"]
    assert fig["handshake"]["what_would_cut_it"]
