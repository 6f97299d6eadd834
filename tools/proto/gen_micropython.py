"""Generate firmware/proto.py: the MicroPython codec (no typing, const(), caller's buffers).

Encoders write into a caller-provided bytearray/memoryview and return the length; a
BURST is encoded straight from the flash queue's records without building lists.
Decoders return tuples (indices are generated constants) and raise only ProtocolError.
"""

from __future__ import annotations

from pathlib import Path

from tools.proto.emit import Lines, fixed_groups
from tools.proto.spec import (
    HEADER_SIZE,
    INT_RANGES,
    SCALARS,
    SPEC_REL,
    Field,
    Frame,
    Spec,
    SpecError,
    varint_size,
)

RUNTIME = Path(__file__).with_name("runtime_micropython.py")
_BODY = "# ---- runtime (copied) ----\n"


def runtime_body() -> str:
    """runtime_micropython.py below its runtime marker, as copied into firmware/proto.py."""
    return RUNTIME.read_text(encoding="utf-8").split(_BODY, 1)[1].strip("\n")


def _c(name: str) -> str:
    return name.upper()


def _default(f: Field) -> str:
    if f.type == "bool":
        return "True" if f.default else "False"
    if f.type == "array":
        return "()"
    if f.type == "bytes":
        return repr(str(f.default).encode())
    return repr(f.default)


# Enums the node needs before it sends (configuration), in firmware/wire.py.
WIRE_ENUMS = ("device_class", "config_key")


def _enums(w: Lines, spec: Spec, names: tuple[str, ...] | None, tables: bool) -> None:
    for e in spec.enums:
        if names is not None and e.name not in names:
            continue
        w(f"# enum {e.name}")
        for k, v in e.values:
            w(f"{_c(e.name)}_{_c(k)} = const({v})")
        if tables:
            w(f"_E_{_c(e.name)} = ({', '.join(str(v) for _, v in e.values)},)")


def _limits_and_records(w: Lines, spec: Spec) -> None:
    w("# device class id -> (max_message, max_queue, max_downlink, wake_interval_s, heartbeat_s,")
    w("#                     budget_bytes_per_min, power_managed)")
    w("CLASS_LIMITS = {")
    for c in spec.classes:
        w(f"    {c.id}: ({c.max_message}, {c.max_queue}, {c.max_downlink}, {c.wake_interval_s}, "
          f"{c.heartbeat_s}, {c.budget_bytes_per_min}, {c.power_managed}),")
    w("}")
    w()
    w("# sensor schemas: a reading in the flash queue is RECORD_<SCHEMA> (u32 time, then values)")
    for s in spec.schemas:
        w(f"SCHEMA_{_c(s.name)} = const({s.id})")
        w(f"RECORD_{_c(s.name)} = {s.record_fmt!r}")
        w(f"RECORD_SIZE_{_c(s.name)} = const({s.record_size})")


def generate_op_args(spec: Spec) -> str:
    """firmware/op_args.py: each command op's argument count and ranges, for the node's own
    check. Its own module: commands.execute imports it only when a command arrives, so a
    wake without one does not pay for the table."""
    detail = next(f for f in spec.frame("COMMAND_RESULT").fields if f.name == "detail")
    w = Lines()
    w("# Torpor command arguments for MicroPython (the firmware): what each op takes.")
    w(f"# Generated from {SPEC_REL} by `torpor proto gen`: generated, do not edit.")
    w("# The gateway checks the same table (gateway/proto.py OP_ARGS) before it queues a command.")
    w("import proto")
    w()
    w("# command op -> (required count, ((name, low, high, unit), ...))")
    w("OP_ARGS = {")
    for c in spec.commands:
        args = "".join(f"({a.name!r}, {a.low}, {a.high}, {a.unit!r}), " for a in c.args)
        w(f"    proto.{_c('command_op')}_{_c(c.op)}: ({c.required}, ({args.rstrip()})),")
    w("}")
    w()
    w()
    w("def check(op, args):")
    w("# None if args suit the known op, else why not, short enough for COMMAND_RESULT.detail", 1)
    w("req, spec = OP_ARGS[op]", 1)
    w("n = len(args)", 1)
    w("if n < req or n > len(spec):", 1)
    w("if req == len(spec):", 2)
    w('return "want %d arg%s, got %d" % (req, "" if req == 1 else "s", n)', 3)
    w('return "want %d..%d args, got %d" % (req, len(spec), n)', 2)
    w("for i in range(n):", 1)
    w("name, lo, hi, unit = spec[i]", 2)
    w("v = args[i]", 2)
    w("if v < lo or v > hi:", 2)
    w(f'return ("%s %d: not in %d..%d %s" % (name, v, lo, hi, unit)).rstrip()[:{detail.max}]', 3)
    w("return None", 1)
    return "\n".join(w.lines) + "\n"


def generate_wire(spec: Spec) -> str:
    """firmware/wire.py: what a wake needs of the protocol before it sends (record layouts,
    class limits, configuration enums), without the codec: proto.py costs about 30 kB of
    heap when imported, and most wakes only sample."""
    w = Lines()
    w("# Torpor wire protocol constants a node needs before it sends (MicroPython firmware).")
    w(f"# Generated from {SPEC_REL} by `torpor proto gen`: generated, do not edit.")
    w("# The same values as in proto.py, which a wake imports only when it sends.")
    w("from micropython import const")
    w()
    _enums(w, spec, WIRE_ENUMS, tables=False)
    w()
    _limits_and_records(w, spec)
    return "\n".join(w.lines) + "\n"


# Enums the bootloader needs, in firmware/bootwire.py, under their bare value names.
BOOT_ENUMS = ("boot_cause", "ota_state", "ota_reason")


def generate_bootwire(spec: Spec) -> str:
    """firmware/bootwire.py: what the bootloader needs of the spec (its version, the manifest
    limit, boot causes, OTA states and reasons). It is installed with the bootloader, which
    cannot import proto.py or wire.py: those live in the image it checks. Values go by their
    bare names (IDLE, BAD_HASH), the names bootstate and the board modules export: every new
    name is a string interned on the node's heap for good."""
    w = Lines()
    w("# Torpor wire facts for the bootloader (MicroPython firmware).")
    w(f"# Generated from {SPEC_REL} by `torpor proto gen`: generated, do not edit.")
    w("# Installed with the bootloader (not in an image): the same values as in proto.py.")
    w("from micropython import const")
    w()
    w("# [bootloader] version: an image's manifest names the lowest it needs (min_bootloader)")
    w(f"BOOTLOADER_VERSION = const({spec.bootloader_version})")
    w("# largest signed manifest an image may carry (OTA_MANIFEST's manifest field)")
    w(f"MAX_MANIFEST = const({spec.max_manifest})")
    seen: dict[str, str] = {}
    for name in BOOT_ENUMS:
        w()
        w(f"# enum {name}")
        for k, v in spec.enum(name).values:
            if k in seen:
                raise SpecError(f"enums.{name}.values: '{k}' is also a value of {seen[k]} "
                                "(bootwire.py names them alike)")
            seen[k] = name
            w(f"{_c(k)} = const({v})")
    return "\n".join(w.lines) + "\n"


def generate_boot_cause(spec: Spec) -> str:
    """boards/_boot_cause.py: the boot_cause enum under the names of the Board API, for the
    board modules (installed with them, importable wherever a board module is)."""
    w = Lines()
    w("# Torpor boot causes for the board modules (MicroPython): the protocol's boot_cause enum.")
    w(f"# Generated from {SPEC_REL} by `torpor proto gen`: generated, do not edit.")
    w("from micropython import const")
    w()
    for k, v in spec.enum("boot_cause").values:
        w(f"{_c(k)} = const({v})")
    return "\n".join(w.lines) + "\n"


def generate(spec: Spec) -> str:
    w = Lines()
    w("# Torpor wire protocol codec for MicroPython (the firmware).")
    w(f"# Generated from {SPEC_REL} by `torpor proto gen`: generated, do not edit.")
    w("# Encoders write into a caller's buffer (at least MAX_<FRAME> bytes) and return the length;")
    w("# decoders return tuples indexed by the <FRAME>_<FIELD> constants and raise ProtocolError.")
    w("from micropython import const")
    w("import struct")
    w()
    w(f"MAJOR = const({spec.major})")
    w(f"MINOR = const({spec.minor})")
    w(f"VERSION_BYTE = const(0x{spec.version_byte:02X})")
    w(f"HEADER_SIZE = const({HEADER_SIZE})")
    w(f"MAX_FRAME = const({spec.max_frame})")
    w()
    w("# frame types and their largest encoding")
    for fr in spec.frames:
        w(f"{fr.name} = const({fr.id})")
        w(f"MAX_{fr.name} = const({spec.max_frame_size(fr)})")
    w()
    _enums(w, spec, None, tables=True)
    w()
    _limits_and_records(w, spec)
    w("# schema id -> (record size, (offset, width, signed) per value)")
    w("_SCHEMA_COLS = {")
    for s in spec.schemas:
        cols = []
        off = 4
        for m in s.measurements:
            size = SCALARS[m.type][1]
            cols.append(f"({off}, {size}, {m.type.startswith('i')})")
            off += size
        w(f"    {s.id}: ({s.record_size}, ({', '.join(cols)},)),")
    w("}")
    w()
    w("# indices into decoded tuples (0 is always the message id)")
    for fr in spec.frames:
        for i, f in enumerate(fr.fields, start=1):
            w(f"{fr.name}_{_c(f.name)} = const({i})")
    w()
    w()
    w(runtime_body())
    for fr in spec.frames:
        _gen_encode(w, spec, fr)
        _gen_decode(w, spec, fr)
    w()
    w()
    w("_DECODERS = {")
    for fr in spec.frames:
        w(f"    {fr.id}: decode_{fr.snake},")
    w("}")
    w()
    w()
    w("def decode(buf):")
    w("# any frame -> (frame type, decoded tuple)", 1)
    w("if len(buf) < 2:", 1)
    w('raise _err("frame", len(buf), "truncated header")', 2)
    w("fn = _DECODERS.get(buf[1])", 1)
    w("if fn is None:", 1)
    w('raise _err("frame", 1, "unknown frame type %d" % buf[1], ERROR_CODE_UNKNOWN_FRAME)', 2)
    w("return buf[1], fn(buf)", 1)
    _gen_in_place(w, spec)
    return "\n".join(w.lines) + "\n"




def _gen_in_place(w: Lines, spec: Spec) -> None:
    """Frames of [in_place]: offsets of their fields and a check of the plain shape, so the
    node reads them from its receive buffer without the tuple and lists of decode_*.
    Few names: each module-level name is an entry in the module's dict on the node's heap."""
    if not spec.in_place:
        return
    w()
    w()
    w("# Frames read in place (the spec's [in_place]). When end = in_place(p) is not 0, p is a")
    w("# plain frame of type p[1] and read_<frame>(p, end) gives its fixed fields: required field X")
    w("# at _<FRAME>_AT_X, optional field Y at opt_at(p, end, _<FRAME>_TAG_Y). Any other frame goes")
    w("# to decode(), which accepts or refuses it. (Underscored: compile-time constants, no heap.)")
    for name in spec.in_place:
        lay = spec.in_place_layout(spec.frame(name))
        for fname, off in lay.at:
            w(f"_{name}_AT_{_c(fname)} = const({off})")
        for fname, tag, _size in lay.optional:
            w(f"_{name}_TAG_{_c(fname)} = const({tag})")
    w()
    w()
    w("def in_place(p):")
    w("# 0, or where the optional fields of plain frame p start (see above)", 1)
    w("n = len(p)", 1)
    w("if n < HEADER_SIZE or n > MAX_FRAME or p[0] >> 4 != MAJOR:", 1)
    w("return 0", 2)
    w("t = p[1]", 1)
    for k, name in enumerate(spec.in_place):
        lay = spec.in_place_layout(spec.frame(name))
        w(f"{'if' if k == 0 else 'elif'} t == {name}:", 1)
        w(f"end = {lay.end}", 2)
        pairs = "".join(f"\\x{tag:02x}\\x{size:02x}" for _f, tag, size in lay.optional)
        w(f'opt = b"{pairs}"  # (tag, size) of each optional field', 2)
        cond = "n < end" + "".join(f" or p[{off}]" for _f, off in lay.empty)
        w(f"if {cond}:{'  # ' + ', '.join(f for f, _o in lay.empty) + ': empty' if lay.empty else ''}", 2)
        w("return 0", 3)
    w("else:", 1)
    w("return 0", 2)
    w("off = end", 1)
    w("j = 0", 1)
    w("while off < n:", 1)
    w("if off + 2 > n:", 2)
    w("return 0", 3)
    w("tag = p[off]", 2)
    w("while j < len(opt) and opt[j] != tag:", 2)
    w("j += 2", 3)
    w("if j == len(opt) or p[off + 1] != opt[j + 1] or off + 2 + opt[j + 1] > n:", 2)
    w("return 0", 3)
    w("j += 2", 2)
    w("off += 2 + p[off + 1]", 2)
    w("return end", 1)
    for name in spec.in_place:
        _gen_read_in_place(w, spec, spec.frame(name))


def _gen_read_in_place(w: Lines, spec: Spec, fr: Frame) -> None:
    """read_<frame>(p, end): the fixed fields of a frame in_place() passed, as a tuple in spec
    order (optional ones at their default when absent): one small tuple per frame, where the
    decoder builds a tuple, a list and views."""
    fields = [f for f in fr.fields if f.fixed]
    for f in fields:
        if f.type == "f32":
            raise SpecError(f"in_place.frames: {fr.name}.{f.name} is a float, which the node does not read in place")

    def value(f: Field, off: str) -> str:
        size = SCALARS[f.type][1]
        v = f"_rd(p, {off}, {size}, {f.type.startswith('i')})"
        return f"{v} != 0" if f.type == "bool" else v

    w()
    w()
    w(f"def read_{fr.snake}(p, end):")
    names = ", ".join(f.name for f in fields)
    w(f"# {fr.name} read in place (end = in_place(p)): ({names}); an absent optional field has its default", 1)
    out = []
    for f in fields:
        if f.optional:
            w(f"o = opt_at(p, end, _{fr.name}_TAG_{_c(f.name)})", 1)
            default = int(f.default or 0) if f.type != "bool" else bool(f.default)
            w(f"v_{f.name} = {value(f, 'o')} if o else {default!r}", 1)
            out.append(f"v_{f.name}")
        else:
            out.append(value(f, f"_{fr.name}_AT_{_c(f.name)}"))
    w(f"return ({', '.join(out)}{',' if len(out) == 1 else ''})", 1)


def _value_size_expr(spec: Spec, f: Field) -> str:
    """MicroPython expression for the encoded size of a variable optional field's value."""
    v = f.name
    if f.type == "bytes":
        return f"_uv_size(len({v})) + len({v})"
    if f.type == "str":
        return f"_uv_size(len({v}_b)) + len({v}_b)"
    if f.type == "array":
        assert f.of
        size = SCALARS[f.of][1] if f.of in SCALARS else spec.record(f.of).size
        return f"_uv_size(len({v})) + len({v}) * {size}"
    raise AssertionError(f.type)


def _encode_value(w: Lines, spec: Spec, fr: Frame, f: Field, ind: int) -> None:
    N = fr.name
    v = f.name
    if f.type == "bytes":
        w(f'off = _put_raw(buf, off, {v}, {f.max}, "{N}", "{v}")', ind)
    elif f.type == "str":
        w(f'off = _put_raw(buf, off, {v}_b, {f.max}, "{N}", "{v}")', ind)
    elif f.type == "array":
        assert f.of
        w(f"if len({v}) > {f.max}:", ind)
        w(f'raise _err("{N}", off, "{v}: more than {f.max} items")', ind + 1)
        w(f"off = _put_uv(buf, off, len({v}))", ind)
        if f.of in SCALARS:
            code, size = SCALARS[f.of]
            w(f"for x in {v}:", ind)
            w(f'struct.pack_into("<{code}", buf, off, x)', ind + 1)
            w(f"off += {size}", ind + 1)
        else:
            rec = spec.record(f.of)
            w(f"for x in {v}:", ind)
            w(f'struct.pack_into("<{rec.fmt}", buf, off, *x)', ind + 1)
            w(f"off += {rec.size}", ind + 1)
    elif f.type == "series":
        w(f'off = _encode_series(buf, off, "{N}", {f.schema_field}, {f.interval_field}, recs, count, {f.max})', ind)
    else:
        raise AssertionError(f.type)


def _gen_encode(w: Lines, spec: Spec, fr: Frame) -> None:
    N = fr.name
    params = ["buf", "msg_id"]
    for f in fr.required:
        params += ["recs", "count"] if f.type == "series" else [f.name]
    params += [f"{f.name}={_default(f)}" for f in fr.optional]
    w()
    w()
    w(f"def encode_{fr.snake}({', '.join(params)}):")
    if any(f.type == "series" for f in fr.fields):
        w("# recs: `count` readings in the schema's RECORD layout, oldest first", 1)
    w(f"_put_header(buf, {N}, msg_id)", 1)
    w(f"off = {HEADER_SIZE}", 1)
    for f in fr.fields:
        if f.type == "str":
            w(f"{f.name}_b = {f.name}.encode()", 1)
    for g in fixed_groups(fr.required):
        if isinstance(g, list):
            fmt = "<" + "".join(SCALARS[f.type][0] for f in g)
            size = sum(SCALARS[f.type][1] for f in g)
            vals = ", ".join(f.name for f in g)
            w(f'struct.pack_into("{fmt}", buf, off, {vals})', 1)
            w(f"off += {size}", 1)
        else:
            _encode_value(w, spec, fr, g, 1)
    for f in fr.optional:
        if f.type == "array":
            w(f"if len({f.name}):", 1)
        else:
            w(f"if {f.name} != {_default(f)}:", 1)
        w(f"buf[off] = {f.tag}", 2)
        if f.fixed:
            code, size = SCALARS[f.type]
            w(f"buf[off + 1] = {size}", 2)
            w(f'struct.pack_into("<{code}", buf, off + 2, {f.name})', 2)
            w(f"off += {2 + size}", 2)
        else:
            w(f"off = _put_uv(buf, off + 1, {_value_size_expr(spec, f)})", 2)
            _encode_value(w, spec, fr, f, 2)
    w("return off", 1)


def _decode_value(w: Lines, spec: Spec, fr: Frame, f: Field, ind: int, end: str) -> None:
    N = fr.name
    v = f.name
    if f.type in ("bytes", "str"):
        w(f'ln = _length(buf, off, {end}, "{N}", "{v}", {f.max})', ind)
        w("off = _pos[0]", ind)
        w(f'_need(off, ln, {end}, "{N}", "{v}")', ind)
        if f.type == "bytes":
            w(f"v_{v} = buf[off:off + ln]", ind)
        else:
            w(f'v_{v} = _text(buf, off, ln, "{N}", "{v}")', ind)
        w("off += ln", ind)
    elif f.type == "array":
        assert f.of
        w(f'cnt = _length(buf, off, {end}, "{N}", "{v}", {f.max})', ind)
        w("off = _pos[0]", ind)
        if f.of in SCALARS:
            code, size = SCALARS[f.of]
            w(f'_need(off, cnt * {size}, {end}, "{N}", "{v}")', ind)
            w(f'v_{v} = [struct.unpack_from("<{code}", buf, off + {size} * i)[0] for i in range(cnt)]', ind)
            w(f"off += cnt * {size}", ind)
        else:
            rec = spec.record(f.of)
            w(f'_need(off, cnt * {rec.size}, {end}, "{N}", "{v}")', ind)
            w(f"v_{v} = []", ind)
            w("for i in range(cnt):", ind)
            w(f'x = struct.unpack_from("<{rec.fmt}", buf, off)', ind + 1)
            pos = 0
            for j, rf in enumerate(rec.fields):
                if rf.type == "enum":
                    assert rf.enum
                    w(f'_enum(x[{j}], _E_{_c(rf.enum)}, "{N}", off + {pos}, "{v}.{rf.name}")', ind + 1)
                elif rf.type == "bool":
                    w(f'_bool(x[{j}], "{N}", off + {pos}, "{v}.{rf.name}")', ind + 1)
                pos += SCALARS[rf.type][1]
            w(f"v_{v}.append(x)", ind + 1)
            w(f"off += {rec.size}", ind + 1)
    elif f.type == "series":
        w(f'v_{v} = _decode_series(buf, off, {end}, "{N}", v_{f.schema_field}, v_{f.interval_field}, {f.max})', ind)
        w("off = _pos[0]", ind)
    else:
        raise AssertionError(f.type)


def _check_scalar(w: Lines, fr: Frame, f: Field, ind: int, where: str) -> None:
    N = fr.name
    if f.type == "enum":
        assert f.enum
        w(f'_enum(v_{f.name}, _E_{_c(f.enum)}, "{N}", {where}, "{f.name}")', ind)
    elif f.type == "bool":
        w(f'v_{f.name} = _bool(v_{f.name}, "{N}", {where}, "{f.name}")', ind)


def _gen_decode(w: Lines, spec: Spec, fr: Frame) -> None:
    N = fr.name
    w()
    w()
    w(f"def decode_{fr.snake}(buf):")
    w("n = len(buf)", 1)
    w(f'minor = _header(buf, n, {N}, "{N}")', 1)
    w("buf = memoryview(buf)", 1)
    w(f"off = {HEADER_SIZE}", 1)
    for g in fixed_groups(fr.required):
        if isinstance(g, list):
            fmt = "<" + "".join(SCALARS[f.type][0] for f in g)
            size = sum(SCALARS[f.type][1] for f in g)
            w(f'_need(off, {size}, n, "{N}", "{g[0].name}")', 1)
            names = ", ".join(f"v_{f.name}" for f in g) + ("," if len(g) == 1 else "")
            w(f'{names} = struct.unpack_from("{fmt}", buf, off)', 1)
            pos = 0
            for f in g:
                _check_scalar(w, fr, f, 1, f"off + {pos}")
                pos += SCALARS[f.type][1]
            w(f"off += {size}", 1)
        else:
            _decode_value(w, spec, fr, g, 1, "n")
    for f in fr.optional:
        w(f"v_{f.name} = {_default(f) if f.type != 'array' else '[]'}", 1)
    if fr.optional:
        w("last = 0", 1)
        w("while off < n:", 1)
        w(f'tl = _tlv(buf, off, n, "{N}")', 2)
        w("tag = _pos[1]", 2)
        w("voff = _pos[0]", 2)
        w("if tag <= last:", 2)
        w(f'raise _err("{N}", off, "field tag %d repeated or out of order" % tag)', 3)
        w("last = tag", 2)
        first = True
        for f in fr.optional:
            w(f"{'if' if first else 'elif'} tag == {f.tag}:", 2)
            first = False
            if f.fixed:
                code, size = SCALARS[f.type]
                w(f'v_{f.name} = _fixed_tlv("<{code}", {size}, buf, voff, tl, "{N}", "{f.name}")', 3)
                _check_scalar(w, fr, f, 3, "voff")
            else:
                w("off = voff", 3)
                _decode_value(w, spec, fr, f, 3, "voff + tl")
                w("if off != voff + tl:", 3)
                w(f'raise _err("{N}", off, "{f.name}: length does not match its value")', 4)
        w("elif minor <= MINOR:", 2)
        w(f'raise _err("{N}", off, "unknown field tag %d" % tag)', 3)
        w("off = voff + tl", 2)
    else:
        w("if off != n and minor <= MINOR:", 1)
        w(f'raise _err("{N}", off, "%d trailing bytes" % (n - off))', 2)
    vals = ", ".join(["_msg_id(buf)"] + [f"v_{f.name}" for f in fr.fields])
    w(f"return ({vals})", 1)


__all__ = ["generate", "varint_size", "INT_RANGES"]
