"""Board profiles (boards/profiles.toml): load, check, and derive the sim's figures from them.

A profile is refused at load when a key is missing, unknown, of the wrong type or outside its
plausible range; the error names the board and the key. `heap_for_unix_port()` turns a
profile's GC heap into the `-X heapsize=` of the 64-bit unix port (see docs/board-profiles.md
for the factor and how it was measured).
"""

from __future__ import annotations

import datetime as dt
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PROFILES_PATH = Path(__file__).resolve().parents[2] / "boards" / "profiles.toml"
# What `torpor sim node|fleet|board` run under unless told otherwise: a real board, so what a
# user tries meets the field's durations, heap and cold clock. (Code that builds a SimNode,
# Fleet or VirtualBoard itself gets the kind model unless it passes a FieldModel.)
DEFAULT_PROFILE = "esp32"

# Pointer-sized objects take twice the room on the 64-bit unix port (measured: the same list
# and dict 2,112 bytes there against 1,088 on the 32-bit WebAssembly port; 50 small instances
# 5,344 against 2,720). Byte buffers do not grow, so the unix-port limit is lenient by up to
# this factor for buffer-heavy code: the WebAssembly port gives the figure at the chip's size.
WORD_FACTOR = 2.0
# What the sim board's own Python parts (sim.py, simflash.py and its littlefs block device,
# json) hold on the unix port's heap after init(): not on a chip, so added on top of the
# profile's heap. Measured by tests/tools/test_profiles.py (docs/board-profiles.md).
SIM_OVERHEAD_BYTES = 34 * 1024


class ProfileError(Exception):
    """A board profile that cannot be used; the message names the board and the key."""


# key -> (type, minimum for a real board, maximum). `ideal` may go down to 0 where noted by
# IDEAL_ZERO. Bounds reject absurd values (a typo of a unit, a sign), not unusual boards.
# A TLS-PSK handshake has no public-key operation: in the unix port it took about 1/40 of
# the node CPU of a mutual-TLS one with P-256 certificates (docs/credentials.md,
# tests/firmware/test_tls_psk.py). The profiles' PSK handshake is that share of theirs.
PSK_CPU_FRACTION = 1 / 40
_NUM = (int, float)
FIELDS: dict[str, tuple[type | tuple[type, ...], float, float]] = {
    "gc_heap_wifi_bytes": (int, 16 * 1024, 8 * 1024 * 1024),
    "rtc_memory_bytes": (int, 256, 64 * 1024),
    "rtc_drift_ppm": (_NUM, 0.0, 100_000.0),
    "wake_jitter_ms": (int, 0, 5_000),
    "boot_ms": (int, 10, 10_000),
    "wifi_cold_ms": (int, 100, 30_000),
    "wifi_preset_ms": (int, 20, 30_000),
    "tls_handshake_ms": (int, 50, 60_000),
    "ed25519_verify_ms": (int, 1, 120_000),
    "cpu_active_ma": (_NUM, 0.5, 500.0),
    "radio_tx_ma": (_NUM, 1.0, 1_000.0),
    "radio_rx_ma": (_NUM, 1.0, 1_000.0),
    "radio_listen_ma": (_NUM, 0.1, 1_000.0),
    "deep_sleep_ua": (_NUM, 0.1, 20_000.0),
    "flash_erase_cycles": (int, 1_000, 10_000_000),
    "flash_erase_4k_ms": (int, 1, 2_000),
    "flash_program_256_ms": (_NUM, 0.01, 100.0),
    "watchdog_max_ms": (int, 0, 3_600_000),  # 0: no limit the firmware would meet
}
IDEAL_ZERO = frozenset({
    "gc_heap_wifi_bytes", "boot_ms", "wifi_cold_ms", "wifi_preset_ms", "tls_handshake_ms",
    "ed25519_verify_ms", "flash_erase_4k_ms", "flash_program_256_ms",
})
OPTIONAL: dict[str, tuple[type | tuple[type, ...], float, float]] = {
    "tls_handshake_accel_ms": (int, 20, 60_000),
}
STRINGS = ("description", "cold_boot_clock")
FLAGS = ("ecc_accelerator",)
FIGURES = tuple(FIELDS) + tuple(OPTIONAL) + ("cold_boot_clock",)  # what docs must cite


@dataclass(frozen=True, slots=True)
class BoardProfile:
    name: str
    description: str
    ideal: bool
    gc_heap_wifi_bytes: int
    rtc_memory_bytes: int
    rtc_drift_ppm: float
    wake_jitter_ms: int
    cold_boot_clock: str
    boot_ms: int
    wifi_cold_ms: int
    wifi_preset_ms: int
    ecc_accelerator: bool
    tls_handshake_ms: int
    ed25519_verify_ms: int
    cpu_active_ma: float
    radio_tx_ma: float
    radio_rx_ma: float
    radio_listen_ma: float
    deep_sleep_ua: float
    flash_erase_cycles: int
    flash_erase_4k_ms: int
    flash_program_256_ms: float
    watchdog_max_ms: int
    tls_handshake_accel_ms: int | None = None

    @property
    def cold_boot_ms(self) -> int | None:
        """The RTC after a power-on in unix ms; None: the true time ("host")."""
        if self.cold_boot_clock == "host":
            return None
        return int(_parse_clock(self.name, self.cold_boot_clock).timestamp() * 1000)

    @property
    def tls_ms(self) -> int:
        """The handshake as the firmware meets it: with the accelerator where there is one."""
        if self.ecc_accelerator and self.tls_handshake_accel_ms is not None:
            return self.tls_handshake_accel_ms
        return self.tls_handshake_ms

    @property
    def tls_psk_ms(self) -> int:
        """A TLS-PSK handshake as the firmware meets it: a model, the mutual-TLS handshake
        scaled by the node CPU ratio measured in the unix port (PSK_CPU_FRACTION)."""
        return max(1, round(self.tls_ms * PSK_CPU_FRACTION))

    def heap_for_unix_port(self) -> int:
        """`-X heapsize=` for the unix port (bytes); 0 for no limit (ideal)."""
        if self.gc_heap_wifi_bytes == 0:
            return 0
        return int(self.gc_heap_wifi_bytes * WORD_FACTOR) + SIM_OVERHEAD_BYTES

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["cold_boot_ms"] = self.cold_boot_ms
        doc["tls_ms"] = self.tls_ms
        doc["tls_psk_ms"] = self.tls_psk_ms
        return doc


def _parse_clock(board: str, text: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ProfileError(
            f"board profile {board!r}: cold_boot_clock {text!r} is not an ISO date-time or 'host'"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    if not 1970 <= when.year <= 2099:
        raise ProfileError(f"board profile {board!r}: cold_boot_clock {text!r} is absurd")
    return when


def check_profile(name: str, row: Any) -> BoardProfile:
    """One row of the profiles file, checked; ProfileError naming board and key otherwise."""
    if not isinstance(row, dict):
        raise ProfileError(f"board profile {name!r}: expected a table of keys")
    ideal = row.get("ideal", False)
    if not isinstance(ideal, bool):
        raise ProfileError(f"board profile {name!r}: key 'ideal' must be true or false")
    known = set(FIELDS) | set(OPTIONAL) | set(STRINGS) | set(FLAGS) | {"ideal"}
    for key in row:
        if key not in known:
            raise ProfileError(f"board profile {name!r}: unknown key {key!r}")
    values: dict[str, Any] = {"name": name, "ideal": ideal}
    for key in STRINGS:
        if key not in row:
            raise ProfileError(f"board profile {name!r}: missing key {key!r}")
        if not isinstance(row[key], str) or not row[key].strip():
            raise ProfileError(f"board profile {name!r}: key {key!r} must be a non-empty string")
        values[key] = row[key]
    if values["cold_boot_clock"] != "host":
        _parse_clock(name, values["cold_boot_clock"])
    for key in FLAGS:
        if key not in row:
            raise ProfileError(f"board profile {name!r}: missing key {key!r}")
        if not isinstance(row[key], bool):
            raise ProfileError(f"board profile {name!r}: key {key!r} must be true or false")
        values[key] = row[key]
    bounds: list[tuple[str, tuple[type | tuple[type, ...], float, float]]] = [
        *FIELDS.items(), *OPTIONAL.items()
    ]
    for key, (typ, lo, hi) in bounds:
        if key not in row:
            if key in OPTIONAL:
                continue
            raise ProfileError(f"board profile {name!r}: missing key {key!r}")
        v: Any = row[key]
        if isinstance(v, bool) or not isinstance(v, typ):
            want = "an integer" if typ is int else "a number"
            raise ProfileError(f"board profile {name!r}: key {key!r} must be {want}, not {v!r}")
        num: float = row[key]
        low = 0 if ideal and key in IDEAL_ZERO else lo
        if not low <= num <= hi:
            raise ProfileError(
                f"board profile {name!r}: key {key!r} = {v!r} is absurd (expected {low}..{hi})"
            )
        values[key] = float(num) if typ == _NUM else num
    if values["ecc_accelerator"] and "tls_handshake_accel_ms" not in values:
        raise ProfileError(
            f"board profile {name!r}: missing key 'tls_handshake_accel_ms' (ecc_accelerator is true)"
        )
    if not values["ecc_accelerator"] and "tls_handshake_accel_ms" in values:
        raise ProfileError(
            f"board profile {name!r}: key 'tls_handshake_accel_ms' needs ecc_accelerator = true"
        )
    if values["wifi_preset_ms"] > values["wifi_cold_ms"]:
        raise ProfileError(
            f"board profile {name!r}: key 'wifi_preset_ms' is longer than wifi_cold_ms"
        )
    return BoardProfile(**values)


def load_profiles(path: Path | None = None, text: str | None = None) -> dict[str, BoardProfile]:
    """Every profile of the file (or of `text`), checked."""
    path = path or PROFILES_PATH
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ProfileError(f"cannot read board profiles {path}: {exc}") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from exc
    return {name: check_profile(name, row) for name, row in raw.items()}


def get_profile(name: str, path: Path | None = None) -> BoardProfile:
    profiles = load_profiles(path)
    if name not in profiles:
        raise ProfileError(
            f"no board profile {name!r}; known: {', '.join(sorted(profiles))}"
        )
    return profiles[name]


def profile_names(path: Path | None = None) -> list[str]:
    return sorted(load_profiles(path))
