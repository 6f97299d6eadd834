"""The boundary fuzzer in CI: 20,000 random, mutated and boundary frames from devices with
valid certificates through the real broker to the real gateway (tools.bench.fuzz), while
well-behaved nodes keep sending. Pass: no ingest restart, no traceback, every node's ACK
within its window and nothing it sent lost, memory bounded, the offender dead-lettered
and quarantined. The figures are printed, never compared with a time."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import GatewayError
from gateway.transport.broker import find_mosquitto
from tools.bench.fuzz import FuzzConfig, measure, table


@pytest.mark.slow
def test_twenty_thousand_fuzzed_frames_stop_nobody(tmp_path: Path) -> None:
    try:
        find_mosquitto()
    except GatewayError as exc:
        pytest.skip(f"mosquitto is not installed: {exc}")
    fig = measure(FuzzConfig(frames=20_000, duration_s=90.0, nodes=3), workdir=tmp_path)
    print("\n" + table(fig))
    assert fig["frames"] >= 20_000, "the fuzzer ran out of time before 20,000 frames"
    assert fig["passed"], "\n".join(fig["failures"]) + "\n" + fig.get("gateway_log_tail", "")
    assert fig["quarantines"] >= 1 and fig["attacker_frames_dead_lettered"] > 0
    # Most frames reach the decoder (the fuzzer releases quarantined attackers in turn).
    assert fig["frames_decoded"] >= fig["frames"] // 2, fig["frames_decoded"]
