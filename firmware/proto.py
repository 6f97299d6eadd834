# Torpor wire protocol codec for MicroPython (the firmware).
# Generated from shared/protocol/torpor.toml by `torpor proto gen`: generated, do not edit.
# Encoders write into a caller's buffer (at least MAX_<FRAME> bytes) and return the length;
# decoders return tuples indexed by the <FRAME>_<FIELD> constants and raise ProtocolError.
from micropython import const
import struct

MAJOR = const(1)
MINOR = const(5)
VERSION_BYTE = const(0x15)
HEADER_SIZE = const(6)
MAX_FRAME = const(4096)

# frame types and their largest encoding
HELLO = const(1)
MAX_HELLO = const(133)
BURST = const(2)
MAX_BURST = const(3579)
ACK = const(3)
MAX_ACK = const(276)
COMMAND = const(4)
MAX_COMMAND = const(314)
COMMAND_RESULT = const(5)
MAX_COMMAND_RESULT = const(103)
SHADOW_REPORT = const(6)
MAX_SHADOW_REPORT = const(91)
SHADOW_DELTA = const(7)
MAX_SHADOW_DELTA = const(91)
OTA_MANIFEST = const(8)
MAX_OTA_MANIFEST = const(3155)
OTA_CHUNK = const(9)
MAX_OTA_CHUNK = const(2062)
OTA_STATUS = const(10)
MAX_OTA_STATUS = const(67)
SLEEP_NOW = const(11)
MAX_SLEEP_NOW = const(13)
ERROR = const(12)
MAX_ERROR = const(78)
CSR_UP = const(13)
MAX_CSR_UP = const(524)

# enum device_class
DEVICE_CLASS_SENSOR = const(0)
DEVICE_CLASS_ACTUATOR = const(1)
DEVICE_CLASS_GATEWAY = const(2)
DEVICE_CLASS_CONTROLLER = const(3)
DEVICE_CLASS_MONITOR = const(4)
_E_DEVICE_CLASS = (0, 1, 2, 3, 4,)
# enum boot_cause
BOOT_CAUSE_POWER_ON = const(0)
BOOT_CAUSE_TIMER = const(1)
BOOT_CAUSE_WATCHDOG = const(2)
BOOT_CAUSE_CRASH = const(3)
BOOT_CAUSE_SOFT_RESET = const(4)
BOOT_CAUSE_EXTERNAL_RESET = const(5)
BOOT_CAUSE_BROWNOUT = const(6)
_E_BOOT_CAUSE = (0, 1, 2, 3, 4, 5, 6,)
# enum command_op
COMMAND_OP_PING = const(0)
COMMAND_OP_SET_INTERVAL = const(1)
COMMAND_OP_SET_THRESHOLDS = const(2)
COMMAND_OP_STAY_AWAKE = const(3)
COMMAND_OP_REBOOT = const(4)
COMMAND_OP_SYNC_TIME = const(5)
COMMAND_OP_ROTATE_KEY = const(6)
COMMAND_OP_INSTALL_CERT = const(7)
COMMAND_OP_SET_KEYS = const(8)
COMMAND_OP_INSTALL_PSK = const(12)
_E_COMMAND_OP = (0, 1, 2, 3, 4, 5, 6, 7, 8, 12,)
# enum result_status
RESULT_STATUS_OK = const(0)
RESULT_STATUS_DUPLICATE = const(1)
RESULT_STATUS_ERROR = const(2)
RESULT_STATUS_UNKNOWN_OP = const(3)
RESULT_STATUS_BAD_ARGS = const(4)
RESULT_STATUS_EXPIRED = const(5)
RESULT_STATUS_REFUSED = const(6)
_E_RESULT_STATUS = (0, 1, 2, 3, 4, 5, 6,)
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
_E_CONFIG_KEY = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10,)
# enum ota_state
OTA_STATE_IDLE = const(0)
OTA_STATE_DOWNLOADING = const(1)
OTA_STATE_VERIFYING = const(2)
OTA_STATE_TRIAL = const(3)
OTA_STATE_CONFIRMED = const(4)
OTA_STATE_REVERTED = const(5)
OTA_STATE_FAILED = const(6)
OTA_STATE_REFUSED = const(7)
_E_OTA_STATE = (0, 1, 2, 3, 4, 5, 6, 7,)
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
_E_OTA_REASON = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,)
# enum cred_outcome
CRED_OUTCOME_NONE = const(0)
CRED_OUTCOME_ROTATED = const(1)
CRED_OUTCOME_REFUSED = const(2)
CRED_OUTCOME_NO_SESSION = const(3)
CRED_OUTCOME_MISMATCH = const(4)
CRED_OUTCOME_ABORTED = const(5)
CRED_OUTCOME_REPROVISIONED = const(6)
_E_CRED_OUTCOME = (0, 1, 2, 3, 4, 5, 6,)
# enum error_code
ERROR_CODE_MALFORMED = const(1)
ERROR_CODE_UNKNOWN_FRAME = const(2)
ERROR_CODE_UNSUPPORTED_VERSION = const(3)
ERROR_CODE_TOO_LARGE = const(4)
ERROR_CODE_RATE_LIMITED = const(5)
ERROR_CODE_QUARANTINED = const(6)
ERROR_CODE_INTERNAL = const(7)
ERROR_CODE_NOT_PROVISIONED = const(8)
_E_ERROR_CODE = (1, 2, 3, 4, 5, 6, 7, 8,)

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
# schema id -> (record size, (offset, width, signed) per value)
_SCHEMA_COLS = {
    1: (10, ((4, 2, True), (6, 2, False), (8, 2, False),)),
}

# indices into decoded tuples (0 is always the message id)
HELLO_FW_VERSION = const(1)
HELLO_BOOT_CAUSE = const(2)
HELLO_BATTERY_MV = const(3)
HELLO_RSSI = const(4)
HELLO_FREE_MEM = const(5)
HELLO_QUEUE_DEPTH = const(6)
HELLO_DROPPED = const(7)
HELLO_NEXT_WAKE_S = const(8)
HELLO_AWAKE_WINDOW_MS = const(9)
HELLO_TIME = const(10)
HELLO_DEVICE_CLASS = const(11)
HELLO_CONFIG_VERSION = const(12)
HELLO_OTA_STATE = const(13)
HELLO_OTA_REASON = const(14)
HELLO_SAFE_MODE = const(15)
HELLO_BOOTS_WITHOUT_SEND = const(16)
HELLO_MCU_TEMP = const(17)
HELLO_FIRST_ID = const(18)
HELLO_NEXT_LISTEN_S = const(19)
HELLO_CLOCK_UNSET = const(20)
HELLO_CERT_SERIAL = const(21)
HELLO_CRED_OUTCOME = const(22)
HELLO_CRED_ROTATION = const(23)
HELLO_KEYS_SEQ = const(24)
HELLO_SESSION_KEY = const(25)
HELLO_PREV_AWAKE_MS = const(26)
HELLO_PREV_RADIO_MS = const(27)
HELLO_PREV_SENT = const(28)
BURST_SCHEMA = const(1)
BURST_INTERVAL = const(2)
BURST_READINGS = const(3)
BURST_NODE_CLOCK = const(4)
ACK_CUMULATIVE = const(1)
ACK_SELECTIVE = const(2)
ACK_TIME = const(3)
ACK_PENDING = const(4)
COMMAND_COMMAND_ID = const(1)
COMMAND_OP = const(2)
COMMAND_ARGS = const(3)
COMMAND_PRIORITY = const(4)
COMMAND_TTL_S = const(5)
COMMAND_DATA = const(6)
COMMAND_EXPIRES_AT = const(7)
COMMAND_RESULT_COMMAND_ID = const(1)
COMMAND_RESULT_STATUS = const(2)
COMMAND_RESULT_CODE = const(3)
COMMAND_RESULT_DETAIL = const(4)
COMMAND_RESULT_VALUES = const(5)
SHADOW_REPORT_CONFIG_VERSION = const(1)
SHADOW_REPORT_ENTRIES = const(2)
SHADOW_DELTA_CONFIG_VERSION = const(1)
SHADOW_DELTA_ENTRIES = const(2)
OTA_MANIFEST_VERSION = const(1)
OTA_MANIFEST_TOTAL_SIZE = const(2)
OTA_MANIFEST_CHUNK_SIZE = const(3)
OTA_MANIFEST_MANIFEST = const(4)
OTA_MANIFEST_SIGNATURE = const(5)
OTA_CHUNK_VERSION = const(1)
OTA_CHUNK_INDEX = const(2)
OTA_CHUNK_DATA = const(3)
OTA_STATUS_VERSION = const(1)
OTA_STATUS_STATE = const(2)
OTA_STATUS_CHUNKS = const(3)
OTA_STATUS_REASON = const(4)
OTA_STATUS_DETAIL = const(5)
SLEEP_NOW_SLEEP_S = const(1)
SLEEP_NOW_PENDING = const(2)
ERROR_CODE = const(1)
ERROR_REF = const(2)
ERROR_DETAIL = const(3)
CSR_UP_ROTATION = const(1)
CSR_UP_CSR = const(2)


class ProtocolError(ValueError):
    # code: the error_code value an ERROR frame answering this failure carries
    code = ERROR_CODE_MALFORMED


def _err(name, off, why, code=ERROR_CODE_MALFORMED):
    e = ProtocolError("%s at byte %d: %s" % (name, off, why))
    e.code = code
    return e


def _header(buf, n, ftype, name):
    if n < HEADER_SIZE:
        raise _err(name, n, "truncated header")
    if n > MAX_FRAME:
        raise _err(name, MAX_FRAME, "frame too large", ERROR_CODE_TOO_LARGE)
    v = buf[0]
    if v >> 4 != MAJOR:
        raise _err(name, 0, "unsupported protocol version %d.%d" % (v >> 4, v & 15),
                   ERROR_CODE_UNSUPPORTED_VERSION)
    if buf[1] != ftype:
        raise _err(name, 1, "frame type %d is not %s" % (buf[1], name))
    return v & 15


def _msg_id(buf):
    return buf[2] | buf[3] << 8 | buf[4] << 16 | buf[5] << 24


def _put_header(buf, ftype, msg_id):
    buf[0] = VERSION_BYTE
    buf[1] = ftype
    buf[2] = msg_id & 0xFF
    buf[3] = (msg_id >> 8) & 0xFF
    buf[4] = (msg_id >> 16) & 0xFF
    buf[5] = (msg_id >> 24) & 0xFF


def _uv(buf, off, n, name):
    # returns the value; the new offset is left in _pos[0] (no tuple per call)
    r = 0
    s = 0
    while True:
        if off >= n:
            raise _err(name, off, "truncated varint")
        b = buf[off]
        off += 1
        r |= (b & 0x7F) << s
        if b < 0x80:
            if b == 0 and s:
                raise _err(name, off - 1, "overlong varint")
            break
        s += 7
        if s >= 35:
            raise _err(name, off, "varint longer than 5 bytes")
    if r > 0xFFFFFFFF:
        raise _err(name, off, "varint exceeds 32 bits")
    _pos[0] = off
    return r


_pos = [0, 0]  # offset after the last read, tag of the last TLV


def _put_uv(buf, off, v):
    while v >= 0x80:
        buf[off] = (v & 0x7F) | 0x80
        v >>= 7
        off += 1
    buf[off] = v
    return off + 1


def _uv_size(v):
    n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


def _need(off, size, n, name, field):
    if off + size > n:
        raise _err(name, n, field + ": truncated")


def _length(buf, off, n, name, field, limit):
    ln = _uv(buf, off, n, name)
    if ln > limit:
        raise _err(name, off, "%s: length %d exceeds the maximum %d" % (field, ln, limit))
    return ln


def _enum(v, valid, name, off, field):
    if v not in valid:
        raise _err(name, off, "%s: %d is not a valid value" % (field, v))
    return v


def _bool(v, name, off, field):
    if v > 1:
        raise _err(name, off, field + ": not a bool")
    return v == 1


def _text(buf, off, ln, name, field):
    try:
        return str(bytes(buf[off:off + ln]), "utf-8")
    except Exception:
        raise _err(name, off, field + ": not UTF-8")


def _put_raw(buf, off, data, limit, name, field):
    n = len(data)
    if n > limit:
        raise _err(name, off, "%s: %d bytes exceeds the maximum %d" % (field, n, limit))
    off = _put_uv(buf, off, n)
    buf[off:off + n] = data
    return off + n


def _fixed_tlv(fmt, size, buf, off, ln, name, field):
    if ln != size:
        raise _err(name, off, "%s: length %d, expected %d" % (field, ln, size))
    return struct.unpack_from(fmt, buf, off)[0]


def _put_zz(buf, off, d):
    z = (d << 1) if d >= 0 else ((-d) << 1) - 1
    while z >= 0x80:
        buf[off] = (z & 0x7F) | 0x80
        z >>= 7
        off += 1
    buf[off] = z
    return off + 1


def _rd(recs, p, width, signed):
    if width == 1:
        v = recs[p]
    elif width == 2:
        v = recs[p] | recs[p + 1] << 8
    else:
        v = recs[p] | recs[p + 1] << 8 | recs[p + 2] << 16 | recs[p + 3] << 24
    if signed and v >= 1 << (8 * width - 1):
        v -= 1 << (8 * width)
    return v


def _dt(recs, p, q):
    # seconds between two u32 timestamps, from 16-bit halves so a 32-bit port needs no big int
    return ((recs[q + 2] | recs[q + 3] << 8) - (recs[p + 2] | recs[p + 3] << 8)) * 65536 + (
        (recs[q] | recs[q + 1] << 8) - (recs[p] | recs[p + 1] << 8))


def _encode_series(buf, off, name, schema, interval, recs, count, limit):
    entry = _SCHEMA_COLS.get(schema)
    if entry is None:
        raise _err(name, off, "unknown sensor schema %d" % schema)
    if count < 1 or count > limit:
        raise _err(name, off, "readings: count %d outside 1..%d" % (count, limit))
    rs, cols = entry
    regular = interval != 0
    if regular:
        p = 0
        for _ in range(count - 1):
            if _dt(recs, p, p + rs) != interval:
                regular = False
                break
            p += rs
    ipos = off - 2
    if not regular:
        buf[ipos] = 0
        buf[ipos + 1] = 0
    buf[off] = count
    buf[off + 1:off + rs + 1] = recs[0:rs]
    off += rs + 1
    for co, width, signed in cols:
        prev = _rd(recs, co, width, signed)
        p = co + rs
        for _ in range(count - 1):
            v = _rd(recs, p, width, signed)
            off = _put_zz(buf, off, v - prev)
            prev = v
            p += rs
    if not regular:
        p = 0
        for _ in range(count - 1):
            off = _put_zz(buf, off, _dt(recs, p, p + rs))
            p += rs
    return off


def _decode_series(buf, off, n, name, schema, interval, limit):
    entry = _SCHEMA_COLS.get(schema)
    if entry is None:
        raise _err(name, off, "unknown sensor schema %d" % schema)
    rs, cols = entry
    _need(off, rs + 1, n, name, "readings")
    count = buf[off]
    if count < 1 or count > limit:
        raise _err(name, off, "readings: count %d outside 1..%d" % (count, limit))
    t0 = struct.unpack_from("<I", buf, off + 1)[0]
    base = off + 1
    off += rs + 1
    columns = []
    for co, width, signed in cols:
        v = _rd(buf, base + co, width, signed)
        lo = -(1 << (8 * width - 1)) if signed else 0
        hi = (1 << (8 * width - 1)) - 1 if signed else (1 << (8 * width)) - 1
        col = [v]
        for _ in range(count - 1):
            z = _uv(buf, off, n, name)
            off = _pos[0]
            v += (z >> 1) ^ -(z & 1)
            if v < lo or v > hi:
                raise _err(name, off, "readings: value leaves its type's range")
            col.append(v)
        columns.append(col)
    ts = [t0]
    t = t0
    for _ in range(count - 1):
        if interval:
            t += interval
        else:
            z = _uv(buf, off, n, name)
            off = _pos[0]
            t += (z >> 1) ^ -(z & 1)
        if t < 0 or t > 0xFFFFFFFF:
            raise _err(name, off, "readings: timestamp leaves u32")
        ts.append(t)
    _pos[0] = off
    return (ts, columns)


def _tlv(buf, off, n, name):
    tag = buf[off]
    ln = _uv(buf, off + 1, n, name)
    if _pos[0] + ln > n:
        raise _err(name, off, "field tag %d: truncated" % tag)
    _pos[1] = tag
    return ln


def opt_at(p, off, tag):
    # where optional field `tag`'s value sits in a frame in_place() passed (off: what it
    # returned), or 0 when the field is absent (it then has its default)
    n = len(p)
    while off < n:
        if p[off] == tag:
            return off + 2
        off += 2 + p[off + 1]
    return 0


def encode_hello(buf, msg_id, fw_version, boot_cause, battery_mv, rssi, free_mem, queue_depth, dropped, next_wake_s, awake_window_ms, time, device_class, config_version=0, ota_state=0, ota_reason=0, safe_mode=False, boots_without_send=0, mcu_temp=0.0, first_id=0, next_listen_s=0, clock_unset=False, cert_serial=b'', cred_outcome=0, cred_rotation=0, keys_seq=0, session_key=0, prev_awake_ms=0, prev_radio_ms=0, prev_sent=False):
    _put_header(buf, HELLO, msg_id)
    off = 6
    struct.pack_into("<IBHbIHIIHIB", buf, off, fw_version, boot_cause, battery_mv, rssi, free_mem, queue_depth, dropped, next_wake_s, awake_window_ms, time, device_class)
    off += 29
    if config_version != 0:
        buf[off] = 12
        buf[off + 1] = 4
        struct.pack_into("<I", buf, off + 2, config_version)
        off += 6
    if ota_state != 0:
        buf[off] = 13
        buf[off + 1] = 1
        struct.pack_into("<B", buf, off + 2, ota_state)
        off += 3
    if ota_reason != 0:
        buf[off] = 14
        buf[off + 1] = 1
        struct.pack_into("<B", buf, off + 2, ota_reason)
        off += 3
    if safe_mode != False:
        buf[off] = 15
        buf[off + 1] = 1
        struct.pack_into("<B", buf, off + 2, safe_mode)
        off += 3
    if boots_without_send != 0:
        buf[off] = 16
        buf[off + 1] = 1
        struct.pack_into("<B", buf, off + 2, boots_without_send)
        off += 3
    if mcu_temp != 0.0:
        buf[off] = 17
        buf[off + 1] = 4
        struct.pack_into("<f", buf, off + 2, mcu_temp)
        off += 6
    if first_id != 0:
        buf[off] = 18
        buf[off + 1] = 4
        struct.pack_into("<I", buf, off + 2, first_id)
        off += 6
    if next_listen_s != 0:
        buf[off] = 19
        buf[off + 1] = 4
        struct.pack_into("<I", buf, off + 2, next_listen_s)
        off += 6
    if clock_unset != False:
        buf[off] = 20
        buf[off + 1] = 1
        struct.pack_into("<B", buf, off + 2, clock_unset)
        off += 3
    if cert_serial != b'':
        buf[off] = 21
        off = _put_uv(buf, off + 1, _uv_size(len(cert_serial)) + len(cert_serial))
        off = _put_raw(buf, off, cert_serial, 20, "HELLO", "cert_serial")
    if cred_outcome != 0:
        buf[off] = 22
        buf[off + 1] = 1
        struct.pack_into("<B", buf, off + 2, cred_outcome)
        off += 3
    if cred_rotation != 0:
        buf[off] = 23
        buf[off + 1] = 4
        struct.pack_into("<I", buf, off + 2, cred_rotation)
        off += 6
    if keys_seq != 0:
        buf[off] = 24
        buf[off + 1] = 4
        struct.pack_into("<I", buf, off + 2, keys_seq)
        off += 6
    if session_key != 0:
        buf[off] = 32
        buf[off + 1] = 4
        struct.pack_into("<I", buf, off + 2, session_key)
        off += 6
    if prev_awake_ms != 0:
        buf[off] = 33
        buf[off + 1] = 4
        struct.pack_into("<I", buf, off + 2, prev_awake_ms)
        off += 6
    if prev_radio_ms != 0:
        buf[off] = 34
        buf[off + 1] = 4
        struct.pack_into("<I", buf, off + 2, prev_radio_ms)
        off += 6
    if prev_sent != False:
        buf[off] = 35
        buf[off + 1] = 1
        struct.pack_into("<B", buf, off + 2, prev_sent)
        off += 3
    return off


def decode_hello(buf):
    n = len(buf)
    minor = _header(buf, n, HELLO, "HELLO")
    buf = memoryview(buf)
    off = 6
    _need(off, 29, n, "HELLO", "fw_version")
    v_fw_version, v_boot_cause, v_battery_mv, v_rssi, v_free_mem, v_queue_depth, v_dropped, v_next_wake_s, v_awake_window_ms, v_time, v_device_class = struct.unpack_from("<IBHbIHIIHIB", buf, off)
    _enum(v_boot_cause, _E_BOOT_CAUSE, "HELLO", off + 4, "boot_cause")
    _enum(v_device_class, _E_DEVICE_CLASS, "HELLO", off + 28, "device_class")
    off += 29
    v_config_version = 0
    v_ota_state = 0
    v_ota_reason = 0
    v_safe_mode = False
    v_boots_without_send = 0
    v_mcu_temp = 0.0
    v_first_id = 0
    v_next_listen_s = 0
    v_clock_unset = False
    v_cert_serial = b''
    v_cred_outcome = 0
    v_cred_rotation = 0
    v_keys_seq = 0
    v_session_key = 0
    v_prev_awake_ms = 0
    v_prev_radio_ms = 0
    v_prev_sent = False
    last = 0
    while off < n:
        tl = _tlv(buf, off, n, "HELLO")
        tag = _pos[1]
        voff = _pos[0]
        if tag <= last:
            raise _err("HELLO", off, "field tag %d repeated or out of order" % tag)
        last = tag
        if tag == 12:
            v_config_version = _fixed_tlv("<I", 4, buf, voff, tl, "HELLO", "config_version")
        elif tag == 13:
            v_ota_state = _fixed_tlv("<B", 1, buf, voff, tl, "HELLO", "ota_state")
            _enum(v_ota_state, _E_OTA_STATE, "HELLO", voff, "ota_state")
        elif tag == 14:
            v_ota_reason = _fixed_tlv("<B", 1, buf, voff, tl, "HELLO", "ota_reason")
            _enum(v_ota_reason, _E_OTA_REASON, "HELLO", voff, "ota_reason")
        elif tag == 15:
            v_safe_mode = _fixed_tlv("<B", 1, buf, voff, tl, "HELLO", "safe_mode")
            v_safe_mode = _bool(v_safe_mode, "HELLO", voff, "safe_mode")
        elif tag == 16:
            v_boots_without_send = _fixed_tlv("<B", 1, buf, voff, tl, "HELLO", "boots_without_send")
        elif tag == 17:
            v_mcu_temp = _fixed_tlv("<f", 4, buf, voff, tl, "HELLO", "mcu_temp")
        elif tag == 18:
            v_first_id = _fixed_tlv("<I", 4, buf, voff, tl, "HELLO", "first_id")
        elif tag == 19:
            v_next_listen_s = _fixed_tlv("<I", 4, buf, voff, tl, "HELLO", "next_listen_s")
        elif tag == 20:
            v_clock_unset = _fixed_tlv("<B", 1, buf, voff, tl, "HELLO", "clock_unset")
            v_clock_unset = _bool(v_clock_unset, "HELLO", voff, "clock_unset")
        elif tag == 21:
            off = voff
            ln = _length(buf, off, voff + tl, "HELLO", "cert_serial", 20)
            off = _pos[0]
            _need(off, ln, voff + tl, "HELLO", "cert_serial")
            v_cert_serial = buf[off:off + ln]
            off += ln
            if off != voff + tl:
                raise _err("HELLO", off, "cert_serial: length does not match its value")
        elif tag == 22:
            v_cred_outcome = _fixed_tlv("<B", 1, buf, voff, tl, "HELLO", "cred_outcome")
            _enum(v_cred_outcome, _E_CRED_OUTCOME, "HELLO", voff, "cred_outcome")
        elif tag == 23:
            v_cred_rotation = _fixed_tlv("<I", 4, buf, voff, tl, "HELLO", "cred_rotation")
        elif tag == 24:
            v_keys_seq = _fixed_tlv("<I", 4, buf, voff, tl, "HELLO", "keys_seq")
        elif tag == 32:
            v_session_key = _fixed_tlv("<I", 4, buf, voff, tl, "HELLO", "session_key")
        elif tag == 33:
            v_prev_awake_ms = _fixed_tlv("<I", 4, buf, voff, tl, "HELLO", "prev_awake_ms")
        elif tag == 34:
            v_prev_radio_ms = _fixed_tlv("<I", 4, buf, voff, tl, "HELLO", "prev_radio_ms")
        elif tag == 35:
            v_prev_sent = _fixed_tlv("<B", 1, buf, voff, tl, "HELLO", "prev_sent")
            v_prev_sent = _bool(v_prev_sent, "HELLO", voff, "prev_sent")
        elif minor <= MINOR:
            raise _err("HELLO", off, "unknown field tag %d" % tag)
        off = voff + tl
    return (_msg_id(buf), v_fw_version, v_boot_cause, v_battery_mv, v_rssi, v_free_mem, v_queue_depth, v_dropped, v_next_wake_s, v_awake_window_ms, v_time, v_device_class, v_config_version, v_ota_state, v_ota_reason, v_safe_mode, v_boots_without_send, v_mcu_temp, v_first_id, v_next_listen_s, v_clock_unset, v_cert_serial, v_cred_outcome, v_cred_rotation, v_keys_seq, v_session_key, v_prev_awake_ms, v_prev_radio_ms, v_prev_sent)


def encode_burst(buf, msg_id, schema, interval, recs, count, node_clock=False):
    # recs: `count` readings in the schema's RECORD layout, oldest first
    _put_header(buf, BURST, msg_id)
    off = 6
    struct.pack_into("<BH", buf, off, schema, interval)
    off += 3
    off = _encode_series(buf, off, "BURST", schema, interval, recs, count, 255)
    if node_clock != False:
        buf[off] = 4
        buf[off + 1] = 1
        struct.pack_into("<B", buf, off + 2, node_clock)
        off += 3
    return off


def decode_burst(buf):
    n = len(buf)
    minor = _header(buf, n, BURST, "BURST")
    buf = memoryview(buf)
    off = 6
    _need(off, 3, n, "BURST", "schema")
    v_schema, v_interval = struct.unpack_from("<BH", buf, off)
    off += 3
    v_readings = _decode_series(buf, off, n, "BURST", v_schema, v_interval, 255)
    off = _pos[0]
    v_node_clock = False
    last = 0
    while off < n:
        tl = _tlv(buf, off, n, "BURST")
        tag = _pos[1]
        voff = _pos[0]
        if tag <= last:
            raise _err("BURST", off, "field tag %d repeated or out of order" % tag)
        last = tag
        if tag == 4:
            v_node_clock = _fixed_tlv("<B", 1, buf, voff, tl, "BURST", "node_clock")
            v_node_clock = _bool(v_node_clock, "BURST", voff, "node_clock")
        elif minor <= MINOR:
            raise _err("BURST", off, "unknown field tag %d" % tag)
        off = voff + tl
    return (_msg_id(buf), v_schema, v_interval, v_readings, v_node_clock)


def encode_ack(buf, msg_id, cumulative, selective, time=0, pending=0):
    _put_header(buf, ACK, msg_id)
    off = 6
    struct.pack_into("<I", buf, off, cumulative)
    off += 4
    if len(selective) > 64:
        raise _err("ACK", off, "selective: more than 64 items")
    off = _put_uv(buf, off, len(selective))
    for x in selective:
        struct.pack_into("<I", buf, off, x)
        off += 4
    if time != 0:
        buf[off] = 3
        buf[off + 1] = 4
        struct.pack_into("<I", buf, off + 2, time)
        off += 6
    if pending != 0:
        buf[off] = 4
        buf[off + 1] = 1
        struct.pack_into("<B", buf, off + 2, pending)
        off += 3
    return off


def decode_ack(buf):
    n = len(buf)
    minor = _header(buf, n, ACK, "ACK")
    buf = memoryview(buf)
    off = 6
    _need(off, 4, n, "ACK", "cumulative")
    v_cumulative, = struct.unpack_from("<I", buf, off)
    off += 4
    cnt = _length(buf, off, n, "ACK", "selective", 64)
    off = _pos[0]
    _need(off, cnt * 4, n, "ACK", "selective")
    v_selective = [struct.unpack_from("<I", buf, off + 4 * i)[0] for i in range(cnt)]
    off += cnt * 4
    v_time = 0
    v_pending = 0
    last = 0
    while off < n:
        tl = _tlv(buf, off, n, "ACK")
        tag = _pos[1]
        voff = _pos[0]
        if tag <= last:
            raise _err("ACK", off, "field tag %d repeated or out of order" % tag)
        last = tag
        if tag == 3:
            v_time = _fixed_tlv("<I", 4, buf, voff, tl, "ACK", "time")
        elif tag == 4:
            v_pending = _fixed_tlv("<B", 1, buf, voff, tl, "ACK", "pending")
        elif minor <= MINOR:
            raise _err("ACK", off, "unknown field tag %d" % tag)
        off = voff + tl
    return (_msg_id(buf), v_cumulative, v_selective, v_time, v_pending)


def encode_command(buf, msg_id, command_id, op, args, priority, ttl_s, data=b'', expires_at=0):
    _put_header(buf, COMMAND, msg_id)
    off = 6
    struct.pack_into("<IB", buf, off, command_id, op)
    off += 5
    if len(args) > 8:
        raise _err("COMMAND", off, "args: more than 8 items")
    off = _put_uv(buf, off, len(args))
    for x in args:
        struct.pack_into("<i", buf, off, x)
        off += 4
    struct.pack_into("<BH", buf, off, priority, ttl_s)
    off += 3
    if data != b'':
        buf[off] = 6
        off = _put_uv(buf, off + 1, _uv_size(len(data)) + len(data))
        off = _put_raw(buf, off, data, 256, "COMMAND", "data")
    if expires_at != 0:
        buf[off] = 7
        buf[off + 1] = 4
        struct.pack_into("<I", buf, off + 2, expires_at)
        off += 6
    return off


def decode_command(buf):
    n = len(buf)
    minor = _header(buf, n, COMMAND, "COMMAND")
    buf = memoryview(buf)
    off = 6
    _need(off, 5, n, "COMMAND", "command_id")
    v_command_id, v_op = struct.unpack_from("<IB", buf, off)
    _enum(v_op, _E_COMMAND_OP, "COMMAND", off + 4, "op")
    off += 5
    cnt = _length(buf, off, n, "COMMAND", "args", 8)
    off = _pos[0]
    _need(off, cnt * 4, n, "COMMAND", "args")
    v_args = [struct.unpack_from("<i", buf, off + 4 * i)[0] for i in range(cnt)]
    off += cnt * 4
    _need(off, 3, n, "COMMAND", "priority")
    v_priority, v_ttl_s = struct.unpack_from("<BH", buf, off)
    off += 3
    v_data = b''
    v_expires_at = 0
    last = 0
    while off < n:
        tl = _tlv(buf, off, n, "COMMAND")
        tag = _pos[1]
        voff = _pos[0]
        if tag <= last:
            raise _err("COMMAND", off, "field tag %d repeated or out of order" % tag)
        last = tag
        if tag == 6:
            off = voff
            ln = _length(buf, off, voff + tl, "COMMAND", "data", 256)
            off = _pos[0]
            _need(off, ln, voff + tl, "COMMAND", "data")
            v_data = buf[off:off + ln]
            off += ln
            if off != voff + tl:
                raise _err("COMMAND", off, "data: length does not match its value")
        elif tag == 7:
            v_expires_at = _fixed_tlv("<I", 4, buf, voff, tl, "COMMAND", "expires_at")
        elif minor <= MINOR:
            raise _err("COMMAND", off, "unknown field tag %d" % tag)
        off = voff + tl
    return (_msg_id(buf), v_command_id, v_op, v_args, v_priority, v_ttl_s, v_data, v_expires_at)


def encode_command_result(buf, msg_id, command_id, status, code=0, detail='', values=()):
    _put_header(buf, COMMAND_RESULT, msg_id)
    off = 6
    detail_b = detail.encode()
    struct.pack_into("<IB", buf, off, command_id, status)
    off += 5
    if code != 0:
        buf[off] = 3
        buf[off + 1] = 4
        struct.pack_into("<i", buf, off + 2, code)
        off += 6
    if detail != '':
        buf[off] = 4
        off = _put_uv(buf, off + 1, _uv_size(len(detail_b)) + len(detail_b))
        off = _put_raw(buf, off, detail_b, 48, "COMMAND_RESULT", "detail")
    if len(values):
        buf[off] = 5
        off = _put_uv(buf, off + 1, _uv_size(len(values)) + len(values) * 4)
        if len(values) > 8:
            raise _err("COMMAND_RESULT", off, "values: more than 8 items")
        off = _put_uv(buf, off, len(values))
        for x in values:
            struct.pack_into("<i", buf, off, x)
            off += 4
    return off


def decode_command_result(buf):
    n = len(buf)
    minor = _header(buf, n, COMMAND_RESULT, "COMMAND_RESULT")
    buf = memoryview(buf)
    off = 6
    _need(off, 5, n, "COMMAND_RESULT", "command_id")
    v_command_id, v_status = struct.unpack_from("<IB", buf, off)
    _enum(v_status, _E_RESULT_STATUS, "COMMAND_RESULT", off + 4, "status")
    off += 5
    v_code = 0
    v_detail = ''
    v_values = []
    last = 0
    while off < n:
        tl = _tlv(buf, off, n, "COMMAND_RESULT")
        tag = _pos[1]
        voff = _pos[0]
        if tag <= last:
            raise _err("COMMAND_RESULT", off, "field tag %d repeated or out of order" % tag)
        last = tag
        if tag == 3:
            v_code = _fixed_tlv("<i", 4, buf, voff, tl, "COMMAND_RESULT", "code")
        elif tag == 4:
            off = voff
            ln = _length(buf, off, voff + tl, "COMMAND_RESULT", "detail", 48)
            off = _pos[0]
            _need(off, ln, voff + tl, "COMMAND_RESULT", "detail")
            v_detail = _text(buf, off, ln, "COMMAND_RESULT", "detail")
            off += ln
            if off != voff + tl:
                raise _err("COMMAND_RESULT", off, "detail: length does not match its value")
        elif tag == 5:
            off = voff
            cnt = _length(buf, off, voff + tl, "COMMAND_RESULT", "values", 8)
            off = _pos[0]
            _need(off, cnt * 4, voff + tl, "COMMAND_RESULT", "values")
            v_values = [struct.unpack_from("<i", buf, off + 4 * i)[0] for i in range(cnt)]
            off += cnt * 4
            if off != voff + tl:
                raise _err("COMMAND_RESULT", off, "values: length does not match its value")
        elif minor <= MINOR:
            raise _err("COMMAND_RESULT", off, "unknown field tag %d" % tag)
        off = voff + tl
    return (_msg_id(buf), v_command_id, v_status, v_code, v_detail, v_values)


def encode_shadow_report(buf, msg_id, config_version, entries):
    _put_header(buf, SHADOW_REPORT, msg_id)
    off = 6
    struct.pack_into("<I", buf, off, config_version)
    off += 4
    if len(entries) > 16:
        raise _err("SHADOW_REPORT", off, "entries: more than 16 items")
    off = _put_uv(buf, off, len(entries))
    for x in entries:
        struct.pack_into("<Bi", buf, off, *x)
        off += 5
    return off


def decode_shadow_report(buf):
    n = len(buf)
    minor = _header(buf, n, SHADOW_REPORT, "SHADOW_REPORT")
    buf = memoryview(buf)
    off = 6
    _need(off, 4, n, "SHADOW_REPORT", "config_version")
    v_config_version, = struct.unpack_from("<I", buf, off)
    off += 4
    cnt = _length(buf, off, n, "SHADOW_REPORT", "entries", 16)
    off = _pos[0]
    _need(off, cnt * 5, n, "SHADOW_REPORT", "entries")
    v_entries = []
    for i in range(cnt):
        x = struct.unpack_from("<Bi", buf, off)
        _enum(x[0], _E_CONFIG_KEY, "SHADOW_REPORT", off + 0, "entries.key")
        v_entries.append(x)
        off += 5
    if off != n and minor <= MINOR:
        raise _err("SHADOW_REPORT", off, "%d trailing bytes" % (n - off))
    return (_msg_id(buf), v_config_version, v_entries)


def encode_shadow_delta(buf, msg_id, config_version, entries):
    _put_header(buf, SHADOW_DELTA, msg_id)
    off = 6
    struct.pack_into("<I", buf, off, config_version)
    off += 4
    if len(entries) > 16:
        raise _err("SHADOW_DELTA", off, "entries: more than 16 items")
    off = _put_uv(buf, off, len(entries))
    for x in entries:
        struct.pack_into("<Bi", buf, off, *x)
        off += 5
    return off


def decode_shadow_delta(buf):
    n = len(buf)
    minor = _header(buf, n, SHADOW_DELTA, "SHADOW_DELTA")
    buf = memoryview(buf)
    off = 6
    _need(off, 4, n, "SHADOW_DELTA", "config_version")
    v_config_version, = struct.unpack_from("<I", buf, off)
    off += 4
    cnt = _length(buf, off, n, "SHADOW_DELTA", "entries", 16)
    off = _pos[0]
    _need(off, cnt * 5, n, "SHADOW_DELTA", "entries")
    v_entries = []
    for i in range(cnt):
        x = struct.unpack_from("<Bi", buf, off)
        _enum(x[0], _E_CONFIG_KEY, "SHADOW_DELTA", off + 0, "entries.key")
        v_entries.append(x)
        off += 5
    if off != n and minor <= MINOR:
        raise _err("SHADOW_DELTA", off, "%d trailing bytes" % (n - off))
    return (_msg_id(buf), v_config_version, v_entries)


def encode_ota_manifest(buf, msg_id, version, total_size, chunk_size, manifest, signature):
    _put_header(buf, OTA_MANIFEST, msg_id)
    off = 6
    struct.pack_into("<IIH", buf, off, version, total_size, chunk_size)
    off += 10
    off = _put_raw(buf, off, manifest, 3072, "OTA_MANIFEST", "manifest")
    off = _put_raw(buf, off, signature, 64, "OTA_MANIFEST", "signature")
    return off


def decode_ota_manifest(buf):
    n = len(buf)
    minor = _header(buf, n, OTA_MANIFEST, "OTA_MANIFEST")
    buf = memoryview(buf)
    off = 6
    _need(off, 10, n, "OTA_MANIFEST", "version")
    v_version, v_total_size, v_chunk_size = struct.unpack_from("<IIH", buf, off)
    off += 10
    ln = _length(buf, off, n, "OTA_MANIFEST", "manifest", 3072)
    off = _pos[0]
    _need(off, ln, n, "OTA_MANIFEST", "manifest")
    v_manifest = buf[off:off + ln]
    off += ln
    ln = _length(buf, off, n, "OTA_MANIFEST", "signature", 64)
    off = _pos[0]
    _need(off, ln, n, "OTA_MANIFEST", "signature")
    v_signature = buf[off:off + ln]
    off += ln
    if off != n and minor <= MINOR:
        raise _err("OTA_MANIFEST", off, "%d trailing bytes" % (n - off))
    return (_msg_id(buf), v_version, v_total_size, v_chunk_size, v_manifest, v_signature)


def encode_ota_chunk(buf, msg_id, version, index, data):
    _put_header(buf, OTA_CHUNK, msg_id)
    off = 6
    struct.pack_into("<IH", buf, off, version, index)
    off += 6
    off = _put_raw(buf, off, data, 2048, "OTA_CHUNK", "data")
    return off


def decode_ota_chunk(buf):
    n = len(buf)
    minor = _header(buf, n, OTA_CHUNK, "OTA_CHUNK")
    buf = memoryview(buf)
    off = 6
    _need(off, 6, n, "OTA_CHUNK", "version")
    v_version, v_index = struct.unpack_from("<IH", buf, off)
    off += 6
    ln = _length(buf, off, n, "OTA_CHUNK", "data", 2048)
    off = _pos[0]
    _need(off, ln, n, "OTA_CHUNK", "data")
    v_data = buf[off:off + ln]
    off += ln
    if off != n and minor <= MINOR:
        raise _err("OTA_CHUNK", off, "%d trailing bytes" % (n - off))
    return (_msg_id(buf), v_version, v_index, v_data)


def encode_ota_status(buf, msg_id, version, state, chunks, reason=0, detail=''):
    _put_header(buf, OTA_STATUS, msg_id)
    off = 6
    detail_b = detail.encode()
    struct.pack_into("<IBH", buf, off, version, state, chunks)
    off += 7
    if reason != 0:
        buf[off] = 4
        buf[off + 1] = 1
        struct.pack_into("<B", buf, off + 2, reason)
        off += 3
    if detail != '':
        buf[off] = 5
        off = _put_uv(buf, off + 1, _uv_size(len(detail_b)) + len(detail_b))
        off = _put_raw(buf, off, detail_b, 48, "OTA_STATUS", "detail")
    return off


def decode_ota_status(buf):
    n = len(buf)
    minor = _header(buf, n, OTA_STATUS, "OTA_STATUS")
    buf = memoryview(buf)
    off = 6
    _need(off, 7, n, "OTA_STATUS", "version")
    v_version, v_state, v_chunks = struct.unpack_from("<IBH", buf, off)
    _enum(v_state, _E_OTA_STATE, "OTA_STATUS", off + 4, "state")
    off += 7
    v_reason = 0
    v_detail = ''
    last = 0
    while off < n:
        tl = _tlv(buf, off, n, "OTA_STATUS")
        tag = _pos[1]
        voff = _pos[0]
        if tag <= last:
            raise _err("OTA_STATUS", off, "field tag %d repeated or out of order" % tag)
        last = tag
        if tag == 4:
            v_reason = _fixed_tlv("<B", 1, buf, voff, tl, "OTA_STATUS", "reason")
            _enum(v_reason, _E_OTA_REASON, "OTA_STATUS", voff, "reason")
        elif tag == 5:
            off = voff
            ln = _length(buf, off, voff + tl, "OTA_STATUS", "detail", 48)
            off = _pos[0]
            _need(off, ln, voff + tl, "OTA_STATUS", "detail")
            v_detail = _text(buf, off, ln, "OTA_STATUS", "detail")
            off += ln
            if off != voff + tl:
                raise _err("OTA_STATUS", off, "detail: length does not match its value")
        elif minor <= MINOR:
            raise _err("OTA_STATUS", off, "unknown field tag %d" % tag)
        off = voff + tl
    return (_msg_id(buf), v_version, v_state, v_chunks, v_reason, v_detail)


def encode_sleep_now(buf, msg_id, sleep_s, pending=0):
    _put_header(buf, SLEEP_NOW, msg_id)
    off = 6
    struct.pack_into("<I", buf, off, sleep_s)
    off += 4
    if pending != 0:
        buf[off] = 2
        buf[off + 1] = 1
        struct.pack_into("<B", buf, off + 2, pending)
        off += 3
    return off


def decode_sleep_now(buf):
    n = len(buf)
    minor = _header(buf, n, SLEEP_NOW, "SLEEP_NOW")
    buf = memoryview(buf)
    off = 6
    _need(off, 4, n, "SLEEP_NOW", "sleep_s")
    v_sleep_s, = struct.unpack_from("<I", buf, off)
    off += 4
    v_pending = 0
    last = 0
    while off < n:
        tl = _tlv(buf, off, n, "SLEEP_NOW")
        tag = _pos[1]
        voff = _pos[0]
        if tag <= last:
            raise _err("SLEEP_NOW", off, "field tag %d repeated or out of order" % tag)
        last = tag
        if tag == 2:
            v_pending = _fixed_tlv("<B", 1, buf, voff, tl, "SLEEP_NOW", "pending")
        elif minor <= MINOR:
            raise _err("SLEEP_NOW", off, "unknown field tag %d" % tag)
        off = voff + tl
    return (_msg_id(buf), v_sleep_s, v_pending)


def encode_error(buf, msg_id, code, ref, detail=''):
    _put_header(buf, ERROR, msg_id)
    off = 6
    detail_b = detail.encode()
    struct.pack_into("<BI", buf, off, code, ref)
    off += 5
    if detail != '':
        buf[off] = 3
        off = _put_uv(buf, off + 1, _uv_size(len(detail_b)) + len(detail_b))
        off = _put_raw(buf, off, detail_b, 64, "ERROR", "detail")
    return off


def decode_error(buf):
    n = len(buf)
    minor = _header(buf, n, ERROR, "ERROR")
    buf = memoryview(buf)
    off = 6
    _need(off, 5, n, "ERROR", "code")
    v_code, v_ref = struct.unpack_from("<BI", buf, off)
    _enum(v_code, _E_ERROR_CODE, "ERROR", off + 0, "code")
    off += 5
    v_detail = ''
    last = 0
    while off < n:
        tl = _tlv(buf, off, n, "ERROR")
        tag = _pos[1]
        voff = _pos[0]
        if tag <= last:
            raise _err("ERROR", off, "field tag %d repeated or out of order" % tag)
        last = tag
        if tag == 3:
            off = voff
            ln = _length(buf, off, voff + tl, "ERROR", "detail", 64)
            off = _pos[0]
            _need(off, ln, voff + tl, "ERROR", "detail")
            v_detail = _text(buf, off, ln, "ERROR", "detail")
            off += ln
            if off != voff + tl:
                raise _err("ERROR", off, "detail: length does not match its value")
        elif minor <= MINOR:
            raise _err("ERROR", off, "unknown field tag %d" % tag)
        off = voff + tl
    return (_msg_id(buf), v_code, v_ref, v_detail)


def encode_csr_up(buf, msg_id, rotation, csr):
    _put_header(buf, CSR_UP, msg_id)
    off = 6
    struct.pack_into("<I", buf, off, rotation)
    off += 4
    off = _put_raw(buf, off, csr, 512, "CSR_UP", "csr")
    return off


def decode_csr_up(buf):
    n = len(buf)
    minor = _header(buf, n, CSR_UP, "CSR_UP")
    buf = memoryview(buf)
    off = 6
    _need(off, 4, n, "CSR_UP", "rotation")
    v_rotation, = struct.unpack_from("<I", buf, off)
    off += 4
    ln = _length(buf, off, n, "CSR_UP", "csr", 512)
    off = _pos[0]
    _need(off, ln, n, "CSR_UP", "csr")
    v_csr = buf[off:off + ln]
    off += ln
    if off != n and minor <= MINOR:
        raise _err("CSR_UP", off, "%d trailing bytes" % (n - off))
    return (_msg_id(buf), v_rotation, v_csr)


_DECODERS = {
    1: decode_hello,
    2: decode_burst,
    3: decode_ack,
    4: decode_command,
    5: decode_command_result,
    6: decode_shadow_report,
    7: decode_shadow_delta,
    8: decode_ota_manifest,
    9: decode_ota_chunk,
    10: decode_ota_status,
    11: decode_sleep_now,
    12: decode_error,
    13: decode_csr_up,
}


def decode(buf):
    # any frame -> (frame type, decoded tuple)
    if len(buf) < 2:
        raise _err("frame", len(buf), "truncated header")
    fn = _DECODERS.get(buf[1])
    if fn is None:
        raise _err("frame", 1, "unknown frame type %d" % buf[1], ERROR_CODE_UNKNOWN_FRAME)
    return buf[1], fn(buf)


# Frames read in place (the spec's [in_place]). When end = in_place(p) is not 0, p is a
# plain frame of type p[1] and read_<frame>(p, end) gives its fixed fields: required field X
# at _<FRAME>_AT_X, optional field Y at opt_at(p, end, _<FRAME>_TAG_Y). Any other frame goes
# to decode(), which accepts or refuses it. (Underscored: compile-time constants, no heap.)
_ACK_AT_CUMULATIVE = const(6)
_ACK_TAG_TIME = const(3)
_ACK_TAG_PENDING = const(4)
_SLEEP_NOW_AT_SLEEP_S = const(6)
_SLEEP_NOW_TAG_PENDING = const(2)


def in_place(p):
    # 0, or where the optional fields of plain frame p start (see above)
    n = len(p)
    if n < HEADER_SIZE or n > MAX_FRAME or p[0] >> 4 != MAJOR:
        return 0
    t = p[1]
    if t == ACK:
        end = 11
        opt = b"\x03\x04\x04\x01"  # (tag, size) of each optional field
        if n < end or p[10]:  # selective: empty
            return 0
    elif t == SLEEP_NOW:
        end = 10
        opt = b"\x02\x01"  # (tag, size) of each optional field
        if n < end:
            return 0
    else:
        return 0
    off = end
    j = 0
    while off < n:
        if off + 2 > n:
            return 0
        tag = p[off]
        while j < len(opt) and opt[j] != tag:
            j += 2
        if j == len(opt) or p[off + 1] != opt[j + 1] or off + 2 + opt[j + 1] > n:
            return 0
        j += 2
        off += 2 + p[off + 1]
    return end


def read_ack(p, end):
    # ACK read in place (end = in_place(p)): (cumulative, time, pending); an absent optional field has its default
    o = opt_at(p, end, _ACK_TAG_TIME)
    v_time = _rd(p, o, 4, False) if o else 0
    o = opt_at(p, end, _ACK_TAG_PENDING)
    v_pending = _rd(p, o, 1, False) if o else 0
    return (_rd(p, _ACK_AT_CUMULATIVE, 4, False), v_time, v_pending)


def read_sleep_now(p, end):
    # SLEEP_NOW read in place (end = in_place(p)): (sleep_s, pending); an absent optional field has its default
    o = opt_at(p, end, _SLEEP_NOW_TAG_PENDING)
    v_pending = _rd(p, o, 1, False) if o else 0
    return (_rd(p, _SLEEP_NOW_AT_SLEEP_S, 4, False), v_pending)
