# Board module for the Raspberry Pi Pico 2 W (RP2350A + CYW43439).
# Same wiring as the Pico W: SHT4x on I2C0 SDA=GP4 SCL=GP5, VSYS/3 on ADC3 (GPIO29, shared with
# the radio's SPI), core temperature on ADC4 (RP2350A; the 80-pin RP2350B would use ADC8).
import _rp2_common
from _rp2_common import *  # noqa: F403 - the Board API functions

NAME = "pico2_w"

_rp2_common.configure(i2c=0, sda=4, scl=5, vbat_adc=3, temp_adc=4)
