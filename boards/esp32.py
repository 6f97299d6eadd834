# Board module for a generic ESP32 (ESP32-WROOM/WROVER DevKitC-style boards).
# Pins: SHT4x on I2C SDA=21 SCL=22; battery through a 100k/100k divider on GPIO35 (ADC1_CH7);
# LED on GPIO2; BOOT button on GPIO0, which also wakes the node from deep sleep (ext0).
import _esp32_common
from _esp32_common import *  # noqa: F403 - the Board API functions

NAME = "esp32"

_esp32_common.configure(
    sda=21, scl=22, vbat_pin=35, vbat_ratio=2, led=2, button=0, button_wake=True
)
