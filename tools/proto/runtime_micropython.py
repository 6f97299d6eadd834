# mypy: ignore-errors
# ruff: noqa: UP031, B904
"""The MicroPython codec runtime: what every generated decoder and encoder calls.

`torpor proto gen` copies everything below the runtime marker into firmware/proto.py, after
the spec's constants. The stand-ins above it take the place of what the generated module
defines, so this file is linted on its own. It is MicroPython code (no typing: the type
checker skips it; `%` formatting and bare re-raises are the port's idioms).
"""

# ---- stand-ins for the generated module (not copied) ----
import struct

from micropython import const

MAJOR = const(1)
VERSION_BYTE = const(0x10)
HEADER_SIZE = const(6)
MAX_FRAME = const(4096)
ERROR_CODE_MALFORMED = const(1)
ERROR_CODE_UNSUPPORTED_VERSION = const(3)
ERROR_CODE_TOO_LARGE = const(4)
# schema id -> (record size, (offset, width, signed) per value)
_SCHEMA_COLS = {}


# ---- runtime (copied) ----
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
