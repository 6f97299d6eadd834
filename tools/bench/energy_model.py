"""An energy model of a node's wakes on each board profile, for `torpor bench energy`.

A model, not a measurement: every figure is a board profile's cited current
(docs/board-profiles.md) times a duration, the durations being the profile's (boot,
association, TLS, flash timings) and the wake's own CPU and radio time as the sim measured
it (the phases of its energy ledger, `L` lines). Nothing here was measured on a real chip.

Per board it gives µAh per sampling wake and per sending wake split by phase, the average
current and the projected battery life at a reading interval with every reading upstream
within a bound, next to two baselines built on the same profile: a node that connects and
publishes for every reading (as ESPHome or Tasmota sensors typically run), and Torpor with
`send_every = 1`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tools.sim.profiles import BoardProfile

HOURS_PER_YEAR = 24 * 365.25
CAPACITY_2AA_MAH = 2500.0
CAPACITY_18650_MAH = 3000.0

# Chip time of a wake's filesystem reads (estimates; the sim counts the reads, their chip
# time is not measured): each read that misses littlefs's cache is a call from its C driver
# through MicroPython's block-device protocol (extmod/vfs_blockdev.c: a method call with a
# buffer object) into the port's readblocks and one SPI flash read command, taken at 10 us;
# the bytes at 20 MB/s (80 MHz dual I/O, the W25Q32JV datasheet's read modes). The sim's
# block device is Python, so its host time for them is no guide (it is taken out).
FLASH_READ_CALL_US = 10.0
FLASH_READ_MB_S = 20.0

# The connect-per-reading baseline runs a compiled firmware (ESPHome, Tasmota): no
# MicroPython start, no filesystem of Python modules. Its boot is the chip's start to
# app_main with the image validated: 264 ms of the 635 ms that stock MicroPython took from
# deep sleep to a trivial main.py on an ESP32-S3, measured with a power profiler
# (github.com/glenn20/upy-esp32-experiments, OptimisingMicropythonBootTime). That share of
# each profile's boot_ms is charged (the compiled firmware's own setup is not counted),
# and its reading costs the sensor's measurement only (SHT4x high repeatability: 8.3 ms
# max in its datasheet; boards/_sht4x.py waits 10 ms).
BASELINE_BOOT_FRACTION = 264.0 / 635.0
BASELINE_SENSOR_MS = 10.0

# An external power-cut timer (TPL5110-class) between wakes: the board is unpowered, the
# timer draws 35 nA typical (TI TPL5110 datasheet, SNAS650) and every wake is a power-on.
POWER_CUT_TIMER_UA = 0.035
# Where RTC memory is a flash file (the RP2 boards, boards/_rp2_common.py), each timer wake
# rewrites it four times (init() clearing the wake mark, the app's boot and end saves,
# deep_sleep's mark): a 2 KB file beyond littlefs's inline size, so a block erase and its
# pages each time. The sim keeps RTC memory in a host file, so its ledger does not show them.
RTC_FILE_WRITES_PER_WAKE = {"pico_w": 4, "pico2_w": 4}
RTC_FILE_BYTES = 2048 + 16


def flash_read_ms(read_bytes: float, reads: float) -> float:
    """Estimated chip ms of filesystem reads (see FLASH_READ_CALL_US)."""
    return reads * FLASH_READ_CALL_US / 1000.0 + read_bytes / (FLASH_READ_MB_S * 1000.0)


def rtc_flash_ms(p: BoardProfile) -> float:
    """Chip ms of a wake's RTC-memory file writes on a board that keeps RTC memory in flash."""
    n = RTC_FILE_WRITES_PER_WAKE.get(p.name, 0)
    pages = (RTC_FILE_BYTES + 255) // 256
    return n * (p.flash_erase_4k_ms + pages * p.flash_program_256_ms)


@dataclass(frozen=True, slots=True)
class WakeShape:
    """The chip-independent parts of a wake, in ms (from sim ledgers, or stated defaults).

    `sample_ms`: CPU time of a sampling wake's app (sensor read, queue append, plan);
    `session_ms`: radio-on time after the TLS handshake (publish, gateway's answers, listen
    window until SLEEP_NOW); `flash_ms_sample`/`flash_ms_send`: flash erase and program time
    (RTC-memory file writes included where the board keeps RTC memory in flash);
    `fs_read_ms_*`: the chip time of the wake's filesystem reads (`flash_read_ms`).
    The defaults are estimates of a chip's times (the PC runs these steps far faster); pass
    figures from `ledger_shape()` for the sim's measured ones.
    """

    sample_ms: float = 60.0
    session_ms: float = 300.0
    flash_ms_sample: float = 1.0
    flash_ms_send: float = 3.0
    preset_wifi: bool = True
    # Filesystem reads (module imports, the image check, config, queue), estimated chip ms.
    fs_read_ms_sample: float = 0.0
    fs_read_ms_send: float = 0.0


@dataclass(frozen=True, slots=True)
class WakeEnergy:
    phases: dict[str, float] = field(default_factory=dict)  # phase -> µAh

    @property
    def uah(self) -> float:
        return sum(self.phases.values())


def _uah(ma: float, ms: float) -> float:
    return ma * ms / 3600.0


def sampling_wake(p: BoardProfile, shape: WakeShape) -> WakeEnergy:
    return WakeEnergy({
        "boot": _uah(p.cpu_active_ma, p.boot_ms),
        "sample": _uah(p.cpu_active_ma, shape.sample_ms),
        "fs_read": _uah(p.cpu_active_ma, shape.fs_read_ms_sample),
        "flash": _uah(p.cpu_active_ma, shape.flash_ms_sample),
    })


def sending_wake(p: BoardProfile, shape: WakeShape, *, preset: bool | None = None) -> WakeEnergy:
    use_preset = shape.preset_wifi if preset is None else preset
    assoc_ms = p.wifi_preset_ms if use_preset else p.wifi_cold_ms
    radio = p.cpu_active_ma + p.radio_listen_ma
    return WakeEnergy({
        "boot": _uah(p.cpu_active_ma, p.boot_ms),
        "sample": _uah(p.cpu_active_ma, shape.sample_ms),
        "fs_read": _uah(p.cpu_active_ma, shape.fs_read_ms_send),
        "assoc": _uah(p.cpu_active_ma + p.radio_rx_ma, assoc_ms),
        "tls": _uah(radio, p.tls_ms),
        "publish": _uah(radio, shape.session_ms),
        "flash": _uah(p.cpu_active_ma, shape.flash_ms_send),
    })


def average_ua(p: BoardProfile, shape: WakeShape, interval_s: float, send_every: int,
               *, preset: bool | None = None) -> float:
    """Average current in µA: wakes every interval_s, a sending wake every send_every."""
    per_cycle_uah = (
        (send_every - 1) * sampling_wake(p, shape).uah
        + sending_wake(p, shape, preset=preset).uah
    )
    cycle_h = send_every * interval_s / 3600.0
    awake_h = (send_every * p.boot_ms
               + (send_every - 1) * (shape.sample_ms + shape.fs_read_ms_sample + shape.flash_ms_sample)) / 3.6e6
    sleep_uah = p.deep_sleep_ua * max(cycle_h - awake_h, 0.0)
    return (per_cycle_uah + sleep_uah) / cycle_h


def baseline_profile(p: BoardProfile) -> BoardProfile:
    """The board as a compiled connect-per-reading firmware boots it (BASELINE_BOOT_FRACTION)."""
    return replace(p, boot_ms=max(1, round(p.boot_ms * BASELINE_BOOT_FRACTION)))


def baseline_shape(shape: WakeShape, *, preset_wifi: bool = False) -> WakeShape:
    """A connect-per-reading node's wake: the sensor read, then Torpor's own session time
    (publish and the broker's answers); no flash queue, no Python modules to load."""
    return WakeShape(sample_ms=BASELINE_SENSOR_MS, session_ms=shape.session_ms,
                     flash_ms_sample=0.0, flash_ms_send=0.0, preset_wifi=preset_wifi)


def with_power_cut_timer(p: BoardProfile) -> BoardProfile:
    """The board unpowered between wakes by an external timer (POWER_CUT_TIMER_UA)."""
    return replace(p, deep_sleep_ua=POWER_CUT_TIMER_UA)


# A MicroPython build of one's own for the ESP32 family with ESP-IDF's
# CONFIG_BOOTLOADER_SKIP_VALIDATE_IN_DEEP_SLEEP: the second-stage bootloader does not hash
# the whole app image on a wake from deep sleep (power-ons still do; Torpor's own image
# signature check in boot.py is untouched). Measured on an ESP32-S3: 217 ms of a 635 ms
# wake-to-main.py (the glenn20 report above); taken as the same share of each ESP32
# profile's boot_ms. Torpor's tools flash stock MicroPython; this is not a build they make.
SKIP_VALIDATE_BOOT_FRACTION = 217.0 / 635.0


def with_skip_validate(p: BoardProfile) -> BoardProfile:
    """The board's boot without the IDF image validation on deep-sleep wakes."""
    return replace(p, boot_ms=max(1, round(p.boot_ms * (1 - SKIP_VALIDATE_BOOT_FRACTION))))


def battery_years(capacity_mah: float, avg_ua: float) -> float:
    return capacity_mah * 1000.0 / avg_ua / HOURS_PER_YEAR


def send_every_for(interval_s: float, upstream_within_s: float, cap: int = 255) -> int:
    """The most readings per send that still gets every reading upstream within the bound."""
    return max(1, min(cap, int(upstream_within_s // interval_s)))


def ledger_shape(ledgers: list[dict[str, tuple[int, float]]], *, preset_wifi: bool = True) -> WakeShape:
    """A WakeShape from sim energy ledgers (`tools.sim.field.parse_ledger` output)."""
    samples = [b for b in ledgers if "tls" not in b]
    sends = [b for b in ledgers if "tls" in b]

    def mean(rows: list[dict[str, tuple[int, float]]], key: str) -> float:
        vals = [r[key][0] for r in rows if key in r]
        return sum(vals) / len(vals) if vals else 0.0

    default = WakeShape()
    return WakeShape(
        sample_ms=mean(samples, "sample") or default.sample_ms,
        session_ms=(mean(sends, "publish") + mean(sends, "listen")) or default.session_ms,
        flash_ms_sample=mean(samples, "flash"),
        flash_ms_send=mean(sends, "flash"),
        preset_wifi=preset_wifi,
    )


def board_figures(p: BoardProfile, shape: WakeShape, *, upstream_within_s: float = 3600.0) -> dict[str, object]:
    """The per-board figures `torpor bench energy` reports (a model: see the module doc)."""
    out: dict[str, object] = {
        "model": "cited profile currents x durations; not a measurement of a real chip",
        "uah_per_sampling_wake": round(sampling_wake(p, shape).uah, 3),
        "uah_per_sending_wake": round(sending_wake(p, shape).uah, 3),
        "phases": {k: round(v, 3) for k, v in sending_wake(p, shape).phases.items()},
    }
    for label, interval in (("5min", 300.0), ("1min", 60.0)):
        n = send_every_for(interval, upstream_within_s)
        ua = average_ua(p, shape, interval, n)
        base = average_ua(baseline_profile(p), baseline_shape(shape), interval, 1)  # connect per reading
        out[f"send_every_{label}"] = n
        out[f"average_ua_{label}"] = round(ua, 2)
        out[f"battery_years_2aa_{label}"] = round(battery_years(CAPACITY_2AA_MAH, ua), 2)
        out[f"battery_years_18650_{label}"] = round(battery_years(CAPACITY_18650_MAH, ua), 2)
        out[f"ratio_to_connect_per_reading_{label}"] = round(base / ua, 2)
        out[f"ratio_to_send_every_1_{label}"] = round(average_ua(p, shape, interval, 1) / ua, 2)
    return out
