# Torpor wire protocol constants a node needs before it sends (MicroPython firmware).
# Generated from shared/protocol/torpor.toml by `torpor proto gen`: generated, do not edit.
# The same values as in proto.py, which a wake imports only when it sends.
from micropython import const

# enum device_class
DEVICE_CLASS_SENSOR = const(0)
DEVICE_CLASS_ACTUATOR = const(1)
DEVICE_CLASS_GATEWAY = const(2)
DEVICE_CLASS_CONTROLLER = const(3)
DEVICE_CLASS_MONITOR = const(4)
# enum config_key
CONFIG_KEY_SAMPLE_INTERVAL_S = const(1)
CONFIG_KEY_SEND_EVERY = const(2)
CONFIG_KEY_SEND_MAX_AGE_S = const(3)
CONFIG_KEY_TEMP_HIGH = const(4)
CONFIG_KEY_TEMP_LOW = const(5)
CONFIG_KEY_HUMIDITY_HIGH = const(6)
CONFIG_KEY_AWAKE_WINDOW_MS = const(7)
CONFIG_KEY_LOW_BATTERY_MV = const(8)
CONFIG_KEY_ALIGN_S = const(9)
CONFIG_KEY_PRIORITY_ALARM = const(10)

# device class id -> (max_message, max_queue, max_downlink, wake_interval_s, heartbeat_s,
#                     budget_bytes_per_min, power_managed)
CLASS_LIMITS = {
    0: (1024, 4096, 32, 60, 3600, 2048, True),
    1: (1024, 1024, 64, 30, 600, 8192, True),
    2: (4096, 65535, 256, 10, 60, 65536, False),
    3: (2048, 8192, 128, 10, 300, 32768, False),
    4: (512, 2048, 16, 300, 7200, 1024, True),
}

# sensor schemas: a reading in the flash queue is RECORD_<SCHEMA> (u32 time, then values)
SCHEMA_ENV3 = const(1)
RECORD_ENV3 = '<IhHH'
RECORD_SIZE_ENV3 = const(10)
