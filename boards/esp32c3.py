# Board module for ESP32-C3 DevKitM-1 style boards.
# Pins: SHT4x on I2C SDA=4 SCL=5; battery through a 100k/100k divider on GPIO3 (ADC1_CH3);
# WS2812 RGB LED on GPIO8; BOOT button on GPIO9 (no ext0 wake on the C3: timer wake only).
import _esp32_common
from _esp32_common import *  # noqa: F403 - the Board API functions

NAME = "esp32c3"

_esp32_common.configure(
    sda=4, scl=5, vbat_pin=3, vbat_ratio=2, led=8, led_rgb=True, button=9, button_wake=False
)
