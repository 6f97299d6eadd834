"""Generate gateway/proto.py: the typed CPython codec (frozen dataclasses, struct decoding).

Decoders raise only ProtocolError (frame name and byte offset in the message). A BURST
decodes straight into columns; regular bursts whose deltas fit one byte each take a path
with no Python-level loop per reading.
"""

from __future__ import annotations

from pathlib import Path

from tools.proto.emit import Lines, fixed_groups
from tools.proto.spec import HEADER_SIZE, INT_RANGES, SCALARS, SPEC_REL, Field, Frame, Spec

RUNTIME = Path(__file__).with_name("runtime_python.py")
_IMPORTS = "# ---- imports (copied) ----\n"
_STAND_INS = "# ---- stand-ins for the generated module (not copied) ----\n"
_BODY = "# ---- runtime (copied) ----\n"


def runtime_parts() -> tuple[str, str]:
    """(imports, runtime body) of runtime_python.py, as copied into gateway/proto.py."""
    text = RUNTIME.read_text(encoding="utf-8")
    imports = text.split(_IMPORTS, 1)[1].split(_STAND_INS, 1)[0]
    body = text.split(_BODY, 1)[1]
    return imports.strip("\n"), body.strip("\n")


def pascal(name: str) -> str:
    return "".join(p.capitalize() for p in name.split("_"))


def _py_type(spec: Spec, f: Field) -> str:
    if f.type == "enum":
        assert f.enum
        return pascal(f.enum)
    if f.type == "bool":
        return "bool"
    if f.type == "f32":
        return "float"
    if f.type in INT_RANGES:
        return "int"
    if f.type == "bytes":
        return "bytes"
    if f.type == "str":
        return "str"
    if f.type == "array":
        assert f.of
        inner = "int" if f.of in SCALARS else pascal(f.of)
        return f"tuple[{inner}, ...]"
    if f.type == "series":
        return "Series"
    raise AssertionError(f.type)


def _default_literal(spec: Spec, f: Field) -> str:
    if f.type == "enum":
        assert f.enum
        name = dict((v, k) for k, v in spec.enum(f.enum).values)[f.default]
        return f"{pascal(f.enum)}.{name.upper()}"
    if f.type == "array":
        return "()"
    if f.type == "bytes":
        return repr(str(f.default).encode())
    return repr(f.default)


def generate(spec: Spec) -> str:
    w = Lines()
    w('"""Torpor wire protocol codec for CPython (the gateway and tools).')
    w()
    w(f"Generated from {SPEC_REL} by `torpor proto gen`: generated, do not edit.")
    w('"""')
    w()
    w("# ruff: noqa")
    imports, body = runtime_parts()
    w(imports)
    w("from collections.abc import Callable, Sequence")
    w("from typing import Any, ClassVar")
    w()
    w(f"MAJOR = {spec.major}")
    w(f"MINOR = {spec.minor}")
    w(f"VERSION_BYTE = 0x{spec.version_byte:02X}")
    w(f"HEADER_SIZE = {HEADER_SIZE}")
    w(f"MAX_FRAME = {spec.max_frame}")
    w("# largest encoding of any frame the spec defines (each frame class's MAX_SIZE)")
    w(f"LARGEST_FRAME = {spec.largest_frame}")
    w("# message ids are the header's u32: 0..MSG_ID_MAX")
    w(f"MSG_ID_MAX = 0x{spec.msg_id_max:X}")
    w("# [bootloader] version: an image's manifest names the lowest it needs (min_bootloader)")
    w(f"BOOTLOADER_VERSION = {spec.bootloader_version}")
    w("# largest signed manifest an image may carry (OTA_MANIFEST's manifest field)")
    w(f"MAX_MANIFEST = {spec.max_manifest}")
    w("_U32 = struct.Struct('<I')")
    w("_RANGES: dict[str, tuple[int, int]] = {")
    for t, (lo, hi) in INT_RANGES.items():
        w(f"    {t!r}: ({lo}, {hi}),")
    w("}")
    w()
    w()
    w(body)
    w()

    # enums
    for e in spec.enums:
        w()
        w(f"class {pascal(e.name)}(IntEnum):")
        for k, v in e.values:
            w(f"{k.upper()} = {v}", 1)
        w()
    _gen_commands(w, spec)
    # device classes
    w()
    w("@dataclass(frozen=True, slots=True)")
    w("class ClassLimits:")
    w('"""Resource constraints of a device class (see the spec)."""', 1)
    for name in ("id", "max_message", "max_queue", "max_downlink", "wake_interval_s",
                 "heartbeat_s", "budget_bytes_per_min"):
        w(f"{name}: int", 1)
    w("power_managed: bool", 1)
    w()
    w()
    w("DEVICE_CLASSES: dict[str, ClassLimits] = {")
    for c in spec.classes:
        w(f"    {c.name!r}: ClassLimits({c.id}, {c.max_message}, {c.max_queue}, {c.max_downlink}, "
          f"{c.wake_interval_s}, {c.heartbeat_s}, {c.budget_bytes_per_min}, {c.power_managed}),")
    w("}")
    w()
    # schemas
    w()
    w("@dataclass(frozen=True, slots=True)")
    w("class Measurement:")
    w("name: str", 1)
    w("type: str", 1)
    w("unit: str", 1)
    w("scale: float", 1)
    w()
    w()
    w("SCHEMAS: dict[int, tuple[str, tuple[Measurement, ...]]] = {")
    for s in spec.schemas:
        ms = ", ".join(f"Measurement({m.name!r}, {m.type!r}, {m.unit!r}, {m.scale!r})"
                       for m in s.measurements)
        w(f"    {s.id}: ({s.name!r}, ({ms},)),")
    w("}")
    w("# schema id -> (struct of the first row, value ranges per column)")
    w("_SCHEMAS: dict[int, tuple[struct.Struct, tuple[tuple[int, int], ...]]] = {")
    for s in spec.schemas:
        fmt = "<" + "".join(SCALARS[m.type][0] for m in s.measurements)
        ranges = ", ".join(f"({INT_RANGES[m.type][0]}, {INT_RANGES[m.type][1]})" for m in s.measurements)
        w(f"    {s.id}: (struct.Struct({fmt!r}), ({ranges},)),")
    w("}")
    w("# schema id -> layout of one reading in a node's flash queue (u32 time + values)")
    w("RECORD_FORMATS: dict[int, str] = {")
    for s in spec.schemas:
        w(f"    {s.id}: {s.record_fmt!r},")
    w("}")
    for s in spec.schemas:
        w(f"SCHEMA_{s.name.upper()} = {s.id}")
    w()

    # records
    for r in spec.records:
        w()
        w("@dataclass(frozen=True, slots=True)")
        w(f"class {pascal(r.name)}:")
        if r.doc:
            w(f'"""{r.doc}"""', 1)
            w()
        for f in r.fields:
            w(f"{f.name}: {_py_type(spec, f)}", 1)
        w()
        w(f"_S_{r.name.upper()} = struct.Struct({('<' + r.fmt)!r})")
        w()

    # frames: dataclasses
    for fr in spec.frames:
        w()
        w("@dataclass(frozen=True, slots=True)")
        w(f"class {fr.camel}:")
        w(f'"""{fr.name} ({fr.direction}): {fr.doc}"""', 1)
        w()
        w(f"FRAME_TYPE: ClassVar[int] = {fr.id}", 1)
        w(f"MAX_SIZE: ClassVar[int] = {spec.max_frame_size(fr)}", 1)
        w("msg_id: int", 1)
        for f in fr.fields:
            t = _py_type(spec, f)
            if f.optional:
                w(f"{f.name}: {t} = {_default_literal(spec, f)}", 1)
            else:
                w(f"{f.name}: {t}", 1)
        w()

    w()
    w("# largest length of each bounded field (bytes for bytes/str, items for arrays and series)")
    for fr in spec.frames:
        for f in fr.fields:
            if f.max is not None:
                w(f"{fr.name}_{f.name.upper()}_MAX = {f.max}")
    w()
    w("Frame = " + " | ".join(fr.camel for fr in spec.frames))
    for fr in spec.frames:
        w(f"{fr.name} = {fr.id}")
    w()

    for fr in spec.frames:
        _gen_structs(w, spec, fr)
        _gen_decode(w, spec, fr)
        _gen_encode(w, spec, fr)

    # dispatch
    w()
    w("_DECODERS: dict[int, Callable[[Buffer], Frame]] = {")
    for fr in spec.frames:
        w(f"    {fr.id}: decode_{fr.snake},")
    w("}")
    w("_ENCODERS: dict[type, Callable[[Any], bytes]] = {")
    for fr in spec.frames:
        w(f"    {fr.camel}: encode_{fr.snake},")
    w("}")
    w()
    w()
    w("def decode(buf: Buffer) -> Frame:")
    w('"""Decode any frame; raises ProtocolError on anything but a valid frame."""', 1)
    w("if len(buf) < 2:", 1)
    w('raise ProtocolError("frame", len(buf), "truncated header")', 2)
    w("fn = _DECODERS.get(buf[1])", 1)
    w("if fn is None:", 1)
    w('raise ProtocolError("frame", 1, f"unknown frame type {buf[1]}", ErrorCode.UNKNOWN_FRAME)', 2)
    w("return fn(buf)", 1)
    w()
    w()
    w("def encode(frame: Frame) -> bytes:")
    w('"""Encode any frame dataclass."""', 1)
    w("fn = _ENCODERS.get(type(frame))", 1)
    w("if fn is None:", 1)
    w('raise TypeError(f"not a frame: {frame!r}")', 2)
    w("return fn(frame)", 1)
    return "\n".join(w.lines) + "\n"


COMMAND_CLASSES = '''\
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
'''


def _gen_commands(w: Lines, spec: Spec) -> None:
    w()
    w(COMMAND_CLASSES.rstrip("\n"))
    w()
    w()
    w("# command op -> its arguments, from the spec's [commands] tables")
    w("OP_ARGS: dict[CommandOp, CommandArgs] = {")
    for c in spec.commands:
        w(f"    CommandOp.{c.op.upper()}: CommandArgs(")
        w(f"        CommandOp.{c.op.upper()}, {c.doc!r}, {c.required}, (")
        for a in c.args:
            w(f"            CommandArg({a.name!r}, {a.low}, {a.high}, {a.unit!r}),")
        w(f"        ), {c.usage!r}),")
    w("}")
    w()


def _gen_structs(w: Lines, spec: Spec, fr: Frame) -> None:
    w()
    for i, g in enumerate(fixed_groups(fr.required)):
        if isinstance(g, list):
            fmt = "<" + "".join(SCALARS[f.type][0] for f in g)
            w(f"_S_{fr.name}_{i} = struct.Struct({fmt!r})")
    for f in fr.optional:
        if f.fixed:
            w(f"_S_{fr.name}_T{f.tag} = struct.Struct({('<' + SCALARS[f.type][0])!r})")


def _decode_value(w: Lines, spec: Spec, fr: Frame, f: Field, ind: int, end: str) -> None:
    """Emit code decoding a variable-size field at `off` into `v_<name>`; `end` bounds it."""
    N = fr.name
    if f.type in ("bytes", "str"):
        w(f'ln, off = _length(buf, off, {end}, "{N}", "{f.name}", {f.max})', ind)
        w(f'_need(off, ln, {end}, "{N}", "{f.name}")', ind)
        if f.type == "bytes":
            w(f"v_{f.name} = bytes(buf[off:off + ln])", ind)
        else:
            w(f'v_{f.name} = _text(buf, off, ln, "{N}", "{f.name}")', ind)
        w("off += ln", ind)
    elif f.type == "array":
        assert f.of
        w(f'cnt, off = _length(buf, off, {end}, "{N}", "{f.name}", {f.max})', ind)
        if f.of in SCALARS:
            code, size = SCALARS[f.of]
            w(f'_need(off, cnt * {size}, {end}, "{N}", "{f.name}")', ind)
            w(f'v_{f.name} = struct.unpack_from(f"<{{cnt}}{code}", buf, off)', ind)
            w(f"off += cnt * {size}", ind)
        else:
            rec = spec.record(f.of)
            w(f'_need(off, cnt * {rec.size}, {end}, "{N}", "{f.name}")', ind)
            args = []
            for j, rf in enumerate(rec.fields):
                if rf.type == "enum":
                    assert rf.enum
                    args.append(f'_enum({pascal(rf.enum)}, r[{j}], "{N}", off, "{f.name}.{rf.name}")')
                elif rf.type == "bool":
                    args.append(f'_bool(r[{j}], "{N}", off, "{f.name}.{rf.name}")')
                else:
                    args.append(f"r[{j}]")
            w(f"v_{f.name} = tuple({pascal(f.of)}({', '.join(args)}) "
              f"for r in _S_{f.of.upper()}.iter_unpack(bytes(buf[off:off + cnt * {rec.size}])))", ind)
            w(f"off += cnt * {rec.size}", ind)
    elif f.type == "series":
        w(f'v_{f.name}, off = _decode_series(buf, off, {end}, "{N}", v_{f.schema_field}, '
          f"v_{f.interval_field}, {f.max}, minor)", ind)
    else:
        raise AssertionError(f.type)


def _gen_decode(w: Lines, spec: Spec, fr: Frame) -> None:
    N = fr.name
    w()
    w()
    w(f"def decode_{fr.snake}(buf: Buffer) -> {fr.camel}:")
    w(f'"""Decode a {N} frame."""', 1)
    w("n = len(buf)", 1)
    w(f'minor, msg_id = _header(buf, n, {fr.id}, "{N}")', 1)
    w(f"off = {HEADER_SIZE}", 1)
    for i, g in enumerate(fixed_groups(fr.required)):
        if isinstance(g, list):
            size = sum(SCALARS[f.type][1] for f in g)
            names = ", ".join(f"v_{f.name}" for f in g) + ("," if len(g) == 1 else "")
            w(f"if off + {size} > n:", 1)
            w(f'raise ProtocolError("{N}", n, f"truncated (needs {size} bytes of fields at {{off}})")', 2)
            w(f"{names} = _S_{N}_{i}.unpack_from(buf, off)", 1)
            pos = 0
            for f in g:
                if f.type == "enum":
                    assert f.enum
                    w(f'v_{f.name} = _enum({pascal(f.enum)}, v_{f.name}, "{N}", off + {pos}, "{f.name}")', 1)
                elif f.type == "bool":
                    w(f'v_{f.name} = _bool(v_{f.name}, "{N}", off + {pos}, "{f.name}")', 1)
                pos += SCALARS[f.type][1]
            w(f"off += {size}", 1)
        else:
            _decode_value(w, spec, fr, g, 1, "n")
    for f in fr.optional:
        w(f"v_{f.name} = {_default_literal(spec, f)}", 1)
    if fr.optional:
        w("last = 0", 1)
        w("while off < n:", 1)
        w(f'tag, voff, tl = _tlv_head(buf, off, n, "{N}")', 2)
        w("if tag <= last:", 2)
        w(f'raise ProtocolError("{N}", off, f"field tag {{tag}} repeated or out of order")', 3)
        w("last = tag", 2)
        first = True
        for f in fr.optional:
            w(f"{'if' if first else 'elif'} tag == {f.tag}:", 2)
            first = False
            if f.fixed:
                w(f'x = _fixed_tlv(_S_{N}_T{f.tag}, buf, voff, tl, "{N}", "{f.name}")', 3)
                if f.type == "enum":
                    assert f.enum
                    w(f'v_{f.name} = _enum({pascal(f.enum)}, x, "{N}", voff, "{f.name}")', 3)
                elif f.type == "bool":
                    w(f'v_{f.name} = _bool(x, "{N}", voff, "{f.name}")', 3)
                else:
                    w(f"v_{f.name} = x", 3)
            else:
                w("off = voff", 3)
                _decode_value(w, spec, fr, f, 3, "voff + tl")
                w("if off != voff + tl:", 3)
                w(f'raise ProtocolError("{N}", off, "{f.name}: length does not match its value")', 4)
        w("elif minor <= MINOR:", 2)
        w(f'raise ProtocolError("{N}", off, f"unknown field tag {{tag}}")', 3)
        w("off = voff + tl", 2)
    else:
        w("if off != n and minor <= MINOR:", 1)
        w(f'raise ProtocolError("{N}", off, f"{{n - off}} trailing bytes")', 2)
    args = ", ".join(["msg_id"] + [f"v_{f.name}" for f in fr.fields])
    w(f"return {fr.camel}({args})", 1)


def _encode_value(w: Lines, spec: Spec, fr: Frame, f: Field, ind: int, target: str) -> None:
    N = fr.name
    v = f"f.{f.name}"
    if f.type == "bytes":
        w(f'_put_bytes({target}, {v}, "{N}", "{f.name}", {f.max})', ind)
    elif f.type == "str":
        w(f'_put_text({target}, {v}, "{N}", "{f.name}", {f.max})', ind)
    elif f.type == "array":
        assert f.of
        w(f"if len({v}) > {f.max}:", ind)
        w(f'raise ProtocolError("{N}", len({target}), "{f.name}: more than {f.max} items")', ind + 1)
        w(f"_put_uvarint({target}, len({v}))", ind)
        if f.of in SCALARS:
            code = SCALARS[f.of][0]
            w("try:", ind)
            w(f'{target} += struct.pack(f"<{{len({v})}}{code}", *{v})', ind + 1)
            w("except (struct.error, TypeError):", ind)
            w(f'raise ProtocolError("{N}", len({target}), "{f.name}: an item does not fit {f.of}") from None', ind + 1)
        else:
            rec = spec.record(f.of)
            w(f"for e in {v}:", ind)
            for rf in rec.fields:
                if rf.type == "enum":
                    assert rf.enum
                    w(f"if e.{rf.name} not in {pascal(rf.enum)}._value2member_map_:", ind + 1)
                    w(f'raise ProtocolError("{N}", len({target}), f"{f.name}.{rf.name}: {{e.{rf.name}!r}} is not a {pascal(rf.enum)}")', ind + 2)
            vals = ", ".join(f"e.{rf.name}" for rf in rec.fields)
            w("try:", ind + 1)
            w(f"{target} += _S_{f.of.upper()}.pack({vals})", ind + 2)
            w("except (struct.error, TypeError):", ind + 1)
            checks = ", ".join(f'("{f.name}.{rf.name}", "{rf.type}", e.{rf.name})' for rf in rec.fields)
            w(f'raise _pack_error("{N}", {target}, ({checks},)) from None', ind + 2)
    elif f.type == "series":
        w(f'_encode_series({target}, "{N}", f.{f.schema_field}, f.{f.interval_field}, {v}, {f.max})', ind)
    else:
        raise AssertionError(f.type)


def _gen_encode(w: Lines, spec: Spec, fr: Frame) -> None:
    N = fr.name
    w()
    w()
    w(f"def encode_{fr.snake}(f: {fr.camel}) -> bytes:")
    w(f'"""Encode a {N} frame."""', 1)
    w("out = bytearray()", 1)
    w("try:", 1)
    w(f"out += _HDR.pack(VERSION_BYTE, {fr.id}, f.msg_id)", 2)
    w("except (struct.error, TypeError):", 1)
    w(f'raise ProtocolError("{N}", 2, f"msg_id: {{f.msg_id!r}} does not fit u32") from None', 2)
    for i, g in enumerate(fixed_groups(fr.required)):
        if isinstance(g, list):
            for f in g:
                if f.type == "enum":
                    assert f.enum
                    w(f"if f.{f.name} not in {pascal(f.enum)}._value2member_map_:", 1)
                    w(f'raise ProtocolError("{N}", len(out), f"{f.name}: {{f.{f.name}!r}} is not a {pascal(f.enum)}")', 2)
            vals = ", ".join(f"f.{f.name}" if f.type != "bool" else f"1 if f.{f.name} else 0" for f in g)
            w("try:", 1)
            w(f"out += _S_{N}_{i}.pack({vals})", 2)
            w("except (struct.error, OverflowError, TypeError):", 1)
            checks = ", ".join(f'("{f.name}", "{f.type}", f.{f.name})' for f in g)
            w(f'raise _pack_error("{N}", out, ({checks},)) from None', 2)
        else:
            _encode_value(w, spec, fr, g, 1, "out")
    for f in fr.optional:
        default = _default_literal(spec, f)
        w(f"if f.{f.name} != {default}:", 1)
        if f.fixed:
            if f.type == "enum":
                assert f.enum
                w(f"if f.{f.name} not in {pascal(f.enum)}._value2member_map_:", 2)
                w(f'raise ProtocolError("{N}", len(out), f"{f.name}: {{f.{f.name}!r}} is not a {pascal(f.enum)}")', 3)
            val = f"1 if f.{f.name} else 0" if f.type == "bool" else f"f.{f.name}"
            w("try:", 2)
            w(f"_put_tlv(out, {f.tag}, _S_{N}_T{f.tag}.pack({val}))", 3)
            w("except (struct.error, OverflowError, TypeError):", 2)
            w(f'raise _pack_error("{N}", out, (("{f.name}", "{f.type}", f.{f.name}),)) from None', 3)
        else:
            w("tmp = bytearray()", 2)
            _encode_value(w, spec, fr, f, 2, "tmp")
            w(f"_put_tlv(out, {f.tag}, bytes(tmp))", 2)
    w("return bytes(out)", 1)
