"""Torpor wire protocol codec for CPython (the gateway and tools).

Generated from shared/protocol/torpor.toml by `torpor proto gen`: generated, do not edit.
"""

# ruff: noqa
from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from itertools import accumulate, pairwise
from typing import TypeVar
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

MAJOR = 1
MINOR = 5
VERSION_BYTE = 0x15
HEADER_SIZE = 6
MAX_FRAME = 4096
# largest encoding of any frame the spec defines (each frame class's MAX_SIZE)
LARGEST_FRAME = 3579
# message ids are the header's u32: 0..MSG_ID_MAX
MSG_ID_MAX = 0xFFFFFFFF
# [bootloader] version: an image's manifest names the lowest it needs (min_bootloader)
BOOTLOADER_VERSION = 1
# largest signed manifest an image may carry (OTA_MANIFEST's manifest field)
MAX_MANIFEST = 3072
_U32 = struct.Struct('<I')
_RANGES: dict[str, tuple[int, int]] = {
    'u8': (0, 255),
    'i8': (-128, 127),
    'u16': (0, 65535),
    'i16': (-32768, 32767),
    'u32': (0, 4294967295),
    'i32': (-2147483648, 2147483647),
}


Buffer = bytes | bytearray | memoryview
_E = TypeVar("_E", bound=IntEnum)


class ProtocolError(ValueError):
    """A frame could not be decoded or encoded; names the frame and the byte offset.

    `code` is the ErrorCode an ERROR frame answering this failure carries: MALFORMED
    unless the header already tells (UNSUPPORTED_VERSION, TOO_LARGE, UNKNOWN_FRAME)."""

    def __init__(self, frame: str, offset: int, reason: str, code: ErrorCode | None = None) -> None:
        super().__init__(f"{frame} at byte {offset}: {reason}")
        self.frame = frame
        self.offset = offset
        self.reason = reason
        self.code = ErrorCode.MALFORMED if code is None else code


_HDR = struct.Struct("<BBI")
# A one-byte zigzag varint (below 0x80) -> its signed value as a two's complement byte:
# memoryview.cast("b") then gives the differences without a Python call per reading.
_ZZ_BYTE = bytes(((b >> 1) ^ -(b & 1)) & 0xFF for b in range(128)) + bytes(128)


def _header(buf: Buffer, n: int, ftype: int, name: str) -> tuple[int, int]:
    if n < HEADER_SIZE:
        raise ProtocolError(name, n, "truncated header")
    if n > MAX_FRAME:
        raise ProtocolError(name, MAX_FRAME, f"frame of {n} bytes exceeds the maximum {MAX_FRAME}",
                            ErrorCode.TOO_LARGE)
    ver, got, msg_id = _HDR.unpack_from(buf, 0)
    if ver >> 4 != MAJOR:
        raise ProtocolError(
            name, 0, f"unsupported protocol version {ver >> 4}.{ver & 15} (this side speaks {MAJOR}.x)",
            ErrorCode.UNSUPPORTED_VERSION,
        )
    if got != ftype:
        raise ProtocolError(name, 1, f"frame type {got} is not {name} ({ftype})")
    return ver & 15, msg_id


def _uvarint(buf: Buffer, off: int, n: int, name: str) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if off >= n:
            raise ProtocolError(name, off, "truncated varint")
        b = buf[off]
        off += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            if b == 0 and shift:
                raise ProtocolError(name, off - 1, "overlong varint")
            break
        shift += 7
        if shift >= 35:
            raise ProtocolError(name, off, "varint longer than 5 bytes")
    if result > 0xFFFFFFFF:
        raise ProtocolError(name, off, "varint exceeds 32 bits")
    return result, off


def _put_uvarint(out: bytearray, v: int) -> None:
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _zigzag_varints(out: bytearray, deltas: list[int], name: str, what: str) -> None:
    zz = [(d << 1) ^ (d >> 63) for d in deltas]
    if not zz or max(zz) < 0x80:
        out += bytes(zz)
        return
    if max(zz) > 0xFFFFFFFF:
        # a varint carries at most 32 bits: the decoder refuses more
        worst = max(deltas, key=abs)
        raise ProtocolError(name, len(out), f"readings: {what} difference {worst} does not fit "
                            "a 32-bit zigzag varint")
    for v in zz:
        _put_uvarint(out, v)


def _length(buf: Buffer, off: int, n: int, name: str, field: str, limit: int) -> tuple[int, int]:
    ln, off = _uvarint(buf, off, n, name)
    if ln > limit:
        raise ProtocolError(name, off, f"{field}: length {ln} exceeds the maximum {limit}")
    return ln, off


def _need(off: int, size: int, n: int, name: str, field: str) -> None:
    if off + size > n:
        raise ProtocolError(name, n, f"{field}: truncated (needs {size} bytes at {off})")


def _text(buf: Buffer, off: int, ln: int, name: str, field: str) -> str:
    try:
        return bytes(buf[off:off + ln]).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(name, off, f"{field}: not UTF-8") from None


def _put_text(out: bytearray, value: str, name: str, field: str, limit: int) -> None:
    raw = value.encode("utf-8")
    if len(raw) > limit:
        raise ProtocolError(name, len(out), f"{field}: {len(raw)} bytes exceeds the maximum {limit}")
    _put_uvarint(out, len(raw))
    out += raw


def _put_bytes(out: bytearray, value: Buffer, name: str, field: str, limit: int) -> None:
    if len(value) > limit:
        raise ProtocolError(name, len(out), f"{field}: {len(value)} bytes exceeds the maximum {limit}")
    _put_uvarint(out, len(value))
    out += value


def _enum(cls: type[_E], value: int, name: str, off: int, field: str) -> _E:
    try:
        return cls(value)
    except ValueError:
        raise ProtocolError(name, off, f"{field}: {value} is not a {cls.__name__}") from None


def _bool(value: int, name: str, off: int, field: str) -> bool:
    if value > 1:
        raise ProtocolError(name, off, f"{field}: {value} is not a bool (0 or 1)")
    return value == 1


def _fixed_tlv(s: struct.Struct, buf: Buffer, off: int, ln: int, name: str, field: str) -> int:
    if ln != s.size:
        raise ProtocolError(name, off, f"{field}: length {ln}, expected {s.size}")
    return s.unpack_from(buf, off)[0]  # type: ignore[no-any-return]


def _pack_error(name: str, out: bytearray, checks: tuple[tuple[str, str, object], ...]) -> ProtocolError:
    for field, ftype, value in checks:
        lo, hi = _RANGES.get(ftype, (None, None))
        if lo is not None and hi is not None:
            if not isinstance(value, int) or not lo <= value <= hi:
                return ProtocolError(name, len(out), f"{field}: {value!r} does not fit {ftype}")
        elif ftype == "f32":
            try:
                struct.pack("<f", value)
            except (struct.error, OverflowError, TypeError):
                return ProtocolError(name, len(out), f"{field}: {value!r} does not fit f32")
    return ProtocolError(name, len(out), "a value does not fit its field")


@dataclass(frozen=True, slots=True)
class Series:
    """Readings of one schema: timestamps (unix s) and one column per measurement."""

    timestamps: tuple[int, ...]
    columns: tuple[tuple[int, ...], ...]

    def __len__(self) -> int:
        return len(self.timestamps)

    def rows(self) -> list[tuple[int, ...]]:
        return list(zip(self.timestamps, *self.columns, strict=True))


def _decode_series(
    buf: Buffer, off: int, n: int, name: str, schema: int, interval: int, limit: int, minor: int
) -> tuple[Series, int]:
    info = _SCHEMAS.get(schema)
    if info is None:
        raise ProtocolError(name, off, f"unknown sensor schema {schema}")
    first, ranges = info
    ncols = len(ranges)
    _need(off, 5 + first.size, n, name, "readings")
    count = buf[off]
    if count == 0 or count > limit:
        raise ProtocolError(name, off, f"readings: count {count} outside 1..{limit}")
    (t0,) = _U32.unpack_from(buf, off + 1)
    row0 = first.unpack_from(buf, off + 5)
    off += 5 + first.size
    m = count - 1
    nstreams = ncols + (1 if interval == 0 else 0)
    rest = n - off
    streams: list[Iterable[int]] = []
    fast = False
    if rest == m * nstreams or (minor > MINOR and rest > m * nstreams):
        # Every difference fits one varint byte: no Python loop per reading.
        block = bytes(buf[off:off + m * nstreams])
        if block.isascii():  # every byte below 0x80
            diffs = memoryview(block.translate(_ZZ_BYTE)).cast("b")
            streams = [diffs[i * m:(i + 1) * m] for i in range(nstreams)]
            off += m * nstreams
            fast = True
    if not fast:
        for _ in range(nstreams):
            col = []
            for _ in range(m):
                v, off = _uvarint(buf, off, n, name)
                col.append((v >> 1) ^ -(v & 1))
            streams.append(col)
    columns = []
    for i, (lo, hi) in enumerate(ranges):
        col_t = tuple(accumulate(streams[i], initial=row0[i]))
        # one-byte steps move at most 64 per reading: skip the range scan when that is safe
        if not (fast and lo + 64 * m <= row0[i] <= hi - 64 * m):
            if min(col_t) < lo or max(col_t) > hi:
                raise ProtocolError(name, off, f"readings: column {i} leaves its type's range")
        columns.append(col_t)
    if interval:
        timestamps = tuple(range(t0, t0 + count * interval, interval))
        bad = timestamps[-1] > 0xFFFFFFFF
    else:
        timestamps = tuple(accumulate(streams[ncols], initial=t0))
        bad = min(timestamps) < 0 or max(timestamps) > 0xFFFFFFFF
    if bad:
        raise ProtocolError(name, off, "readings: timestamp leaves u32")
    return Series(timestamps, tuple(columns)), off


def _encode_series(
    out: bytearray, name: str, schema: int, interval: int, series: Series, limit: int
) -> None:
    info = _SCHEMAS.get(schema)
    if info is None:
        raise ProtocolError(name, len(out), f"unknown sensor schema {schema}")
    first, ranges = info
    count = len(series.timestamps)
    if not 1 <= count <= limit:
        raise ProtocolError(name, len(out), f"readings: count {count} outside 1..{limit}")
    if len(series.columns) != len(ranges) or any(len(c) != count for c in series.columns):
        raise ProtocolError(name, len(out), "readings: columns do not match the schema")
    ts = series.timestamps
    if interval:
        if ts[-1] - ts[0] != (count - 1) * interval or any(
            b - a != interval for a, b in pairwise(ts)
        ):
            raise ProtocolError(name, len(out), "readings: timestamps are not `interval` apart")
    for i, (lo, hi) in enumerate(ranges):
        col = series.columns[i]
        if min(col) < lo or max(col) > hi:
            raise ProtocolError(name, len(out), f"readings: column {i} leaves its type's range")
    if min(ts) < 0 or max(ts) > 0xFFFFFFFF:
        raise ProtocolError(name, len(out), "readings: timestamp leaves u32")
    out.append(count)
    out += _U32.pack(ts[0])
    out += first.pack(*(c[0] for c in series.columns))
    for i, col in enumerate(series.columns):
        _zigzag_varints(out, [b - a for a, b in pairwise(col)], name, f"column {i}")
    if not interval:
        _zigzag_varints(out, [b - a for a, b in pairwise(ts)], name, "timestamp")


def _tlv_head(buf: Buffer, off: int, n: int, name: str) -> tuple[int, int, int]:
    tag = buf[off]
    ln, voff = _uvarint(buf, off + 1, n, name)
    if voff + ln > n:
        raise ProtocolError(name, off, f"field tag {tag}: truncated (length {ln})")
    return tag, voff, ln


def _put_tlv(out: bytearray, tag: int, value: bytes) -> None:
    out.append(tag)
    _put_uvarint(out, len(value))
    out += value


class DeviceClass(IntEnum):
    SENSOR = 0
    ACTUATOR = 1
    GATEWAY = 2
    CONTROLLER = 3
    MONITOR = 4


class BootCause(IntEnum):
    POWER_ON = 0
    TIMER = 1
    WATCHDOG = 2
    CRASH = 3
    SOFT_RESET = 4
    EXTERNAL_RESET = 5
    BROWNOUT = 6


class CommandOp(IntEnum):
    PING = 0
    SET_INTERVAL = 1
    SET_THRESHOLDS = 2
    STAY_AWAKE = 3
    REBOOT = 4
    SYNC_TIME = 5
    ROTATE_KEY = 6
    INSTALL_CERT = 7
    SET_KEYS = 8
    INSTALL_PSK = 12


class ResultStatus(IntEnum):
    OK = 0
    DUPLICATE = 1
    ERROR = 2
    UNKNOWN_OP = 3
    BAD_ARGS = 4
    EXPIRED = 5
    REFUSED = 6


class ConfigKey(IntEnum):
    SAMPLE_INTERVAL_S = 1
    SEND_EVERY = 2
    SEND_MAX_AGE_S = 3
    TEMP_HIGH = 4
    TEMP_LOW = 5
    HUMIDITY_HIGH = 6
    AWAKE_WINDOW_MS = 7
    LOW_BATTERY_MV = 8
    ALIGN_S = 9
    PRIORITY_ALARM = 10


class OtaState(IntEnum):
    IDLE = 0
    DOWNLOADING = 1
    VERIFYING = 2
    TRIAL = 3
    CONFIRMED = 4
    REVERTED = 5
    FAILED = 6
    REFUSED = 7


class OtaReason(IntEnum):
    NONE = 0
    BAD_SIGNATURE = 1
    UNKNOWN_KEY = 2
    BAD_HASH = 3
    MISSING_FILE = 4
    WRONG_BOARD = 5
    DOWNGRADE = 6
    TRUNCATED = 7
    LOW_BATTERY = 8
    HEALTH_CHECK = 9
    CRASHED = 10
    NO_SPACE = 11
    BAD_MANIFEST = 12


class CredOutcome(IntEnum):
    NONE = 0
    ROTATED = 1
    REFUSED = 2
    NO_SESSION = 3
    MISMATCH = 4
    ABORTED = 5
    REPROVISIONED = 6


class ErrorCode(IntEnum):
    MALFORMED = 1
    UNKNOWN_FRAME = 2
    UNSUPPORTED_VERSION = 3
    TOO_LARGE = 4
    RATE_LIMITED = 5
    QUARANTINED = 6
    INTERNAL = 7
    NOT_PROVISIONED = 8


@dataclass(frozen=True, slots=True)
class CommandArg:
    """One argument of a command op: an i32 on the wire, valid in low..high (inclusive)."""

    name: str
    low: int
    high: int
    unit: str

    @property
    def span(self) -> str:
        """`0..600 s`; a scaled unit reads `-32768..32767 (units of 0.01 degC)`."""
        unit = f" (units of {self.unit})" if self.unit[:1].isdigit() else f" {self.unit}"
        return f"{self.low}..{self.high}{unit.rstrip()}"


@dataclass(frozen=True, slots=True)
class CommandArgs:
    """What a command op takes: the first `required` of `args` must be given."""

    op: CommandOp
    doc: str
    required: int
    args: tuple[CommandArg, ...]
    usage: str

    def problem(self, values: Sequence[int]) -> str | None:
        """None if `values` suit the op, else what is wrong, naming the argument and its range."""
        name = self.op.name.lower()
        n = len(values)
        if not self.required <= n <= len(self.args):
            if not self.args:
                want = "no arguments"
            elif self.required == len(self.args):
                want = f"{self.required} argument{'s' if self.required > 1 else ''}"
            else:
                want = f"{self.required} to {len(self.args)} arguments"
            return f"{name} takes {want}, got {n} (usage: {self.usage})"
        for i, (a, v) in enumerate(zip(self.args, values), start=1):
            if not a.low <= v <= a.high:
                return f"{name}: argument {i} ({a.name}) must be in {a.span}, got {v}"
        return None


# command op -> its arguments, from the spec's [commands] tables
OP_ARGS: dict[CommandOp, CommandArgs] = {
    CommandOp.PING: CommandArgs(
        CommandOp.PING, "answer with the node's clock, and the tag if one is given (to match answers)", 0, (
            CommandArg('tag', -2147483648, 2147483647, ''),
        ), 'ping [TAG]'),
    CommandOp.SET_INTERVAL: CommandArgs(
        CommandOp.SET_INTERVAL, 'set the sampling interval (the configuration key of the same name)', 1, (
            CommandArg('sample_interval_s', 1, 86400, 's'),
        ), 'set_interval SAMPLE_INTERVAL_S'),
    CommandOp.SET_THRESHOLDS: CommandArgs(
        CommandOp.SET_THRESHOLDS, 'set the alarm thresholds (temp_low, temp_high, humidity_high)', 2, (
            CommandArg('temp_low', -32768, 32767, '0.01 degC'),
            CommandArg('temp_high', -32768, 32767, '0.01 degC'),
            CommandArg('humidity_high', 0, 65535, '0.01 %RH'),
        ), 'set_thresholds TEMP_LOW TEMP_HIGH [HUMIDITY_HIGH]'),
    CommandOp.STAY_AWAKE: CommandArgs(
        CommandOp.STAY_AWAKE, 'listen for downlink this long, beyond the awake window and budget', 1, (
            CommandArg('seconds', 0, 600, 's'),
        ), 'stay_awake SECONDS'),
    CommandOp.REBOOT: CommandArgs(
        CommandOp.REBOOT, 'reboot at the end of the wake', 0, (
        ), 'reboot'),
    CommandOp.SYNC_TIME: CommandArgs(
        CommandOp.SYNC_TIME, "set the node's clock", 1, (
            CommandArg('time', 0, 2147483647, 'unix seconds'),
        ), 'sync_time TIME'),
    CommandOp.ROTATE_KEY: CommandArgs(
        CommandOp.ROTATE_KEY, 'make a new device key on the node and send its certificate request (CSR_UP) for this rotation', 1, (
            CommandArg('rotation', 1, 2147483647, ''),
        ), 'rotate_key ROTATION'),
    CommandOp.INSTALL_CERT: CommandArgs(
        CommandOp.INSTALL_CERT, "one piece of the certificate issued for a rotation's key: bytes offset.. of total, in `data`", 3, (
            CommandArg('rotation', 1, 2147483647, ''),
            CommandArg('offset', 0, 4095, 'bytes'),
            CommandArg('total', 1, 4096, 'bytes'),
        ), 'install_cert ROTATION OFFSET TOTAL'),
    CommandOp.SET_KEYS: CommandArgs(
        CommandOp.SET_KEYS, "one piece of a signed firmware key list: bytes offset.. of total (the list's canonical JSON, then its 64-byte Ed25519 signature), in `data`", 3, (
            CommandArg('seq', 1, 2147483647, ''),
            CommandArg('offset', 0, 2047, 'bytes'),
            CommandArg('total', 65, 2048, 'bytes'),
        ), 'set_keys SEQ OFFSET TOTAL'),
    CommandOp.INSTALL_PSK: CommandArgs(
        CommandOp.INSTALL_PSK, 'a TLS-PSK session key for routine sends, 32 bytes in `data`; sent only while the device has no key on the broker, so only over a certificate-authenticated session (docs/session-keys.md)', 2, (
            CommandArg('key_id', 1, 2147483647, ''),
            CommandArg('port', 1, 65535, ''),
        ), 'install_psk KEY_ID PORT'),
}


@dataclass(frozen=True, slots=True)
class ClassLimits:
    """Resource constraints of a device class (see the spec)."""
    id: int
    max_message: int
    max_queue: int
    max_downlink: int
    wake_interval_s: int
    heartbeat_s: int
    budget_bytes_per_min: int
    power_managed: bool


DEVICE_CLASSES: dict[str, ClassLimits] = {
    'sensor': ClassLimits(0, 1024, 4096, 32, 60, 3600, 2048, True),
    'actuator': ClassLimits(1, 1024, 1024, 64, 30, 600, 8192, True),
    'gateway': ClassLimits(2, 4096, 65535, 256, 10, 60, 65536, False),
    'controller': ClassLimits(3, 2048, 8192, 128, 10, 300, 32768, False),
    'monitor': ClassLimits(4, 512, 2048, 16, 300, 7200, 1024, True),
}


@dataclass(frozen=True, slots=True)
class Measurement:
    name: str
    type: str
    unit: str
    scale: float


SCHEMAS: dict[int, tuple[str, tuple[Measurement, ...]]] = {
    1: ('env3', (Measurement('temperature', 'i16', 'degC', 0.01), Measurement('humidity', 'u16', '%RH', 0.01), Measurement('battery', 'u16', 'mV', 1.0),)),
}
# schema id -> (struct of the first row, value ranges per column)
_SCHEMAS: dict[int, tuple[struct.Struct, tuple[tuple[int, int], ...]]] = {
    1: (struct.Struct('<hHH'), ((-32768, 32767), (0, 65535), (0, 65535),)),
}
# schema id -> layout of one reading in a node's flash queue (u32 time + values)
RECORD_FORMATS: dict[int, str] = {
    1: '<IhHH',
}
SCHEMA_ENV3 = 1


@dataclass(frozen=True, slots=True)
class ConfigEntry:
    """one configuration value"""

    key: ConfigKey
    value: int

_S_CONFIG_ENTRY = struct.Struct('<Bi')


@dataclass(frozen=True, slots=True)
class Hello:
    """HELLO (up): A node woke and reports its state; the gateway answers with ACK, queued downlink, SLEEP_NOW."""

    FRAME_TYPE: ClassVar[int] = 1
    MAX_SIZE: ClassVar[int] = 133
    msg_id: int
    fw_version: int
    boot_cause: BootCause
    battery_mv: int
    rssi: int
    free_mem: int
    queue_depth: int
    dropped: int
    next_wake_s: int
    awake_window_ms: int
    time: int
    device_class: DeviceClass
    config_version: int = 0
    ota_state: OtaState = OtaState.IDLE
    ota_reason: OtaReason = OtaReason.NONE
    safe_mode: bool = False
    boots_without_send: int = 0
    mcu_temp: float = 0.0
    first_id: int = 0
    next_listen_s: int = 0
    clock_unset: bool = False
    cert_serial: bytes = b''
    cred_outcome: CredOutcome = CredOutcome.NONE
    cred_rotation: int = 0
    keys_seq: int = 0
    session_key: int = 0
    prev_awake_ms: int = 0
    prev_radio_ms: int = 0
    prev_sent: bool = False


@dataclass(frozen=True, slots=True)
class Burst:
    """BURST (up): Readings of one schema; the header's message id is the first reading's, the rest follow consecutively."""

    FRAME_TYPE: ClassVar[int] = 2
    MAX_SIZE: ClassVar[int] = 3579
    msg_id: int
    schema: int
    interval: int
    readings: Series
    node_clock: bool = False


@dataclass(frozen=True, slots=True)
class Ack:
    """ACK (down): Readings committed by the gateway: every id <= cumulative, plus the selective ids above it."""

    FRAME_TYPE: ClassVar[int] = 3
    MAX_SIZE: ClassVar[int] = 276
    msg_id: int
    cumulative: int
    selective: tuple[int, ...]
    time: int = 0
    pending: int = 0


@dataclass(frozen=True, slots=True)
class Command:
    """COMMAND (down): An operation for the node; idempotent by command id."""

    FRAME_TYPE: ClassVar[int] = 4
    MAX_SIZE: ClassVar[int] = 314
    msg_id: int
    command_id: int
    op: CommandOp
    args: tuple[int, ...]
    priority: int
    ttl_s: int
    data: bytes = b''
    expires_at: int = 0


@dataclass(frozen=True, slots=True)
class CommandResult:
    """COMMAND_RESULT (up): What the node did with a command; `duplicate` means it had already executed it."""

    FRAME_TYPE: ClassVar[int] = 5
    MAX_SIZE: ClassVar[int] = 103
    msg_id: int
    command_id: int
    status: ResultStatus
    code: int = 0
    detail: str = ''
    values: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ShadowReport:
    """SHADOW_REPORT (up): The configuration the node has applied."""

    FRAME_TYPE: ClassVar[int] = 6
    MAX_SIZE: ClassVar[int] = 91
    msg_id: int
    config_version: int
    entries: tuple[ConfigEntry, ...]


@dataclass(frozen=True, slots=True)
class ShadowDelta:
    """SHADOW_DELTA (down): Desired configuration values that differ from what the node reported."""

    FRAME_TYPE: ClassVar[int] = 7
    MAX_SIZE: ClassVar[int] = 91
    msg_id: int
    config_version: int
    entries: tuple[ConfigEntry, ...]


@dataclass(frozen=True, slots=True)
class OtaManifest:
    """OTA_MANIFEST (down): A signed firmware manifest; chunks follow on this and later wakes."""

    FRAME_TYPE: ClassVar[int] = 8
    MAX_SIZE: ClassVar[int] = 3155
    msg_id: int
    version: int
    total_size: int
    chunk_size: int
    manifest: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class OtaChunk:
    """OTA_CHUNK (down): One piece of a firmware image."""

    FRAME_TYPE: ClassVar[int] = 9
    MAX_SIZE: ClassVar[int] = 2062
    msg_id: int
    version: int
    index: int
    data: bytes


@dataclass(frozen=True, slots=True)
class OtaStatus:
    """OTA_STATUS (up): Progress of an update on the node."""

    FRAME_TYPE: ClassVar[int] = 10
    MAX_SIZE: ClassVar[int] = 67
    msg_id: int
    version: int
    state: OtaState
    chunks: int
    reason: OtaReason = OtaReason.NONE
    detail: str = ''


@dataclass(frozen=True, slots=True)
class SleepNow:
    """SLEEP_NOW (down): Nothing more this window; the node may sleep."""

    FRAME_TYPE: ClassVar[int] = 11
    MAX_SIZE: ClassVar[int] = 13
    msg_id: int
    sleep_s: int
    pending: int = 0


@dataclass(frozen=True, slots=True)
class Error:
    """ERROR (both): A frame was refused."""

    FRAME_TYPE: ClassVar[int] = 12
    MAX_SIZE: ClassVar[int] = 78
    msg_id: int
    code: ErrorCode
    ref: int
    detail: str = ''


@dataclass(frozen=True, slots=True)
class CsrUp:
    """CSR_UP (up): A PKCS#10 certificate request for a key the node made for a rotation; sent each sending wake until the certificate arrives."""

    FRAME_TYPE: ClassVar[int] = 13
    MAX_SIZE: ClassVar[int] = 524
    msg_id: int
    rotation: int
    csr: bytes


# largest length of each bounded field (bytes for bytes/str, items for arrays and series)
HELLO_CERT_SERIAL_MAX = 20
BURST_READINGS_MAX = 255
ACK_SELECTIVE_MAX = 64
COMMAND_ARGS_MAX = 8
COMMAND_DATA_MAX = 256
COMMAND_RESULT_DETAIL_MAX = 48
COMMAND_RESULT_VALUES_MAX = 8
SHADOW_REPORT_ENTRIES_MAX = 16
SHADOW_DELTA_ENTRIES_MAX = 16
OTA_MANIFEST_MANIFEST_MAX = 3072
OTA_MANIFEST_SIGNATURE_MAX = 64
OTA_CHUNK_DATA_MAX = 2048
OTA_STATUS_DETAIL_MAX = 48
ERROR_DETAIL_MAX = 64
CSR_UP_CSR_MAX = 512

Frame = Hello | Burst | Ack | Command | CommandResult | ShadowReport | ShadowDelta | OtaManifest | OtaChunk | OtaStatus | SleepNow | Error | CsrUp
HELLO = 1
BURST = 2
ACK = 3
COMMAND = 4
COMMAND_RESULT = 5
SHADOW_REPORT = 6
SHADOW_DELTA = 7
OTA_MANIFEST = 8
OTA_CHUNK = 9
OTA_STATUS = 10
SLEEP_NOW = 11
ERROR = 12
CSR_UP = 13


_S_HELLO_0 = struct.Struct('<IBHbIHIIHIB')
_S_HELLO_T12 = struct.Struct('<I')
_S_HELLO_T13 = struct.Struct('<B')
_S_HELLO_T14 = struct.Struct('<B')
_S_HELLO_T15 = struct.Struct('<B')
_S_HELLO_T16 = struct.Struct('<B')
_S_HELLO_T17 = struct.Struct('<f')
_S_HELLO_T18 = struct.Struct('<I')
_S_HELLO_T19 = struct.Struct('<I')
_S_HELLO_T20 = struct.Struct('<B')
_S_HELLO_T22 = struct.Struct('<B')
_S_HELLO_T23 = struct.Struct('<I')
_S_HELLO_T24 = struct.Struct('<I')
_S_HELLO_T32 = struct.Struct('<I')
_S_HELLO_T33 = struct.Struct('<I')
_S_HELLO_T34 = struct.Struct('<I')
_S_HELLO_T35 = struct.Struct('<B')


def decode_hello(buf: Buffer) -> Hello:
    """Decode a HELLO frame."""
    n = len(buf)
    minor, msg_id = _header(buf, n, 1, "HELLO")
    off = 6
    if off + 29 > n:
        raise ProtocolError("HELLO", n, f"truncated (needs 29 bytes of fields at {off})")
    v_fw_version, v_boot_cause, v_battery_mv, v_rssi, v_free_mem, v_queue_depth, v_dropped, v_next_wake_s, v_awake_window_ms, v_time, v_device_class = _S_HELLO_0.unpack_from(buf, off)
    v_boot_cause = _enum(BootCause, v_boot_cause, "HELLO", off + 4, "boot_cause")
    v_device_class = _enum(DeviceClass, v_device_class, "HELLO", off + 28, "device_class")
    off += 29
    v_config_version = 0
    v_ota_state = OtaState.IDLE
    v_ota_reason = OtaReason.NONE
    v_safe_mode = False
    v_boots_without_send = 0
    v_mcu_temp = 0.0
    v_first_id = 0
    v_next_listen_s = 0
    v_clock_unset = False
    v_cert_serial = b''
    v_cred_outcome = CredOutcome.NONE
    v_cred_rotation = 0
    v_keys_seq = 0
    v_session_key = 0
    v_prev_awake_ms = 0
    v_prev_radio_ms = 0
    v_prev_sent = False
    last = 0
    while off < n:
        tag, voff, tl = _tlv_head(buf, off, n, "HELLO")
        if tag <= last:
            raise ProtocolError("HELLO", off, f"field tag {tag} repeated or out of order")
        last = tag
        if tag == 12:
            x = _fixed_tlv(_S_HELLO_T12, buf, voff, tl, "HELLO", "config_version")
            v_config_version = x
        elif tag == 13:
            x = _fixed_tlv(_S_HELLO_T13, buf, voff, tl, "HELLO", "ota_state")
            v_ota_state = _enum(OtaState, x, "HELLO", voff, "ota_state")
        elif tag == 14:
            x = _fixed_tlv(_S_HELLO_T14, buf, voff, tl, "HELLO", "ota_reason")
            v_ota_reason = _enum(OtaReason, x, "HELLO", voff, "ota_reason")
        elif tag == 15:
            x = _fixed_tlv(_S_HELLO_T15, buf, voff, tl, "HELLO", "safe_mode")
            v_safe_mode = _bool(x, "HELLO", voff, "safe_mode")
        elif tag == 16:
            x = _fixed_tlv(_S_HELLO_T16, buf, voff, tl, "HELLO", "boots_without_send")
            v_boots_without_send = x
        elif tag == 17:
            x = _fixed_tlv(_S_HELLO_T17, buf, voff, tl, "HELLO", "mcu_temp")
            v_mcu_temp = x
        elif tag == 18:
            x = _fixed_tlv(_S_HELLO_T18, buf, voff, tl, "HELLO", "first_id")
            v_first_id = x
        elif tag == 19:
            x = _fixed_tlv(_S_HELLO_T19, buf, voff, tl, "HELLO", "next_listen_s")
            v_next_listen_s = x
        elif tag == 20:
            x = _fixed_tlv(_S_HELLO_T20, buf, voff, tl, "HELLO", "clock_unset")
            v_clock_unset = _bool(x, "HELLO", voff, "clock_unset")
        elif tag == 21:
            off = voff
            ln, off = _length(buf, off, voff + tl, "HELLO", "cert_serial", 20)
            _need(off, ln, voff + tl, "HELLO", "cert_serial")
            v_cert_serial = bytes(buf[off:off + ln])
            off += ln
            if off != voff + tl:
                raise ProtocolError("HELLO", off, "cert_serial: length does not match its value")
        elif tag == 22:
            x = _fixed_tlv(_S_HELLO_T22, buf, voff, tl, "HELLO", "cred_outcome")
            v_cred_outcome = _enum(CredOutcome, x, "HELLO", voff, "cred_outcome")
        elif tag == 23:
            x = _fixed_tlv(_S_HELLO_T23, buf, voff, tl, "HELLO", "cred_rotation")
            v_cred_rotation = x
        elif tag == 24:
            x = _fixed_tlv(_S_HELLO_T24, buf, voff, tl, "HELLO", "keys_seq")
            v_keys_seq = x
        elif tag == 32:
            x = _fixed_tlv(_S_HELLO_T32, buf, voff, tl, "HELLO", "session_key")
            v_session_key = x
        elif tag == 33:
            x = _fixed_tlv(_S_HELLO_T33, buf, voff, tl, "HELLO", "prev_awake_ms")
            v_prev_awake_ms = x
        elif tag == 34:
            x = _fixed_tlv(_S_HELLO_T34, buf, voff, tl, "HELLO", "prev_radio_ms")
            v_prev_radio_ms = x
        elif tag == 35:
            x = _fixed_tlv(_S_HELLO_T35, buf, voff, tl, "HELLO", "prev_sent")
            v_prev_sent = _bool(x, "HELLO", voff, "prev_sent")
        elif minor <= MINOR:
            raise ProtocolError("HELLO", off, f"unknown field tag {tag}")
        off = voff + tl
    return Hello(msg_id, v_fw_version, v_boot_cause, v_battery_mv, v_rssi, v_free_mem, v_queue_depth, v_dropped, v_next_wake_s, v_awake_window_ms, v_time, v_device_class, v_config_version, v_ota_state, v_ota_reason, v_safe_mode, v_boots_without_send, v_mcu_temp, v_first_id, v_next_listen_s, v_clock_unset, v_cert_serial, v_cred_outcome, v_cred_rotation, v_keys_seq, v_session_key, v_prev_awake_ms, v_prev_radio_ms, v_prev_sent)


def encode_hello(f: Hello) -> bytes:
    """Encode a HELLO frame."""
    out = bytearray()
    try:
        out += _HDR.pack(VERSION_BYTE, 1, f.msg_id)
    except (struct.error, TypeError):
        raise ProtocolError("HELLO", 2, f"msg_id: {f.msg_id!r} does not fit u32") from None
    if f.boot_cause not in BootCause._value2member_map_:
        raise ProtocolError("HELLO", len(out), f"boot_cause: {f.boot_cause!r} is not a BootCause")
    if f.device_class not in DeviceClass._value2member_map_:
        raise ProtocolError("HELLO", len(out), f"device_class: {f.device_class!r} is not a DeviceClass")
    try:
        out += _S_HELLO_0.pack(f.fw_version, f.boot_cause, f.battery_mv, f.rssi, f.free_mem, f.queue_depth, f.dropped, f.next_wake_s, f.awake_window_ms, f.time, f.device_class)
    except (struct.error, OverflowError, TypeError):
        raise _pack_error("HELLO", out, (("fw_version", "u32", f.fw_version), ("boot_cause", "enum", f.boot_cause), ("battery_mv", "u16", f.battery_mv), ("rssi", "i8", f.rssi), ("free_mem", "u32", f.free_mem), ("queue_depth", "u16", f.queue_depth), ("dropped", "u32", f.dropped), ("next_wake_s", "u32", f.next_wake_s), ("awake_window_ms", "u16", f.awake_window_ms), ("time", "u32", f.time), ("device_class", "enum", f.device_class),)) from None
    if f.config_version != 0:
        try:
            _put_tlv(out, 12, _S_HELLO_T12.pack(f.config_version))
        except (struct.error, OverflowError, TypeError):
            raise _pack_error("HELLO", out, (("config_version", "u32", f.config_version),)) from None
    if f.ota_state != OtaState.IDLE:
        if f.ota_state not in OtaState._value2member_map_:
            raise ProtocolError("HELLO", len(out), f"ota_state: {f.ota_state!r} is not a OtaState")
        try:
            _put_tlv(out, 13, _S_HELLO_T13.pack(f.ota_state))
        except (struct.error, OverflowError, TypeError):
            raise _pack_error("HELLO", out, (("ota_state", "enum", f.ota_state),)) from None
    if f.ota_reason != OtaReason.NONE:
        if f.ota_reason not in OtaReason._value2member_map_:
            raise ProtocolError("HELLO", len(out), f"ota_reason: {f.ota_reason!r} is not a OtaReason")
        try:
            _put_tlv(out, 14, _S_HELLO_T14.pack(f.ota_reason))
        except (struct.error, OverflowError, TypeError):
            raise _pack_error("HELLO", out, (("ota_reason", "enum", f.ota_reason),)) from None
    if f.safe_mode != False:
        try:
            _put_tlv(out, 15, _S_HELLO_T15.pack(1 if f.safe_mode else 0))
        except (struct.error, OverflowError, TypeError):
            raise _pack_error("HELLO", out, (("safe_mode", "bool", f.safe_mode),)) from None
    if f.boots_without_send != 0:
        try:
            _put_tlv(out, 16, _S_HELLO_T16.pack(f.boots_without_send))
        except (struct.error, OverflowError, TypeError):
            raise _pack_error("HELLO", out, (("boots_without_send", "u8", f.boots_without_send),)) from None
    if f.mcu_temp != 0.0:
        try:
            _put_tlv(out, 17, _S_HELLO_T17.pack(f.mcu_temp))
        except (struct.error, OverflowError, TypeError):
            raise _pack_error("HELLO", out, (("mcu_temp", "f32", f.mcu_temp),)) from None
    if f.first_id != 0:
        try:
            _put_tlv(out, 18, _S_HELLO_T18.pack(f.first_id))
        except (struct.error, OverflowError, TypeError):
            raise _pack_error("HELLO", out, (("first_id", "u32", f.first_id),)) from None
    if f.next_listen_s != 0:
        try:
            _put_tlv(out, 19, _S_HELLO_T19.pack(f.next_listen_s))
        except (struct.error, OverflowError, TypeError):
            raise _pack_error("HELLO", out, (("next_listen_s", "u32", f.next_listen_s),)) from None
    if f.clock_unset != False:
        try:
            _put_tlv(out, 20, _S_HELLO_T20.pack(1 if f.clock_unset else 0))
        except (struct.error, OverflowError, TypeError):
            raise _pack_error("HELLO", out, (("clock_unset", "bool", f.clock_unset),)) from None
    if f.cert_serial != b'':
        tmp = bytearray()
        _put_bytes(tmp, f.cert_serial, "HELLO", "cert_serial", 20)
        _put_tlv(out, 21, bytes(tmp))
    if f.cred_outcome != CredOutcome.NONE:
        if f.cred_outcome not in CredOutcome._value2member_map_:
            raise ProtocolError("HELLO", len(out), f"cred_outcome: {f.cred_outcome!r} is not a CredOutcome")
        try:
            _put_tlv(out, 22, _S_HELLO_T22.pack(f.cred_outcome))
        except (struct.error, OverflowError, TypeError):
            raise _pack_error("HELLO", out, (("cred_outcome", "enum", f.cred_outcome),)) from None
    if f.cred_rotation != 0:
        try:
            _put_tlv(out, 23, _S_HELLO_T23.pack(f.cred_rotation))
        except (struct.error, OverflowError, TypeError):
            raise _pack_error("HELLO", out, (("cred_rotation", "u32", f.cred_rotation),)) from None
    if f.keys_seq != 0:
        try:
            _put_tlv(out, 24, _S_HELLO_T24.pack(f.keys_seq))
        except (struct.error, OverflowError, TypeError):
            raise _pack_error("HELLO", out, (("keys_seq", "u32", f.keys_seq),)) from None
    if f.session_key != 0:
        try:
            _put_tlv(out, 32, _S_HELLO_T32.pack(f.session_key))
        except (struct.error, OverflowError, TypeError):
            raise _pack_error("HELLO", out, (("session_key", "u32", f.session_key),)) from None
    if f.prev_awake_ms != 0:
        try:
            _put_tlv(out, 33, _S_HELLO_T33.pack(f.prev_awake_ms))
        except (struct.error, OverflowError, TypeError):
            raise _pack_error("HELLO", out, (("prev_awake_ms", "u32", f.prev_awake_ms),)) from None
    if f.prev_radio_ms != 0:
        try:
            _put_tlv(out, 34, _S_HELLO_T34.pack(f.prev_radio_ms))
        except (struct.error, OverflowError, TypeError):
            raise _pack_error("HELLO", out, (("prev_radio_ms", "u32", f.prev_radio_ms),)) from None
    if f.prev_sent != False:
        try:
            _put_tlv(out, 35, _S_HELLO_T35.pack(1 if f.prev_sent else 0))
        except (struct.error, OverflowError, TypeError):
            raise _pack_error("HELLO", out, (("prev_sent", "bool", f.prev_sent),)) from None
    return bytes(out)

_S_BURST_0 = struct.Struct('<BH')
_S_BURST_T4 = struct.Struct('<B')


def decode_burst(buf: Buffer) -> Burst:
    """Decode a BURST frame."""
    n = len(buf)
    minor, msg_id = _header(buf, n, 2, "BURST")
    off = 6
    if off + 3 > n:
        raise ProtocolError("BURST", n, f"truncated (needs 3 bytes of fields at {off})")
    v_schema, v_interval = _S_BURST_0.unpack_from(buf, off)
    off += 3
    v_readings, off = _decode_series(buf, off, n, "BURST", v_schema, v_interval, 255, minor)
    v_node_clock = False
    last = 0
    while off < n:
        tag, voff, tl = _tlv_head(buf, off, n, "BURST")
        if tag <= last:
            raise ProtocolError("BURST", off, f"field tag {tag} repeated or out of order")
        last = tag
        if tag == 4:
            x = _fixed_tlv(_S_BURST_T4, buf, voff, tl, "BURST", "node_clock")
            v_node_clock = _bool(x, "BURST", voff, "node_clock")
        elif minor <= MINOR:
            raise ProtocolError("BURST", off, f"unknown field tag {tag}")
        off = voff + tl
    return Burst(msg_id, v_schema, v_interval, v_readings, v_node_clock)


def encode_burst(f: Burst) -> bytes:
    """Encode a BURST frame."""
    out = bytearray()
    try:
        out += _HDR.pack(VERSION_BYTE, 2, f.msg_id)
    except (struct.error, TypeError):
        raise ProtocolError("BURST", 2, f"msg_id: {f.msg_id!r} does not fit u32") from None
    try:
        out += _S_BURST_0.pack(f.schema, f.interval)
    except (struct.error, OverflowError, TypeError):
        raise _pack_error("BURST", out, (("schema", "u8", f.schema), ("interval", "u16", f.interval),)) from None
    _encode_series(out, "BURST", f.schema, f.interval, f.readings, 255)
    if f.node_clock != False:
        try:
            _put_tlv(out, 4, _S_BURST_T4.pack(1 if f.node_clock else 0))
        except (struct.error, OverflowError, TypeError):
            raise _pack_error("BURST", out, (("node_clock", "bool", f.node_clock),)) from None
    return bytes(out)

_S_ACK_0 = struct.Struct('<I')
_S_ACK_T3 = struct.Struct('<I')
_S_ACK_T4 = struct.Struct('<B')


def decode_ack(buf: Buffer) -> Ack:
    """Decode a ACK frame."""
    n = len(buf)
    minor, msg_id = _header(buf, n, 3, "ACK")
    off = 6
    if off + 4 > n:
        raise ProtocolError("ACK", n, f"truncated (needs 4 bytes of fields at {off})")
    v_cumulative, = _S_ACK_0.unpack_from(buf, off)
    off += 4
    cnt, off = _length(buf, off, n, "ACK", "selective", 64)
    _need(off, cnt * 4, n, "ACK", "selective")
    v_selective = struct.unpack_from(f"<{cnt}I", buf, off)
    off += cnt * 4
    v_time = 0
    v_pending = 0
    last = 0
    while off < n:
        tag, voff, tl = _tlv_head(buf, off, n, "ACK")
        if tag <= last:
            raise ProtocolError("ACK", off, f"field tag {tag} repeated or out of order")
        last = tag
        if tag == 3:
            x = _fixed_tlv(_S_ACK_T3, buf, voff, tl, "ACK", "time")
            v_time = x
        elif tag == 4:
            x = _fixed_tlv(_S_ACK_T4, buf, voff, tl, "ACK", "pending")
            v_pending = x
        elif minor <= MINOR:
            raise ProtocolError("ACK", off, f"unknown field tag {tag}")
        off = voff + tl
    return Ack(msg_id, v_cumulative, v_selective, v_time, v_pending)


def encode_ack(f: Ack) -> bytes:
    """Encode a ACK frame."""
    out = bytearray()
    try:
        out += _HDR.pack(VERSION_BYTE, 3, f.msg_id)
    except (struct.error, TypeError):
        raise ProtocolError("ACK", 2, f"msg_id: {f.msg_id!r} does not fit u32") from None
    try:
        out += _S_ACK_0.pack(f.cumulative)
    except (struct.error, OverflowError, TypeError):
        raise _pack_error("ACK", out, (("cumulative", "u32", f.cumulative),)) from None
    if len(f.selective) > 64:
        raise ProtocolError("ACK", len(out), "selective: more than 64 items")
    _put_uvarint(out, len(f.selective))
    try:
        out += struct.pack(f"<{len(f.selective)}I", *f.selective)
    except (struct.error, TypeError):
        raise ProtocolError("ACK", len(out), "selective: an item does not fit u32") from None
    if f.time != 0:
        try:
            _put_tlv(out, 3, _S_ACK_T3.pack(f.time))
        except (struct.error, OverflowError, TypeError):
            raise _pack_error("ACK", out, (("time", "u32", f.time),)) from None
    if f.pending != 0:
        try:
            _put_tlv(out, 4, _S_ACK_T4.pack(f.pending))
        except (struct.error, OverflowError, TypeError):
            raise _pack_error("ACK", out, (("pending", "u8", f.pending),)) from None
    return bytes(out)

_S_COMMAND_0 = struct.Struct('<IB')
_S_COMMAND_2 = struct.Struct('<BH')
_S_COMMAND_T7 = struct.Struct('<I')


def decode_command(buf: Buffer) -> Command:
    """Decode a COMMAND frame."""
    n = len(buf)
    minor, msg_id = _header(buf, n, 4, "COMMAND")
    off = 6
    if off + 5 > n:
        raise ProtocolError("COMMAND", n, f"truncated (needs 5 bytes of fields at {off})")
    v_command_id, v_op = _S_COMMAND_0.unpack_from(buf, off)
    v_op = _enum(CommandOp, v_op, "COMMAND", off + 4, "op")
    off += 5
    cnt, off = _length(buf, off, n, "COMMAND", "args", 8)
    _need(off, cnt * 4, n, "COMMAND", "args")
    v_args = struct.unpack_from(f"<{cnt}i", buf, off)
    off += cnt * 4
    if off + 3 > n:
        raise ProtocolError("COMMAND", n, f"truncated (needs 3 bytes of fields at {off})")
    v_priority, v_ttl_s = _S_COMMAND_2.unpack_from(buf, off)
    off += 3
    v_data = b''
    v_expires_at = 0
    last = 0
    while off < n:
        tag, voff, tl = _tlv_head(buf, off, n, "COMMAND")
        if tag <= last:
            raise ProtocolError("COMMAND", off, f"field tag {tag} repeated or out of order")
        last = tag
        if tag == 6:
            off = voff
            ln, off = _length(buf, off, voff + tl, "COMMAND", "data", 256)
            _need(off, ln, voff + tl, "COMMAND", "data")
            v_data = bytes(buf[off:off + ln])
            off += ln
            if off != voff + tl:
                raise ProtocolError("COMMAND", off, "data: length does not match its value")
        elif tag == 7:
            x = _fixed_tlv(_S_COMMAND_T7, buf, voff, tl, "COMMAND", "expires_at")
            v_expires_at = x
        elif minor <= MINOR:
            raise ProtocolError("COMMAND", off, f"unknown field tag {tag}")
        off = voff + tl
    return Command(msg_id, v_command_id, v_op, v_args, v_priority, v_ttl_s, v_data, v_expires_at)


def encode_command(f: Command) -> bytes:
    """Encode a COMMAND frame."""
    out = bytearray()
    try:
        out += _HDR.pack(VERSION_BYTE, 4, f.msg_id)
    except (struct.error, TypeError):
        raise ProtocolError("COMMAND", 2, f"msg_id: {f.msg_id!r} does not fit u32") from None
    if f.op not in CommandOp._value2member_map_:
        raise ProtocolError("COMMAND", len(out), f"op: {f.op!r} is not a CommandOp")
    try:
        out += _S_COMMAND_0.pack(f.command_id, f.op)
    except (struct.error, OverflowError, TypeError):
        raise _pack_error("COMMAND", out, (("command_id", "u32", f.command_id), ("op", "enum", f.op),)) from None
    if len(f.args) > 8:
        raise ProtocolError("COMMAND", len(out), "args: more than 8 items")
    _put_uvarint(out, len(f.args))
    try:
        out += struct.pack(f"<{len(f.args)}i", *f.args)
    except (struct.error, TypeError):
        raise ProtocolError("COMMAND", len(out), "args: an item does not fit i32") from None
    try:
        out += _S_COMMAND_2.pack(f.priority, f.ttl_s)
    except (struct.error, OverflowError, TypeError):
        raise _pack_error("COMMAND", out, (("priority", "u8", f.priority), ("ttl_s", "u16", f.ttl_s),)) from None
    if f.data != b'':
        tmp = bytearray()
        _put_bytes(tmp, f.data, "COMMAND", "data", 256)
        _put_tlv(out, 6, bytes(tmp))
    if f.expires_at != 0:
        try:
            _put_tlv(out, 7, _S_COMMAND_T7.pack(f.expires_at))
        except (struct.error, OverflowError, TypeError):
            raise _pack_error("COMMAND", out, (("expires_at", "u32", f.expires_at),)) from None
    return bytes(out)

_S_COMMAND_RESULT_0 = struct.Struct('<IB')
_S_COMMAND_RESULT_T3 = struct.Struct('<i')


def decode_command_result(buf: Buffer) -> CommandResult:
    """Decode a COMMAND_RESULT frame."""
    n = len(buf)
    minor, msg_id = _header(buf, n, 5, "COMMAND_RESULT")
    off = 6
    if off + 5 > n:
        raise ProtocolError("COMMAND_RESULT", n, f"truncated (needs 5 bytes of fields at {off})")
    v_command_id, v_status = _S_COMMAND_RESULT_0.unpack_from(buf, off)
    v_status = _enum(ResultStatus, v_status, "COMMAND_RESULT", off + 4, "status")
    off += 5
    v_code = 0
    v_detail = ''
    v_values = ()
    last = 0
    while off < n:
        tag, voff, tl = _tlv_head(buf, off, n, "COMMAND_RESULT")
        if tag <= last:
            raise ProtocolError("COMMAND_RESULT", off, f"field tag {tag} repeated or out of order")
        last = tag
        if tag == 3:
            x = _fixed_tlv(_S_COMMAND_RESULT_T3, buf, voff, tl, "COMMAND_RESULT", "code")
            v_code = x
        elif tag == 4:
            off = voff
            ln, off = _length(buf, off, voff + tl, "COMMAND_RESULT", "detail", 48)
            _need(off, ln, voff + tl, "COMMAND_RESULT", "detail")
            v_detail = _text(buf, off, ln, "COMMAND_RESULT", "detail")
            off += ln
            if off != voff + tl:
                raise ProtocolError("COMMAND_RESULT", off, "detail: length does not match its value")
        elif tag == 5:
            off = voff
            cnt, off = _length(buf, off, voff + tl, "COMMAND_RESULT", "values", 8)
            _need(off, cnt * 4, voff + tl, "COMMAND_RESULT", "values")
            v_values = struct.unpack_from(f"<{cnt}i", buf, off)
            off += cnt * 4
            if off != voff + tl:
                raise ProtocolError("COMMAND_RESULT", off, "values: length does not match its value")
        elif minor <= MINOR:
            raise ProtocolError("COMMAND_RESULT", off, f"unknown field tag {tag}")
        off = voff + tl
    return CommandResult(msg_id, v_command_id, v_status, v_code, v_detail, v_values)


def encode_command_result(f: CommandResult) -> bytes:
    """Encode a COMMAND_RESULT frame."""
    out = bytearray()
    try:
        out += _HDR.pack(VERSION_BYTE, 5, f.msg_id)
    except (struct.error, TypeError):
        raise ProtocolError("COMMAND_RESULT", 2, f"msg_id: {f.msg_id!r} does not fit u32") from None
    if f.status not in ResultStatus._value2member_map_:
        raise ProtocolError("COMMAND_RESULT", len(out), f"status: {f.status!r} is not a ResultStatus")
    try:
        out += _S_COMMAND_RESULT_0.pack(f.command_id, f.status)
    except (struct.error, OverflowError, TypeError):
        raise _pack_error("COMMAND_RESULT", out, (("command_id", "u32", f.command_id), ("status", "enum", f.status),)) from None
    if f.code != 0:
        try:
            _put_tlv(out, 3, _S_COMMAND_RESULT_T3.pack(f.code))
        except (struct.error, OverflowError, TypeError):
            raise _pack_error("COMMAND_RESULT", out, (("code", "i32", f.code),)) from None
    if f.detail != '':
        tmp = bytearray()
        _put_text(tmp, f.detail, "COMMAND_RESULT", "detail", 48)
        _put_tlv(out, 4, bytes(tmp))
    if f.values != ():
        tmp = bytearray()
        if len(f.values) > 8:
            raise ProtocolError("COMMAND_RESULT", len(tmp), "values: more than 8 items")
        _put_uvarint(tmp, len(f.values))
        try:
            tmp += struct.pack(f"<{len(f.values)}i", *f.values)
        except (struct.error, TypeError):
            raise ProtocolError("COMMAND_RESULT", len(tmp), "values: an item does not fit i32") from None
        _put_tlv(out, 5, bytes(tmp))
    return bytes(out)

_S_SHADOW_REPORT_0 = struct.Struct('<I')


def decode_shadow_report(buf: Buffer) -> ShadowReport:
    """Decode a SHADOW_REPORT frame."""
    n = len(buf)
    minor, msg_id = _header(buf, n, 6, "SHADOW_REPORT")
    off = 6
    if off + 4 > n:
        raise ProtocolError("SHADOW_REPORT", n, f"truncated (needs 4 bytes of fields at {off})")
    v_config_version, = _S_SHADOW_REPORT_0.unpack_from(buf, off)
    off += 4
    cnt, off = _length(buf, off, n, "SHADOW_REPORT", "entries", 16)
    _need(off, cnt * 5, n, "SHADOW_REPORT", "entries")
    v_entries = tuple(ConfigEntry(_enum(ConfigKey, r[0], "SHADOW_REPORT", off, "entries.key"), r[1]) for r in _S_CONFIG_ENTRY.iter_unpack(bytes(buf[off:off + cnt * 5])))
    off += cnt * 5
    if off != n and minor <= MINOR:
        raise ProtocolError("SHADOW_REPORT", off, f"{n - off} trailing bytes")
    return ShadowReport(msg_id, v_config_version, v_entries)


def encode_shadow_report(f: ShadowReport) -> bytes:
    """Encode a SHADOW_REPORT frame."""
    out = bytearray()
    try:
        out += _HDR.pack(VERSION_BYTE, 6, f.msg_id)
    except (struct.error, TypeError):
        raise ProtocolError("SHADOW_REPORT", 2, f"msg_id: {f.msg_id!r} does not fit u32") from None
    try:
        out += _S_SHADOW_REPORT_0.pack(f.config_version)
    except (struct.error, OverflowError, TypeError):
        raise _pack_error("SHADOW_REPORT", out, (("config_version", "u32", f.config_version),)) from None
    if len(f.entries) > 16:
        raise ProtocolError("SHADOW_REPORT", len(out), "entries: more than 16 items")
    _put_uvarint(out, len(f.entries))
    for e in f.entries:
        if e.key not in ConfigKey._value2member_map_:
            raise ProtocolError("SHADOW_REPORT", len(out), f"entries.key: {e.key!r} is not a ConfigKey")
        try:
            out += _S_CONFIG_ENTRY.pack(e.key, e.value)
        except (struct.error, TypeError):
            raise _pack_error("SHADOW_REPORT", out, (("entries.key", "enum", e.key), ("entries.value", "i32", e.value),)) from None
    return bytes(out)

_S_SHADOW_DELTA_0 = struct.Struct('<I')


def decode_shadow_delta(buf: Buffer) -> ShadowDelta:
    """Decode a SHADOW_DELTA frame."""
    n = len(buf)
    minor, msg_id = _header(buf, n, 7, "SHADOW_DELTA")
    off = 6
    if off + 4 > n:
        raise ProtocolError("SHADOW_DELTA", n, f"truncated (needs 4 bytes of fields at {off})")
    v_config_version, = _S_SHADOW_DELTA_0.unpack_from(buf, off)
    off += 4
    cnt, off = _length(buf, off, n, "SHADOW_DELTA", "entries", 16)
    _need(off, cnt * 5, n, "SHADOW_DELTA", "entries")
    v_entries = tuple(ConfigEntry(_enum(ConfigKey, r[0], "SHADOW_DELTA", off, "entries.key"), r[1]) for r in _S_CONFIG_ENTRY.iter_unpack(bytes(buf[off:off + cnt * 5])))
    off += cnt * 5
    if off != n and minor <= MINOR:
        raise ProtocolError("SHADOW_DELTA", off, f"{n - off} trailing bytes")
    return ShadowDelta(msg_id, v_config_version, v_entries)


def encode_shadow_delta(f: ShadowDelta) -> bytes:
    """Encode a SHADOW_DELTA frame."""
    out = bytearray()
    try:
        out += _HDR.pack(VERSION_BYTE, 7, f.msg_id)
    except (struct.error, TypeError):
        raise ProtocolError("SHADOW_DELTA", 2, f"msg_id: {f.msg_id!r} does not fit u32") from None
    try:
        out += _S_SHADOW_DELTA_0.pack(f.config_version)
    except (struct.error, OverflowError, TypeError):
        raise _pack_error("SHADOW_DELTA", out, (("config_version", "u32", f.config_version),)) from None
    if len(f.entries) > 16:
        raise ProtocolError("SHADOW_DELTA", len(out), "entries: more than 16 items")
    _put_uvarint(out, len(f.entries))
    for e in f.entries:
        if e.key not in ConfigKey._value2member_map_:
            raise ProtocolError("SHADOW_DELTA", len(out), f"entries.key: {e.key!r} is not a ConfigKey")
        try:
            out += _S_CONFIG_ENTRY.pack(e.key, e.value)
        except (struct.error, TypeError):
            raise _pack_error("SHADOW_DELTA", out, (("entries.key", "enum", e.key), ("entries.value", "i32", e.value),)) from None
    return bytes(out)

_S_OTA_MANIFEST_0 = struct.Struct('<IIH')


def decode_ota_manifest(buf: Buffer) -> OtaManifest:
    """Decode a OTA_MANIFEST frame."""
    n = len(buf)
    minor, msg_id = _header(buf, n, 8, "OTA_MANIFEST")
    off = 6
    if off + 10 > n:
        raise ProtocolError("OTA_MANIFEST", n, f"truncated (needs 10 bytes of fields at {off})")
    v_version, v_total_size, v_chunk_size = _S_OTA_MANIFEST_0.unpack_from(buf, off)
    off += 10
    ln, off = _length(buf, off, n, "OTA_MANIFEST", "manifest", 3072)
    _need(off, ln, n, "OTA_MANIFEST", "manifest")
    v_manifest = bytes(buf[off:off + ln])
    off += ln
    ln, off = _length(buf, off, n, "OTA_MANIFEST", "signature", 64)
    _need(off, ln, n, "OTA_MANIFEST", "signature")
    v_signature = bytes(buf[off:off + ln])
    off += ln
    if off != n and minor <= MINOR:
        raise ProtocolError("OTA_MANIFEST", off, f"{n - off} trailing bytes")
    return OtaManifest(msg_id, v_version, v_total_size, v_chunk_size, v_manifest, v_signature)


def encode_ota_manifest(f: OtaManifest) -> bytes:
    """Encode a OTA_MANIFEST frame."""
    out = bytearray()
    try:
        out += _HDR.pack(VERSION_BYTE, 8, f.msg_id)
    except (struct.error, TypeError):
        raise ProtocolError("OTA_MANIFEST", 2, f"msg_id: {f.msg_id!r} does not fit u32") from None
    try:
        out += _S_OTA_MANIFEST_0.pack(f.version, f.total_size, f.chunk_size)
    except (struct.error, OverflowError, TypeError):
        raise _pack_error("OTA_MANIFEST", out, (("version", "u32", f.version), ("total_size", "u32", f.total_size), ("chunk_size", "u16", f.chunk_size),)) from None
    _put_bytes(out, f.manifest, "OTA_MANIFEST", "manifest", 3072)
    _put_bytes(out, f.signature, "OTA_MANIFEST", "signature", 64)
    return bytes(out)

_S_OTA_CHUNK_0 = struct.Struct('<IH')


def decode_ota_chunk(buf: Buffer) -> OtaChunk:
    """Decode a OTA_CHUNK frame."""
    n = len(buf)
    minor, msg_id = _header(buf, n, 9, "OTA_CHUNK")
    off = 6
    if off + 6 > n:
        raise ProtocolError("OTA_CHUNK", n, f"truncated (needs 6 bytes of fields at {off})")
    v_version, v_index = _S_OTA_CHUNK_0.unpack_from(buf, off)
    off += 6
    ln, off = _length(buf, off, n, "OTA_CHUNK", "data", 2048)
    _need(off, ln, n, "OTA_CHUNK", "data")
    v_data = bytes(buf[off:off + ln])
    off += ln
    if off != n and minor <= MINOR:
        raise ProtocolError("OTA_CHUNK", off, f"{n - off} trailing bytes")
    return OtaChunk(msg_id, v_version, v_index, v_data)


def encode_ota_chunk(f: OtaChunk) -> bytes:
    """Encode a OTA_CHUNK frame."""
    out = bytearray()
    try:
        out += _HDR.pack(VERSION_BYTE, 9, f.msg_id)
    except (struct.error, TypeError):
        raise ProtocolError("OTA_CHUNK", 2, f"msg_id: {f.msg_id!r} does not fit u32") from None
    try:
        out += _S_OTA_CHUNK_0.pack(f.version, f.index)
    except (struct.error, OverflowError, TypeError):
        raise _pack_error("OTA_CHUNK", out, (("version", "u32", f.version), ("index", "u16", f.index),)) from None
    _put_bytes(out, f.data, "OTA_CHUNK", "data", 2048)
    return bytes(out)

_S_OTA_STATUS_0 = struct.Struct('<IBH')
_S_OTA_STATUS_T4 = struct.Struct('<B')


def decode_ota_status(buf: Buffer) -> OtaStatus:
    """Decode a OTA_STATUS frame."""
    n = len(buf)
    minor, msg_id = _header(buf, n, 10, "OTA_STATUS")
    off = 6
    if off + 7 > n:
        raise ProtocolError("OTA_STATUS", n, f"truncated (needs 7 bytes of fields at {off})")
    v_version, v_state, v_chunks = _S_OTA_STATUS_0.unpack_from(buf, off)
    v_state = _enum(OtaState, v_state, "OTA_STATUS", off + 4, "state")
    off += 7
    v_reason = OtaReason.NONE
    v_detail = ''
    last = 0
    while off < n:
        tag, voff, tl = _tlv_head(buf, off, n, "OTA_STATUS")
        if tag <= last:
            raise ProtocolError("OTA_STATUS", off, f"field tag {tag} repeated or out of order")
        last = tag
        if tag == 4:
            x = _fixed_tlv(_S_OTA_STATUS_T4, buf, voff, tl, "OTA_STATUS", "reason")
            v_reason = _enum(OtaReason, x, "OTA_STATUS", voff, "reason")
        elif tag == 5:
            off = voff
            ln, off = _length(buf, off, voff + tl, "OTA_STATUS", "detail", 48)
            _need(off, ln, voff + tl, "OTA_STATUS", "detail")
            v_detail = _text(buf, off, ln, "OTA_STATUS", "detail")
            off += ln
            if off != voff + tl:
                raise ProtocolError("OTA_STATUS", off, "detail: length does not match its value")
        elif minor <= MINOR:
            raise ProtocolError("OTA_STATUS", off, f"unknown field tag {tag}")
        off = voff + tl
    return OtaStatus(msg_id, v_version, v_state, v_chunks, v_reason, v_detail)


def encode_ota_status(f: OtaStatus) -> bytes:
    """Encode a OTA_STATUS frame."""
    out = bytearray()
    try:
        out += _HDR.pack(VERSION_BYTE, 10, f.msg_id)
    except (struct.error, TypeError):
        raise ProtocolError("OTA_STATUS", 2, f"msg_id: {f.msg_id!r} does not fit u32") from None
    if f.state not in OtaState._value2member_map_:
        raise ProtocolError("OTA_STATUS", len(out), f"state: {f.state!r} is not a OtaState")
    try:
        out += _S_OTA_STATUS_0.pack(f.version, f.state, f.chunks)
    except (struct.error, OverflowError, TypeError):
        raise _pack_error("OTA_STATUS", out, (("version", "u32", f.version), ("state", "enum", f.state), ("chunks", "u16", f.chunks),)) from None
    if f.reason != OtaReason.NONE:
        if f.reason not in OtaReason._value2member_map_:
            raise ProtocolError("OTA_STATUS", len(out), f"reason: {f.reason!r} is not a OtaReason")
        try:
            _put_tlv(out, 4, _S_OTA_STATUS_T4.pack(f.reason))
        except (struct.error, OverflowError, TypeError):
            raise _pack_error("OTA_STATUS", out, (("reason", "enum", f.reason),)) from None
    if f.detail != '':
        tmp = bytearray()
        _put_text(tmp, f.detail, "OTA_STATUS", "detail", 48)
        _put_tlv(out, 5, bytes(tmp))
    return bytes(out)

_S_SLEEP_NOW_0 = struct.Struct('<I')
_S_SLEEP_NOW_T2 = struct.Struct('<B')


def decode_sleep_now(buf: Buffer) -> SleepNow:
    """Decode a SLEEP_NOW frame."""
    n = len(buf)
    minor, msg_id = _header(buf, n, 11, "SLEEP_NOW")
    off = 6
    if off + 4 > n:
        raise ProtocolError("SLEEP_NOW", n, f"truncated (needs 4 bytes of fields at {off})")
    v_sleep_s, = _S_SLEEP_NOW_0.unpack_from(buf, off)
    off += 4
    v_pending = 0
    last = 0
    while off < n:
        tag, voff, tl = _tlv_head(buf, off, n, "SLEEP_NOW")
        if tag <= last:
            raise ProtocolError("SLEEP_NOW", off, f"field tag {tag} repeated or out of order")
        last = tag
        if tag == 2:
            x = _fixed_tlv(_S_SLEEP_NOW_T2, buf, voff, tl, "SLEEP_NOW", "pending")
            v_pending = x
        elif minor <= MINOR:
            raise ProtocolError("SLEEP_NOW", off, f"unknown field tag {tag}")
        off = voff + tl
    return SleepNow(msg_id, v_sleep_s, v_pending)


def encode_sleep_now(f: SleepNow) -> bytes:
    """Encode a SLEEP_NOW frame."""
    out = bytearray()
    try:
        out += _HDR.pack(VERSION_BYTE, 11, f.msg_id)
    except (struct.error, TypeError):
        raise ProtocolError("SLEEP_NOW", 2, f"msg_id: {f.msg_id!r} does not fit u32") from None
    try:
        out += _S_SLEEP_NOW_0.pack(f.sleep_s)
    except (struct.error, OverflowError, TypeError):
        raise _pack_error("SLEEP_NOW", out, (("sleep_s", "u32", f.sleep_s),)) from None
    if f.pending != 0:
        try:
            _put_tlv(out, 2, _S_SLEEP_NOW_T2.pack(f.pending))
        except (struct.error, OverflowError, TypeError):
            raise _pack_error("SLEEP_NOW", out, (("pending", "u8", f.pending),)) from None
    return bytes(out)

_S_ERROR_0 = struct.Struct('<BI')


def decode_error(buf: Buffer) -> Error:
    """Decode a ERROR frame."""
    n = len(buf)
    minor, msg_id = _header(buf, n, 12, "ERROR")
    off = 6
    if off + 5 > n:
        raise ProtocolError("ERROR", n, f"truncated (needs 5 bytes of fields at {off})")
    v_code, v_ref = _S_ERROR_0.unpack_from(buf, off)
    v_code = _enum(ErrorCode, v_code, "ERROR", off + 0, "code")
    off += 5
    v_detail = ''
    last = 0
    while off < n:
        tag, voff, tl = _tlv_head(buf, off, n, "ERROR")
        if tag <= last:
            raise ProtocolError("ERROR", off, f"field tag {tag} repeated or out of order")
        last = tag
        if tag == 3:
            off = voff
            ln, off = _length(buf, off, voff + tl, "ERROR", "detail", 64)
            _need(off, ln, voff + tl, "ERROR", "detail")
            v_detail = _text(buf, off, ln, "ERROR", "detail")
            off += ln
            if off != voff + tl:
                raise ProtocolError("ERROR", off, "detail: length does not match its value")
        elif minor <= MINOR:
            raise ProtocolError("ERROR", off, f"unknown field tag {tag}")
        off = voff + tl
    return Error(msg_id, v_code, v_ref, v_detail)


def encode_error(f: Error) -> bytes:
    """Encode a ERROR frame."""
    out = bytearray()
    try:
        out += _HDR.pack(VERSION_BYTE, 12, f.msg_id)
    except (struct.error, TypeError):
        raise ProtocolError("ERROR", 2, f"msg_id: {f.msg_id!r} does not fit u32") from None
    if f.code not in ErrorCode._value2member_map_:
        raise ProtocolError("ERROR", len(out), f"code: {f.code!r} is not a ErrorCode")
    try:
        out += _S_ERROR_0.pack(f.code, f.ref)
    except (struct.error, OverflowError, TypeError):
        raise _pack_error("ERROR", out, (("code", "enum", f.code), ("ref", "u32", f.ref),)) from None
    if f.detail != '':
        tmp = bytearray()
        _put_text(tmp, f.detail, "ERROR", "detail", 64)
        _put_tlv(out, 3, bytes(tmp))
    return bytes(out)

_S_CSR_UP_0 = struct.Struct('<I')


def decode_csr_up(buf: Buffer) -> CsrUp:
    """Decode a CSR_UP frame."""
    n = len(buf)
    minor, msg_id = _header(buf, n, 13, "CSR_UP")
    off = 6
    if off + 4 > n:
        raise ProtocolError("CSR_UP", n, f"truncated (needs 4 bytes of fields at {off})")
    v_rotation, = _S_CSR_UP_0.unpack_from(buf, off)
    off += 4
    ln, off = _length(buf, off, n, "CSR_UP", "csr", 512)
    _need(off, ln, n, "CSR_UP", "csr")
    v_csr = bytes(buf[off:off + ln])
    off += ln
    if off != n and minor <= MINOR:
        raise ProtocolError("CSR_UP", off, f"{n - off} trailing bytes")
    return CsrUp(msg_id, v_rotation, v_csr)


def encode_csr_up(f: CsrUp) -> bytes:
    """Encode a CSR_UP frame."""
    out = bytearray()
    try:
        out += _HDR.pack(VERSION_BYTE, 13, f.msg_id)
    except (struct.error, TypeError):
        raise ProtocolError("CSR_UP", 2, f"msg_id: {f.msg_id!r} does not fit u32") from None
    try:
        out += _S_CSR_UP_0.pack(f.rotation)
    except (struct.error, OverflowError, TypeError):
        raise _pack_error("CSR_UP", out, (("rotation", "u32", f.rotation),)) from None
    _put_bytes(out, f.csr, "CSR_UP", "csr", 512)
    return bytes(out)

_DECODERS: dict[int, Callable[[Buffer], Frame]] = {
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
_ENCODERS: dict[type, Callable[[Any], bytes]] = {
    Hello: encode_hello,
    Burst: encode_burst,
    Ack: encode_ack,
    Command: encode_command,
    CommandResult: encode_command_result,
    ShadowReport: encode_shadow_report,
    ShadowDelta: encode_shadow_delta,
    OtaManifest: encode_ota_manifest,
    OtaChunk: encode_ota_chunk,
    OtaStatus: encode_ota_status,
    SleepNow: encode_sleep_now,
    Error: encode_error,
    CsrUp: encode_csr_up,
}


def decode(buf: Buffer) -> Frame:
    """Decode any frame; raises ProtocolError on anything but a valid frame."""
    if len(buf) < 2:
        raise ProtocolError("frame", len(buf), "truncated header")
    fn = _DECODERS.get(buf[1])
    if fn is None:
        raise ProtocolError("frame", 1, f"unknown frame type {buf[1]}", ErrorCode.UNKNOWN_FRAME)
    return fn(buf)


def encode(frame: Frame) -> bytes:
    """Encode any frame dataclass."""
    fn = _ENCODERS.get(type(frame))
    if fn is None:
        raise TypeError(f"not a frame: {frame!r}")
    return fn(frame)
