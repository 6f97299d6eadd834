"""Load and validate the protocol spec (shared/protocol/torpor.toml) into a small model.

Every later stage (both code generators, the docs, the benchmarks) reads this model, never
the TOML, so a rule about the wire format is checked once, here.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SPEC_PATH = ROOT / "shared" / "protocol" / "torpor.toml"
SPEC_REL = "shared/protocol/torpor.toml"

# type -> (struct code, size in bytes) for fixed-width scalars
SCALARS: dict[str, tuple[str, int]] = {
    "u8": ("B", 1),
    "i8": ("b", 1),
    "u16": ("H", 2),
    "i16": ("h", 2),
    "u32": ("I", 4),
    "i32": ("i", 4),
    "f32": ("f", 4),
    "bool": ("B", 1),
    "enum": ("B", 1),
}
INT_RANGES: dict[str, tuple[int, int]] = {
    "u8": (0, 0xFF),
    "i8": (-0x80, 0x7F),
    "u16": (0, 0xFFFF),
    "i16": (-0x8000, 0x7FFF),
    "u32": (0, 0xFFFFFFFF),
    "i32": (-0x80000000, 0x7FFFFFFF),
}
VARIABLE = ("bytes", "str", "array", "record", "series")
HEADER_SIZE = 6
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_FRAME_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


class SpecError(Exception):
    """The spec file is wrong; the message names the key."""


@dataclass(frozen=True, slots=True)
class Field:
    tag: int
    name: str
    type: str
    enum: str | None = None
    of: str | None = None
    max: int | None = None
    optional: bool = False
    default: Any = None
    unit: str | None = None
    doc: str = ""
    schema_field: str | None = None
    interval_field: str | None = None

    @property
    def fixed(self) -> bool:
        return self.type in SCALARS


@dataclass(frozen=True, slots=True)
class Record:
    name: str
    doc: str
    fields: tuple[Field, ...]

    @property
    def size(self) -> int:
        return sum(SCALARS[f.type][1] for f in self.fields)

    @property
    def fmt(self) -> str:
        return "".join(SCALARS[f.type][0] for f in self.fields)


@dataclass(frozen=True, slots=True)
class Enum:
    name: str
    values: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Measurement:
    name: str
    type: str
    unit: str
    scale: float


@dataclass(frozen=True, slots=True)
class Schema:
    name: str
    id: int
    doc: str
    measurements: tuple[Measurement, ...]

    @property
    def record_fmt(self) -> str:
        """Layout of one reading in the node's flash queue: u32 timestamp, then the values."""
        return "<I" + "".join(SCALARS[m.type][0] for m in self.measurements)

    @property
    def record_size(self) -> int:
        return 4 + sum(SCALARS[m.type][1] for m in self.measurements)


@dataclass(frozen=True, slots=True)
class DeviceClass:
    name: str
    id: int
    max_message: int
    max_queue: int
    max_downlink: int
    wake_interval_s: int
    heartbeat_s: int
    budget_bytes_per_min: int
    power_managed: bool


@dataclass(frozen=True, slots=True)
class Frame:
    name: str
    id: int
    direction: str
    doc: str
    fields: tuple[Field, ...]

    @property
    def required(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if not f.optional)

    @property
    def optional(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if f.optional)

    @property
    def snake(self) -> str:
        return self.name.lower()

    @property
    def camel(self) -> str:
        return "".join(p.capitalize() for p in self.name.split("_"))


@dataclass(frozen=True, slots=True)
class CommandArg:
    """One argument of a command op: an i32 on the wire, valid in low..high (inclusive)."""

    name: str
    low: int
    high: int
    unit: str


@dataclass(frozen=True, slots=True)
class Command:
    """What one command_op takes: `required` of its `args` must be given, the rest may follow."""

    op: str
    value: int
    doc: str
    required: int
    args: tuple[CommandArg, ...]

    @property
    def usage(self) -> str:
        """`stay_awake SECONDS`, `set_thresholds TEMP_LOW TEMP_HIGH [HUMIDITY_HIGH]`."""
        words = [a.name.upper() for a in self.args]
        if self.required < len(words):
            words[self.required] = "[" + words[self.required]
            words[-1] += "]"
        return " ".join([self.op, *words])


@dataclass(frozen=True, slots=True)
class InPlace:
    """A frame read in place when plain: its fixed required fields at fixed offsets, its
    arrays empty (a one-byte count of 0), then only its optional fields, each at its size."""

    at: tuple[tuple[str, int], ...]  # (field, offset) of each fixed required field
    empty: tuple[tuple[str, int], ...]  # (field, offset) of each array's count byte, 0 when plain
    end: int  # where the optional fields start
    optional: tuple[tuple[str, int, int], ...]  # (field, tag, size)


# error_code values a decoder raises with, by the kind of failure
ERROR_CODES = ("malformed", "unknown_frame", "unsupported_version", "too_large")


@dataclass(frozen=True, slots=True)
class Spec:
    major: int
    minor: int
    max_frame: int
    classes: tuple[DeviceClass, ...]
    schemas: tuple[Schema, ...]
    enums: tuple[Enum, ...]
    records: tuple[Record, ...]
    frames: tuple[Frame, ...]
    commands: tuple[Command, ...]
    bootloader_version: int
    in_place: tuple[str, ...]

    @property
    def version_byte(self) -> int:
        return self.major << 4 | self.minor

    @property
    def msg_id_max(self) -> int:
        """Largest message id: the header's u32."""
        return INT_RANGES["u32"][1]

    @property
    def max_manifest(self) -> int:
        """Largest signed manifest an image may carry: OTA_MANIFEST's manifest field."""
        f = next(f for f in self.frame("OTA_MANIFEST").fields if f.name == "manifest")
        assert f.max is not None
        return f.max

    @property
    def largest_frame(self) -> int:
        """Largest encoding of any frame the spec defines (at most max_frame)."""
        return max(self.max_frame_size(fr) for fr in self.frames)

    def in_place_layout(self, frame: Frame) -> InPlace:
        """Where a frame named in [in_place] keeps its fields when it has its plain shape."""
        at: list[tuple[str, int]] = []
        empty: list[tuple[str, int]] = []
        off = HEADER_SIZE
        for f in frame.required:
            if f.fixed:
                at.append((f.name, off))
                off += SCALARS[f.type][1]
            else:
                empty.append((f.name, off))
                off += 1
        opt = tuple((f.name, f.tag, SCALARS[f.type][1]) for f in frame.optional)
        return InPlace(tuple(at), tuple(empty), off, opt)

    def enum(self, name: str) -> Enum:
        return next(e for e in self.enums if e.name == name)

    def record(self, name: str) -> Record:
        return next(r for r in self.records if r.name == name)

    def frame(self, name: str) -> Frame:
        return next(f for f in self.frames if f.name == name)

    def max_value_size(self, f: Field) -> int:
        """Largest encoding of one field's value (without a TLV tag/length)."""
        if f.fixed:
            return SCALARS[f.type][1]
        assert f.max is not None
        if f.type in ("bytes", "str"):
            return varint_size(f.max) + f.max
        if f.type == "array":
            assert f.of is not None
            item = SCALARS[f.of][1] if f.of in SCALARS else self.record(f.of).size
            return varint_size(f.max) + f.max * item
        if f.type == "series":
            # count, t0, the first row, then one zigzag varint per value and per spacing
            return max(
                1 + 4 + sum(SCALARS[m.type][1] for m in s.measurements)
                + (f.max - 1) * (5 + sum(varint_size(2 << (8 * SCALARS[m.type][1] - 1))
                                         for m in s.measurements))
                for s in self.schemas
            )
        raise AssertionError(f.type)

    def max_frame_size(self, frame: Frame) -> int:
        size = HEADER_SIZE
        for f in frame.fields:
            v = self.max_value_size(f)
            size += (1 + varint_size(v) + v) if f.optional else v
        return size


def varint_size(n: int) -> int:
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


def _req(table: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if key not in table:
        raise SpecError(f"{where}: missing key '{key}'")
    value = table[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SpecError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _field(raw: Any, where: str, enums: dict[str, Enum], records: dict[str, Record] | None) -> Field:
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: a field must be a table")
    known = {"tag", "name", "type", "enum", "of", "max", "optional", "default", "unit", "doc",
             "schema_field", "interval_field"}
    extra = set(raw) - known
    if extra:
        raise SpecError(f"{where}: unknown key(s) {sorted(extra)}")
    tag = _req(raw, "tag", where, int)
    name = _req(raw, "name", where, str)
    ftype = _req(raw, "type", where, str)
    if not 1 <= tag <= 127:
        raise SpecError(f"{where}.tag: must be 1..127")
    if not _NAME.match(name):
        raise SpecError(f"{where}.name: '{name}' must be snake_case")
    if ftype not in SCALARS and ftype not in VARIABLE:
        raise SpecError(f"{where}.type: unknown type '{ftype}'")
    enum = raw.get("enum")
    if ftype == "enum" and enum not in enums:
        raise SpecError(f"{where}.enum: unknown enum {enum!r}")
    of = raw.get("of")
    if ftype == "array":
        if of not in SCALARS and (records is None or of not in records):
            raise SpecError(f"{where}.of: '{of}' is neither a scalar type nor a record")
        if of in ("enum", "bool", "f32"):
            raise SpecError(f"{where}.of: arrays of {of} are not supported")
    maxn = raw.get("max")
    if ftype in ("bytes", "str", "array", "series"):
        if not isinstance(maxn, int) or maxn < 1:
            raise SpecError(f"{where}.max: required for {ftype} (a positive integer)")
    if ftype == "record":
        raise SpecError(f"{where}.type: nest records through arrays (type = 'array', of = record)")
    optional = bool(raw.get("optional", False))
    default = raw.get("default")
    if optional and "default" not in raw:
        raise SpecError(f"{where}.default: optional fields need a default")
    if ftype == "series" and optional:
        raise SpecError(f"{where}: a series cannot be optional")
    if records is None and ftype not in SCALARS:
        raise SpecError(f"{where}.type: record fields must be fixed-width scalars")
    if ftype in INT_RANGES and optional:
        lo, hi = INT_RANGES[ftype]
        if not isinstance(default, int) or not lo <= default <= hi:
            raise SpecError(f"{where}.default: {default!r} is not a {ftype}")
    return Field(
        tag=tag, name=name, type=ftype, enum=enum, of=of, max=maxn, optional=optional,
        default=default, unit=raw.get("unit"), doc=raw.get("doc", ""),
        schema_field=raw.get("schema_field"), interval_field=raw.get("interval_field"),
    )


def _fields(raws: Any, where: str, enums: dict[str, Enum],
            records: dict[str, Record] | None) -> tuple[Field, ...]:
    if not isinstance(raws, list) or not raws:
        raise SpecError(f"{where}.fields: must be a non-empty list")
    fields = tuple(_field(r, f"{where}.fields[{i}]", enums, records) for i, r in enumerate(raws))
    tags = [f.tag for f in fields]
    if tags != sorted(set(tags)):
        raise SpecError(f"{where}.fields: tags must be unique and increasing")
    names = [f.name for f in fields]
    if len(set(names)) != len(names):
        raise SpecError(f"{where}.fields: duplicate field name")
    seen_optional = False
    for f in fields:
        if f.optional:
            seen_optional = True
        elif seen_optional:
            raise SpecError(f"{where}.{f.name}: required fields must come before optional ones")
    for i, f in enumerate(fields):
        if f.type == "series":
            before = {g.name: g for g in fields[:i]}
            for ref in (f.schema_field, f.interval_field):
                if ref not in before or before[ref].type not in INT_RANGES:
                    raise SpecError(f"{where}.{f.name}: series needs earlier integer fields "
                                    "schema_field and interval_field")
            interval = before[f.interval_field]  # type: ignore[index]
            if interval.type != "u16" or fields[i - 1] is not interval:
                raise SpecError(f"{where}.{f.name}: interval_field must be the u16 right before it")
            if i != len(fields) - 1 - len([g for g in fields if g.optional]):
                raise SpecError(f"{where}.{f.name}: a series must be the last required field")
    return fields


def _commands(raw: dict[str, Any], enums: dict[str, Enum],
              frames: list[Frame]) -> tuple[Command, ...]:
    """The [commands.<op>] tables: one per command_op value, args within COMMAND's args."""
    table = _req(raw, "commands", "spec", dict)
    ops = dict(enums["command_op"].values) if "command_op" in enums else {}
    missing = sorted(set(ops) - set(table))
    if missing:
        raise SpecError(f"commands: no entry for command_op {', '.join(missing)}")
    extra = sorted(set(table) - set(ops))
    if extra:
        raise SpecError(f"commands.{extra[0]}: not a value of enum command_op")
    cmd_frame = next((f for f in frames if f.name == "COMMAND"), None)
    args_field = next((f for f in cmd_frame.fields if f.name == "args"), None) if cmd_frame else None
    if args_field is None or args_field.type != "array" or args_field.of not in INT_RANGES:
        raise SpecError("commands: needs frame COMMAND with an integer array field 'args'")
    assert args_field.max is not None and args_field.of is not None
    wire_lo, wire_hi = INT_RANGES[args_field.of]
    out = []
    for op, value in sorted(ops.items(), key=lambda kv: kv[1]):
        w = f"commands.{op}"
        entry = table[op]
        if not isinstance(entry, dict):
            raise SpecError(f"{w}: must be a table")
        unknown = set(entry) - {"doc", "args", "required"}
        if unknown:
            raise SpecError(f"{w}: unknown key(s) {sorted(unknown)}")
        raws = _req(entry, "args", w, list)
        if len(raws) > args_field.max:
            raise SpecError(f"{w}.args: more than COMMAND.args allows ({args_field.max})")
        args = []
        for i, a in enumerate(raws):
            wa = f"{w}.args[{i}]"
            if not isinstance(a, dict):
                raise SpecError(f"{wa}: must be a table")
            unknown = set(a) - {"name", "min", "max", "unit"}
            if unknown:
                raise SpecError(f"{wa}: unknown key(s) {sorted(unknown)}")
            name = _req(a, "name", wa, str)
            if not _NAME.match(name):
                raise SpecError(f"{wa}.name: '{name}' must be snake_case")
            lo, hi = _req(a, "min", wa, int), _req(a, "max", wa, int)
            if not wire_lo <= lo <= hi <= wire_hi:
                raise SpecError(f"{wa}: need {wire_lo} <= min <= max <= {wire_hi} "
                                f"({args_field.of} on the wire), got {lo}..{hi}")
            unit = a.get("unit", "")
            if not isinstance(unit, str):
                raise SpecError(f"{wa}.unit: expected str, got {unit!r}")
            args.append(CommandArg(name, lo, hi, unit))
        if len({a.name for a in args}) != len(args):
            raise SpecError(f"{w}.args: duplicate argument name")
        required = entry.get("required", len(args))
        if isinstance(required, bool) or not isinstance(required, int) \
                or not 0 <= required <= len(args):
            raise SpecError(f"{w}.required: must be an integer 0..{len(args)}")
        out.append(Command(op, value, str(entry.get("doc", "")), required, tuple(args)))
    return tuple(out)


def _in_place(raw: dict[str, Any], frames: list[Frame]) -> tuple[str, ...]:
    """[in_place] frames: downlink frames the node reads from its receive buffer without
    decoding them, when they have their plain shape (see InPlace)."""
    table = raw.get("in_place", {})
    if not isinstance(table, dict) or set(table) - {"frames"}:
        raise SpecError("in_place: a table with only the key 'frames'")
    names = table.get("frames", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise SpecError("in_place.frames: a list of frame names")
    by_name = {f.name: f for f in frames}
    for n in names:
        fr = by_name.get(n)
        if fr is None:
            raise SpecError(f"in_place.frames: unknown frame {n!r}")
        if fr.direction == "up":
            raise SpecError(f"in_place.frames: {n} is not read by the node")
        if any(not f.fixed and f.type != "array" for f in fr.required):
            raise SpecError(f"in_place.frames: {n} has a required field neither fixed nor an array")
        if any(not f.fixed for f in fr.optional):
            raise SpecError(f"in_place.frames: {n} has an optional field that is not fixed-size")
    return tuple(names)


def load(path: Path = SPEC_PATH) -> Spec:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path.name}: not valid TOML: {exc}") from exc
    proto = _req(raw, "protocol", "spec", dict)
    major = _req(proto, "major", "protocol", int)
    minor = _req(proto, "minor", "protocol", int)
    if not (0 <= major <= 15 and 0 <= minor <= 15):
        raise SpecError("protocol: major and minor must each fit in 4 bits")
    max_frame = _req(proto, "max_frame", "protocol", int)

    enums: dict[str, Enum] = {}
    for name, table in _req(raw, "enums", "spec", dict).items():
        values = _req(table, "values", f"enums.{name}", dict)
        nums = list(values.values())
        if any(not isinstance(v, int) or not 0 <= v <= 255 for v in nums) or len(set(nums)) != len(nums):
            raise SpecError(f"enums.{name}.values: values must be unique integers 0..255")
        for key in values:
            if not _NAME.match(key):
                raise SpecError(f"enums.{name}.values: '{key}' must be snake_case")
        enums[name] = Enum(name, tuple(sorted(values.items(), key=lambda kv: kv[1])))

    records: dict[str, Record] = {}
    for name, table in raw.get("records", {}).items():
        fields = _fields(table.get("fields"), f"records.{name}", enums, None)
        if any(f.optional for f in fields):
            raise SpecError(f"records.{name}: record fields cannot be optional")
        records[name] = Record(name, table.get("doc", ""), fields)

    classes = []
    for name, table in _req(raw, "classes", "spec", dict).items():
        w = f"classes.{name}"
        ints = {k: _req(table, k, w, int) for k in (
            "id", "max_message", "max_queue", "max_downlink", "wake_interval_s",
            "heartbeat_s", "budget_bytes_per_min")}
        if ints["max_message"] > max_frame:
            raise SpecError(f"{w}.max_message: larger than protocol.max_frame")
        classes.append(DeviceClass(name=name, power_managed=_req(table, "power_managed", w, bool),
                                   **ints))
    if "device_class" not in enums or dict(enums["device_class"].values) != {c.name: c.id for c in classes}:
        raise SpecError("enums.device_class: must list exactly the classes with their ids")

    schemas = []
    for name, table in _req(raw, "schemas", "spec", dict).items():
        w = f"schemas.{name}"
        ms = []
        for i, m in enumerate(_req(table, "measurements", w, list)):
            mtype = _req(m, "type", f"{w}.measurements[{i}]", str)
            if mtype not in ("i8", "u8", "i16", "u16", "i32", "u32"):
                raise SpecError(f"{w}.measurements[{i}].type: must be an integer type")
            ms.append(Measurement(_req(m, "name", f"{w}.measurements[{i}]", str), mtype,
                                  str(m.get("unit", "")), float(m.get("scale", 1))))
        sid = _req(table, "id", w, int)
        if not 1 <= sid <= 255:
            raise SpecError(f"{w}.id: must be 1..255")
        schemas.append(Schema(name, sid, table.get("doc", ""), tuple(ms)))

    frames = []
    for i, table in enumerate(_req(raw, "frames", "spec", list)):
        w = f"frames[{i}]"
        name = _req(table, "name", w, str)
        if not _FRAME_NAME.match(name):
            raise SpecError(f"{w}.name: '{name}' must be UPPER_CASE")
        direction = _req(table, "direction", w, str)
        if direction not in ("up", "down", "both"):
            raise SpecError(f"{w}.direction: must be up, down or both")
        fid = _req(table, "id", w, int)
        if not 1 <= fid <= 255:
            raise SpecError(f"{w}.id: must be 1..255")
        frames.append(Frame(name, fid, direction, table.get("doc", ""),
                            _fields(table.get("fields"), f"frames.{name}", enums, records)))
    ids = [f.id for f in frames]
    if len(set(ids)) != len(ids):
        raise SpecError("frames: duplicate frame id")
    commands = _commands(raw, enums, frames)
    missing = [c for c in ERROR_CODES if c not in dict(enums.get("error_code", Enum("", ())).values)]
    if missing:
        raise SpecError(f"enums.error_code: decoders need the value(s) {', '.join(missing)}")
    if "boot_cause" not in enums:
        raise SpecError("enums.boot_cause: missing (the Board API's boot causes)")
    boot = _req(raw, "bootloader", "spec", dict)
    bootloader_version = _req(boot, "version", "bootloader", int)
    if not 1 <= bootloader_version <= 0xFFFF:
        raise SpecError("bootloader.version: must be 1..65535")
    in_place = _in_place(raw, frames)
    if not any(f.name == "OTA_MANIFEST" and any(g.name == "manifest" and g.type == "bytes"
                                                for g in f.fields) for f in frames):
        raise SpecError("frames: needs OTA_MANIFEST with a bytes field 'manifest' (MAX_MANIFEST)")
    spec = Spec(major, minor, max_frame, tuple(classes), tuple(schemas), tuple(enums.values()),
                tuple(records.values()), tuple(frames), commands, bootloader_version, in_place)
    for fr in spec.frames:
        if spec.max_frame_size(fr) > max_frame:
            raise SpecError(f"frames.{fr.name}: can exceed protocol.max_frame "
                            f"({spec.max_frame_size(fr)} > {max_frame}); lower a max")
    return spec
