# Torpor wire facts for the bootloader (MicroPython firmware).
# Generated from shared/protocol/torpor.toml by `torpor proto gen`: generated, do not edit.
# Installed with the bootloader (not in an image): the same values as in proto.py.
from micropython import const

# [bootloader] version: an image's manifest names the lowest it needs (min_bootloader)
BOOTLOADER_VERSION = const(1)
# largest signed manifest an image may carry (OTA_MANIFEST's manifest field)
MAX_MANIFEST = const(3072)

# enum boot_cause
POWER_ON = const(0)
TIMER = const(1)
WATCHDOG = const(2)
CRASH = const(3)
SOFT_RESET = const(4)
EXTERNAL_RESET = const(5)
BROWNOUT = const(6)

# enum ota_state
IDLE = const(0)
DOWNLOADING = const(1)
VERIFYING = const(2)
TRIAL = const(3)
CONFIRMED = const(4)
REVERTED = const(5)
FAILED = const(6)
REFUSED = const(7)

# enum ota_reason
NONE = const(0)
BAD_SIGNATURE = const(1)
UNKNOWN_KEY = const(2)
BAD_HASH = const(3)
MISSING_FILE = const(4)
WRONG_BOARD = const(5)
DOWNGRADE = const(6)
TRUNCATED = const(7)
LOW_BATTERY = const(8)
HEALTH_CHECK = const(9)
CRASHED = const(10)
NO_SPACE = const(11)
BAD_MANIFEST = const(12)
