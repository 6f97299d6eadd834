"""Board profiles: the file loads, bad rows are refused by board and key, every figure has a
cited row in docs/board-profiles.md, and the sim's own heap overhead stays under its bound."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.mpharness import micropython_binary
from tools.sim.profiles import (
    FIGURES,
    PROFILES_PATH,
    SIM_OVERHEAD_BYTES,
    ProfileError,
    get_profile,
    load_profiles,
)

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "board-profiles.md"
REAL = ("esp32", "esp32s3", "esp32c3", "pico_w", "pico2_w")
KINDS = {"datasheet", "source", "report", "estimate", "model"}


def _row(**over: object) -> str:
    base = tomllib.loads(PROFILES_PATH.read_text())["esp32"]
    base.update(over)
    lines = ["[demo]"]
    for k, v in base.items():
        if v is None:
            continue
        lines.append(f"{k} = {v!r}".replace("'", '"').replace("True", "true").replace("False", "false"))
    return "\n".join(lines) + "\n"


def _without(key: str) -> str:
    return "\n".join(line for line in _row().splitlines() if not line.startswith(key + " ")) + "\n"


def test_every_real_board_and_ideal_load() -> None:
    profiles = load_profiles()
    assert set(REAL) | {"ideal"} <= set(profiles)
    for name in REAL:
        p = profiles[name]
        assert not p.ideal and p.cold_boot_ms is not None and p.heap_for_unix_port() > p.gc_heap_wifi_bytes
        assert p.wifi_preset_ms < p.wifi_cold_ms and p.tls_ms > 0
    assert profiles["ideal"].heap_for_unix_port() == 0 and profiles["ideal"].cold_boot_ms is None
    assert get_profile("esp32").cold_boot_ms == 946_684_800_000  # 2000-01-01


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (_without("tls_handshake_ms"), r"'demo': missing key 'tls_handshake_ms'"),
        (_without("cold_boot_clock"), r"'demo': missing key 'cold_boot_clock'"),
        (_row(gc_heap_wifi_bytes="100K"), r"'demo': key 'gc_heap_wifi_bytes' must be an integer"),
        (_row(deep_sleep_ua=True), r"'demo': key 'deep_sleep_ua' must be a number"),
        (_row(gc_heap_wifi_bytes=100), r"'demo': key 'gc_heap_wifi_bytes' = 100 is absurd"),
        (_row(deep_sleep_ua=-5.0), r"'demo': key 'deep_sleep_ua' = -5.0 is absurd"),
        (_row(tls_handshake_ms=900_000), r"'demo': key 'tls_handshake_ms' = 900000 is absurd"),
        (_row(cold_boot_clock="yesterday"), r"'demo': cold_boot_clock 'yesterday' is not an ISO"),
        (_row(cold_boot_clock="1900-01-01T00:00:00Z"), r"'demo': cold_boot_clock .* is absurd"),
        (_row(wifi_preset_ms=5000), r"'demo': key 'wifi_preset_ms' is longer than wifi_cold_ms"),
        (_row(ecc_accelerator=True), r"'demo': missing key 'tls_handshake_accel_ms'"),
        (_row(tls_handshake_accel_ms=300), r"'demo': key 'tls_handshake_accel_ms' needs ecc_accelerator"),
        (_row(wifi_cold_msec=3), r"'demo': unknown key 'wifi_cold_msec'"),
        (_row(ideal=1), r"'demo': key 'ideal' must be true or false"),
    ],
)
def test_a_bad_profile_is_refused_naming_board_and_key(text: str, pattern: str) -> None:
    with pytest.raises(ProfileError, match=pattern):
        load_profiles(text=text)


def test_an_accelerated_profile_uses_its_accelerated_handshake() -> None:
    p = load_profiles(text=_row(ecc_accelerator=True, tls_handshake_accel_ms=400))["demo"]
    assert p.tls_ms == 400


def test_an_unknown_profile_name_lists_the_known_ones() -> None:
    with pytest.raises(ProfileError, match="no board profile 'esp8266'; known: esp32, "):
        get_profile("esp8266")


def _doc_rows() -> dict[tuple[str, str], tuple[str, str, str]]:
    rows: dict[tuple[str, str], tuple[str, str, str]] = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or cells[0] in ("board", "---") or cells[0].startswith("-"):
            continue
        board, key, value, kind, source = cells
        assert (board, key) not in rows, f"two rows for {board}.{key}"
        rows[(board, key)] = (value, kind, source)
    return rows


def _fmt(v: object) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def test_every_figure_has_a_cited_row_in_the_docs_and_they_agree() -> None:
    raw = tomllib.loads(PROFILES_PATH.read_text())
    rows = _doc_rows()
    for board, row in raw.items():
        for key in FIGURES:
            if key not in row:
                continue
            assert (board, key) in rows, f"docs/board-profiles.md has no row for {board}.{key}"
            value, kind, source = rows[(board, key)]
            assert value == _fmt(row[key]), f"{board}.{key}: docs say {value}, the profile {row[key]}"
            assert kind in KINDS, f"{board}.{key}: kind {kind!r}"
            assert source, f"{board}.{key} cites no source"
    extra = {(b, k) for b, k in rows if b not in raw or k not in raw[b]}
    assert not extra, f"docs rows for figures the profiles do not have: {sorted(extra)}"
    # Every reference-style link the table uses is defined.
    text = DOC.read_text()
    for ref in set(re.findall(r"\]\[([\w-]+)\]", text)):
        assert re.search(rf"^\[{re.escape(ref)}\]: https://", text, re.M), f"undefined link [{ref}]"


_OVERHEAD = """
import gc, sys
gc.collect(); a0 = gc.mem_alloc()
import sim
sim.configure(sys.argv[1])
sim.init()
sim.read_sensors(); sim.battery_mv(); sim.rtc_memory(); sim.time()
gc.collect()
print('OVERHEAD', gc.mem_alloc() - a0)
"""


def test_the_sim_boards_own_heap_stays_under_the_bound_left_out_of_the_budget(tmp_path: Path) -> None:
    binary = micropython_binary()
    if binary is None:
        pytest.skip("no MicroPython unix port")
    node = tmp_path / "n"
    node.mkdir()
    import json

    from tools.sim.field import FieldModel

    (node / "sim.json").write_text(json.dumps(FieldModel.named("esp32").sim_json(1)))
    (tmp_path / "probe.py").write_text(_OVERHEAD)
    proc = subprocess.run(
        [binary, str(tmp_path / "probe.py"), str(node)], capture_output=True, text=True, timeout=60,
        env={"MICROPYPATH": str(ROOT / "boards")},
    )
    m = re.search(r"OVERHEAD (\d+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    print(f"sim board overhead on the unix port: {m.group(1)} bytes (bound {SIM_OVERHEAD_BYTES})")
    assert int(m.group(1)) <= SIM_OVERHEAD_BYTES
