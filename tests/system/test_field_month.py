"""The field run, shortened: sim nodes on real board profiles live two simulated days against
the real gateway (its own Mosquitto with mutual TLS), with a battery swap, a power cut
mid-wake, RTC drift at each profile's rate, a Wi-Fi outage for half the fleet and random
association failures; the verdict must hold. `torpor sim field` runs the full 30 days."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tools.sim.field import FieldModel
from tools.sim.fieldrun import FieldRun, FieldRunOptions, format_result

HOUR_MS = 3_600_000


def test_two_field_days_store_every_reading_once_at_its_true_time_within_the_budget(
    tmp_path: Path,
) -> None:
    start = int(time.time() * 1000)
    outage = ((start + 14 * HOUR_MS, start + 26 * HOUR_MS),)
    fields = tuple(FieldModel.named(n, assoc_fail_rate=0.05, outages=outage)
                   for n in ("esp32c3", "pico_w", "esp32", "pico2_w"))
    opts = FieldRunOptions(
        nodes=4, days=2.0, sample_interval_s=1800, send_every=(6, 8), time_scale=2880.0,
        fields=fields, outage_share=0.5, battery_swaps=1, power_cuts=1, seed=3,
        dir=tmp_path / "field", keep=True, live=False, start_ms=start, wall_limit_s=240.0,
    )
    result = asyncio.run(FieldRun(opts).run())
    assert result is not None
    report = "\n".join(format_result(result))
    assert result.ok, report
    v = result.verdict
    # The hostile parts happened: outage nodes, a battery swap, a power cut, cold clocks.
    assert result.outage_nodes == 2 and result.swaps == 1, report
    assert result.fleet.power_cuts == 1 and v.cold_readings > 0, report
    assert result.fleet.send_failures > 0, report
    assert v.checked == v.sampled == result.fleet.sampled > 4 * 90, report
    print(report)
