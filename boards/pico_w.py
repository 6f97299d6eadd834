# Board module for the Raspberry Pi Pico W (RP2040 + CYW43439).
# Pins: SHT4x on I2C0 SDA=GP4 SCL=GP5; VSYS/3 on ADC3 (GPIO29, shared with the radio's SPI);
# core temperature on ADC4; LED on the radio chip ("LED"); BOOTSEL as the button.
import _rp2_common
from _rp2_common import *  # noqa: F403 - the Board API functions

NAME = "pico_w"

_rp2_common.configure(i2c=0, sda=4, scl=5, vbat_adc=3, temp_adc=4)
