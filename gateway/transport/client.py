"""An asyncio MQTT 3.1.1 client on the transport's own codec.

One `MqttClient` is one connection at a time (it may `connect()` again after a loss): TLS
through an `ssl.SSLContext`, subscribe/unsubscribe, PUBLISH QoS 0 and 1 with every PUBACK
tracked in a bounded in-flight window, keepalive pings, clean or persistent sessions and a
clean DISCONNECT. Received messages go to an `on_message` callback (the cheap path, called
in the event loop as packets are decoded) or to a bounded queue read with `messages()` /
`receive()`; when the queue is full the client stops reading the socket, so a slow
consumer slows the broker down instead of growing memory.

Writes made in one pass of the event loop are coalesced into one `transport.write`, which
under TLS means one record instead of one per packet. Every failure is a `TransportError`
with an `ErrorCode`; when the connection ends, every pending operation fails with
`ConnectionLost` and the reason.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

from gateway.transport import codec
from gateway.transport.codec import ConnackCode, Publish
from gateway.transport.errors import (
    ConnectionLost,
    ConnectRefused,
    EncodeError,
    ErrorCode,
    MalformedPacket,
    NotConnected,
    SubscribeRefused,
    TransportError,
    TransportTimeout,
)

log = logging.getLogger(__name__)

OnMessage = Callable[[Publish], None]
OnOversized = Callable[[codec.Oversized], None]

# Coalesced writes are flushed at once past this size, so a publisher that never yields
# to the loop still hands bytes to the socket and meets its flow control.
FLUSH_AT: Final = 64 * 1024
_TOPIC_CACHE_MAX: Final = 1024

_CONNACK_TEXT: Final = {
    ConnackCode.UNACCEPTABLE_PROTOCOL_VERSION: "the broker does not speak MQTT 3.1.1",
    ConnackCode.IDENTIFIER_REJECTED: "the broker rejected the client id",
    ConnackCode.SERVER_UNAVAILABLE: "the broker is unavailable",
    ConnackCode.BAD_USERNAME_OR_PASSWORD: "the broker refused the username or password",
    ConnackCode.NOT_AUTHORIZED: "the broker refused this client (certificate or ACL)",
}


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """How to reach the broker and how to behave on the connection.

    `max_packet` bounds every packet read (see `codec.max_publish_packet`); `max_inflight`
    bounds the QoS 1 PUBLISHes awaiting their PUBACK; `max_queued` bounds received messages
    waiting in the queue when there is no `on_message` callback."""

    host: str
    port: int
    client_id: str
    ssl: ssl.SSLContext | None = None
    server_hostname: str | None = None  # default: `host` when TLS
    keepalive: int = 60
    clean_session: bool = True
    username: str | None = None
    password: bytes | None = None
    will: codec.Will | None = None
    max_packet: int = 64 * 1024
    max_inflight: int = 64
    max_queued: int = 10_000
    connect_timeout: float = 10.0
    # A packet over `max_packet` ends the connection (False), or is let go unread and, as
    # a QoS 1 PUBLISH, acknowledged so the broker does not send it again (True): see
    # `MqttClient.on_oversized`.
    drop_oversized: bool = False

    def __post_init__(self) -> None:
        if self.max_inflight < 1 or self.max_inflight > 65_000:
            raise ValueError(f"max_inflight {self.max_inflight} is outside 1..65000")
        if self.max_queued < 1:
            raise ValueError(f"max_queued {self.max_queued} must be at least 1")
        if not 0 <= self.keepalive <= 0xFFFF:
            raise ValueError(f"keepalive {self.keepalive} is outside 0..65535 s")


class _Protocol(asyncio.Protocol):
    """Hands the transport's events to the client that made it."""

    def __init__(
        self,
        made: Callable[[asyncio.Transport], None],
        received: Callable[[bytes], None],
        lost: Callable[[Exception | None], None],
        pause: Callable[[], None],
        resume: Callable[[], None],
    ) -> None:
        self.made = made
        self.received = received
        self.lost = lost
        self.pause = pause
        self.resume = resume

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.made(transport)

    def data_received(self, data: bytes) -> None:
        self.received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost(exc)

    def pause_writing(self) -> None:
        self.pause()

    def resume_writing(self) -> None:
        self.resume()


class MqttClient:
    """See the module docstring. Use as `async with MqttClient(options) as client:` or
    call `connect()` and `disconnect()`."""

    def __init__(self, options: ClientOptions, on_message: OnMessage | None = None,
                 on_oversized: OnOversized | None = None) -> None:
        self.options = options
        self.on_message = on_message
        # Told of each packet dropped over the bound (with `drop_oversized`); default: a
        # warning in the log. `oversized` counts them over the client's life.
        self.on_oversized = on_oversized
        self.oversized = 0
        self.session_present = False
        self._transport: asyncio.Transport | None = None
        self._decoder = codec.Decoder(options.max_packet, options.drop_oversized)
        self._out = bytearray()
        self._flush_handle: asyncio.Handle | None = None
        self._connack: asyncio.Future[codec.ConnAck] | None = None
        self._connected = False
        self._closing = False  # disconnect() asked for the end
        self._closed: asyncio.Future[None] | None = None
        self._error: ConnectionLost | None = None
        # packet id -> future; PUBLISH QoS 1 futures are counted against the window
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._inflight = 0
        self._window_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._next_id = 0
        self._write_ok: asyncio.Event | None = None
        self._queue: collections.deque[Publish] = collections.deque()
        self._queue_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._qos2_received: set[int] = set()
        self._topics: dict[str, codec.EncodedTopic] = {}
        self._keepalive_handle: asyncio.TimerHandle | None = None
        self._last_out = 0.0
        self._last_in = 0.0
        self._ping_sent: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- public API ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def inflight(self) -> int:
        """QoS 1 PUBLISHes written and not yet acknowledged."""
        return self._inflight

    @property
    def queued(self) -> int:
        """Received messages waiting in the queue."""
        return len(self._queue)

    @property
    def error(self) -> ConnectionLost | None:
        """Why the last connection ended, if it ended by a fault."""
        return self._error

    async def connect(self) -> bool:
        """Open the connection and complete the MQTT handshake; returns the CONNACK's
        session-present flag. Raises `ConnectRefused`, `TransportTimeout` or
        `ConnectionLost` (code CONNECT_FAILED when the broker cannot be reached)."""
        if self._transport is not None and not self._transport.is_closing():
            raise TransportError(ErrorCode.PROTOCOL_VIOLATION, "already connected")
        o = self.options
        where = f"{o.host}:{o.port}"
        loop = self._loop = asyncio.get_running_loop()
        self._reset(loop)
        connack: asyncio.Future[codec.ConnAck] = loop.create_future()
        self._connack = connack
        packet = codec.encode_connect(codec.Connect(
            o.client_id, o.keepalive, o.clean_session, o.username, o.password, o.will))
        try:
            async with asyncio.timeout(o.connect_timeout):
                try:
                    await loop.create_connection(
                        self._protocol, o.host, o.port, ssl=o.ssl,
                        server_hostname=(o.server_hostname or o.host) if o.ssl else None,
                    )
                except ssl.SSLError as exc:
                    raise ConnectionLost(ErrorCode.CONNECT_FAILED,
                                         f"TLS handshake with the broker at {where} failed: {exc}"
                                         ) from exc
                except OSError as exc:
                    raise ConnectionLost(ErrorCode.CONNECT_FAILED,
                                         f"cannot reach the broker at {where}: {exc}") from exc
                self._write(packet)
                self._flush()
                ack = await connack
        except TimeoutError:
            self._closing = True  # the TransportTimeout says why; no second report
            self._abort()
            self._settle()
            raise TransportTimeout(
                f"no CONNACK from the broker at {where} within {o.connect_timeout:g}s") from None
        except BaseException as exc:
            if isinstance(exc, ConnectionLost) and self._error is None:
                self._error = exc
            self._abort()
            self._settle()
            raise
        if ack.return_code != ConnackCode.ACCEPTED:
            self._closing = True
            self._abort()
            try:
                text = _CONNACK_TEXT[ConnackCode(ack.return_code)]
            except ValueError:
                text = "the broker refused the connection"
            raise ConnectRefused(ack.return_code,
                                 f"{text} (CONNACK {ack.return_code}) at {where}")
        self.session_present = ack.session_present
        self._connected = True
        self._schedule_keepalive()
        return ack.session_present

    async def subscribe(self, *filters: tuple[str, int], timeout: float = 10.0) -> tuple[int, ...]:
        """Subscribe to (topic filter, QoS) pairs; returns the granted QoS of each. Raises
        `SubscribeRefused` naming the filters the broker refused."""
        pid = self._take_id()
        packet = codec.encode_subscribe(codec.Subscribe(pid, tuple(filters)))
        suback: codec.SubAck = await self._request(pid, packet, timeout, "SUBACK")
        if len(suback.return_codes) != len(filters):
            self._fail(ConnectionLost(ErrorCode.PROTOCOL_VIOLATION,
                                      "SUBACK does not answer every topic filter"))
            raise self._lost_error()
        refused = tuple(f for (f, _), rc in zip(filters, suback.return_codes, strict=True)
                        if rc == codec.SUBACK_FAILURE)
        if refused:
            raise SubscribeRefused(refused)
        return suback.return_codes

    async def unsubscribe(self, *filters: str, timeout: float = 10.0) -> None:
        pid = self._take_id()
        packet = codec.encode_unsubscribe(codec.Unsubscribe(pid, tuple(filters)))
        await self._request(pid, packet, timeout, "UNSUBACK")

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                      timeout: float | None = None) -> None:
        """Publish; for QoS 1 return once the broker's PUBACK arrived (or raise
        `TransportTimeout` after `timeout` seconds, the message staying in flight)."""
        if qos == 0:
            self._check_connected()
            if self._write_ok is not None and not self._write_ok.is_set():
                await self._write_ok.wait()
                self._check_connected()
            self._write(codec.publish_packet(self._topic(topic), payload, 0, 0, retain))
            return
        if qos != 1:
            raise EncodeError(f"this client publishes QoS 0 and 1, not QoS {qos!r}")
        fut = await self.start_publish(topic, payload, qos, retain)
        if timeout is None:
            await fut
            return
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise TransportTimeout(f"no PUBACK for {topic} within {timeout:g}s") from None

    def publish_nowait(self, topic: str, payload: bytes, qos: int = 0,
                       retain: bool = False) -> asyncio.Future[None] | None:
        """Write a PUBLISH now, without waiting for room in the in-flight window or for the
        socket to drain: for a caller that bounds what it sends by other means (ingest
        answers only what it just committed). Writes made in one pass of the event loop
        go out together. QoS 1: returns the future its PUBACK resolves, counted in
        `inflight` (its failure need not be retrieved). Raises `NotConnected` or the
        connection's `ConnectionLost` when there is no connection."""
        self._check_connected()
        if qos == 0:
            self._write(codec.publish_packet(self._topic(topic), payload, 0, 0, retain))
            return None
        if qos != 1:
            raise EncodeError(f"this client publishes QoS 0 and 1, not QoS {qos!r}")
        t = self._topic(topic)
        pid = self._take_id()
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        fut.add_done_callback(_retrieve)
        self._pending[pid] = fut
        self._inflight += 1
        self._write(codec.publish_packet(t, payload, 1, pid, retain))
        return fut

    async def start_publish(self, topic: str, payload: bytes, qos: int = 1,
                            retain: bool = False) -> asyncio.Future[None]:
        """Write a QoS 1 PUBLISH once the in-flight window has room; return the future its
        PUBACK resolves (or `ConnectionLost` fails). Lets a caller keep the window full."""
        if qos != 1:
            raise EncodeError(f"start_publish sends QoS 1 only, not QoS {qos}")
        self._check_connected()
        while self._inflight >= self.options.max_inflight or (
                self._write_ok is not None and not self._write_ok.is_set()):
            if self._inflight >= self.options.max_inflight:
                assert self._loop is not None
                waiter = self._loop.create_future()
                self._window_waiters.append(waiter)
                try:
                    await waiter
                except asyncio.CancelledError:
                    if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                        self._wake_one()  # the room it was given goes to the next in line
                    raise
            else:
                assert self._write_ok is not None
                await self._write_ok.wait()
            self._check_connected()
        t = self._topic(topic)
        pid = self._take_id()
        packet = codec.publish_packet(t, payload, 1, pid, retain)
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._pending[pid] = fut
        self._inflight += 1
        self._write(packet)
        return fut

    async def messages(self) -> AsyncIterator[Publish]:
        """Received messages, in order, until the connection ends: after a disconnect() the
        iteration stops, after a fault it raises `ConnectionLost` (messages already
        received are yielded first)."""
        while True:
            batch = await self.receive(256)
            if not batch:
                return
            for m in batch:
                yield m

    async def receive(self, limit: int = 1024) -> list[Publish]:
        """Wait for at least one received message and return up to `limit`; an empty list
        once the connection ended by disconnect(). Raises `ConnectionLost` after a fault."""
        if self.on_message is not None:
            raise TransportError(ErrorCode.PROTOCOL_VIOLATION,
                                 "messages go to the on_message callback, not the queue")
        q = self._queue
        while not q:
            if self._transport is None or self._closed is None or self._closed.done():
                if self._error is not None and not self._closing:
                    raise self._error
                return []
            assert self._loop is not None
            waiter = self._queue_waiter = self._loop.create_future()
            await waiter
        out = [q.popleft() for _ in range(min(limit, len(q)))]
        if self._reading_paused and len(q) <= self.options.max_queued // 2:
            self._reading_paused = False
            if self._transport is not None and not self._transport.is_closing():
                self._transport.resume_reading()
        return out

    async def disconnect(self, timeout: float = 5.0) -> None:
        """Send DISCONNECT and close. QoS 1 messages still awaiting their PUBACK fail with
        ConnectionLost: whether the broker has them is unknown, so a caller that must
        deliver them publishes them again (the relay's outbox does)."""
        self._closing = True
        transport = self._transport
        if transport is not None and not transport.is_closing():
            self._write(codec.DISCONNECT_BYTES)
            self._flush()
            transport.close()
        if self._closed is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._closed), timeout)
            except TimeoutError:
                self._abort()

    async def wait_closed(self) -> ConnectionLost | None:
        """Wait for the connection to end; returns its error (None after disconnect())."""
        if self._closed is not None:
            await asyncio.shield(self._closed)
        return None if self._closing else self._error

    async def __aenter__(self) -> MqttClient:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.disconnect()

    # --- internals: state -----------------------------------------------------------------

    def _protocol(self) -> _Protocol:
        return _Protocol(self._made, self._received, self._lost, self._pause_writing,
                         self._resume_writing)

    def _reset(self, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = None
        self._decoder = codec.Decoder(self.options.max_packet, self.options.drop_oversized)
        self._out = bytearray()
        self._flush_handle = None
        self._connected = False
        self._closing = False
        self._closed = loop.create_future()
        self._error = None
        self._pending = {}
        self._inflight = 0
        self._window_waiters = collections.deque()
        self._write_ok = asyncio.Event()
        self._write_ok.set()
        self._reading_paused = False
        self._qos2_received = set()
        self._ping_sent = None
        self._last_in = self._last_out = loop.time()
        # Messages of a previous connection stay in the queue: nothing received is lost.

    def _check_connected(self) -> None:
        if not self._connected:
            raise self._lost_error()

    def _lost_error(self) -> TransportError:
        if self._error is not None and not self._closing:
            return self._error
        return NotConnected()

    def _take_id(self) -> int:
        self._check_connected()
        pending = self._pending
        for _ in range(0xFFFF):
            self._next_id = self._next_id % 0xFFFF + 1
            if self._next_id not in pending:
                return self._next_id
        raise TransportError(ErrorCode.PROTOCOL_VIOLATION, "all 65535 packet ids are in use")

    def _topic(self, topic: str) -> codec.EncodedTopic:
        t = self._topics.get(topic)
        if t is None:
            t = codec.encode_topic(topic)
            if len(self._topics) >= _TOPIC_CACHE_MAX:
                self._topics.clear()
            self._topics[topic] = t
        return t

    async def _request(self, pid: int, packet: bytes, timeout: float, answer: str) -> Any:
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._pending[pid] = fut
        self._write(packet)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            self._pending.pop(pid, None)
            raise TransportTimeout(f"no {answer} from the broker within {timeout:g}s") from None

    # --- internals: writing ---------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        out = self._out
        out += data
        if len(out) >= FLUSH_AT:
            self._flush()
        elif self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._out:
            return
        out, self._out = self._out, bytearray()
        t = self._transport
        if t is not None and not t.is_closing():
            t.write(out)
            assert self._loop is not None
            self._last_out = self._loop.time()

    def _pause_writing(self) -> None:
        if self._write_ok is not None:
            self._write_ok.clear()

    def _resume_writing(self) -> None:
        if self._write_ok is not None:
            self._write_ok.set()

    # --- internals: keepalive ---------------------------------------------------------------

    def _schedule_keepalive(self) -> None:
        k = self.options.keepalive
        if k and self._loop is not None:
            self._keepalive_handle = self._loop.call_later(k / 2, self._keepalive_tick)

    def _keepalive_tick(self) -> None:
        self._keepalive_handle = None
        if not self._connected or self._loop is None:
            return
        now = self._loop.time()
        k = self.options.keepalive
        if self._ping_sent is not None and self._last_in <= self._ping_sent:
            # A whole half-keepalive without a PINGRESP or any other packet.
            self._fail(ConnectionLost(
                ErrorCode.KEEPALIVE_TIMEOUT,
                f"the broker did not answer a PINGREQ within {k / 2:g}s: connection dead"))
            return
        self._ping_sent = None
        if now - self._last_out >= k / 2:
            self._ping_sent = now
            self._write(codec.PINGREQ_BYTES)
            self._flush()
        self._schedule_keepalive()

    # --- internals: reading ---------------------------------------------------------------

    def _made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _received(self, data: bytes) -> None:
        decoder = self._decoder
        try:
            decoder.feed(data)
            packet = decoder.next_item()
            while packet is not None:
                if type(packet) is Publish:
                    self._on_publish(packet)
                elif type(packet) is codec.Oversized:
                    self._on_oversized(packet)
                else:
                    self._on_control(packet)  # type: ignore[arg-type]
                packet = decoder.next_item()
        except MalformedPacket as exc:
            lost = ConnectionLost(exc.code, f"the broker sent a malformed packet: {exc}")
            lost.__cause__ = exc
            self._fail(lost)
            return
        assert self._loop is not None
        self._last_in = self._loop.time()
        if self._out:
            self._flush()  # the PUBACKs for this read, in one write

    def _on_publish(self, p: Publish) -> None:
        if p.qos == 1:
            pid = p.packet_id
            self._out += bytes((0x40, 2, pid >> 8, pid & 0xFF))
        elif p.qos == 2:
            pid = p.packet_id
            self._out += bytes((0x50, 2, pid >> 8, pid & 0xFF))  # PUBREC
            if pid in self._qos2_received:
                return  # a redelivery before PUBREL: already handed over once
            self._qos2_received.add(pid)
        cb = self.on_message
        if cb is not None:
            try:
                cb(p)
            except Exception:
                log.exception("on_message failed for a message on %s", p.topic)
            return
        self._queue.append(p)
        w = self._queue_waiter
        if w is not None:
            self._queue_waiter = None
            if not w.done():
                w.set_result(None)
        if not self._reading_paused and len(self._queue) >= self.options.max_queued:
            self._reading_paused = True
            if self._transport is not None:
                self._transport.pause_reading()

    def _on_oversized(self, o: codec.Oversized) -> None:
        self.oversized += 1
        if o.kind == codec.PacketType.PUBLISH and o.qos == 1 and o.packet_id:
            self._out += codec.encode_puback(o.packet_id)  # else it comes again, forever
        cb = self.on_oversized
        if cb is None:
            log.warning("dropped a packet of %d bytes on %r: over the %d-byte bound",
                        o.size, o.topic[:80], self.options.max_packet)
            return
        try:
            cb(o)
        except Exception:
            log.exception("on_oversized failed")

    def _wake_one(self) -> None:
        waiters = self._window_waiters
        while waiters:
            w = waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    def _on_control(self, p: codec.Packet) -> None:
        if type(p) is codec.PubAck:
            fut = self._pending.pop(p.packet_id, None)
            if fut is None:
                log.debug("PUBACK for unknown packet id %d ignored", p.packet_id)
                return
            self._inflight -= 1
            if not fut.done():
                fut.set_result(None)
            if self._window_waiters:
                self._wake_one()
        elif type(p) is codec.PingResp:
            self._ping_sent = None
        elif isinstance(p, codec.SubAck | codec.UnsubAck):
            fut = self._pending.pop(p.packet_id, None)
            if fut is not None and not fut.done():
                fut.set_result(p)
        elif type(p) is codec.ConnAck:
            if self._connack is None or self._connack.done():
                self._fail(ConnectionLost(ErrorCode.PROTOCOL_VIOLATION,
                                          "the broker sent a second CONNACK"))
                return
            self._connack.set_result(p)
        elif type(p) is codec.PubRel:
            self._qos2_received.discard(p.packet_id)
            self._out += codec.encode(codec.PubComp(p.packet_id))
        else:
            self._fail(ConnectionLost(
                ErrorCode.PROTOCOL_VIOLATION,
                f"the broker sent {type(p).__name__}, which a server never sends to a client"))

    def _fail(self, error: ConnectionLost) -> None:
        """End the connection with `error` (a fault found on our side)."""
        if self._error is None:
            self._error = error
        self._abort()

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _settle(self) -> None:
        """A connect that never got a transport has no connection_lost to come: end here."""
        if self._transport is None and self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def _lost(self, exc: Exception | None) -> None:
        was_connected = self._connected
        self._connected = False
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        o = self.options
        detail = f": {exc}" if exc is not None else ""
        if self._error is None and not self._closing:
            if not was_connected:
                why = ("the broker closed the connection before CONNACK (under TLS 1.3 a "
                       "refused client certificate shows this way)")
            else:
                why = "the broker closed the connection"
            self._error = ConnectionLost(ErrorCode.CONNECTION_LOST,
                                         f"{why} ({o.host}:{o.port}){detail}")
        err = self._error or ConnectionLost(
            ErrorCode.CONNECTION_LOST, f"disconnected by the client ({o.host}:{o.port})")
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(err)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        self._inflight = 0
        for w in self._window_waiters:
            if not w.done():
                w.set_exception(err)
        self._window_waiters.clear()
        if self._write_ok is not None:
            self._write_ok.set()
        qw = self._queue_waiter
        self._queue_waiter = None
        if qw is not None and not qw.done():
            qw.set_result(None)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        if self._error is not None and not self._closing:
            log.warning("MQTT connection to %s:%d lost: %s", o.host, o.port, err)


def _retrieve(fut: asyncio.Future[None]) -> None:
    """Mark a fire-and-forget future's failure as seen (no "never retrieved" warning)."""
    if not fut.cancelled():
        fut.exception()
