"""`python -m tools.sim.fakesleep ARGS...`: run `torpor ARGS...` with a `time.sleep` that
works under the soak's libfaketime (tools/sim/soak.py).

With FAKETIME_DONT_FAKE_MONOTONIC=1 (the soak keeps monotonic clocks the host's, so that
timeouts and asyncio's timers are real), libfaketime 0.9.10 fails every
clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME) with EINVAL, and CPython's `time.sleep`
sleeps that way: any `time.sleep` in the gateway or a `torpor` command would raise
OSError. A sleep through select() with a relative timeout is not affected; the code that
calls `time.sleep` runs unchanged.
"""

from __future__ import annotations

import select
import sys
import time


def _sleep(seconds: float) -> None:
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        select.select([], [], [], left)


def install() -> None:
    setattr(time, "sleep", _sleep)  # noqa: B010 - replacing the module's function on purpose


def main(argv: list[str]) -> int:
    install()
    from tools.cli import main as torpor_main

    return torpor_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
