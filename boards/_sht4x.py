# Sensirion SHT4x temperature/humidity sensor over I2C (also answers as SHT40/41/45 at 0x44).
# One high-precision measurement: command 0xFD, about 8.3 ms, six bytes with two CRC-8s.
import time

from micropython import const

ADDR = const(0x44)
_MEASURE_HIGH = const(0xFD)
_WAIT_MS = const(10)

_buf = bytearray(6)
_cmd = bytearray(1)


def _crc8(buf, start):
    crc = 0xFF
    for i in range(start, start + 2):
        crc ^= buf[i]
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def measure(i2c, addr=ADDR):
    """(temperature in 0.01 degC, humidity in 0.01 %RH); OSError if absent or corrupt."""
    _cmd[0] = _MEASURE_HIGH
    i2c.writeto(addr, _cmd)
    time.sleep_ms(_WAIT_MS)
    i2c.readfrom_into(addr, _buf)
    if _crc8(_buf, 0) != _buf[2] or _crc8(_buf, 3) != _buf[5]:
        raise OSError("SHT4x CRC mismatch")
    raw_t = (_buf[0] << 8) | _buf[1]
    raw_h = (_buf[3] << 8) | _buf[4]
    temp = -4500 + (17500 * raw_t) // 65535
    hum = -600 + (12500 * raw_h) // 65535
    return temp, max(0, min(10000, hum))
