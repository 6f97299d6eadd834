"""The spec loader refuses bad specs by key; generated files carry their header and match."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, get_args

import pytest

from tools.proto import generate
from tools.proto.spec import SPEC_PATH, SpecError, load


def _spec_with(tmp_path: Path, old: str, new: str) -> Path:
    text = SPEC_PATH.read_text()
    assert old in text
    path = tmp_path / "torpor.toml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('name = "fw_version", type = "u32"', 'name = "fw_version", type = "u64"',
         "frames.HELLO.fields[0].type: unknown type 'u64'"),
        ('{ tag = 2, name = "boot_cause"', '{ tag = 1, name = "boot_cause"',
         "frames.HELLO.fields: tags must be unique and increasing"),
        ('name = "data", type = "bytes", max = 256,', 'name = "data", type = "bytes",',
         "frames.COMMAND.fields[5].max: required for bytes"),
        ("major = 1\n", "major = 16\n", "protocol: major and minor must each fit in 4 bits"),
        ('enum = "boot_cause" }', 'enum = "boot_reason" }', "unknown enum 'boot_reason'"),
        ("max_message = 1024\nmax_queue = 4096", "max_message = 9000\nmax_queue = 4096",
         "classes.sensor.max_message: larger than protocol.max_frame"),
        ("[commands.reboot]", "[commands.reboots]", "commands: no entry for command_op reboot"),
        ("set_keys = 8 }", "set_keys = 8, blink = 9 }", "commands: no entry for command_op blink"),
        ('min = 0, max = 600, unit = "s"', 'min = 0, max = 2147483648, unit = "s"',
         "commands.stay_awake.args[0]: need -2147483648 <= min <= max <= 2147483647"),
        ('min = 0, max = 600, unit = "s"', 'min = 600, max = 0, unit = "s"',
         "got 600..0"),
        ("required = 2\n", "required = 4\n", "commands.set_thresholds.required: must be an integer 0..3"),
        ('min = 0, max = 600, unit = "s"', 'min = 0, max = 600, unit = 5', "commands.stay_awake.args[0].unit: expected str"),
        ('min = 0, max = 600, unit = "s"', 'max = 600, unit = "s"', "commands.stay_awake.args[0]: missing key 'min'"),
        ('{ name = "seconds", min = 0', '{ name = "Seconds", min = 0', "'Seconds' must be snake_case"),
        ('doc = "reboot at the end of the wake"', 'docs = "x"', "commands.reboot: unknown key(s) ['docs']"),
        ('name = "args", type = "array", of = "i32", max = 8', 'name = "args", type = "array", of = "i32", max = 2',
         "commands.set_thresholds.args: more than COMMAND.args allows (2)"),
    ],
)
def test_bad_spec_names_the_key(tmp_path: Path, old: str, new: str, message: str) -> None:
    with pytest.raises(SpecError) as err:
        load(_spec_with(tmp_path, old, new))
    assert message in str(err.value)


def test_generated_files_are_current_and_say_so() -> None:
    assert generate.stale_files() == []
    for rel in generate.TARGETS:
        head = (generate.ROOT / rel).read_text().split("\n", 6)
        assert any("shared/protocol/torpor.toml" in line and "generated, do not edit" in line for line in head), rel


def test_proto_check_fails_on_drift(tmp_path: Path) -> None:
    for rel, text in generate.render().items():
        target = tmp_path / rel.relative_to(generate.ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    assert generate.stale_files(tmp_path) == []
    (tmp_path / "gateway" / "proto.py").write_text("# edited by hand\n")
    assert generate.stale_files(tmp_path) == [tmp_path / "gateway" / "proto.py"]


def test_proto_check_cli_exit_code() -> None:
    proc = subprocess.run([sys.executable, "-m", "tools.cli", "proto", "check"],
                          capture_output=True, text=True, cwd=generate.ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "match the spec" in proc.stdout


def test_command_table_reaches_both_runtimes_and_the_docs() -> None:
    """One table in the spec: the gateway's OP_ARGS, the node's OP_ARGS and the docs all
    carry it, and `device send --help` is built from it."""
    from gateway import proto
    from gateway.cli import downlink
    from tools.proto import gen_micropython

    spec = load()
    text = gen_micropython.generate_op_args(spec)
    docs = (generate.ROOT / "docs" / "protocol.md").read_text()
    helptext = downlink.ops_help()
    assert [c.op for c in spec.commands] == [op.name.lower() for op in proto.OP_ARGS]
    for c in spec.commands:
        gw = proto.OP_ARGS[proto.CommandOp[c.op.upper()]]
        assert (gw.required, gw.usage, gw.doc) == (c.required, c.usage, c.doc)
        assert [(a.name, a.low, a.high, a.unit) for a in gw.args] == \
            [(a.name, a.low, a.high, a.unit) for a in c.args]
        node = f"proto.COMMAND_OP_{c.op.upper()}: ({c.required}, (" + "".join(
            f"({a.name!r}, {a.low}, {a.high}, {a.unit!r}), " for a in c.args).rstrip() + ")),"
        assert node in text
        assert f"| {c.op} | `{c.usage}` |" in docs and f"  {c.usage}\n" in helptext
        for a in gw.args:
            assert f"{a.name.upper()}: {a.span}" in helptext


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('frames = ["ACK", "SLEEP_NOW"]', 'frames = ["ACK", "NAP"]', "in_place.frames: unknown frame 'NAP'"),
        ('frames = ["ACK", "SLEEP_NOW"]', 'frames = ["HELLO"]', "in_place.frames: HELLO is not read by the node"),
        ('frames = ["ACK", "SLEEP_NOW"]', 'frames = ["COMMAND_RESULT"]', "COMMAND_RESULT is not read"),
        ('frames = ["ACK", "SLEEP_NOW"]', 'frames = ["OTA_CHUNK"]',
         "in_place.frames: OTA_CHUNK has a required field neither fixed nor an array"),
        ('frames = ["ACK", "SLEEP_NOW"]', 'frames = ["ERROR"]',
         "in_place.frames: ERROR has an optional field that is not fixed-size"),
        ("[bootloader]\nversion = 1", "[bootloader]\nversion = 0", "bootloader.version: must be 1..65535"),
        ("[bootloader]\nversion = 1", "[bootloader]\nrelease = 1", "bootloader: missing key 'version'"),
        ("too_large = 4, ", "", "enums.error_code: decoders need the value(s) too_large"),
    ],
)
def test_bad_wire_fact_sections_name_the_key(tmp_path: Path, old: str, new: str, message: str) -> None:
    with pytest.raises(SpecError) as err:
        load(_spec_with(tmp_path, old, new))
    assert message in str(err.value)


# ------------------------------------------------------------------ wire facts
# Each constant the generator emits for other modules, checked against the spec's TOML read
# here directly (not through the generator's model), in every generated file that has it.

def _raw() -> dict[str, Any]:
    return tomllib.loads(SPEC_PATH.read_text())


def _consts(rel: str, private: bool = False) -> dict[str, int]:
    """NAME = const(N) lines of a generated MicroPython module (and _NAME ones: private)."""
    text = (generate.ROOT / rel).read_text()
    name = r"_?[A-Z][A-Z0-9_]*" if private else r"[A-Z][A-Z0-9_]*"
    return {m[1]: int(m[2], 0) for m in re.finditer(rf"^({name}) = const\((-?\w+)\)$", text, re.M)}


def _frame(raw: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in raw["frames"] if f["name"] == name)


def _field(raw: dict[str, Any], frame: str, name: str) -> dict[str, Any]:
    return next(f for f in _frame(raw, frame)["fields"] if f["name"] == name)


def test_emitted_constants_match_the_spec() -> None:
    from gateway import proto

    raw = _raw()
    boot = _consts("firmware/bootwire.py")
    node = _consts("firmware/proto.py")
    causes = _consts("boards/_boot_cause.py")

    version = raw["bootloader"]["version"]
    assert proto.BOOTLOADER_VERSION == boot["BOOTLOADER_VERSION"] == version
    manifest = _field(raw, "OTA_MANIFEST", "manifest")["max"]
    assert proto.MAX_MANIFEST == boot["MAX_MANIFEST"] == manifest
    assert proto.MSG_ID_MAX == 2**32 - 1  # the header's u32 message id
    assert proto.LARGEST_FRAME == max(c.MAX_SIZE for c in get_args(proto.Frame))
    assert proto.LARGEST_FRAME <= proto.MAX_FRAME == raw["protocol"]["max_frame"]
    assert proto.LARGEST_FRAME == max(v for k, v in node.items()
                                      if k.startswith("MAX_") and k != "MAX_FRAME")

    spec_causes = raw["enums"]["boot_cause"]["values"]
    assert {c.name.lower(): int(c) for c in proto.BootCause} == spec_causes
    assert {k.lower(): v for k, v in causes.items()} == spec_causes
    for enum in ("boot_cause", "ota_state", "ota_reason"):  # bare names in bootwire.py
        values = raw["enums"][enum]["values"]
        assert {k: boot[k.upper()] for k in values} == values

    codes = raw["enums"]["error_code"]["values"]
    assert {c.name.lower(): int(c) for c in proto.ErrorCode} == codes
    assert {k.removeprefix("ERROR_CODE_").lower(): v for k, v in node.items()
            if k.startswith("ERROR_CODE_")} == codes

    for fr in raw["frames"]:
        for f in fr["fields"]:
            if "max" in f:
                assert getattr(proto, f"{fr['name']}_{f['name'].upper()}_MAX") == f["max"]


def test_in_place_offsets_point_at_the_fields_the_gateway_encodes() -> None:
    """firmware/proto.py's _ACK_AT_*/_SLEEP_NOW_AT_* and *_TAG_* (what its read_ack and
    read_sleep_now read) find the values in frames the gateway's codec wrote, with and
    without each optional field."""
    from gateway import proto

    raw = _raw()
    node = {k[1:]: v for k, v in _consts("firmware/proto.py", private=True).items() if k[0] == "_"}
    assert raw["in_place"]["frames"] == ["ACK", "SLEEP_NOW"]
    assert node["ACK_TAG_TIME"] == _field(raw, "ACK", "time")["tag"]
    assert node["ACK_TAG_PENDING"] == _field(raw, "ACK", "pending")["tag"]
    assert node["SLEEP_NOW_TAG_PENDING"] == _field(raw, "SLEEP_NOW", "pending")["tag"]

    def opt(p: bytes, end: int, tag: int) -> int | None:
        while end < len(p):
            if p[end] == tag:
                return p[end + 2] if p[end + 1] == 1 else int.from_bytes(p[end + 2:end + 6], "little")
            end += 2 + p[end + 1]
        return None

    for cum, tm, pend in ((7, 0, 0), (0xFFFFFFFF, 1767225600, 3), (64, 0, 255), (1, 5, 0)):
        p = proto.encode_ack(proto.Ack(9, cum, (), tm, pend))
        assert int.from_bytes(p[node["ACK_AT_CUMULATIVE"]:][:4], "little") == cum
        assert p[node["ACK_AT_CUMULATIVE"] + 4] == 0  # selective: empty, then the optional part
        end = node["ACK_AT_CUMULATIVE"] + 5
        assert opt(p, end, node["ACK_TAG_TIME"]) == (tm or None)
        assert opt(p, end, node["ACK_TAG_PENDING"]) == (pend or None)
    for s, pend in ((0, 0), (600, 0), (0xFFFFFFFF, 2)):
        p = proto.encode_sleep_now(proto.SleepNow(5, s, pend))
        assert int.from_bytes(p[node["SLEEP_NOW_AT_SLEEP_S"]:][:4], "little") == s
        assert opt(p, node["SLEEP_NOW_AT_SLEEP_S"] + 4, node["SLEEP_NOW_TAG_PENDING"]) == (pend or None)


def test_protocol_error_carries_the_error_code_of_its_answer() -> None:
    from gateway import proto

    hello = proto.encode_hello(proto.Hello(1, 7, proto.BootCause.TIMER, 4100, -60, 1, 0, 0, 60, 3000,
                                           1767225600, proto.DeviceClass.SENSOR))
    cases = [
        (hello[:4], proto.ErrorCode.MALFORMED),
        (hello[:-1], proto.ErrorCode.MALFORMED),
        (bytes((0x21,)) + hello[1:], proto.ErrorCode.UNSUPPORTED_VERSION),
        (hello[:1] + b"\xee" + hello[2:], proto.ErrorCode.UNKNOWN_FRAME),
        (hello + bytes(proto.MAX_FRAME), proto.ErrorCode.TOO_LARGE),
    ]
    for payload, code in cases:
        with pytest.raises(proto.ProtocolError) as err:
            proto.decode(payload)
        assert err.value.code is code, (payload[:8], str(err.value))


# Hand copies of wire facts that once lived outside the generated files: each pattern names
# what must come from generated code instead. Generated files are not searched; constants
# are matched at module level only (tools/sim/board.py's stand-in `machine` module has
# MicroPython's own reset causes, not the protocol's).
_HAND_COPIES = [
    (r"^\s*MAX_MANIFEST\s*=\s*(const\()?\d", "MAX_MANIFEST (proto / bootwire)"),
    (r"^\s*BOOTLOADER_VERSION\s*=\s*(const\()?\d", "BOOTLOADER_VERSION (proto / bootwire)"),
    (r"^(POWER_ON|TIMER|WATCHDOG|CRASH|SOFT_RESET|EXTERNAL_RESET|BROWNOUT)\s*=\s*(const\()?\d",
     "a boot cause (proto.BootCause / _boot_cause / bootwire)"),
    (r"^POWER_ON\s*,.*=\s*range\(", "boot causes as range() (proto.BootCause)"),
    (r"^_?CAUSE_(WATCHDOG|CRASH)\s*=\s*(const\()?\d", "a boot cause (bootwire)"),
    (r"^(IDLE|TRIAL|CONFIRMED|REVERTED)\s*=\s*(const\()?\d", "an ota_state value (bootwire)"),
    (r"^(NONE|BAD_SIGNATURE|UNKNOWN_KEY|BAD_HASH|MISSING_FILE|WRONG_BOARD|DOWNGRADE|TRUNCATED"
     r"|HEALTH_CHECK|CRASHED|NO_SPACE|BAD_MANIFEST)\s*=\s*(const\()?\d", "an ota_reason value (bootwire)"),
    (r"^\s*ID_MAX\s*=\s*0x", "the message id limit (proto.MSG_ID_MAX)"),
    (r"^\s*MAX_SELECTIVE\s*=\s*\d", "ACK.selective's bound (proto.ACK_SELECTIVE_MAX)"),
    (r"^\s*_DETAIL_MAX\s*=\s*\d", "ERROR.detail's bound (proto.ERROR_DETAIL_MAX)"),
    (r"_(ACK|SLEEP_NOW)_(FIXED|OPTIONAL)\b", "the ACK/SLEEP_NOW layout (proto.in_place)"),
    (r"in exc\.reason|in str\(exc\)", "a ProtocolError read by its words (exc.code)"),
]


def test_no_hand_copied_wire_facts_outside_generated_code() -> None:
    generated = {generate.ROOT / rel for rel in generate.TARGETS}
    found = []
    for top in ("firmware", "boards", "gateway", "tools"):
        for path in sorted((generate.ROOT / top).rglob("*.py")):
            if path in generated:
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                for pattern, what in _HAND_COPIES:
                    if re.search(pattern, line):
                        found.append(f"{path.relative_to(generate.ROOT)}:{n}: {what}: {line.strip()}")
    assert not found, "\n".join(found)


def test_runtime_stand_ins_are_what_the_generated_module_defines() -> None:
    """tools/proto/runtime_python.py stands in for the generated module's names; each one
    exists in gateway/proto.py with the same kind of value (the codes as the spec's)."""
    from enum import IntEnum

    from gateway import proto
    from tools.proto import runtime_python as rt

    text = rt.__file__ and Path(rt.__file__).read_text()
    stand_ins = text.split("(not copied) ----\n", 1)[1].split("# ---- runtime (copied)", 1)[0]
    names = re.findall(r"^(?:class )?([A-Za-z_][A-Za-z0-9_]*)\b", stand_ins, re.M)
    assert {"MAJOR", "MAX_FRAME", "_SCHEMAS", "ErrorCode"} <= set(names)
    for name in names:
        assert type(getattr(proto, name)) is type(getattr(rt, name)), name
    assert issubclass(proto.ErrorCode, IntEnum)
    for code in rt.ErrorCode:
        assert proto.ErrorCode[code.name].name == code.name
    assert proto.ProtocolError.__module__ == "gateway.proto"  # copied, not imported


def test_micropython_runtime_stand_ins_are_defined_by_the_generated_module() -> None:
    text = (generate.ROOT / "tools" / "proto" / "runtime_micropython.py").read_text()
    stand_ins = text.split("(not copied) ----\n", 1)[1].split("# ---- runtime (copied)", 1)[0]
    names = re.findall(r"^([A-Za-z_][A-Za-z0-9_]*) = ", stand_ins, re.M)
    assert {"MAJOR", "MAX_FRAME", "ERROR_CODE_TOO_LARGE", "_SCHEMA_COLS"} <= set(names)
    node = (generate.ROOT / "firmware" / "proto.py").read_text()
    for name in names:
        assert re.search(rf"^{name} = ", node, re.M), name
    assert text.split("# ---- runtime (copied) ----\n", 1)[1].strip() in node
