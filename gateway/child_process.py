"""What the gateway's child processes (the upstream relay, the web page) share: how the
supervisor stops one, and how one ends with its gateway.

A child gets its settings as the first JSON line on a socket pair it shares with the
gateway, and exits when the gateway's end of it closes; on Linux the kernel also sends it
SIGTERM the moment the gateway dies, so no child outlives its gateway."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from gateway.errors import GatewayError

STOP_WAIT_S = 10.0  # SIGTERM, then this long for the child's last work, then SIGKILL


class ChildProcessError(GatewayError):
    """A child process of the gateway could not start or exited (the supervisor restarts it)."""


async def spawn(module: str, parent: socket.socket, child: socket.socket,
                hello: dict[str, Any]) -> asyncio.subprocess.Process:
    """Start `python -m <module>` (whose `main` calls `main` below) on the `child` end of a
    socket pair, close that end here, and send the child its settings on `parent`."""
    level = logging.getLogger("gateway").getEffectiveLevel()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module,
            "--fd", str(child.fileno()), "--log-level", str(level),
            "--parent", str(os.getpid()),
            pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL,
        )
    finally:
        child.close()
    parent.sendall(json.dumps(hello).encode() + b"\n")
    return proc


async def stop(proc: asyncio.subprocess.Process, wait_s: float = STOP_WAIT_S) -> None:
    """SIGTERM lets the child finish what it holds; SIGKILL after `wait_s`."""
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        async with asyncio.timeout(wait_s):
            await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def read_hello(sock: socket.socket, what: str) -> dict[str, Any]:
    """The child's settings: the first line the gateway sent on `sock` (blocking)."""
    buf = b""
    while b"\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ChildProcessError(f"the gateway closed the {what}'s socket before its settings")
        buf += data
    # Wake-ups or requests sent right after the settings are not read here: the child
    # starts from the stored state anyway.
    hello: dict[str, Any] = json.loads(buf.split(b"\n", 1)[0])
    return hello


def die_with_parent(parent: int) -> None:
    """A gateway killed with SIGKILL must not leave its child running beside the next
    gateway's: Linux sends us SIGTERM the moment the parent dies (the socket's EOF says
    so too, a little later, and elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if parent and os.getppid() != parent:  # it died before the line above
        sys.exit(0)


def main(module: str, label: str, serve: Callable[[socket.socket], Coroutine[Any, Any, None]],
         argv: list[str] | None = None) -> int:
    """`python -m <module> --fd N --log-level L --parent PID`: the child's entry point.
    `serve(sock)` runs until the gateway closes the socket or sends SIGTERM."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--log-level", type=int, default=logging.WARNING)
    parser.add_argument("--parent", type=int, default=0, help="the gateway's pid")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format=(
        f"%(asctime)s {label}[{os.getpid()}] %(levelname)s %(name)s: %(message)s"))
    # Ctrl-C in a terminal reaches the whole process group: the gateway stops its children.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(args.parent)
    sock = socket.socket(fileno=args.fd)
    try:
        asyncio.run(serve(sock))
    except (GatewayError, OSError) as exc:  # e.g. a port taken: the supervisor retries
        logging.getLogger(module).error("the %s stopped: %s", label, exc)
        return 1
    finally:
        sock.close()
    return 0
