"""Generate docs/protocol.md: the byte layout of every frame, from the spec."""

from __future__ import annotations

from tools.proto.spec import HEADER_SIZE, SCALARS, SPEC_REL, Field, Spec


def _type(spec: Spec, f: Field) -> str:
    if f.type == "enum":
        return f"enum `{f.enum}` (u8)"
    if f.type == "array":
        return f"array of {f.of} (varint count, max {f.max})"
    if f.type in ("bytes", "str"):
        return f"{f.type} (varint length, max {f.max})"
    if f.type == "series":
        return f"series (max {f.max} readings)"
    return f.type


def generate(spec: Spec) -> str:
    out: list[str] = []
    p = out.append
    p("# Torpor wire protocol")
    p("")
    p(f"Generated from `{SPEC_REL}` by `torpor proto gen`: generated, do not edit.")
    p("")
    p(f"Protocol version {spec.major}.{spec.minor}. Integers are little-endian. No frame exceeds "
      f"{spec.max_frame} bytes; each device class has a smaller `max_message`.")
    p("")
    p("## Header (every frame)")
    p("")
    p("| offset | size | field | meaning |")
    p("|---|---|---|---|")
    p("| 0 | 1 | version | `major << 4 | minor`; a decoder refuses another major version |")
    p("| 1 | 1 | frame type | see the frames below |")
    p("| 2 | 4 | message id | u32; for BURST the first reading's id |")
    p("")
    p("## Encoding rules")
    p("")
    p("- Required fields follow the header in tag order: fixed-width scalars as they are, "
      "`bytes`/`str` as an unsigned LEB128 varint length then the bytes (UTF-8 for `str`), "
      "arrays as a varint count then the items, records as their fields in order.")
    p("- Optional fields follow as `tag (u8) | varint length | value`, in increasing tag order, "
      "and only when they differ from their default.")
    p("- Evolution: a newer minor version may add optional fields; a decoder skips unknown tags "
      "and trailing bytes only when the frame's minor version is newer than its own, and refuses "
      "them otherwise (trailing garbage is an error).")
    p("- Varints are at most 5 bytes and at most 32 bits; an overlong encoding is an error.")
    p("- A series (BURST readings): `count (u8) | t0 (u32) | first reading's values (their fixed "
      "types)`, then for each measurement the `count - 1` differences to the previous reading as "
      "zigzag varints, column after column; when `interval` is 0 a last column holds the "
      "differences between timestamps; otherwise reading *i* was taken at `t0 + i * interval`.")
    p("")
    p("## Device classes")
    p("")
    p("| class | id | max message | max flash queue | max downlink | wake s | heartbeat s | "
      "budget B/min | power managed |")
    p("|---|---|---|---|---|---|---|---|---|")
    for c in spec.classes:
        p(f"| {c.name} | {c.id} | {c.max_message} | {c.max_queue} | {c.max_downlink} | "
          f"{c.wake_interval_s} | {c.heartbeat_s} | {c.budget_bytes_per_min} | "
          f"{'yes' if c.power_managed else 'no'} |")
    p("")
    p("## Sensor schemas")
    for s in spec.schemas:
        p("")
        p(f"### {s.name} (id {s.id})")
        p("")
        p(s.doc)
        p("")
        p("| column | type | unit | scale |")
        p("|---|---|---|---|")
        for m in s.measurements:
            p(f"| {m.name} | {m.type} | {m.unit} | {m.scale:g} |")
        p("")
        p(f"Flash queue record: `{s.record_fmt}` ({s.record_size} bytes).")
    p("")
    p("## Enums")
    for e in spec.enums:
        p("")
        p(f"- `{e.name}`: " + ", ".join(f"{k} = {v}" for k, v in e.values))
    p("")
    p("## Errors")
    p("")
    p("A decoder that refuses a frame says which `error_code` an ERROR frame answering it carries "
      "(`ProtocolError.code` on both sides): `unsupported_version` for another major version, "
      "`too_large` for a frame over the maximum, `unknown_frame` for an unknown frame type, "
      "`malformed` for anything else.")
    p("")
    p("## Limits and versions")
    p("")
    p("| constant | value | from |")
    p("|---|---|---|")
    p(f"| MAX_FRAME | {spec.max_frame} | `protocol.max_frame`: no decoder takes a larger frame |")
    p(f"| LARGEST_FRAME | {spec.largest_frame} | the largest encoding of any frame below |")
    p(f"| MSG_ID_MAX | 0x{spec.msg_id_max:X} | the header's u32 message id; ids do not wrap |")
    p(f"| MAX_MANIFEST | {spec.max_manifest} | OTA_MANIFEST's `manifest` field: the largest "
      "signed manifest an image may carry |")
    p(f"| BOOTLOADER_VERSION | {spec.bootloader_version} | `bootloader.version`: an image's "
      "manifest names the lowest it needs |")
    if spec.in_place:
        p("")
        p("## Read in place")
        p("")
        p("The node reads these frames straight from its receive buffer when they have their plain "
          "shape: the header with this major version, arrays empty, then only the frame's optional "
          "fields, each at most once, in tag order, at the size below. Any other shape goes to the "
          "decoder, which accepts or refuses it.")
        p("")
        for name in spec.in_place:
            lay = spec.in_place_layout(spec.frame(name))
            at = ", ".join(f"`{f}` at {o}" for f, o in lay.at)
            empty = ", ".join(f"`{f}` count 0 at {o}" for f, o in lay.empty)
            opt = ", ".join(f"`{f}` (tag {t}, {n} byte{'s' if n > 1 else ''})" for f, t, n in lay.optional)
            p(f"- {name}: {at}" + (f"; {empty}" if empty else "")
              + f"; optional fields from byte {lay.end}" + (f": {opt}" if opt else "") + ".")
    p("")
    p("## Command arguments")
    p("")
    p("What each `command_op` carries in a COMMAND's `args` (i32 each, in this order). Arguments "
      "in brackets may be left out. The gateway refuses anything else when a command is queued; "
      "the node answers `bad_args` to anything else it receives.")
    p("")
    p("| op | usage | argument | range | unit | what it does |")
    p("|---|---|---|---|---|---|")
    for cmd in spec.commands:
        if not cmd.args:
            p(f"| {cmd.op} | `{cmd.usage}` | - | - | - | {cmd.doc} |")
        for i, a in enumerate(cmd.args):
            first = i == 0
            name = a.name if i < cmd.required else f"[{a.name}]"
            p(f"| {cmd.op if first else ''} | {f'`{cmd.usage}`' if first else ''} | {name} | "
              f"{a.low}..{a.high} | {a.unit} | {cmd.doc if first else ''} |")
    for r in spec.records:
        p("")
        p(f"## Record `{r.name}` ({r.size} bytes)")
        p("")
        p("| tag | field | type |")
        p("|---|---|---|")
        for f in r.fields:
            p(f"| {f.tag} | {f.name} | {_type(spec, f)} |")
    p("")
    p("## Frames")
    for fr in spec.frames:
        p("")
        p(f"### {fr.name} (type {fr.id}, {fr.direction})")
        p("")
        p(fr.doc)
        p("")
        p(f"Largest encoding: {spec.max_frame_size(fr)} bytes.")
        p("")
        p("| offset | tag | field | type | unit | notes |")
        p("|---|---|---|---|---|---|")
        off: int | None = HEADER_SIZE
        for f in fr.fields:
            if f.optional:
                where = "opt"
            else:
                where = str(off) if off is not None else "var"
            notes = f.doc
            if f.optional:
                notes = (notes + "; " if notes else "") + f"default {f.default!r}"
            p(f"| {where} | {f.tag} | {f.name} | {_type(spec, f)} | {f.unit or ''} | {notes} |")
            if off is not None and not f.optional:
                off = off + SCALARS[f.type][1] if f.fixed else None
    return "\n".join(out) + "\n"
