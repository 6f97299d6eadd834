"""`torpor bench energy`: µAh per wake, average current and battery life on every board profile.

A model on cited figures, never a measurement of a real chip. The board profiles
(boards/profiles.toml, sources in docs/board-profiles.md) give the currents and the chip's
durations (boot, Wi-Fi association, TLS handshake, flash); the rest of a wake's durations come
from a live run in the same invocation: the real firmware, as sim nodes on the board's profile
(its heap, its charged delays), against a real Mosquitto with mutual TLS and the real gateway,
each wake writing its energy ledger (`L ...` line) to the node log. The long-run projection
(battery years) combines the ledger's phases with the profile's sleep current
(tools/bench/energy_model.py).

Next to each board's figures, computed on the same profile in the same run: a node that
associates from cold, opens a mutual-TLS MQTT session and publishes JSON for every reading
(as ESPHome and Tasmota sensors typically run), and Torpor with `send_every = 1`.

Peak heap: `-X heapsize=` bisection on the unix port (64-bit), converted to the chip's
32-bit heap by the word factor and the sim's own overhead of tools/sim/profiles.py; see
`HEAP_METHOD`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tools.bench import heap_ota
from tools.bench.energy_model import (
    CAPACITY_2AA_MAH,
    CAPACITY_18650_MAH,
    WakeShape,
    average_ua,
    battery_years,
    sampling_wake,
    send_every_for,
    sending_wake,
)
from tools.bench.node import (
    START_MS,
    BenchError,
    node_config,
    provision,
    stack,
)
from tools.sim.field import FieldModel, parse_ledger
from tools.sim.node import SimNode
from tools.sim.profiles import SIM_OVERHEAD_BYTES, WORD_FACTOR, BoardProfile, load_profiles

BOARDS = ("esp32", "esp32s3", "esp32c3", "pico_w", "pico2_w")
CALIBRATION_BOARD = "esp32c3"
# Targets, printed next to the figures, never asserted.
TARGET_C3_YEARS_2AA_5MIN = 5.0
TARGET_RATIO = 20.0
# TLS-PSK routine sessions (docs/credentials.md): the handshake costs about 1/40 of the
# node CPU of a mutual-TLS one with P-256 certificates.
PSK_CPU_FRACTION = 1 / 40
# A chip runs the app's Python far slower than this PC: a sampling wake's app CPU below this
# (an estimate, WakeShape's default) is raised to it.
CHIP_SAMPLE_MS_FLOOR = WakeShape().sample_ms

MODEL_NOTE = (
    "A model on the board profiles' cited currents and durations (docs/board-profiles.md) and "
    "the phases of sim wakes' energy ledgers: never a measurement of a real chip."
)
HEAP_METHOD = (
    "Peak heap: the smallest unix-port `-X heapsize=` (bisection, 1 KB steps) with which the "
    f"workload completes, minus the sim's own parts ({SIM_OVERHEAD_BYTES} bytes; none for the "
    "Ed25519 verify, a bare script), divided by the 64-bit "
    f"word factor {WORD_FACTOR}; the result is held against each profile's gc_heap_wifi_bytes. The "
    "factor is lenient for byte buffers and not conservative for integer-heavy code (see "
    "docs/board-profiles.md)."
)
PICO_NOTE = (
    "The Pico W and Pico 2 W are limited by their sleep current under MicroPython: its "
    "deepsleep on rp2 is a timed light sleep followed by a reset, with the chip's clocks and "
    "SRAM kept up (about 1.3 mA measured on a Pico; the Pico 2 W's 1 mA is an estimate), not "
    "the chip's dormant state. That current is most of the average, whatever a wake costs, "
    "so fewer connections barely help there. What users can do: cut the board's power between "
    "wakes with an external timer (a TPL5110-class timer or an RTC alarm on the regulator's "
    "enable pin; every wake is then a cold boot with a cold clock, which Torpor's time sync "
    "handles), or run the node on an ESP32-C3, whose deep sleep draws about 5 uA."
)


# ---- the live run -----------------------------------------------------------------------

def _live_profile(p: BoardProfile) -> FieldModel:
    return FieldModel(p, awake_scale=AWAKE_SCALE)


AWAKE_SCALE = 20.0


def live_ledgers(tmp: Path, boards: list[BoardProfile], wakes: int, send_every: int) -> dict[str, dict[str, Any]]:
    """Run the firmware on each board's profile; per board the ledgers of its wakes."""
    devices = [f"energy-{p.name.replace('_', '-')}" for p in boards]
    out: dict[str, dict[str, Any]] = {}
    with stack(tmp, devices) as st:
        for p, device in zip(boards, devices, strict=True):
            node = SimNode(tmp / device, seed=5, time_scale=0, start_ms=START_MS,
                           field=_live_profile(p))
            provision(node, node_config(st, device, send_every, sample_interval_s=300, align_s=0),
                      st.pki, device)
            t0 = time.monotonic()
            summary = asyncio.run(node.run(wakes, wall_limit_s=60 + wakes * 10.0))
            text = (node.dir / "node.log").read_text(errors="replace")
            ledgers = [b for b in (parse_ledger(ln) for ln in text.splitlines()) if b]
            out[p.name] = {
                "ledgers": ledgers,
                "kinds": dict(summary.kinds),
                "wall_s": round(time.monotonic() - t0, 1),
            }
    return out


def _stub_profile(p: BoardProfile, heap: int) -> FieldModel:
    return FieldModel(dataclasses.replace(p, gc_heap_wifi_bytes=heap), awake_scale=AWAKE_SCALE)


def _bisect(ok: Any, lo: int, hi: int, step: int = 1024) -> int | None:
    """The smallest heap (chip bytes, to `step`) in (lo, hi] for which ok(heap) holds."""
    if not ok(hi):
        return None
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step or step
        if mid <= lo:
            break
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def heap_tls_wake(tmp: Path, st: Any, p: BoardProfile, device: str) -> int | None:
    """Peak heap of a sending wake with its TLS handshake, in chip bytes (see HEAP_METHOD)."""
    trials = [0]

    def ok(heap: int) -> bool:
        # A wake that ends without its ACK for another reason than the heap (a slow moment of
        # a shared machine) is run again, so that it does not count as too small a heap.
        for _ in range(3):
            trials[0] += 1
            node = SimNode(tmp / f"heap-{device}-{trials[0]}", seed=5, time_scale=0,
                           start_ms=START_MS, field=_stub_profile(p, heap))
            provision(node, node_config(st, device, 1, sample_interval_s=300, align_s=0),
                      st.pki, device)
            asyncio.run(node.run(1, wall_limit_s=60))
            text = (node.dir / "node.log").read_text(errors="replace")
            shutil.rmtree(node.dir, ignore_errors=True)
            if "MemoryError" in text:
                return False
            if " ack cumulative=" in text:
                return True
        return False

    return _bisect(ok, 8 * 1024, p.gc_heap_wifi_bytes)


# ---- figures ------------------------------------------------------------------------------

def _mean(rows: list[dict[str, tuple[int, float]]], key: str) -> float:
    # A phase a wake did not have counts as 0 ms (flash: most wakes erase nothing).
    return sum(r[key][0] if key in r else 0 for r in rows) / len(rows) if rows else 0.0


def shape_from_ledgers(p: BoardProfile, ledgers: list[dict[str, tuple[int, float]]]) -> tuple[WakeShape, dict[str, Any]]:
    """The wake shape the model uses, from the ledgers, and what was measured."""
    # The first wake after power-on (new queue, first HELLO) is left out when there are more.
    ledgers = ledgers[1:] if len(ledgers) > 2 else ledgers
    samples = [b for b in ledgers if "tls" not in b and "assoc" not in b]
    sends = [b for b in ledgers if "tls" in b]
    if not samples or not sends:
        raise BenchError(f"{p.name}: the live run gave {len(samples)} sampling and {len(sends)} sending wakes")
    assoc = _mean(sends, "assoc")
    measured = {
        "sampling_wakes": len(samples),
        "sending_wakes": len(sends),
        "boot_ms": round(_mean(ledgers, "boot")),
        "sample_ms": round(_mean(samples, "sample"), 1),
        "assoc_ms": round(assoc),
        "tls_ms": round(_mean(sends, "tls")),
        "session_ms": round(_mean(sends, "publish") + _mean(sends, "listen"), 1),
        "flash_ms_sampling": round(_mean(samples, "flash"), 1),
        "flash_ms_sending": round(_mean(sends, "flash"), 1),
        "uah_sampling_wake_ledger": round(sum(sum(v[1] for k, v in b.items() if k != "sleep") for b in samples) / len(samples), 3),
        "uah_sending_wake_ledger": round(sum(sum(v[1] for k, v in b.items() if k != "sleep") for b in sends) / len(sends), 3),
    }
    shape = WakeShape(
        sample_ms=max(measured["sample_ms"], CHIP_SAMPLE_MS_FLOOR),
        session_ms=measured["session_ms"],
        flash_ms_sample=measured["flash_ms_sampling"],
        flash_ms_send=measured["flash_ms_sending"],
        preset_wifi=assoc < (p.wifi_cold_ms + p.wifi_preset_ms) / 2,
    )
    return shape, measured


def with_psk(p: BoardProfile) -> BoardProfile:
    """The profile with TLS-PSK routine sessions: the handshake at 1/40 of its CPU time."""
    accel = p.tls_handshake_accel_ms
    return dataclasses.replace(
        p,
        tls_handshake_ms=max(1, round(p.tls_handshake_ms * PSK_CPU_FRACTION)),
        tls_handshake_accel_ms=None if accel is None else max(1, round(accel * PSK_CPU_FRACTION)),
    )


def _round(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in d.items()}


def variant(p: BoardProfile, shape: WakeShape, *, baseline: BoardProfile | None = None,
            upstream_within_s: float = 3600.0) -> dict[str, Any]:
    """Per-wake µAh, average current, battery years and both baselines for one wake shape.

    The connect-per-reading baseline runs on `baseline` (default `p`): a cold association and
    a mutual-TLS handshake with the board's own figures, whatever Torpor's session costs."""
    bp = baseline or p
    sw = sampling_wake(p, shape)
    tw = sending_wake(p, shape)
    out: dict[str, Any] = {
        "uah_per_sampling_wake": round(sw.uah, 3),
        "uah_per_sending_wake": round(tw.uah, 3),
        "phases": {"sampling_wake": _round(sw.phases), "sending_wake": _round(tw.phases)},
    }
    for label, interval in (("5min", 300.0), ("1min", 60.0)):
        n = send_every_for(interval, upstream_within_s)
        ua = average_ua(p, shape, interval, n)
        out[f"send_every_{label}"] = n
        out[f"average_ua_{label}"] = round(ua, 2)
        out[f"battery_years_2aa_{label}"] = round(battery_years(CAPACITY_2AA_MAH, ua), 2)
        out[f"battery_years_18650_{label}"] = round(battery_years(CAPACITY_18650_MAH, ua), 2)
        connect = average_ua(bp, shape, interval, 1, preset=False)
        every1 = average_ua(p, shape, interval, 1)
        out[f"baseline_connect_per_reading_ua_{label}"] = round(connect, 2)
        out[f"baseline_send_every_1_ua_{label}"] = round(every1, 2)
        out[f"ratio_to_connect_per_reading_{label}"] = round(connect / ua, 2)
        out[f"ratio_to_send_every_1_{label}"] = round(every1 / ua, 2)
    out["ratio_to_connect_per_reading"] = out["ratio_to_connect_per_reading_5min"]
    return out


VARIANTS = (
    ("as_run", "the firmware as run: its association as the ledger shows it, mutual TLS every session"),
    ("fast_reconnect", "Wi-Fi association with the channel/BSSID preset (the profile's wifi_preset_ms)"),
    ("fast_reconnect_psk", "preset association and TLS-PSK routine sessions (handshake at 1/40 the CPU)"),
)


def board_entry(p: BoardProfile, shape: WakeShape, measured: dict[str, Any], live: bool,
                heap: dict[str, int | None]) -> dict[str, Any]:
    variants = {
        "as_run": variant(p, shape),
        "fast_reconnect": variant(p, dataclasses.replace(shape, preset_wifi=True)),
        "fast_reconnect_psk": variant(with_psk(p), dataclasses.replace(shape, preset_wifi=True), baseline=p),
    }
    fits = [v <= p.gc_heap_wifi_bytes for v in heap.values() if v is not None]
    entry: dict[str, Any] = {
        "live": live,
        "measured": measured,
        **variants["as_run"],
        "variants": variants,
        "heap_bytes": p.gc_heap_wifi_bytes,
        "heap_peak_bytes": heap,
        "heap_ok": bool(fits) and all(fits) and None not in heap.values(),
    }
    return entry


def targets(boards: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, _ in VARIANTS:
        c3 = boards.get("esp32c3", {}).get("variants", {}).get(name, {})
        ratios = {b: e["variants"][name]["ratio_to_connect_per_reading_5min"] for b, e in boards.items()}
        out[name] = {
            "esp32c3_years_2aa_5min": c3.get("battery_years_2aa_5min"),
            "esp32c3_years_2aa_5min_met": (c3.get("battery_years_2aa_5min") or 0) >= TARGET_C3_YEARS_2AA_5MIN,
            "min_ratio_to_connect_per_reading_5min": min(ratios.values()),
            "min_ratio_to_connect_per_reading_1min": min(
                e["variants"][name]["ratio_to_connect_per_reading_1min"] for e in boards.values()),
            "ratio_met_on_every_board": all(r >= TARGET_RATIO for r in ratios.values()),
        }
    out["every_heap_ok"] = all(e["heap_ok"] for e in boards.values())
    out["targets"] = {
        "esp32c3_years_2aa_5min": f">= {TARGET_C3_YEARS_2AA_5MIN}",
        "ratio_to_connect_per_reading": f">= {TARGET_RATIO} on every board",
        "heap_ok": "true on every board",
    }
    return out


def measure(quick: bool = False) -> dict[str, Any]:
    """Run the benchmark; returns the figures as one JSON-able dict."""
    t0 = time.monotonic()
    profiles = load_profiles()
    boards = [profiles[b] for b in BOARDS]
    cal = profiles[CALIBRATION_BOARD]
    live_boards = [cal] if quick else boards
    wakes = 3 if quick else 5
    with tempfile.TemporaryDirectory(prefix="torpor-bench-energy-") as tmpname:
        tmp = Path(tmpname)
        live = live_ledgers(tmp, live_boards, wakes, 2)
        devices = ["energy-heap"]
        heap_boards = [cal] if quick else boards
        with stack(tmp / "heap", devices) as st:
            tls = {p.name: heap_tls_wake(tmp / "heap", st, p, "energy-heap") for p in heap_boards}
            ota = heap_ota.measure(tmp / "heap", st, heap_boards, "energy-heap", _stub_profile)
    cal_shape, cal_measured = shape_from_ledgers(cal, live[cal.name]["ledgers"])
    heaps = {p.name: {
        "sending_wake_tls": tls.get(p.name, tls[cal.name]),
        "ota_chunk_wake": ota["ota_chunk_wake"].get(p.name, ota["ota_chunk_wake"][cal.name]),
        "ed25519_verify": ota["ed25519_verify"],
    } for p in boards}
    out_boards: dict[str, Any] = {}
    for p in boards:
        if p.name in live:
            shape, measured = shape_from_ledgers(p, live[p.name]["ledgers"])
            measured["wall_s"] = live[p.name]["wall_s"]
        else:
            # Scaled from the calibration run: its app CPU, session and flash times, with this
            # board's own boot, association and TLS durations from its profile.
            shape, measured = cal_shape, {"scaled_from": cal.name}
        out_boards[p.name] = board_entry(p, shape, measured, p.name in live, heaps[p.name])
    return {
        "model": MODEL_NOTE,
        "method": (
            f"Live: the firmware ran as sim nodes on {', '.join(p.name for p in live_boards)} "
            f"({wakes} wakes each, send_every 2, awake delays compressed {AWAKE_SCALE:g}x and booked "
            "at full length) against Mosquitto with mutual TLS and the gateway; their ledgers "
            "give the phases. "
            + ("Other boards: the calibration board's app CPU, session and flash times with "
               "their own profile's boot, association and TLS durations. " if quick else "")
            + f"A sampling wake's app CPU below {CHIP_SAMPLE_MS_FLOOR:g} ms (this PC is faster "
            "than a chip) is raised to it. Projections: those wakes repeated, with the "
            "profile's deep-sleep current between them, every reading upstream within 1 h."
        ),
        "heap_method": HEAP_METHOD + " " + heap_ota.METHOD + (
            f" Quick: the wakes measured on the {cal.name} profile only and held against each "
            "board's heap." if quick else " The wakes measured on each board's own profile."
        ),
        "heap_ed25519": {k: v for k, v in ota.items() if k.startswith("ed25519")},
        "pico_note": PICO_NOTE,
        "variants": dict(VARIANTS),
        "boards": out_boards,
        "targets": targets(out_boards),
        "wall_s": round(time.monotonic() - t0, 1),
    }


# ---- output -------------------------------------------------------------------------------

def table(fig: dict[str, Any]) -> str:
    rows = [
        "board     live  µAh/sample µAh/send  avg µA 5min  2xAA y 5min/1min  18650 y 5min/1min"
        "  x connect 5min/1min  x send_every=1  heap peak (tls/ota/ed25519) of heap  heap_ok",
    ]
    for name, e in fig["boards"].items():
        hp = e["heap_peak_bytes"]
        peaks = "/".join("-" if hp[k] is None else str(hp[k]) for k in ("sending_wake_tls", "ota_chunk_wake", "ed25519_verify"))
        rows.append(
            f"{name:9} {'yes' if e['live'] else 'no':5} {e['uah_per_sampling_wake']:10.2f} {e['uah_per_sending_wake']:8.1f}"
            f"  {e['average_ua_5min']:11.1f}  {e['battery_years_2aa_5min']:7.2f}/{e['battery_years_2aa_1min']:<8.2f}"
            f"  {e['battery_years_18650_5min']:7.2f}/{e['battery_years_18650_1min']:<8.2f}"
            f"  {e['ratio_to_connect_per_reading_5min']:9.2f}/{e['ratio_to_connect_per_reading_1min']:<9.2f}"
            f"  {e['ratio_to_send_every_1_5min']:14.2f}  {peaks:>22} of {e['heap_bytes']:<6}  {e['heap_ok']}"
        )
    rows.append("")
    rows.append("phases of a sending wake (µAh), as run:")
    for name, e in fig["boards"].items():
        ph = e["phases"]["sending_wake"]
        rows.append(f"  {name:9} " + "  ".join(f"{k}={v:.2f}" for k, v in ph.items()))
    rows.append("")
    rows.append("variants: 2xAA years at 1 reading/5 min, x connect-per-reading at 5 min / 1 min:")
    for vname, text in fig["variants"].items():
        rows.append(f"  {vname}: {text}")
        for name, e in fig["boards"].items():
            v = e["variants"][vname]
            rows.append(f"    {name:9} {v['battery_years_2aa_5min']:6.2f} y"
                        f"   x{v['ratio_to_connect_per_reading_5min']:.2f}"
                        f" / x{v['ratio_to_connect_per_reading_1min']:.2f}")
    rows.append("")
    t = fig["targets"]
    rows.append("targets (printed, not asserted):")
    for vname in fig["variants"]:
        tv = t[vname]
        rows.append(
            f"  {vname}: ESP32-C3 2xAA at 5 min {tv['esp32c3_years_2aa_5min']} y (target >= {TARGET_C3_YEARS_2AA_5MIN:g}:"
            f" {'met' if tv['esp32c3_years_2aa_5min_met'] else 'not met'}); lowest x connect-per-reading"
            f" {tv['min_ratio_to_connect_per_reading_5min']} at 5 min,"
            f" {tv['min_ratio_to_connect_per_reading_1min']} at 1 min (target >= {TARGET_RATIO:g} on every board:"
            f" {'met' if tv['ratio_met_on_every_board'] else 'not met'})"
        )
    rows.append(f"  every heap_ok: {t['every_heap_ok']} (target: true)")
    rows.append("")
    for key in ("model", "method", "heap_method", "pico_note"):
        rows.append(f"{key}: {fig[key]}")
    rows.append(f"wall: {fig['wall_s']} s")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    try:
        fig = measure(quick=args.quick)
    except BenchError as exc:
        print(f"error: {exc}")
        return 1
    print(json.dumps(fig) if args.json else table(fig))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "energy",
        help="µAh per wake, average current and battery life on every board profile (a model)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true",
                   help="one live calibration board (esp32c3), the others scaled from it")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
