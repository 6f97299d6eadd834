# Board module for ESP32-S3 DevKitC-1 style boards.
# Pins: SHT4x on I2C SDA=8 SCL=9; battery through a 100k/100k divider on GPIO1 (ADC1_CH0);
# WS2812 RGB LED on GPIO48; BOOT button on GPIO0, which also wakes the node (ext0).
import _esp32_common
from _esp32_common import *  # noqa: F403 - the Board API functions

NAME = "esp32s3"

_esp32_common.configure(
    sda=8, scl=9, vbat_pin=1, vbat_ratio=2, led=48, led_rgb=True, button=0, button_wake=True
)
