"""The gateway's clock in a simulated field: the host's clock plus an offset the sim sets.

Sim nodes live in compressed virtual time; a gateway on the host's clock would hand them a
time hours off at every ACK. `python -m tools.sim.vclock CLOCK_FILE ARGS...` runs `torpor
ARGS...` (e.g. `gateway run --config X`) with `time.time` reading the host's clock plus the
milliseconds in CLOCK_FILE, which the node talking to the gateway keeps at its own true time
(boards/sim.py, "the field's shared clock"). The gateway's code runs unchanged, as under
faketime. Monotonic clocks (asyncio's timers, timeouts) stay the host's.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path


class FileOffset:
    """The offset in CLOCK_FILE (ms, one integer), read again whenever the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: tuple[int, int] | None = None
        self._offset_s = 0.0

    def __call__(self) -> float:
        try:
            st = os.stat(self.path)
        except OSError:
            return self._offset_s
        key = (st.st_ino, st.st_mtime_ns)
        if key != self._key:
            try:
                self._offset_s = int(self.path.read_text().strip() or 0) / 1000.0
                self._key = key
            except (OSError, ValueError):
                pass  # mid-rename: keep the last offset
        return self._offset_s


def write_offset(path: Path, offset_ms: int) -> None:
    """Set the clock file (written new then renamed, as the sim board does)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{int(offset_ms)}\n")
    os.replace(tmp, path)


def install(path: Path) -> Callable[[], float]:
    """Make this process's `time.time`/`time.time_ns` follow the clock file."""
    offset = FileOffset(path)
    real_time, real_ns = time.time, time.time_ns

    def vtime() -> float:
        return real_time() + offset()

    def vtime_ns() -> int:
        return real_ns() + int(offset() * 1e9)

    setattr(time, "time", vtime)  # noqa: B010 - replacing the module's function on purpose
    setattr(time, "time_ns", vtime_ns)  # noqa: B010
    return vtime


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m tools.sim.vclock CLOCK_FILE TORPOR_ARGS...", file=sys.stderr)
        return 2
    install(Path(argv[0]))
    from tools.cli import main as torpor_main

    return torpor_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
