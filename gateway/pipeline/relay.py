"""The upstream relay: forwards the outbox to an upstream MQTT broker, store-and-forward.

One task per connection reads the outbox in order, keeps several QoS 1 publishes in flight
and deletes an item only after its PUBACK; a lost connection ends the session, and the next
one (after a backoff) starts again from the oldest item still stored, so delivery upstream
is at-least-once and in order. Bounds are enforced on a timer whether connected or not.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, TypeVar

from gateway.errors import ConfigError
from gateway.pipeline.formats import check_format
from gateway.store import db
from gateway.store.db import Writer
from gateway.store.outbox import Counters, Outbox, Queued
from gateway.transport.client import ClientOptions, MqttClient
from gateway.transport.errors import ConnectionLost, ErrorCode, TransportError

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_INFLIGHT: Final = 64
# Items handed over by ingest and not yet sent, at most (see Relay.notify).
FRESH_MAX: Final = 4096
# Sent and not yet deleted, in windows: at most this many are sent again after a crash.
UNDELETED_MAX: Final = 3


class UpstreamLike(Protocol):
    """What the relay reads from the `[upstream]` configuration section."""

    @property
    def enabled(self) -> bool: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def tls(self) -> bool: ...
    @property
    def ca(self) -> str | Path | None: ...
    @property
    def cert(self) -> str | Path | None: ...
    @property
    def key(self) -> str | Path | None: ...
    @property
    def username(self) -> str | None: ...
    @property
    def password(self) -> str | None: ...
    @property
    def client_id(self) -> str: ...
    @property
    def topic_readings(self) -> str: ...
    @property
    def topic_events(self) -> str: ...
    @property
    def format(self) -> str: ...
    @property
    def qos(self) -> int: ...
    @property
    def outbox_max_items(self) -> int: ...
    @property
    def outbox_max_age_s(self) -> float: ...
    @property
    def drop_policy(self) -> str: ...
    @property
    def reconnect_min_s(self) -> float: ...
    @property
    def reconnect_max_s(self) -> float: ...


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """A plain `UpstreamLike` with the documented defaults (docs/upstream.md)."""

    enabled: bool = False
    host: str = "localhost"
    port: int = 8883
    tls: bool = True
    ca: str | Path | None = None
    cert: str | Path | None = None
    key: str | Path | None = None
    username: str | None = None
    password: str | None = None
    client_id: str = "torpor-relay"
    topic_readings: str = "torpor/{device}/readings"
    topic_events: str = "torpor/{device}/events"
    format: str = "json"
    qos: int = 1
    outbox_max_items: int = 1_000_000
    outbox_max_age_s: float = 7 * 86400.0
    drop_policy: str = "oldest"
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 60.0


@dataclass(frozen=True, slots=True)
class RelayStatus:
    """A snapshot for the CLI and logs."""

    connected: bool
    relayed: int  # items acknowledged upstream and deleted by this relay since it started
    pending: int  # items in the outbox now
    oldest_age_s: float | None
    last_error: str | None
    reconnects: int
    counters: Counters


def validate(cfg: UpstreamLike) -> None:
    """Refuse settings the relay cannot work with, naming the key."""
    check_format(cfg.format)
    if cfg.qos not in (0, 1, 2):
        raise ConfigError(f"upstream.qos must be 0, 1 or 2, not {cfg.qos}")
    if not 0 < cfg.port < 65536:
        raise ConfigError(f"upstream.port must be 1..65535, not {cfg.port}")
    if not 0 < cfg.reconnect_min_s <= cfg.reconnect_max_s:
        raise ConfigError(
            "upstream.reconnect_min_s must be positive and not above upstream.reconnect_max_s"
        )
    if not cfg.host:
        raise ConfigError("upstream.host is empty: name the upstream broker")
    cert, key = _opt(cfg.cert), _opt(cfg.key)
    if (cert is None) != (key is None):
        raise ConfigError("upstream.cert and upstream.key go together: set both or neither")
    if (cert is not None or _opt(cfg.ca) is not None) and not cfg.tls:
        raise ConfigError("upstream.ca/cert are set but upstream.tls is false")
    for name in ("ca", "cert", "key"):
        path = _opt(getattr(cfg, name))
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"upstream.{name}: no file {path}")


def _opt(value: str | Path | None) -> str | None:
    """Unset is None or "" (the configuration file's empty default)."""
    return str(value) if value not in (None, "") else None


def tls_context(cfg: UpstreamLike) -> ssl.SSLContext | None:
    """None for plain MQTT; else server verification against `ca` (or the system's trust
    store when unset) and the client certificate when `cert`/`key` are set."""
    if not cfg.tls:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=_opt(cfg.ca))
    cert, key = _opt(cfg.cert), _opt(cfg.key)
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


def _expected(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_expected(e) for e in exc.exceptions)
    return isinstance(exc, TransportError | OSError | TimeoutError)


class Relay:
    """Forwards the outbox in `db_path` to the broker in `cfg` until cancelled."""

    def __init__(
        self,
        db_path: str | Path,
        cfg: UpstreamLike,
        *,
        inflight: int = DEFAULT_INFLIGHT,
        batch: int = 256,
        poll_s: float = 0.25,
        flush_s: float = 0.02,
        bounds_every_s: float = 1.0,
        publish_timeout_s: float = 15.0,
        keepalive_s: int = 30,
        writer: Writer | None = None,
        autocheckpoint: bool | None = None,
    ) -> None:
        if cfg.enabled:
            validate(cfg)
        self.db_path = Path(db_path)
        self.cfg = cfg
        self.inflight = max(1, inflight)
        self.batch = max(self.inflight, batch)
        self.poll_s = poll_s
        self.flush_s = flush_s
        self.bounds_every_s = bounds_every_s
        self.publish_timeout_s = publish_timeout_s
        self.keepalive_s = keepalive_s
        self.connected = False
        self.relayed = 0
        self.reconnects = 0
        self.connects = 0
        self.last_error: str | None = None
        self._outbox: Outbox | None = None
        # The gateway's database writer thread (gateway.store.db.Writer), shared with ingest so
        # that the relay's deletes queue behind ingest's commits in-process instead of on
        # SQLite's lock; a private thread when None.
        self.writer = writer
        self._pool: Writer | None = None
        # Whoever checkpoints the database (gateway.store.db.checkpoint_loop) turns the
        # relay's own checkpoints off; by default the owner of a shared writer does.
        self.autocheckpoint = writer is None if autocheckpoint is None else autocheckpoint
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._acks: asyncio.Event | None = None
        self._room: asyncio.Event | None = None  # set when a PUBACK or a delete frees room
        # Items just committed, handed over by ingest (`notify`), in id order: sent without
        # reading them back from the outbox when they follow on from what was sent.
        self._fresh: collections.deque[Queued] = collections.deque()
        # The outbox may hold items that were not handed over (a backlog, a gap, another
        # process's events): read it before waiting again.
        self._behind = True
        self._deleting = 0  # acknowledged items whose delete is running

    # ---------------------------------------------------------------- public

    def notify(self, items: Sequence[Queued] = ()) -> None:
        """New items were committed: look now instead of at the next poll. Any thread
        (ingest commits on the writer thread). `items`: the committed items themselves,
        with their ids, when the committer has them."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(self._arrived, items)

    def _arrived(self, items: Sequence[Queued]) -> None:
        # Kept only while a connection is sending, and only FRESH_MAX of them: a relay
        # that is behind reads the outbox anyway.
        if items and self.connected:
            fresh = self._fresh
            if len(fresh) + len(items) > FRESH_MAX:
                fresh.clear()
                self._behind = True
            else:
                fresh.extend(items)
        else:
            self._behind = True  # committed, but not handed over: read the outbox
        if self._wake is not None:
            self._wake.set()

    def _take_fresh(self, after: int) -> list[Queued]:
        """Handed-over items that follow `after` without a gap, up to a batch; none when
        the outbox may hold items between (then `_pump` reads the outbox)."""
        fresh = self._fresh
        while fresh and fresh[0].id <= after:  # read from the outbox meanwhile
            fresh.popleft()
        if fresh and fresh[0].id != after + 1:
            self._behind = True  # a gap: what lies between is only in the outbox
        out: list[Queued] = []
        while fresh and fresh[0].id == after + 1 and len(out) < self.batch:
            after += 1
            out.append(fresh.popleft())
        return out

    async def status(self) -> RelayStatus:
        box = self._box()
        depth, oldest, counters = await self._db(
            lambda: (box.depth(), box.oldest(), box.counters())
        )
        return RelayStatus(
            connected=self.connected,
            relayed=self.relayed,
            pending=depth,
            oldest_age_s=None if oldest is None else max(0.0, time.time() - oldest),
            last_error=self.last_error,
            reconnects=self.reconnects,
            counters=counters,
        )

    async def run(self) -> None:
        """Relay until cancelled. Returns at once when the upstream is disabled."""
        if not self.cfg.enabled:
            log.info("upstream relay disabled")
            return
        self._wake = asyncio.Event()
        self._acks = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        # One thread owns the SQLite connection: a write waiting on the database must not
        # stall the event loop.
        self._pool = self.writer or Writer("relay-db")
        cfg = self.cfg
        try:
            self._outbox = await self._db(
                lambda: Outbox(
                    self.db_path,
                    max_items=cfg.outbox_max_items,
                    max_age_s=cfg.outbox_max_age_s,
                    drop_policy=cfg.drop_policy,
                )
            )
            if not self.autocheckpoint:
                # The owner of a shared writer checkpoints (gateway.store.db.checkpoint_loop):
                # a delete must not stall the writer thread with a checkpoint's fsync.
                await self._db(db.no_autocheckpoint, self._outbox.conn)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._bounds_loop(), name="relay-bounds")
                tg.create_task(self._connection_loop(), name="relay-connection")
        finally:
            self.connected = False
            box, self._outbox = self._outbox, None
            pool, self._pool = self._pool, None
            self._loop = None
            if box is not None:
                pool.submit(box.close)
            if pool is not self.writer:
                pool.close()

    # ---------------------------------------------------------------- internals

    def _box(self) -> Outbox:
        if self._outbox is None:
            raise RuntimeError("the relay is not running")
        return self._outbox

    async def _db(self, fn: Callable[..., T], *args: object) -> T:
        assert self._pool is not None
        return await self._pool.run(fn, *args)

    async def _bounds_loop(self) -> None:
        box = self._box()
        while True:
            dropped = await self._db(box.enforce_bounds, time.time())
            if dropped.age or dropped.full:
                log.warning(
                    "upstream outbox: dropped %d items older than %ss and %d beyond %d items",
                    dropped.age, box.max_age_s, dropped.full, box.max_items,
                )
            await asyncio.sleep(self.bounds_every_s)

    async def _connection_loop(self) -> None:
        cfg = self.cfg
        delay = cfg.reconnect_min_s
        while True:
            connects = self.connects
            try:
                await self._session()
            except Exception as exc:  # the relay outlives any one connection's failure
                self.last_error = _describe(exc)
                if not _expected(exc):
                    log.error("upstream relay: unexpected failure", exc_info=exc)
            if self.connects != connects:  # it was up: start the backoff over
                delay = cfg.reconnect_min_s
            log.warning(
                "upstream %s:%d: %s; retrying in %.1fs", cfg.host, cfg.port, self.last_error, delay
            )
            # Jitter keeps a fleet of gateways from reconnecting in lockstep.
            await asyncio.sleep(delay * random.uniform(0.9, 1.1))
            delay = min(delay * 2, cfg.reconnect_max_s)
            self.reconnects += 1

    def _client(self) -> MqttClient:
        cfg = self.cfg
        password = _opt(cfg.password)
        return MqttClient(ClientOptions(
            cfg.host,
            cfg.port,
            cfg.client_id,
            ssl=tls_context(cfg),
            keepalive=self.keepalive_s,
            # The outbox is the session state: nothing needs to survive in the broker.
            clean_session=True,
            username=_opt(cfg.username),
            password=password.encode() if password is not None else None,
            # The window is the relay's own (`_pump`); the client's only must not be smaller.
            max_inflight=max(self.inflight, 1),
            connect_timeout=self.publish_timeout_s,
        ))

    async def _session(self) -> None:
        # A fresh client per connection: its packet ids and in-flight table start empty,
        # and the outbox replay is the only resend after a reconnect.
        acked: list[int] = []
        client = self._client()
        await client.connect()
        self.connected = True
        self.connects += 1
        self.last_error = None
        log.info("upstream %s:%d connected", self.cfg.host, self.cfg.port)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._watch(client))
                tg.create_task(self._flush_loop(acked))
                await self._pump(client, acked)
        finally:
            self.connected = False
            # PUBACKs that arrived before the connection dropped: delete those now so a
            # replay does not send them again.
            await self._flush(acked)
            with contextlib.suppress(Exception):
                await client.disconnect()

    @staticmethod
    async def _watch(client: MqttClient) -> None:
        # Nothing is subscribed: this only ends, with the reason, when the connection does.
        error = await client.wait_closed()
        raise error or ConnectionLost(ErrorCode.CONNECTION_LOST, "upstream connection closed")

    async def _pump(self, client: MqttClient, acked: list[int]) -> None:
        """Publish the outbox in order, at most `inflight` unacknowledged at once. Each
        QoS 1 PUBLISH's future resolves on its PUBACK and hands back the outbox item to
        delete; a QoS 0 PUBLISH counts as delivered once written. (QoS 2 in the settings
        is sent as QoS 1: the outbox makes delivery at-least-once, and the consumers drop
        duplicates by message id.)"""
        box = self._box()
        wake, acks = self._wake, self._acks
        assert wake is not None and acks is not None
        qos, window = self.cfg.qos, self.inflight
        # outbox id -> sent at, oldest first: the publishes awaiting their PUBACK
        sent: dict[int, float] = {}
        room = self._room = asyncio.Event()

        def full() -> bool:
            # A window of publishes awaiting PUBACK, or UNDELETED_MAX windows sent and not
            # yet deleted: that much would be sent again after a crash, so wait for the
            # deletes (a slow one, e.g. behind a checkpoint, holds the relay back).
            if len(sent) >= window:
                return True
            if len(sent) + len(acked) + self._deleting < UNDELETED_MAX * window:
                return False
            if len(acked) >= window:
                acks.set()
            return True

        def done(item_id: int) -> None:
            acked.append(item_id)
            room.set()
            # A window's worth: delete now rather than at the timer.
            if len(acked) >= window:
                acks.set()

        def on_puback(fut: asyncio.Future[None], item_id: int) -> None:
            # A failed future is a lost connection: _watch ends the session, and the
            # item, still in the outbox, goes again on the next one.
            if fut.cancelled() or fut.exception() is not None:
                return
            if sent.pop(item_id, None) is not None:
                done(item_id)

        def overdue() -> float:
            """Seconds left for the oldest publish's PUBACK; raises past the limit."""
            if not sent:
                return self.poll_s
            left = next(iter(sent.values())) + self.publish_timeout_s - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no PUBACK within {self.publish_timeout_s:g}s")
            return left

        after = 0  # the outbox is replayed from its oldest item on every connection
        self._fresh.clear()
        self._behind = True
        while True:
            wake.clear()
            items = self._take_fresh(after)
            if not items and self._behind:
                # Cleared before the read, so that a wake-up during it (an item committed
                # after the read's snapshot) sets it again instead of being lost until
                # the next poll.
                self._behind = False
                items = await self._db(box.peek, self.batch, after)
                # Caught up unless the read came back full. Items handed over
                # meanwhile that it already covered are dropped by _take_fresh.
                if len(items) >= self.batch:
                    self._behind = True
            if not items:
                left = min(self.poll_s, overdue())
                try:
                    async with asyncio.timeout(left):
                        await wake.wait()
                except TimeoutError:
                    self._behind = True  # another process may have added items
                continue
            for q in items:
                while full():
                    room.clear()
                    left = overdue()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(left):
                            await room.wait()
                if qos:
                    fut = await client.start_publish(q.item.topic, q.item.payload,
                                                   retain=q.item.retain)
                    sent[q.id] = time.monotonic()
                    fut.add_done_callback(functools.partial(on_puback, item_id=q.id))
                else:
                    await client.publish(q.item.topic, q.item.payload, qos=0,
                                         retain=q.item.retain)
                    done(q.id)
                after = q.id

    async def _flush_loop(self, acked: list[int]) -> None:
        # Deletes go in batches (one transaction each) every `flush_s` or once a window's
        # worth is acknowledged; `_pump` keeps at most UNDELETED_MAX windows sent and not
        # yet deleted, which bounds a crash's resends.
        acks = self._acks
        assert acks is not None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.flush_s):
                    await acks.wait()
            acks.clear()
            await self._flush(acked)

    async def _flush(self, acked: list[int]) -> None:
        if not acked:
            return
        ids = acked[:]
        acked.clear()
        box = self._box()
        self._deleting = len(ids)
        try:
            self.relayed += await self._db(box.delete, ids)
        finally:
            self._deleting = 0
            if self._room is not None:
                self._room.set()
