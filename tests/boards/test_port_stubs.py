"""Every board module, and the firmware with it, type-checks against its port's MicroPython stubs.

On a device the board module ships as `board.py` (boards/esp32.py would otherwise shadow the
port's own `esp32` module), so each board is checked as `board.py` next to the shared helpers
(boards/_*.py) and every firmware module. The ESP32 and RP2 stub packages write the same
file names into one site-packages, so each package gets its own directory: copied from the
venv when its files are intact (checked against the wheel's RECORD), otherwise installed
with `pip install --target`.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BOARDS = ROOT / "boards"
FIRMWARE = ROOT / "firmware"

# Board module -> stub package of its port. Boards not listed (sim) are handled below.
PORTS = {
    "esp32": "micropython-esp32-stubs",
    "esp32s3": "micropython-esp32-stubs",
    "esp32c3": "micropython-esp32-stubs",
    "pico_w": "micropython-rp2-stubs",
    "pico2_w": "micropython-rp2-stubs",
}
FAMILY = {"micropython-esp32-stubs": "esp32", "micropython-rp2-stubs": "rp2"}
STDLIB = "micropython-stdlib-stubs"
# The sim board runs on the unix port, which has no stub package: it is checked against the
# ESP32 stubs, which cover the modules it uses (json, os, sys, time, vfs, micropython).
SIM_STUBS = "micropython-esp32-stubs"
# MicroPython code keeps state in untyped module globals (`_wlan = None`, `_cfg = {}`), which
# mypy infers too narrowly; these codes only flag that inference, not a port's API.
# Kept: attr-defined, call-arg, arg-type, name-defined, import-not-found, call-overload, ...
LENIENT = ("union-attr", "index", "operator", "assignment", "var-annotated", "has-type")


def _board_files() -> list[str]:
    return sorted(p.stem for p in BOARDS.glob("*.py") if not p.name.startswith("_") and p.stem != "simflash")


def _intact_files(dist: importlib.metadata.Distribution) -> list[Path] | None:
    """The installed files of dist, or None if another package overwrote any of them."""
    record = dist.read_text("RECORD")
    if record is None:
        return None
    base = Path(str(dist.locate_file("")))
    files: list[Path] = []
    for row in csv.reader(record.splitlines()):
        if len(row) < 2 or not row[1] or ".dist-info/" in row[0]:
            continue
        path = base / row[0]
        algo, _, want = row[1].partition("=")
        try:
            digest = hashlib.new(algo, path.read_bytes()).digest()
        except OSError:
            return None
        if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != want:
            return None
        files.append(Path(row[0]))
    return files


def _stub_dir(cache: Path, package: str) -> Path:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{package} is not installed (pip install '.[dev]')")
    target = cache / f"{package}-{dist.version}"
    if target.exists():
        return target
    tmp = cache / f".{package}-{uuid.uuid4().hex}"
    files = _intact_files(dist)
    if files is not None:
        base = Path(str(dist.locate_file("")))
        for rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(base / rel, tmp / rel)
    else:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp),
             f"{package}=={dist.version}"],
            capture_output=True, text=True, timeout=300,
        )
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            pytest.skip(
                f"{package} in the venv was overwritten by another stub package and "
                f"`pip install --target` failed (offline?): {proc.stderr.strip()[-300:]}"
            )
    try:
        os.replace(tmp, target)
    except OSError:
        # Another worker finished first; its copy is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def stub_cache(pytestconfig: pytest.Config) -> Path:
    return Path(pytestconfig.cache.mkdir("torpor-mp-stubs"))


def _check(board: str, package: str, stub_cache: Path, tmp_path: Path, *, judge: str) -> None:
    """mypy the board (as board.py), the helpers and the firmware; judge "boards" or "firmware"."""
    stubs = _stub_dir(stub_cache, package)
    stdlib = _stub_dir(stub_cache, STDLIB)
    src = tmp_path / "src"
    src.mkdir()
    ours: list[str] = []
    firmware: list[str] = []
    family = "" if board == "sim" else FAMILY[package]
    for helper in sorted(BOARDS.glob("_*.py")):
        # Shared helpers: the generic ones, and those of this board's family only.
        if any(f in helper.stem for f in FAMILY.values() if f != family):
            continue
        shutil.copyfile(helper, src / helper.name)
        ours.append(helper.name)
    if board == "sim":
        shutil.copyfile(BOARDS / "simflash.py", src / "simflash.py")
        ours.append("simflash.py")
    shutil.copyfile(BOARDS / f"{board}.py", src / "board.py")
    ours.append("board.py")
    for path in sorted(FIRMWARE.rglob("*.py")):
        rel = path.relative_to(FIRMWARE)
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, src / rel)
        firmware.append(str(rel))
    env = dict(os.environ, MYPYPATH=f"{stubs}{os.pathsep}{stdlib}")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--custom-typeshed-dir", str(stdlib), "--no-site-packages",
         "--python-version", "3.11", "--check-untyped-defs", "--no-error-summary",
         *(f"--disable-error-code={code}" for code in LENIENT),
         "--cache-dir", str(stub_cache / f"mypy-{package}"), "--config-file", os.devnull, *ours, *firmware],
        cwd=src, env=env, capture_output=True, text=True, timeout=600,
    )
    # Errors inside the stub packages themselves are not ours to fix; report only our files.
    judged = ours if judge == "boards" else firmware
    errors = [
        line for line in proc.stdout.splitlines()
        if line.split(":", 1)[0] in judged and ": error:" in line
    ]
    what = f"{board}.py (as board.py)" if judge == "boards" else f"firmware/ with {board}.py"
    assert not errors, f"{what} against {package}:\n" + "\n".join(errors)


@pytest.mark.parametrize("board", [b for b in _board_files() if b in PORTS])
def test_board_and_firmware_typecheck_against_port_stubs(
    board: str, stub_cache: Path, tmp_path: Path
) -> None:
    _check(board, PORTS[board], stub_cache, tmp_path, judge="boards")


@pytest.mark.parametrize("board", ["esp32", "pico_w"])
def test_firmware_typechecks_against_port_stubs(board: str, stub_cache: Path, tmp_path: Path) -> None:
    if not any(FIRMWARE.rglob("*.py")):
        pytest.skip("no firmware modules yet")
    _check(board, PORTS[board], stub_cache, tmp_path, judge="firmware")


def test_sim_board_typechecks_as_micropython(stub_cache: Path, tmp_path: Path) -> None:
    _check("sim", SIM_STUBS, stub_cache, tmp_path, judge="boards")


def test_every_board_module_has_a_port() -> None:
    unknown = [b for b in _board_files() if b not in PORTS and b != "sim"]
    assert not unknown, f"add these board modules to PORTS in {Path(__file__).name}: {unknown}"


def test_a_wrong_api_call_is_caught(stub_cache: Path, tmp_path: Path) -> None:
    # The check above must be able to fail: a misspelled machine call is reported.
    stubs = _stub_dir(stub_cache, PORTS["pico_w"])
    stdlib = _stub_dir(stub_cache, STDLIB)
    (tmp_path / "board.py").write_text("import machine\nmachine.deepslep(10)\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--custom-typeshed-dir", str(stdlib), "--no-site-packages",
         "--check-untyped-defs", "--cache-dir", str(stub_cache / "mypy-neg"),
         "--config-file", os.devnull, "board.py"],
        cwd=tmp_path, env=dict(os.environ, MYPYPATH=f"{stubs}{os.pathsep}{stdlib}"),
        capture_output=True, text=True, timeout=600,
    )
    assert 'board.py:2: error: Module has no attribute "deepslep"' in proc.stdout
