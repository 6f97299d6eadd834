# Torpor boot causes for the board modules (MicroPython): the protocol's boot_cause enum.
# Generated from shared/protocol/torpor.toml by `torpor proto gen`: generated, do not edit.
from micropython import const

POWER_ON = const(0)
TIMER = const(1)
WATCHDOG = const(2)
CRASH = const(3)
SOFT_RESET = const(4)
EXTERNAL_RESET = const(5)
BROWNOUT = const(6)
