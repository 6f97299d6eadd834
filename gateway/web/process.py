"""The web page and API in a process of their own (`[web] process = true`).

Served inside the gateway, a page shares one interpreter lock and one event loop with
ingest, so its tail latency is ingest's busiest moment. Here the same server
(gateway.web.server.serve, unchanged) runs in a child process (`python -m
gateway.web.process`) that the supervisor starts, watches and restarts (`WebProcess.run`,
under gateway.service's backoff). It has its own database connection, as `torpor gateway
web` does: reads see every commit (WAL), operator actions write through the same
gateway.ops functions, and the event stream already follows the database (a fingerprint of
counters polled every 2 s), so nothing about the fleet crosses between the processes.

What crosses is one socket pair: first one JSON line parent -> child (the validated
configuration), then, at each `/metrics` scrape, `metrics` child -> parent and the
parent's in-memory counters and histogram (gateway.ops.metrics.Live.snapshot) back as one
JSON line. The child exits when the gateway's end of the socket closes, and on Linux the
kernel sends it SIGTERM when the gateway dies (gateway.child_process), so no page is left
serving without its gateway.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import signal
import socket
import sys

from gateway import child_process
from gateway.config import GatewayConfig, as_plain, from_plain
from gateway.errors import GatewayError
from gateway.ops.metrics import Live

log = logging.getLogger(__name__)

STOP_WAIT_S = 5.0  # SIGTERM, then this long (the server gives requests 1 s), then SIGKILL
METRICS_WAIT_S = 2.0  # a scrape waits this long for the gateway's counters, then goes without
REQUEST = b"metrics\n"


class WebProcessError(GatewayError):
    """The web page's process exited (the supervisor restarts it)."""


class WebProcess:
    """The parent's side: `run()` starts the child and returns (raises) when it exits, and
    answers its requests for `live` meanwhile."""

    def __init__(self, cfg: GatewayConfig, live: Live) -> None:
        self.cfg = cfg
        self.live = live
        self.pid: int | None = None
        self.starts = 0

    async def run(self) -> None:
        parent, child = socket.socketpair()
        proc: asyncio.subprocess.Process | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            proc = await child_process.spawn("gateway.web.process", parent, child,
                                             {"config": as_plain(self.cfg)})
            self.pid = proc.pid
            self.starts += 1
            reader, writer = await asyncio.open_connection(sock=parent)
            log.info("web page process %d started", proc.pid)
            answer = asyncio.create_task(self._answer(reader, writer))
            try:
                code = await proc.wait()
            finally:
                answer.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await answer
            raise WebProcessError(f"the web page's process {proc.pid} exited with code {code}")
        finally:
            self.pid = None
            # SIGTERM first: the socket's end of file would tell the child its gateway died.
            if proc is not None and proc.returncode is None:
                await child_process.stop(proc, STOP_WAIT_S)
            if writer is not None:
                writer.close()
            else:
                parent.close()
            child.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            if line != REQUEST:
                log.warning("web page process: unreadable request %r", line[:80])
                continue
            snap = self.live.snapshot()
            writer.write(json.dumps(snap, default=str).encode() + b"\n")
            await writer.drain()


# ------------------------------------------------------------------ the child

class GatewayLink:
    """The child's end of the socket: asks the gateway for its live metrics, and cancels
    `main` when the gateway closes its end."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.waiting: collections.deque[asyncio.Future[bytes]] = collections.deque()

    async def follow(self, main: asyncio.Task[None]) -> None:
        """Answers come back in the order asked; one whose scrape gave up is skipped."""
        while line := await self.reader.readline():
            while self.waiting:
                fut = self.waiting.popleft()
                if not fut.done():
                    fut.set_result(line)
                    break
        log.warning("the gateway closed the web page's socket; stopping")
        main.cancel()

    async def live(self) -> Live | None:
        """The gateway's counters and histogram now; None (a scrape of the gauges only)
        when it does not answer in time."""
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        try:
            self.writer.write(REQUEST)
            async with asyncio.timeout(METRICS_WAIT_S):
                line = await fut
        except (TimeoutError, OSError) as exc:
            fut.cancel()
            log.warning("the gateway did not send its metrics: %s", exc or "timed out")
            return None
        return Live.from_snapshot(json.loads(line))


async def _serve(sock: socket.socket) -> None:
    from gateway.web import server

    hello = child_process.read_hello(sock, "web page")
    cfg = from_plain(hello["config"])
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    loop.add_signal_handler(signal.SIGTERM, main.cancel)
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    link = GatewayLink(reader, writer)
    follow = asyncio.create_task(link.follow(main))
    try:
        await server.serve(cfg, live_source=link.live)
    except asyncio.CancelledError:
        pass
    finally:
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow
        writer.close()


def main(argv: list[str] | None = None) -> int:
    return child_process.main("gateway.web.process", "web", _serve, argv)


if __name__ == "__main__":
    sys.exit(main())
