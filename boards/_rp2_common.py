# Board API for the Raspberry Pi Pico W and Pico 2 W (RP2040 / RP2350 with a CYW43 radio).
# The per-board modules set pins with configure() and re-export these functions.
#
# RP2 has no memory that survives deep sleep: machine.deepsleep() ends in a reset, and
# machine.reset_cause() then says WDT_RESET for deep sleeps, resets and real watchdog bites
# alike. So this module keeps "RTC memory" in a small flash file (RTC_FILE): its first byte
# records why the node is about to restart, the next four the wall clock to restore, the rest
# is the firmware's data. A power-on boot discards the file, so firmware sees the same
# semantics as on ESP32 (kept across deep sleep and resets, lost on power loss), at the cost
# of one flash write per rtc_memory_write() and per sleep.
import os
import time as _time

import _boot_cause
import _sht4x
import _wlan
import machine
import rp2
from _wlan import radio_down, radio_up, rssi  # noqa: F401 - the Board API's radio
from micropython import const

FS_ROOT = "/"
RTC_FILE = "/.rtcmem"

# Boot causes: the protocol's boot_cause enum, generated into _boot_cause.py.
POWER_ON = _boot_cause.POWER_ON
TIMER = _boot_cause.TIMER
WATCHDOG = _boot_cause.WATCHDOG
CRASH = _boot_cause.CRASH
SOFT_RESET = _boot_cause.SOFT_RESET
EXTERNAL_RESET = _boot_cause.EXTERNAL_RESET
BROWNOUT = _boot_cause.BROWNOUT

NO_HUMIDITY = const(0xFFFF)
RTC_MEMORY_SIZE = const(2048)
WDT_MAX_MS = const(8388)  # the RP2 watchdog's longest timeout
_NO_MARK = const(0xFF)
_HEADER = const(5)

_EPOCH_OFFSET = 946684800 if _time.gmtime(0)[0] == 2000 else 0

_cfg = {}
_i2c = None
_wdt = None
_cause = -1
_data = b""


def configure(**pins):
    # sda, scl, i2c (bus id), vbat_adc (ADC channel of VSYS/3), temp_adc (core temperature).
    _cfg.update(pins)


def _read_rtc_file():
    try:
        with open(RTC_FILE, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _write_rtc_file(mark, clock, data):
    header = bytearray(_HEADER)
    header[0] = mark
    header[1:5] = (clock & 0xFFFFFFFF).to_bytes(4, "little")
    tmp = RTC_FILE + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(data)
    os.rename(tmp, RTC_FILE)


def init():
    """Work out the boot cause, restore the clock after a deep sleep; flash is already at "/"."""
    global _cause, _data
    raw = _read_rtc_file()
    hw = machine.reset_cause()
    if hw == machine.PWRON_RESET or len(raw) < _HEADER:
        _cause = POWER_ON
        _data = b""
        if raw:
            os.remove(RTC_FILE)
        return
    mark = raw[0]
    _data = raw[_HEADER:]
    _cause = mark if mark != _NO_MARK else WATCHDOG
    if _cause == TIMER:
        clock = int.from_bytes(raw[1:5], "little")
        if clock:
            set_time(clock)
    if mark != _NO_MARK:
        # Clear the mark so that a later watchdog bite is not mistaken for this cause.
        _write_rtc_file(_NO_MARK, 0, _data)


def unique_id():
    return machine.unique_id()


def flash_block_device():
    return rp2.Flash()


def boot_cause():
    if _cause < 0:
        init()
    return _cause


def reset_cause():
    return boot_cause()


def wake_cause():
    return boot_cause()


# ---- sensors ----

def _bus():
    global _i2c
    if _i2c is None:
        _i2c = machine.I2C(
            _cfg.get("i2c", 0), sda=machine.Pin(_cfg["sda"]), scl=machine.Pin(_cfg["scl"]), freq=100000
        )
    return _i2c


def _chip_temp_centi():
    adc = machine.ADC(_cfg.get("temp_adc", 4))
    uv = adc.read_u16() * 3300000 // 65535
    # Datasheet: 0.706 V at 27 degC, -1.721 mV per degC.
    return 2700 - (uv - 706000) * 100 // 1721


def read_sensors():
    """(0.01 degC, 0.01 %RH) from an SHT4x at 0x44; core temperature and NO_HUMIDITY without it."""
    try:
        return _sht4x.measure(_bus())
    except OSError:
        return _chip_temp_centi(), NO_HUMIDITY


def battery_mv():
    """VSYS in mV. Read it with the radio down: GPIO29 is shared with the CYW43's SPI clock."""
    if _wlan.radio_active():
        return 0
    # GPIO25 high deselects the radio chip; GPIO29 becomes an analog input for the reading.
    cs = machine.Pin(25, machine.Pin.OUT, value=1)
    machine.Pin(29, machine.Pin.IN)
    adc = machine.ADC(_cfg.get("vbat_adc", 3))
    total = 0
    for _ in range(8):
        total += adc.read_u16()
    cs.value(0)
    # VSYS reaches the ADC through a 3:1 divider; full scale is 3.3 V.
    return total * 3 * 3300 // (8 * 65535)


# ---- sleep, RTC memory, clock ----

def deep_sleep(ms):
    radio_down()
    # The clock does not survive the reset that ends an RP2 deep sleep: store the wake time.
    _write_rtc_file(TIMER, time() + (ms + 999) // 1000, _data)
    machine.deepsleep(ms)


def rtc_memory():
    if _cause < 0:
        init()
    return bytes(_data)


def rtc_memory_write(data):
    global _data
    if len(data) > RTC_MEMORY_SIZE:
        raise ValueError("RTC memory holds 2048 bytes")
    _data = bytes(data)
    _write_rtc_file(_NO_MARK, 0, _data)


def time():
    return (_time.time() + _EPOCH_OFFSET) & 0xFFFFFFFF


def time_ms():
    # The same clock in unix milliseconds: a wake planned from whole seconds lands up to a
    # second after its grid point.
    return _time.time_ns() // 1000000 + _EPOCH_OFFSET * 1000


def set_time(seconds):
    t = _time.gmtime(seconds - _EPOCH_OFFSET)
    machine.RTC().datetime((t[0], t[1], t[2], t[6], t[3], t[4], t[5], 0))


# ---- LED, button, watchdog, reset ----

def led(on):
    # "LED" names the on-board LED, which on the W boards hangs off the radio chip.
    machine.Pin("LED", machine.Pin.OUT).value(1 if on else 0)


def button():
    """The BOOTSEL button (reading it briefly stalls flash access, so not from an IRQ)."""
    return rp2.bootsel_button() == 1


def watchdog_start(timeout_ms):
    global _wdt
    _wdt = machine.WDT(timeout=min(timeout_ms, WDT_MAX_MS))


def watchdog_feed():
    if _wdt is not None:
        _wdt.feed()


def reset():
    _write_rtc_file(SOFT_RESET, 0, _data)
    machine.reset()


def phase(name):
    """Energy-ledger phase marker: the sim board books time by it; nothing to do here."""


def pk_op(kind):
    """A public-key operation's charge on the sim board; it simply takes its time here."""
