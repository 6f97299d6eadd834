"""The sim board under a board profile, driven by a small script on the unix port: the cold
clock on every power-on and its drift in deep sleep, association times with and without the
hint, failures and outage windows, charged TLS, and the ledger the battery drains by."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.mpharness import micropython_binary
from tools.sim.field import FieldModel
from tools.sim.node import SimNode
from tools.sim.profiles import get_profile

pytestmark = pytest.mark.skipif(micropython_binary() is None, reason="needs the MicroPython unix port")

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
HOUR_MS = 3_600_000

# One wake: report the clocks, try the radio with the hint kept in RTC memory, sleep.
WAKE = """
import time
import board
board.init()
kept = board.rtc_memory()
hint = (kept[0], bytes(kept[1:7])) if kept else None
t0 = time.ticks_ms()
got = board.radio_up('ssid', 'pw', 8000, hint)
ms = time.ticks_diff(time.ticks_ms(), t0)
if got:
    board.rtc_memory_write(bytes((got[0],)) + got[1])
board.radio_down()
print('WAKE cause=%d rtc=%d true=%d up=%d ms=%d hint=%d' % (
    board.boot_cause(), board.time_ms(), board.virtual_ms(), 1 if got else 0, ms, 1 if hint else 0))
board.deep_sleep(SLEEP)
"""


def _node(tmp: Path, field: FieldModel, sleep_ms: int = HOUR_MS, seed: int = 4) -> SimNode:
    script = tmp / "wake.py"
    script.write_text(WAKE.replace("SLEEP", str(sleep_ms)))
    return SimNode(tmp / "n", seed=seed, time_scale=0, start_ms=START_MS, entry=str(script), field=field)


def _wakes(node: SimNode) -> list[dict[str, int]]:
    text = (node.dir / "node.log").read_text()
    return [{k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}
            for m in re.finditer(r"^WAKE (.*)$", text, re.M)]


def _ledgers(node: SimNode) -> list[dict[str, tuple[int, float]]]:
    from tools.sim.field import parse_ledger

    out = []
    for line in (node.dir / "node.log").read_text().splitlines():
        book = parse_ledger(line)
        if book is not None:
            out.append(book)
    return out


def test_cold_clock_on_power_on_and_drift_in_deep_sleep(tmp_path: Path) -> None:
    # awake_scale compresses the association delays so the test stays quick.
    field = FieldModel.named("esp32", awake_scale=20.0)
    node = _node(tmp_path, field)
    summary = node.run_sync(4, wall_limit_s=60)
    assert summary.kinds["sleep"] == 4
    wakes = _wakes(node)
    cold = get_profile("esp32").cold_boot_ms
    assert cold is not None
    # The first boot is a power-on: the RTC reads 2000-01-01, the true time is 2026.
    assert wakes[0]["cause"] == 0 and abs(wakes[0]["rtc"] - cold) < 5000
    assert abs(wakes[0]["true"] - START_MS) < 5000
    # Across each hour of deep sleep the RTC and the true time part by the node's drift
    # (up to 5,000 ppm: 18 s an hour), plus the wake jitter on the true side.
    drift = field.drift_ppm(node.model.seed)
    for a, b in zip(wakes, wakes[1:], strict=False):
        d_rtc = b["rtc"] - a["rtc"]
        d_true = b["true"] - a["true"]
        expect = HOUR_MS * drift / 1e6
        assert abs((d_rtc - d_true) - expect) < 1000, (d_rtc - d_true, expect)
    assert abs(drift) >= 2500
    # A power cut while asleep: the next boot starts cold again, the true time goes on.
    node.power_cycle()
    node.run_sync(1, wall_limit_s=60)
    last = _wakes(node)[-1]
    assert last["cause"] == 0 and abs(last["rtc"] - cold) < 5000
    assert last["true"] > START_MS + 3 * HOUR_MS


def test_association_takes_cold_then_preset_time_and_fails_in_an_outage(tmp_path: Path) -> None:
    prof = get_profile("esp32")
    scale = 10.0
    # An outage during the fourth hour of the node's life.
    field = FieldModel(prof, awake_scale=scale, outages=((START_MS + 3 * HOUR_MS - 60_000, START_MS + 4 * HOUR_MS - 60_000),))
    node = _node(tmp_path, field)
    node.run_sync(5, wall_limit_s=60)
    wakes = _wakes(node)
    books = _ledgers(node)
    assert [w["up"] for w in wakes] == [1, 1, 1, 0, 1]
    # No hint on the first wake: a cold association; then the kept hint: the preset time.
    assert books[0]["assoc"][0] == prof.wifi_cold_ms and wakes[0]["hint"] == 0
    assert books[1]["assoc"][0] == prof.wifi_preset_ms and wakes[1]["hint"] == 1
    # Waited in real time for the charged time over the compression.
    assert wakes[0]["ms"] >= prof.wifi_cold_ms / scale - 5
    # In the outage the board tries until the deadline, and the ledger says so.
    assert books[3]["assoc"][0] == 8000
    # The ledger's energy is the profile's currents times the times.
    ma = prof.cpu_active_ma + prof.radio_rx_ma
    assert books[1]["assoc"][1] == pytest.approx(ma * prof.wifi_preset_ms / 3600, rel=1e-3)
    assert books[0]["sleep"] == (HOUR_MS, pytest.approx(prof.deep_sleep_ua * HOUR_MS / 3.6e6, rel=1e-3))
    # The battery drains by the ledgers.
    used = json.loads((node.dir / "battery.json").read_text())["used_uah"]
    assert used == pytest.approx(sum(sum(u for _, u in b.values()) for b in books), rel=1e-4)


def test_association_fails_at_the_configured_rate(tmp_path: Path) -> None:
    field = FieldModel.named("esp32c3", awake_scale=50.0, assoc_fail_rate=0.5)
    node = _node(tmp_path, field, sleep_ms=60_000, seed=9)
    node.run_sync(16, wall_limit_s=120)
    ups = [w["up"] for w in _wakes(node)]
    assert len(ups) == 16
    assert 3 <= ups.count(0) <= 13, ups


def test_the_kind_profile_keeps_the_true_clock_and_instant_radio(tmp_path: Path) -> None:
    node = _node(tmp_path, FieldModel.named("ideal"))
    node.run_sync(2, wall_limit_s=60)
    wakes = _wakes(node)
    assert all(w["up"] == 1 and w["ms"] < 200 for w in wakes)
    assert abs(wakes[0]["rtc"] - START_MS) < 5000
    assert abs((wakes[1]["rtc"] - wakes[0]["rtc"]) - (wakes[1]["true"] - wakes[0]["true"])) < 50


def test_cli_takes_a_board_profile_and_refuses_bad_field_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tools.cli import main

    script = tmp_path / "wake.py"
    script.write_text(WAKE.replace("SLEEP", "60000"))
    base = ["sim", "node", "--dir", str(tmp_path / "n"), "--entry", str(script), "--cycles", "2",
            "--time-scale", "0", "--start-ms", str(START_MS), "--json"]
    assert main([*base, "--board-profile", "pico_w", "--awake-scale", "50"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kinds"] == {"sleep": 2}
    assert data["energy_uah"] > 0 and {"boot", "assoc", "sleep"} <= set(data["energy_phases_uah"])
    cfg = json.loads((tmp_path / "n" / "sim.json").read_text())
    assert cfg["profile"]["name"] == "pico_w" and cfg["field"]["awake_scale"] == 50
    assert _ledgers(SimNode(tmp_path / "n"))[0]["assoc"][0] == get_profile("pico_w").wifi_cold_ms

    assert main([*base, "--board-profile", "esp8266"]) == 2
    assert "no board profile 'esp8266'; known: esp32, esp32c3" in capsys.readouterr().err
    assert main([*base, "--outage", "5:3"]) == 2
    assert "--outage '5:3': the window must end after it starts" in capsys.readouterr().err
    assert main([*base, "--assoc-fail-rate", "1.5"]) == 2
    assert "failure rate must be between 0 and 1" in capsys.readouterr().err


def test_outages_apply_to_the_given_share_of_a_fleet() -> None:
    from tools.sim.field import with_outage_share

    window = ((START_MS, START_MS + 2 * 24 * HOUR_MS),)
    fields = [FieldModel.named(n, outages=window) for n in ("esp32", "pico_w")]
    dealt = with_outage_share(fields, 20, 0.5)
    assert len(dealt) == 20
    assert sum(1 for f in dealt if f.outages) == 10
    assert {f.profile.name for f in dealt} == {"esp32", "pico_w"}
    assert all(f.outages for f in with_outage_share(fields, 4, 1.0))
    with pytest.raises(ValueError, match="between 0 and 1"):
        with_outage_share(fields, 4, 2.0)


def test_a_wake_the_watchdog_ends_is_still_paid_for(tmp_path: Path) -> None:
    script = tmp_path / "hang.py"
    script.write_text(
        "import time, board\nboard.init()\n"
        "if board.boot_cause() == board.POWER_ON:\n"
        "    board.watchdog_start(300)\n    while True:\n        time.sleep_ms(50)\n"
        "board.deep_sleep(60000)\n"
    )
    node = SimNode(tmp_path / "n", seed=2, time_scale=0, start_ms=START_MS, entry=str(script),
                   field=FieldModel.named("esp32"))
    summary = node.run_sync(2, wall_limit_s=60)
    assert [r.kind for r in summary.runs] == ["watchdog", "sleep"]
    books = _ledgers(node)
    prof = get_profile("esp32")
    bite = books[0]["watchdog"]
    assert bite[0] >= 300
    assert bite[1] == pytest.approx((prof.cpu_active_ma + prof.radio_listen_ma) * bite[0] / 3600, rel=1e-2)
    used = json.loads((node.dir / "battery.json").read_text())["used_uah"]
    assert used == pytest.approx(sum(sum(u for _, u in b.values()) for b in books), rel=1e-3)
