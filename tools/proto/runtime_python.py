"""The CPython codec runtime: what every generated decoder and encoder calls.

`torpor proto gen` copies this file into gateway/proto.py: its imports, then the spec's
constants and enums, then everything below the runtime marker. The stand-ins between the
markers are not copied: they take the place of what the generated module defines, so this
file is linted, type-checked and importable on its own.
"""

# ---- imports (copied) ----
from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from itertools import accumulate, pairwise
from typing import TypeVar

# ---- stand-ins for the generated module (not copied) ----
MAJOR = 1
MINOR = 0
HEADER_SIZE = 6
MAX_FRAME = 4096
_U32 = struct.Struct("<I")
_RANGES: dict[str, tuple[int, int]] = {}
# schema id -> (struct of the first row, value ranges per column)
_SCHEMAS: dict[int, tuple[struct.Struct, tuple[tuple[int, int], ...]]] = {}


class ErrorCode(IntEnum):
    MALFORMED = 1
    UNKNOWN_FRAME = 2
    UNSUPPORTED_VERSION = 3
    TOO_LARGE = 4


# ---- runtime (copied) ----
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
