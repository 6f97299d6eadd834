"""`torpor ota demo` at a reduced scale: a signed, staged campaign through the real gateway
and its Mosquitto to sim nodes booting through the real bootloader; the summary must say
N-1 confirmed, one reverted by its health check, every node on a verified image."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.errors import GatewayError
from gateway.transport.broker import find_mosquitto

ROOT = Path(__file__).resolve().parents[2]


def torpor(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)


def test_ota_demo_six_nodes(tmp_path: Path) -> None:
    try:
        find_mosquitto()
    except GatewayError as exc:
        pytest.skip(f"mosquitto is not installed: {exc}")
    p = torpor("ota", "demo", "--nodes", "6", "--json", "--dir", str(tmp_path / "demo"),
               "--duration", "200")
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(p.stdout)
    assert r["ok"] is True and r["campaign_status"] == "completed"
    assert r["counts"] == {"confirmed": 5, "reverted": 1}
    assert r["reverted"] == [{"device": "ota-006", "reason": "health_check"}]
    assert r["verified_images"] == 6
    running = {d["device"]: (d["running_version"], d["gateway_version"]) for d in r["devices"]}
    assert running == {f"ota-00{i}": (2, 2) for i in range(1, 6)} | {"ota-006": (1, 1)}
    # Staged: the first wave was 25 % (2 of 6), not everyone at once.
    assert "started 2;" in p.stderr, p.stderr
    assert "[ota] " in p.stderr and "round 1: campaign" in p.stderr and "campaign completed" in p.stderr
    # The silent image did run (on trial) before the bootloader reverted it.
    log = (tmp_path / "demo" / "nodes" / "ota-006" / "node.log").read_text()
    assert "silent image up" in log and "boot: revert v2 in slot b: reason 9" in log


def test_ota_demo_refuses_too_few_nodes(tmp_path: Path) -> None:
    p = torpor("ota", "demo", "--nodes", "2", "--dir", str(tmp_path / "d"), timeout=60)
    assert p.returncode == 2 and "at least 5" in p.stderr, p.stdout + p.stderr
