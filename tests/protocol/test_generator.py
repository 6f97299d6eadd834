"""The spec loader refuses bad specs by key; generated files carry their header and match."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
        ("sync_time = 5 }", "sync_time = 5, blink = 6 }", "commands: no entry for command_op blink"),
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
    from gateway import downlink_cli, proto
    from tools.proto import gen_micropython

    spec = load()
    text = gen_micropython.generate_op_args(spec)
    docs = (generate.ROOT / "docs" / "protocol.md").read_text()
    helptext = downlink_cli.ops_help()
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
