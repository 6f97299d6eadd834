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
