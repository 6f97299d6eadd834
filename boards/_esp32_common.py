# Board API for the ESP32 family (ESP32, ESP32-S3, ESP32-C3). The per-board modules set the
# pins with configure() and re-export these functions; see boards/README.md for the contract.
import time as _time

import _boot_cause
import _sht4x
import esp32
import machine
from _wlan import radio_down, radio_up, rssi  # noqa: F401 - the Board API's radio
from micropython import const

FS_ROOT = "/"

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

# Seconds between 1970-01-01 and the port's epoch (2000-01-01 on older firmware).
_EPOCH_OFFSET = 946684800 if _time.gmtime(0)[0] == 2000 else 0

_cfg = {}
_i2c = None
_wdt = None
_led_pin = None
_np = None


def configure(**pins):
    # sda, scl, vbat_pin, vbat_ratio (divider: battery mV per ADC mV), led, led_active_low,
    # led_rgb (a WS2812 on that pin), button, button_wake (ext0 wake on the button).
    _cfg.update(pins)


def init():
    # MicroPython's _boot.py has already mounted littlefs at "/"; nothing else must start.
    pass


def unique_id():
    return machine.unique_id()


def flash_block_device():
    # The "vfs" data partition is the block device the filesystem lives on.
    return esp32.Partition.find(esp32.Partition.TYPE_DATA, label="vfs")[0]


def reset_cause():
    rc = machine.reset_cause()
    if rc == machine.DEEPSLEEP_RESET:
        return TIMER if machine.wake_reason() == machine.TIMER_WAKE else EXTERNAL_RESET
    if rc == machine.WDT_RESET:
        # The port also reports panics and the task watchdog this way.
        return WATCHDOG
    if rc == machine.SOFT_RESET:
        return SOFT_RESET
    if rc == machine.HARD_RESET:
        return EXTERNAL_RESET
    return POWER_ON


def wake_cause():
    return reset_cause()


def boot_cause():
    return reset_cause()


# ---- sensors ----

def _bus():
    global _i2c
    if _i2c is None:
        _i2c = machine.I2C(0, sda=machine.Pin(_cfg["sda"]), scl=machine.Pin(_cfg["scl"]), freq=100000)
    return _i2c


def _chip_temp_centi():
    mcu = getattr(esp32, "mcu_temperature", None)
    if mcu is not None:
        return int(mcu() * 100)
    # The original ESP32 reports degF from an uncalibrated sensor: a last resort.
    return (esp32.raw_temperature() - 32) * 500 // 9


def read_sensors():
    """(0.01 degC, 0.01 %RH) from an SHT4x at 0x44; chip temperature and NO_HUMIDITY without it."""
    try:
        return _sht4x.measure(_bus())
    except OSError:
        return _chip_temp_centi(), NO_HUMIDITY


def battery_mv():
    pin = _cfg.get("vbat_pin")
    if pin is None:
        return 0
    adc = machine.ADC(machine.Pin(pin), atten=machine.ADC.ATTN_11DB)
    total = 0
    for _ in range(8):
        total += adc.read_uv()
    return int(total // 8000 * _cfg.get("vbat_ratio", 2))


# ---- sleep, RTC memory, clock ----

def deep_sleep(ms):
    radio_down()
    button = _cfg.get("button")
    if button is not None and _cfg.get("button_wake"):
        esp32.wake_on_ext0(machine.Pin(button), esp32.WAKEUP_ALL_LOW)
    machine.deepsleep(ms)


def rtc_memory():
    return bytes(machine.RTC().memory())


def rtc_memory_write(data):
    if len(data) > RTC_MEMORY_SIZE:
        raise ValueError("RTC memory holds 2048 bytes")
    machine.RTC().memory(data)


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
    global _led_pin, _np
    pin = _cfg.get("led")
    if pin is None:
        return
    if _cfg.get("led_rgb"):
        if _np is None:
            import neopixel

            _np = neopixel.NeoPixel(machine.Pin(pin), 1)
        _np[0] = (0, 16, 0) if on else (0, 0, 0)
        _np.write()
        return
    if _led_pin is None:
        _led_pin = machine.Pin(pin, machine.Pin.OUT)
    _led_pin.value((not on) if _cfg.get("led_active_low") else bool(on))


def button():
    pin = _cfg.get("button")
    if pin is None:
        return False
    return machine.Pin(pin, machine.Pin.IN, machine.Pin.PULL_UP).value() == 0


def watchdog_start(timeout_ms):
    # The hardware watchdog cannot be stopped once started; deep sleep pauses it.
    global _wdt
    _wdt = machine.WDT(timeout=timeout_ms)


def watchdog_feed():
    if _wdt is not None:
        _wdt.feed()


def reset():
    machine.reset()


def phase(name):
    """Energy-ledger phase marker: the sim board books time by it; nothing to do here."""


def pk_op(kind):
    """A public-key operation's charge on the sim board; it simply takes its time here."""
