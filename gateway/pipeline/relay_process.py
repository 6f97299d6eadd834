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

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import child_process
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
            hello = {"db_path": str(self.db_path), "upstream": dataclasses.asdict(self.cfg)}
            proc = await child_process.spawn("gateway.pipeline.relay_process", parent, child,
                                             hello)
            self.pid = proc.pid
            self.starts += 1
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
                await child_process.stop(proc, STOP_WAIT_S)

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


# ------------------------------------------------------------------ the child

async def _serve(sock: socket.socket) -> None:
    hello = child_process.read_hello(sock, "relay")
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


def main(argv: list[str] | None = None) -> int:
    return child_process.main("gateway.pipeline.relay_process", "relay", _serve, argv)


if __name__ == "__main__":
    sys.exit(main())
