# Torpor wire facts for the bootloader and the board modules (MicroPython firmware).
# Generated from shared/protocol/torpor.toml by `torpor proto gen`: generated, do not edit.
# Installed with the bootloader (not in an image): the same values as in proto.py.
from micropython import const

# [bootloader] version: an image's manifest names the lowest it needs (min_bootloader)
BOOTLOADER_VERSION = const(1)
# largest signed manifest an image may carry (OTA_MANIFEST's manifest field)
MAX_MANIFEST = const(2048)

# enum boot_cause
BOOT_CAUSE_POWER_ON = const(0)
BOOT_CAUSE_TIMER = const(1)
BOOT_CAUSE_WATCHDOG = const(2)
BOOT_CAUSE_CRASH = const(3)
BOOT_CAUSE_SOFT_RESET = const(4)
BOOT_CAUSE_EXTERNAL_RESET = const(5)
BOOT_CAUSE_BROWNOUT = const(6)
# enum ota_state
OTA_STATE_IDLE = const(0)
OTA_STATE_DOWNLOADING = const(1)
OTA_STATE_VERIFYING = const(2)
OTA_STATE_TRIAL = const(3)
OTA_STATE_CONFIRMED = const(4)
OTA_STATE_REVERTED = const(5)
OTA_STATE_FAILED = const(6)
OTA_STATE_REFUSED = const(7)
# enum ota_reason
OTA_REASON_NONE = const(0)
OTA_REASON_BAD_SIGNATURE = const(1)
OTA_REASON_UNKNOWN_KEY = const(2)
OTA_REASON_BAD_HASH = const(3)
OTA_REASON_MISSING_FILE = const(4)
OTA_REASON_WRONG_BOARD = const(5)
OTA_REASON_DOWNGRADE = const(6)
OTA_REASON_TRUNCATED = const(7)
OTA_REASON_LOW_BATTERY = const(8)
OTA_REASON_HEALTH_CHECK = const(9)
OTA_REASON_CRASHED = const(10)
OTA_REASON_NO_SPACE = const(11)
OTA_REASON_BAD_MANIFEST = const(12)
