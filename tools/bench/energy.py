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

from tools.bench import heap_ota, session_energy
from tools.bench.energy_model import (
    BASELINE_BOOT_FRACTION,
    CAPACITY_2AA_MAH,
    CAPACITY_18650_MAH,
    FLASH_READ_CALL_US,
    FLASH_READ_MB_S,
    WakeShape,
    average_ua,
    baseline_profile,
    baseline_shape,
    battery_years,
    flash_read_ms,
    rtc_flash_ms,
    sampling_wake,
    send_every_for,
    sending_wake,
    with_power_cut_timer,
    with_skip_validate,
)
from tools.bench.node import (
    START_MS,
    BenchError,
    install_image,
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
# A chip's time for a wake's app CPU outside its filesystem reads (the interpreter's work:
# loading bytecode, the JSON configuration, the queue): an estimate, WakeShape's default.
# The host's time for it (printed) is a few ms to tens of ms on this PC, as loaded as the
# machine is: no guide to a chip's.
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
    "wakes with an external timer (a TPL5110-class timer, 35 nA, or an RTC alarm on the "
    "regulator's enable pin): the `power_cut_timer` variants, a model only. The firmware does "
    "not support it yet: at a power-on boards/_rp2_common.py discards RTC memory, so every "
    "wake would start a new clock epoch (readings of sampling wakes could not be placed in "
    "time) and associate cold; a timer mode needs a board module that keeps the RTC-memory "
    "file across the timer's cuts, counts the timer's resistor-set period as the sleep and "
    "ends the wake with the timer's DONE signal (no early wake for pending downlink, no "
    "backoff). Or run the node on an ESP32-C3, whose deep sleep draws about 5 uA."
)


# ---- the live run -----------------------------------------------------------------------

def _live_profile(p: BoardProfile) -> FieldModel:
    return FieldModel(p, awake_scale=AWAKE_SCALE)


AWAKE_SCALE = 20.0


def ledgers_and_flash(text: str) -> tuple[list[dict[str, tuple[int, float]]], list[dict[str, int]]]:
    """The ledgers of a node log's wakes and, for each, its `F` line (flash counters: prog,
    erase, read, reads, io_us; empty when the wake printed none)."""
    ledgers: list[dict[str, tuple[int, float]]] = []
    flash: list[dict[str, int]] = []
    f: dict[str, int] = {}
    for ln in text.splitlines():
        if ln.startswith("F "):
            try:
                f = {k: int(v) for k, _, v in (part.partition("=") for part in ln[2:].split())}
            except ValueError:
                f = {}
            continue
        b = parse_ledger(ln)
        if b:
            ledgers.append(b)
            flash.append(f)
            f = {}
    return ledgers, flash


def live_ledgers(tmp: Path, boards: list[BoardProfile], wakes: int, send_every: int) -> dict[str, dict[str, Any]]:
    """Run the firmware on each board's profile; per board the ledgers of its wakes.

    Each node boots as a provisioned board does: the bootloader with its image check, then
    the signed .mpy image from its slot on the node's littlefs flash."""
    devices = [f"energy-{p.name.replace('_', '-')}" for p in boards]
    out: dict[str, dict[str, Any]] = {}
    with stack(tmp, devices) as st:
        for p, device in zip(boards, devices, strict=True):
            node = SimNode(tmp / device, seed=5, time_scale=0, start_ms=START_MS,
                           field=_live_profile(p), entry="boot")
            install_image(node, tmp)
            provision(node, node_config(st, device, send_every, sample_interval_s=300, align_s=0),
                      st.pki, device)
            t0 = time.monotonic()
            summary = asyncio.run(node.run(wakes, wall_limit_s=60 + wakes * 10.0))
            text = (node.dir / "node.log").read_text(errors="replace")
            ledgers, flash = ledgers_and_flash(text)
            out[p.name] = {
                "ledgers": ledgers,
                "flash": flash,
                "kinds": dict(summary.kinds),
                "wall_s": round(time.monotonic() - t0, 1),
            }
    return out


def _stub_profile(p: BoardProfile, heap: int) -> FieldModel:
    return FieldModel(dataclasses.replace(p, gc_heap_wifi_bytes=heap), awake_scale=AWAKE_SCALE)


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

    return heap_ota.bisect(ok, 8 * 1024, p.gc_heap_wifi_bytes)


# ---- figures ------------------------------------------------------------------------------

def _mean(rows: list[dict[str, tuple[int, float]]], key: str) -> float:
    # A phase a wake did not have counts as 0 ms (flash: most wakes erase nothing).
    return sum(r[key][0] if key in r else 0 for r in rows) / len(rows) if rows else 0.0


def _fmean(rows: list[dict[str, int]], key: str) -> float:
    return sum(r.get(key, 0) for r in rows) / len(rows) if rows else 0.0


def shape_from_ledgers(p: BoardProfile, ledgers: list[dict[str, tuple[int, float]]],
                       flash: list[dict[str, int]] | None = None) -> tuple[WakeShape, dict[str, Any]]:
    """The wake shape the model uses, from the ledgers (and `F` lines), and what was measured.

    The steady state a node lives in: the first wake after power-on (new queue, first
    HELLO) is left out, and so is the first send, whose association is cold (no channel and
    BSSID kept yet); later sends associate as the run shows (with the kept hint, the preset
    time). A sampling wake's app CPU is its `sample` phase less the sim's Python block
    device's host time (io_us); its filesystem reads are charged at the chip's estimated
    cost (energy_model.flash_read_ms) from the counted reads."""
    flash = flash if flash is not None and len(flash) == len(ledgers) else [{} for _ in ledgers]
    rows = list(zip(ledgers, flash, strict=True))
    rows = rows[1:] if len(rows) > 2 else rows
    samples = [(b, f) for b, f in rows if "tls" not in b and "assoc" not in b]
    all_sends = [(b, f) for b, f in rows if "tls" in b]
    if not samples or not all_sends:
        raise BenchError(f"{p.name}: the live run gave {len(samples)} sampling and {len(all_sends)} sending wakes")
    sends = all_sends[1:] if len(all_sends) > 1 else all_sends
    sb = [b for b, _ in samples]
    tb = [b for b, _ in sends]
    sf = [f for _, f in samples]
    tf = [f for _, f in sends]
    assoc = _mean(tb, "assoc")
    app_ms = max(0.0, _mean(sb, "sample") - _fmean(sf, "io_us") / 1000.0)
    measured = {
        "sampling_wakes": len(samples),
        "sending_wakes": len(sends),
        "boot_ms": round(_mean([b for b, _ in rows], "boot")),
        "sample_ms": round(_mean(sb, "sample"), 1),
        "sample_ms_without_sim_flash_io": round(app_ms, 1),
        "assoc_ms": round(assoc),
        "assoc_ms_first_send": round(_mean([all_sends[0][0]], "assoc")),
        "tls_ms": round(_mean(tb, "tls")),
        "session_ms": round(_mean(tb, "publish") + _mean(tb, "listen"), 1),
        "flash_ms_sampling": round(_mean(sb, "flash"), 1),
        "flash_ms_sending": round(_mean(tb, "flash"), 1),
        "fs_read_bytes_sampling": round(_fmean(sf, "read")),
        "fs_reads_sampling": round(_fmean(sf, "reads")),
        "fs_read_bytes_sending": round(_fmean(tf, "read")),
        "fs_reads_sending": round(_fmean(tf, "reads")),
        "prog_bytes_sampling": round(_fmean(sf, "prog")),
        "erases_sampling": round(_fmean(sf, "erase"), 2),
        "uah_sampling_wake_ledger": round(sum(sum(v[1] for k, v in b.items() if k != "sleep") for b in sb) / len(sb), 3),
        "uah_sending_wake_ledger": round(sum(sum(v[1] for k, v in b.items() if k != "sleep") for b in tb) / len(tb), 3),
    }
    shape = WakeShape(
        # The estimate, not the host time: on a shared machine that measures its load.
        sample_ms=CHIP_SAMPLE_MS_FLOOR,
        session_ms=measured["session_ms"],
        flash_ms_sample=measured["flash_ms_sampling"],
        flash_ms_send=measured["flash_ms_sending"],
        preset_wifi=assoc < (p.wifi_cold_ms + p.wifi_preset_ms) / 2,
        fs_read_ms_sample=flash_read_ms(_fmean(sf, "read"), _fmean(sf, "reads")),
        fs_read_ms_send=flash_read_ms(_fmean(tf, "read"), _fmean(tf, "reads")),
    )
    measured["fs_read_ms_sampling_chip_estimate"] = round(shape.fs_read_ms_sample, 1)
    measured["fs_read_ms_sending_chip_estimate"] = round(shape.fs_read_ms_send, 1)
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
    """Per-wake µAh, average current, battery years and the baselines for one wake shape.

    The connect-per-reading baseline runs on `baseline` (default `p`) as a compiled firmware
    boots it (energy_model.baseline_profile and baseline_shape): a mutual-TLS handshake with
    the board's own figures whatever Torpor's session costs, and a cold association (a full
    scan: ESPHome's default, `fast_connect: false`) or, in the `_fast` figures, the same
    preset association Torpor gets."""
    bp = baseline_profile(baseline or p)
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
        connect = average_ua(bp, baseline_shape(shape), interval, 1)
        connect_fast = average_ua(bp, baseline_shape(shape, preset_wifi=True), interval, 1)
        every1 = average_ua(p, shape, interval, 1)
        out[f"baseline_connect_per_reading_ua_{label}"] = round(connect, 2)
        out[f"baseline_connect_per_reading_fast_ua_{label}"] = round(connect_fast, 2)
        out[f"baseline_send_every_1_ua_{label}"] = round(every1, 2)
        out[f"ratio_to_connect_per_reading_{label}"] = round(connect / ua, 2)
        out[f"ratio_to_connect_per_reading_fast_{label}"] = round(connect_fast / ua, 2)
        out[f"ratio_to_send_every_1_{label}"] = round(every1 / ua, 2)
    out["ratio_to_connect_per_reading"] = out["ratio_to_connect_per_reading_5min"]
    return out


VARIANTS = (
    ("as_run", "the firmware as run, steady state: its association as the ledger shows it after "
               "the first send (the kept channel/BSSID hint), mutual TLS every session; without PSK"),
    ("fast_reconnect", "Wi-Fi association with the channel/BSSID preset (the profile's "
                       "wifi_preset_ms) whatever the run showed; without PSK"),
    ("fast_reconnect_psk", "preset association and TLS-PSK routine sessions (handshake at 1/40 "
                           "the CPU): with PSK, which the PSK session path provides"),
)
# Boards whose sleep current under MicroPython holds them (RP2): also figured with an
# external power-cut timer between wakes (energy_model.with_power_cut_timer).
TIMER_VARIANTS = (
    ("power_cut_timer", "fast_reconnect", "a TPL5110-class timer cuts the board's power between "
                                          "wakes (35 nA), every send associates cold (RTC memory "
                                          "is lost at power-on); a model only; without PSK"),
    ("power_cut_timer_psk", "fast_reconnect_psk", "the same with PSK"),
)
# ESP32-family boards: also figured on a MicroPython build of one's own whose IDF
# bootloader skips the image hash on deep-sleep wakes (energy_model.with_skip_validate).
BUILD_VARIANTS = (
    ("custom_build", "a MicroPython build with CONFIG_BOOTLOADER_SKIP_VALIDATE_IN_DEEP_SLEEP "
                     "(boot_ms less the 217/635 share measured on an ESP32-S3; not a build "
                     "Torpor makes); preset association, without PSK"),
    ("custom_build_psk", "the same with PSK"),
)


def board_entry(p: BoardProfile, shape: WakeShape, measured: dict[str, Any], live: bool,
                heap: dict[str, int | None]) -> dict[str, Any]:
    rtc = rtc_flash_ms(p)
    if rtc:
        shape = dataclasses.replace(shape, flash_ms_sample=shape.flash_ms_sample + rtc,
                                    flash_ms_send=shape.flash_ms_send + rtc)
        measured = {**measured, "rtc_file_flash_ms_per_wake": round(rtc, 1)}
    preset = dataclasses.replace(shape, preset_wifi=True)
    variants = {
        "as_run": variant(p, shape),
        "fast_reconnect": variant(p, preset),
        "fast_reconnect_psk": variant(with_psk(p), preset, baseline=p),
    }
    if p.deep_sleep_ua >= 100:
        # Every wake a power-on: RTC memory, with the Wi-Fi hint, is gone, so every send
        # associates cold. The baseline gets the same timer: compiled firmware can be cut too.
        cut = with_power_cut_timer(p)
        cold = dataclasses.replace(shape, preset_wifi=False)
        variants["power_cut_timer"] = variant(cut, cold, baseline=cut)
        variants["power_cut_timer_psk"] = variant(with_psk(cut), cold, baseline=cut)
    else:
        # The baseline keeps the stock build's boot (its share, as everywhere).
        fast = with_skip_validate(p)
        variants["custom_build"] = variant(fast, preset, baseline=p)
        variants["custom_build_psk"] = variant(with_psk(fast), preset, baseline=p)
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
    timer_of = {base: name for name, base, _ in TIMER_VARIANTS}
    timer_of["as_run"] = timer_of["fast_reconnect"]
    for name, _ in VARIANTS:
        c3 = boards.get("esp32c3", {}).get("variants", {}).get(name, {})
        per = {b: e["variants"][name] for b, e in boards.items()}
        # The same, with the power-cut timer on the boards that have that variant.
        timed = {b: e["variants"].get(timer_of.get(name, ""), per[b]) for b, e in boards.items()}

        def low(vs: dict[str, dict[str, Any]], key: str) -> float:
            return float(min(v[key] for v in vs.values()))

        out[name] = {
            "esp32c3_years_2aa_5min": c3.get("battery_years_2aa_5min"),
            "esp32c3_years_2aa_5min_met": (c3.get("battery_years_2aa_5min") or 0) >= TARGET_C3_YEARS_2AA_5MIN,
            "min_ratio_to_connect_per_reading_5min": low(per, "ratio_to_connect_per_reading_5min"),
            "min_ratio_to_connect_per_reading_1min": low(per, "ratio_to_connect_per_reading_1min"),
            "min_ratio_to_connect_per_reading_fast_5min": low(per, "ratio_to_connect_per_reading_fast_5min"),
            "ratio_met_on_every_board": all(v["ratio_to_connect_per_reading_5min"] >= TARGET_RATIO
                                            for v in per.values()),
            "ratio_met_on_every_board_vs_fast_baseline": all(
                v["ratio_to_connect_per_reading_fast_5min"] >= TARGET_RATIO for v in per.values()),
            "boards_below_ratio": sorted(b for b, v in per.items()
                                         if v["ratio_to_connect_per_reading_5min"] < TARGET_RATIO),
            "min_ratio_5min_with_power_cut_timer": low(timed, "ratio_to_connect_per_reading_5min"),
            "ratio_met_on_every_board_with_power_cut_timer": all(
                v["ratio_to_connect_per_reading_5min"] >= TARGET_RATIO for v in timed.values()),
        }
    for name, _ in BUILD_VARIANTS:
        c3 = boards.get("esp32c3", {}).get("variants", {}).get(name, {})
        out[name] = {
            "esp32c3_years_2aa_5min": c3.get("battery_years_2aa_5min"),
            "esp32c3_years_2aa_5min_met": (c3.get("battery_years_2aa_5min") or 0) >= TARGET_C3_YEARS_2AA_5MIN,
            "esp32c3_ratio_to_connect_per_reading_5min": c3.get("ratio_to_connect_per_reading_5min"),
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
    # Five wakes at send_every 2: power-on, first send (cold association), a sampling wake,
    # a steady send and a sampling wake; the first two are left out of the steady state.
    wakes = 5
    with tempfile.TemporaryDirectory(prefix="torpor-bench-energy-") as tmpname:
        tmp = Path(tmpname)
        live = live_ledgers(tmp, live_boards, wakes, 2)
        devices = ["energy-heap"]
        heap_boards = [cal] if quick else boards
        with stack(tmp / "heap", devices) as st:
            tls = {p.name: heap_tls_wake(tmp / "heap", st, p, "energy-heap") for p in heap_boards}
            ota = heap_ota.measure(tmp / "heap", st, heap_boards, "energy-heap", _stub_profile)
        # Routine-send session set-up, mutual TLS against TLS-PSK (tools/bench/session_energy.py).
        session = session_energy.measure(tmp / "session-keys", profiles[session_energy.BOARD],
                                         AWAKE_SCALE)
    cal_shape, cal_measured = shape_from_ledgers(cal, live[cal.name]["ledgers"], live[cal.name]["flash"])
    heaps = {p.name: {
        "sending_wake_tls": tls.get(p.name, tls[cal.name]),
        "ota_chunk_wake": ota["ota_chunk_wake"].get(p.name, ota["ota_chunk_wake"][cal.name]),
        "ed25519_verify": ota["ed25519_verify"],
    } for p in boards}
    out_boards: dict[str, Any] = {}
    for p in boards:
        if p.name in live:
            shape, measured = shape_from_ledgers(p, live[p.name]["ledgers"], live[p.name]["flash"])
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
            "at full length), each booting as a provisioned board: the bootloader and its image "
            "check, then the signed .mpy image from its slot on littlefs, against Mosquitto with "
            "mutual TLS and the gateway; their ledgers give the phases. Steady state: the first "
            "wake after power-on and the first send (cold association) are left out. "
            + ("Other boards: the calibration board's app CPU, session, flash and filesystem "
               "reads with their own profile's boot, association and TLS durations. " if quick else "")
            + f"A wake's app CPU is taken at {CHIP_SAMPLE_MS_FLOOR:g} ms (an estimate; the host's "
            "time, less the sim's Python block device, is printed); its "
            "filesystem reads, counted, are charged apart at an estimated chip cost "
            f"({FLASH_READ_CALL_US:g} us a read, {FLASH_READ_MB_S:g} MB/s); RP2 boards add their "
            "RTC-memory file writes. Baseline: a compiled firmware's boot "
            f"({BASELINE_BOOT_FRACTION:.2f} of boot_ms), the sensor read, cold (ESPHome's default) "
            "or preset (`_fast`) association, mutual TLS, the session Torpor's run measured. "
            "Projections: those wakes repeated, with the profile's deep-sleep current between "
            "them, every reading upstream within 1 h."
        ),
        "heap_method": HEAP_METHOD + " " + heap_ota.METHOD + (
            f" Quick: the wakes measured on the {cal.name} profile only and held against each "
            "board's heap." if quick else " The wakes measured on each board's own profile."
        ),
        "heap_ed25519": {k: v for k, v in ota.items() if k.startswith("ed25519")},
        "pico_note": PICO_NOTE,
        "variants": {**dict(VARIANTS), **{n: t for n, _, t in TIMER_VARIANTS}, **dict(BUILD_VARIANTS)},
        "boards": out_boards,
        "targets": targets(out_boards),
        "session_keys": session,
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
    rows.append("sampling wake, measured (steady state): filesystem reads, their estimated chip ms, app CPU on this PC:")
    for name, e in fig["boards"].items():
        m = e["measured"]
        if "fs_reads_sampling" not in m:
            continue
        rows.append(f"  {name:9} {m['fs_read_bytes_sampling']:>8} B in {m['fs_reads_sampling']:>6} reads"
                    f" = {m['fs_read_ms_sampling_chip_estimate']} ms; sending wake {m['fs_read_bytes_sending']} B"
                    f" in {m['fs_reads_sending']} reads = {m['fs_read_ms_sending_chip_estimate']} ms;"
                    f" app {m['sample_ms_without_sim_flash_io']} ms (sample phase {m['sample_ms']} ms);"
                    f" programmed {m['prog_bytes_sampling']} B; association {m['assoc_ms']} ms"
                    f" (first send {m['assoc_ms_first_send']} ms)")
    rows.append("")
    rows.append("variants: 2xAA years at 1 reading/5 min, x connect-per-reading at 5 min / 1 min"
                " (cold-scan baseline; [same fast association baseline]):")
    for vname, text in fig["variants"].items():
        rows.append(f"  {vname}: {text}")
        for name, e in fig["boards"].items():
            v = e["variants"].get(vname)
            if v is None:
                continue
            rows.append(f"    {name:9} {v['battery_years_2aa_5min']:6.2f} y"
                        f"   x{v['ratio_to_connect_per_reading_5min']:.2f}"
                        f" / x{v['ratio_to_connect_per_reading_1min']:.2f}"
                        f"   [x{v['ratio_to_connect_per_reading_fast_5min']:.2f}"
                        f" / x{v['ratio_to_connect_per_reading_fast_1min']:.2f}]")
    rows.append("")
    t = fig["targets"]
    rows.append("targets (printed, not asserted):")
    for vname, _ in VARIANTS:
        tv = t[vname]
        rows.append(
            f"  {vname}: ESP32-C3 2xAA at 5 min {tv['esp32c3_years_2aa_5min']} y (target >= {TARGET_C3_YEARS_2AA_5MIN:g}:"
            f" {'met' if tv['esp32c3_years_2aa_5min_met'] else 'not met'}); lowest x connect-per-reading"
            f" {tv['min_ratio_to_connect_per_reading_5min']} at 5 min,"
            f" {tv['min_ratio_to_connect_per_reading_1min']} at 1 min (target >= {TARGET_RATIO:g} on every board:"
            f" {'met' if tv['ratio_met_on_every_board'] else 'not met'}; below: {', '.join(tv['boards_below_ratio']) or 'none'};"
            f" against the fast-association baseline {tv['min_ratio_to_connect_per_reading_fast_5min']};"
            f" with the power-cut timer on the RP2 boards {tv['min_ratio_5min_with_power_cut_timer']})"
        )
    for vname, _ in BUILD_VARIANTS:
        tv = t[vname]
        rows.append(f"  {vname}: ESP32-C3 2xAA at 5 min {tv['esp32c3_years_2aa_5min']} y"
                    f" ({'met' if tv['esp32c3_years_2aa_5min_met'] else 'not met'}),"
                    f" x connect-per-reading {tv['esp32c3_ratio_to_connect_per_reading_5min']} at 5 min")
    rows.append(f"  every heap_ok: {t['every_heap_ok']} (target: true)")
    rows.append("")
    if "session_keys" in fig:
        rows += session_energy.table_rows(fig["session_keys"]) + [""]
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
