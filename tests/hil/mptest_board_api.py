# The Board API on the board under test: the same checks on a real board (HIL) and on the
# sim board. Tests that need a real radio or sensor skip on the sim board with a reason.
import time

import mpunit

try:
    import board
except ImportError:
    board = None


def _board():
    if board is None:
        raise mpunit.SkipTest("needs a board module: runs on a board via `torpor hil` (tests/tools/test_hil.py runs it on the virtual board)")
    return board


def test_name_and_boot_causes():
    b = _board()
    assert b.NAME in ("esp32", "esp32s3", "esp32c3", "pico_w", "pico2_w", "sim"), b.NAME
    mpunit.eq((b.POWER_ON, b.TIMER, b.WATCHDOG, b.CRASH), (0, 1, 2, 3))
    b.init()
    assert 0 <= b.boot_cause() <= 6


def test_unique_id_is_stable():
    b = _board()
    uid = b.unique_id()
    assert isinstance(uid, bytes) and 4 <= len(uid) <= 16
    mpunit.eq(uid, b.unique_id())


def test_rtc_memory_round_trip():
    b = _board()
    b.init()
    old = b.rtc_memory()
    b.rtc_memory_write(b"torpor-hil")
    try:
        mpunit.eq(b.rtc_memory()[:10], b"torpor-hil")
    finally:
        b.rtc_memory_write(old)


def test_clock_is_plausible_and_ticks_advance():
    b = _board()
    t0 = time.ticks_ms()
    time.sleep_ms(20)
    assert time.ticks_diff(time.ticks_ms(), t0) >= 15
    assert b.time() >= 0


def test_battery_reading_in_range():
    b = _board()
    b.init()
    mv = b.battery_mv()
    assert mv == 0 or 2500 <= mv <= 4500, mv


def test_sensor_reading():
    b = _board()
    if b.NAME == "sim":
        raise mpunit.SkipTest("needs a real temperature/humidity sensor")
    b.init()
    temp, hum = b.read_sensors()
    assert -4000 <= temp <= 8500, temp
    assert hum == 0xFFFF or 0 <= hum <= 10000, hum


def test_radio_joins_configured_network():
    b = _board()
    if b.NAME == "sim":
        raise mpunit.SkipTest("needs a real radio")
    import json

    try:
        with open("/config.json") as f:
            cfg = json.load(f)
    except OSError:
        raise mpunit.SkipTest("no /config.json with Wi-Fi credentials (torpor flash)")
    if not cfg.get("wifi_ssid"):
        raise mpunit.SkipTest("no Wi-Fi network in /config.json")
    try:
        assert b.radio_up(cfg["wifi_ssid"], cfg.get("wifi_password", ""), 15000)
        assert b.rssi() < 0
    finally:
        b.radio_down()


def test_flash_filesystem_write_read():
    b = _board()
    import os

    path = "/hil_tmp.bin"
    data = bytes(range(256)) * 8
    with open(path, "wb") as f:
        f.write(data)
    try:
        with open(path, "rb") as f:
            mpunit.eq(f.read(), data)
        st = os.statvfs("/")
        assert st[0] * st[3] > 0
    finally:
        os.remove(path)
    assert b.flash_block_device() is not None or b.NAME != "sim"
