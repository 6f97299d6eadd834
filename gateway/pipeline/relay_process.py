"""The upstream relay in a process of its own, so that it runs on the second core.

Ingest (decode, commit, ACK) and the relay (read the outbox, publish upstream, delete on
PUBACK) shared one GIL in one process. Here the relay (gateway.pipeline.relay.Relay,
unchanged) runs in a child process (`python -m gateway.pipeline.relay_process`) that the
supervisor starts, watches and restarts (`RelayProcess.run`, under gateway.service's
backoff). The two talk over one socket pair, nothing else:

- parent -> child: first one JSON line (the database path and the `[upstream]`
  settings), then one byte whenever something was committed to the outbox: a wake-up,
  after which the child reads the outbox in id order (it never trusts the bytes for
  content, so a lost or coalesced wake-up costs at most one poll interval);
- child -> parent: a status line (`connected connects relayed`) whenever it changes.

The outbox in SQLite is the only hand-over of data, so a crash of either process loses
nothing: a new child starts from the oldest item still stored (delivery upstream stays
at-least-once and in order), and the child exits when the parent's end of the socket
closes (the parent died), so no relay outlives its gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.config import UpstreamConfig
from gateway.errors import GatewayError
from gateway.pipeline.relay import Relay
from gateway.store.outbox import Queued

log = logging.getLogger(__name__)

STATUS_EVERY_S = 0.1  # how often the child looks whether its status changed
STOP_WAIT_S = 10.0  # SIGTERM, then this long for the child's last deletes, then SIGKILL


class RelayProcessError(GatewayError):
    """The relay process exited (the supervisor restarts it)."""


class RelayProcess:
    """The parent's side: `run()` starts the child and returns (raises) when it exits;
    `notify()` wakes it from any thread; `connected`, `connects`, `relayed` mirror the
    child's Relay for status and metrics."""

    def __init__(self, db_path: str | Path, cfg: UpstreamConfig) -> None:
        self.db_path = Path(db_path)
        self.cfg = cfg
        self.connected = False
        self.connects = 0
        self.relayed = 0
        self.pid: int | None = None
        self.starts = 0
        self._sock: socket.socket | None = None

    def notify(self, items: Sequence[Queued] = ()) -> None:
        """Something was committed to the outbox. Any thread (ingest commits on the
        writer thread); never blocks: when the socket's buffer is full a wake-up is
        already waiting, and when the child is down its successor reads the outbox."""
        sock = self._sock
        if sock is None:
            return
        with contextlib.suppress(OSError):  # BlockingIOError included
            sock.send(b"\x01")

    async def run(self) -> None:
        parent, child = socket.socketpair()
        proc: asyncio.subprocess.Process | None = None
        try:
            level = logging.getLogger("gateway").getEffectiveLevel()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.pipeline.relay_process",
                "--fd", str(child.fileno()), "--log-level", str(level),
                "--parent", str(os.getpid()),
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL,
            )
            child.close()
            self.pid = proc.pid
            self.starts += 1
            hello = {"db_path": str(self.db_path), "upstream": dataclasses.asdict(self.cfg)}
            parent.sendall(json.dumps(hello).encode() + b"\n")
            parent.setblocking(False)
            self._sock = parent
            log.info("upstream relay process %d started", proc.pid)
            reader = asyncio.create_task(self._read_status(parent))
            try:
                code = await proc.wait()
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            raise RelayProcessError(f"the upstream relay process {proc.pid} exited with code {code}")
        finally:
            self._sock = None
            self.connected = False
            parent.close()
            child.close()
            if proc is not None and proc.returncode is None:
                await _stop(proc)

    async def _read_status(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        buf = b""
        while True:
            data = await loop.sock_recv(sock, 4096)
            if not data:
                return
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines[-1:]:  # only the latest state matters
                try:
                    connected, connects, relayed = (int(x) for x in line.split())
                except ValueError:
                    log.warning("upstream relay process: unreadable status %r", line[:80])
                    continue
                self.connected, self.connects, self.relayed = bool(connected), connects, relayed


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM lets the child delete what upstream acknowledged; SIGKILL after a while
    costs only resends."""
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        async with asyncio.timeout(STOP_WAIT_S):
            await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


# ------------------------------------------------------------------ the child

def _read_hello(sock: socket.socket) -> dict[str, Any]:
    buf = b""
    while b"\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise RelayProcessError("the gateway closed the relay's socket before its settings")
        buf += data
    # Wake-ups sent right after the settings need no answer: the relay reads the outbox
    # when it starts.
    line = buf.split(b"\n", 1)[0]
    hello: dict[str, Any] = json.loads(line)
    return hello


async def _serve(sock: socket.socket) -> None:
    hello = _read_hello(sock)
    cfg = UpstreamConfig(**hello["upstream"])
    # The parent checkpoints (gateway.store.db.checkpoint_loop): the relay's deletes must
    # not run a checkpoint's fsync of their own.
    relay = Relay(hello["db_path"], cfg, autocheckpoint=False)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    loop.add_signal_handler(signal.SIGTERM, main.cancel)
    sock.setblocking(False)

    def readable() -> None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the gateway is gone: so is its relay
            loop.remove_reader(sock.fileno())
            log.warning("the gateway closed the relay's socket; stopping")
            main.cancel()
            return
        relay.notify()

    loop.add_reader(sock.fileno(), readable)

    async def report() -> None:
        last: tuple[int, int, int] | None = None
        while True:
            now = (int(relay.connected), relay.connects, relay.relayed)
            if now != last:
                with contextlib.suppress(BlockingIOError):
                    sock.send("{} {} {}\n".format(*now).encode())
                    last = now
            await asyncio.sleep(STATUS_EVERY_S)

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(relay.run(), name="relay")
            tg.create_task(report(), name="relay-status")
    except asyncio.CancelledError:
        pass


def _die_with_parent(parent: int) -> None:
    """A gateway killed with SIGKILL must not leave its relay publishing beside the next
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.pipeline.relay_process")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--log-level", type=int, default=logging.WARNING)
    parser.add_argument("--parent", type=int, default=0, help="the gateway's pid")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format=f"%(asctime)s relay[{os.getpid()}] %(levelname)s %(name)s: %(message)s")
    # Ctrl-C in a terminal reaches the whole process group: the gateway stops its relay.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(args.parent)
    sock = socket.socket(fileno=args.fd)
    try:
        asyncio.run(_serve(sock))
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
