"""Ingest: frames from `torpor/+/up` into SQLite, exactly once, then the answers.

Frames are collected for a few milliseconds (or up to N), decoded, and committed in ONE
transaction: readings, dedup state, upstream outbox items, registry updates, dead letters.
Only after that commit are ACKs published, so an ACK always means "on disk". A frame is
attributed to the device named by its topic, which the broker's ACL ties to the node's
certificate; ids written inside frames are never trusted for identity.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from gateway import db, deadletter, mqtt, proto, readings, registry, topics
from gateway.config import IngestConfig, UpstreamConfig
from gateway.downlink import Downlink, WakePlan
from gateway.ota import OtaHandler
from gateway.outbox import Queued

log = logging.getLogger(__name__)

# on_hello(device, hello) -> encoded frames to send between the ACK and SLEEP_NOW.
HelloHook = Callable[[str, proto.Hello], list[bytes]]
# Outgoing messages: (topic, payload, QoS).
Outgoing = list[tuple[str, bytes, int]]
# ACK, SLEEP_NOW and ERROR go at QoS 0. Each answers a frame of the node's current
# session (nodes connect with a clean session), and over the live connection QoS 0
# arrives as surely as QoS 1, which would only add a PUBACK each way: for the gateway and
# the broker, and a packet on air for the node. If the node is gone, its next HELLO gets
# a fresh ACK and it resends what was not acknowledged. Commands, configuration and OTA
# chunks go at QoS 1.
SESSION_QOS = 0
DOWNLINK_QOS = 1

_UP_TYPES = frozenset({
    proto.HELLO, proto.BURST, proto.COMMAND_RESULT, proto.SHADOW_REPORT, proto.OTA_STATUS,
})
_DETAIL_MAX = 64
_UNCONFIRMED_MAX = 65536  # answers remembered for drain(); older ones are let go
STATUS_REFRESH_S = 0.5
UNKNOWN_RECHECK_S = 1.0


class DeviceLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Log records that concern a device carry `device_id` and name it in the message."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        return f"[{extra.get('device_id')}] {msg}", kwargs


def device_log(device: str) -> DeviceLog:
    return DeviceLog(log, {"device_id": device})


def no_downlink(device: str, hello: proto.Hello) -> list[bytes]:
    return []


@dataclass(slots=True)
class Metrics:
    frames: int = 0
    bursts: int = 0
    hellos: int = 0
    readings_stored: int = 0
    readings_duplicate: int = 0
    dead_letters: int = 0
    quarantined: int = 0
    batches: int = 0
    commit_errors: int = 0
    acks_sent: int = 0
    publish_errors: int = 0
    last_commit: float = 0.0
    commit_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(slots=True)
class _Guard:
    """Per-device misbehaviour accounting: malformed frames in a window, a token bucket
    for the frame rate."""

    malformed: collections.deque[float]
    tokens: float
    refilled: float


@dataclass(slots=True)
class _Reply:
    kind: int  # 0 burst ack, 1 hello, 2 error, 3 hook frames
    device: str
    index: int = 0  # into acks or hellos
    frames: list[bytes] = field(default_factory=list)


class Ingest:
    """The ingest pipeline. `process(batch)` is the synchronous core (one transaction per
    call, returns what to publish); `run(client)` drives it from an MQTT subscription."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        cfg: IngestConfig | None = None,
        *,
        upstream: UpstreamConfig | None = None,
        on_hello: HelloHook = no_downlink,
        downlink: Downlink | None = None,
        ota: OtaHandler | None = None,
        on_committed: Callable[[list[Queued]], None] | None = None,
        clock: Callable[[], float] = time.time,
        writer: db.Writer | None = None,
    ) -> None:
        # `run` commits on `writer`'s thread (a private one when None), so `conn`, the
        # caches and `on_committed` are used from that thread while it runs.
        # on_committed(items): after each commit that added upstream outbox items, those
        # items with their ids (the relay sends them without reading them back).
        self.conn = conn
        self.writer = writer
        cfg = cfg or IngestConfig()
        self.cfg = cfg
        self.upstream = upstream if upstream is not None and upstream.enabled else None
        self.on_hello = on_hello
        # Downlink to sleeping nodes: planned in the commit transaction (replaces on_hello).
        self.downlink = downlink
        # OTA_STATUS frames and HELLOs' OTA outcomes (gateway.ota), before downlink planning.
        self.ota = ota
        self.on_committed = on_committed
        self.clock = clock
        self.metrics = Metrics()
        self.states: dict[str, readings.DedupState] = readings.load_states(conn)
        self._status: dict[str, str] = registry.statuses(conn)
        self._unknown: dict[str, float] = {}
        self._guards: dict[str, _Guard] = {}
        self._data_version = self._read_data_version()
        self._status_checked = time.monotonic()
        self._rate = cfg.rate_limit_frames_per_min / 60.0
        self._pending: list[tuple[str, bytes]] = []
        self._have = asyncio.Event()
        self._more = asyncio.Event()  # set by every offer
        self._full = asyncio.Event()
        self._accepting = True
        # The connection's publisher: its `inflight` are the answers not yet acknowledged
        # by the broker (for drain()).
        self._publisher: mqtt.Publisher | None = None
        self._inflight: asyncio.Future[Outgoing] | None = None
        self._oldest = 0.0  # time.monotonic() when the oldest pending frame arrived
        if self.upstream is not None:
            from gateway import formats

            formats.check_format(self.upstream.format)

    # ------------------------------------------------------------ registry cache
    def _read_data_version(self) -> int:
        # The registry's own counter, not PRAGMA data_version: that one moves with every
        # other connection's commit (the relay's deletes), and a reload of 100k statuses
        # costs hundreds of milliseconds on the writer thread.
        return registry.version(self.conn)

    def _refresh_statuses(self) -> None:
        """Pick up other processes' changes (`torpor device add/release`)."""
        mono = time.monotonic()
        if mono - self._status_checked < STATUS_REFRESH_S:
            return
        self._status_checked = mono
        version = self._read_data_version()
        if version == self._data_version:
            return
        self._data_version = version
        fresh = registry.statuses(self.conn)
        for dev, status in fresh.items():
            if self._status.get(dev) == registry.QUARANTINED and status in registry.SERVED:
                self._guards.pop(dev, None)
                device_log(dev).info("served again (%s)", status)
        self._status = fresh
        self._unknown.clear()

    def _status_of(self, device: str, now: float) -> str | None:
        status = self._status.get(device)
        if status is not None:
            return status
        checked = self._unknown.get(device)
        if checked is not None and now - checked < UNKNOWN_RECHECK_S:
            return None
        row = self.conn.execute("SELECT status FROM devices WHERE id=?", (device,)).fetchone()
        if row is None:
            self._unknown[device] = now
            return None
        self._status[device] = row[0]
        return str(row[0])

    def _guard(self, device: str, now: float) -> _Guard:
        g = self._guards.get(device)
        if g is None:
            g = self._guards[device] = _Guard(
                collections.deque(maxlen=self.cfg.malformed_threshold),
                float(self.cfg.rate_limit_frames_per_min), now,
            )
        return g

    # ------------------------------------------------------------ the core
    def process(self, batch: Iterable[tuple[str, bytes]]) -> Outgoing:
        """Decode, commit and answer one batch of (topic, payload). Nothing is answered
        when the commit fails: the nodes keep their readings and send them again."""
        now = self.clock()
        self._refresh_statuses()
        m = self.metrics
        bursts: list[tuple[str, proto.Burst]] = []
        hellos: list[tuple[str, proto.Hello]] = []
        answers: list[tuple[str, proto.CommandResult | proto.ShadowReport]] = []
        ota_frames: list[tuple[str, proto.OtaStatus]] = []
        plans: list[WakePlan] = []
        dead: list[deadletter.Row] = []
        replies: list[_Reply] = []
        seen: dict[str, float] = {}
        quarantine: dict[str, str] = {}
        upstream: list[Queued] = []
        for topic, payload in batch:
            m.frames += 1
            try:
                device = topics.parse_up(topic)
            except topics.TopicError as exc:
                log.warning("frame on an unexpected topic: %s", exc)
                dead.append(("", now, "bad_topic", topic[:200], bytes(payload)))
                continue
            status = self._status_of(device, now)
            if status is None or status not in registry.SERVED:
                reason = "not_provisioned" if status is None else status
                dead.append((device, now, reason, "", bytes(payload)))
                if status is None or status == registry.PROVISIONED:
                    replies.append(_Reply(2, device, frames=[_error(
                        proto.ErrorCode.NOT_PROVISIONED, _ref(payload), "not provisioned")]))
                continue
            g = self._guard(device, now)
            g.tokens = min(float(self.cfg.rate_limit_frames_per_min),
                           g.tokens + (now - g.refilled) * self._rate)
            g.refilled = now
            if g.tokens < 1.0:
                reason = f"over {self.cfg.rate_limit_frames_per_min} frames/min"
                self._quarantine(device, reason, quarantine)
                dead.append((device, now, "rate_limited", reason, bytes(payload)))
                replies.append(_Reply(2, device, frames=[_error(
                    proto.ErrorCode.QUARANTINED, _ref(payload), "rate limited")]))
                continue
            g.tokens -= 1.0
            seen[device] = now
            problem = ""
            frame: proto.Frame | None = None
            try:
                frame = proto.decode(payload)
            except proto.ProtocolError as exc:
                problem = str(exc)
                code = (proto.ErrorCode.UNSUPPORTED_VERSION if "version" in exc.reason
                        else proto.ErrorCode.TOO_LARGE if "exceeds the maximum" in exc.reason
                        and exc.frame == "frame" else
                        proto.ErrorCode.UNKNOWN_FRAME if "unknown frame type" in exc.reason
                        else proto.ErrorCode.MALFORMED)
            else:
                if payload[1] not in _UP_TYPES:
                    problem = f"{type(frame).__name__} is a gateway-to-node frame"
                    code = proto.ErrorCode.UNKNOWN_FRAME
            if problem:
                dead.append((device, now, "malformed", problem[:500], bytes(payload)))
                device_log(device).warning("malformed frame: %s", problem)
                replies.append(_Reply(2, device, frames=[_error(code, _ref(payload), problem)]))
                g.malformed.append(now)
                if (len(g.malformed) >= self.cfg.malformed_threshold
                        and now - g.malformed[0] <= self.cfg.malformed_window_s):
                    self._quarantine(
                        device, f"{len(g.malformed)} malformed frames in "
                        f"{self.cfg.malformed_window_s:g}s", quarantine)
                    replies.append(_Reply(2, device, frames=[_error(
                        proto.ErrorCode.QUARANTINED, _ref(payload), "quarantined")]))
                continue
            if isinstance(frame, proto.Burst):
                replies.append(_Reply(0, device, len(bursts)))
                bursts.append((device, frame))
            elif isinstance(frame, proto.Hello):
                replies.append(_Reply(1, device, len(hellos)))
                hellos.append((device, frame))
            elif self.downlink is not None and isinstance(
                    frame, proto.CommandResult | proto.ShadowReport):
                answers.append((device, frame))
            elif self.ota is not None and isinstance(frame, proto.OtaStatus):
                ota_frames.append((device, frame))
            else:
                # Up frames served by later modules (command results, shadow, OTA status).
                dead.append((device, now, "unhandled", type(frame).__name__, bytes(payload)))
                replies.append(_Reply(2, device, frames=[_error(
                    proto.ErrorCode.UNKNOWN_FRAME, _ref(payload), "not served by this gateway")]))

        t0 = time.perf_counter()
        try:
            with db.transaction(self.conn):
                # Status changes of our own (first HELLO, quarantine) need no reload of
                # the cache: note the registry version around them (the write lock is
                # ours, so nobody else moves it in between).
                own = bool(hellos or quarantine)
                before = registry.version(self.conn) if own else 0
                if any(b.node_clock for _, b in bursts):
                    bursts = self._to_gateway_clock(bursts, hellos, now)
                result = readings.commit_bursts(
                    self.conn, bursts, self.states, now=now, in_transaction=True,
                    low_water=[(d, h.first_id) for d, h in hellos if h.first_id])
                if self.upstream is not None and result.committed:
                    upstream += self._enqueue_upstream(result.committed, now)
                if self.upstream is not None and (hellos or quarantine):
                    upstream += queue_events(self.conn, self.upstream, [
                        *((d, "hello", hello_fields(h)) for d, h in hellos),
                        *((d, "quarantined", {"reason": r}) for d, r in quarantine.items()),
                    ], now)
                if self.ota is not None and (ota_frames or hellos):
                    self.ota.handle(self.conn, ota_frames, hellos, now)
                if self.downlink is not None:
                    if answers:
                        self.downlink.handle_up(self.conn, answers, now)
                    if hellos:
                        plans = self.downlink.plan(self.conn, hellos, now)
                if hellos:
                    registry.record_hellos(
                        self.conn, [registry.hello_row(d, h, now) for d, h in hellos], now)
                if seen:
                    registry.touch_many(self.conn, [(t, d) for d, t in seen.items()])
                if dead:
                    deadletter.add_many(self.conn, dead)
                for dev, reason in quarantine.items():
                    registry.quarantine(self.conn, dev, reason, now=now)
                after = registry.version(self.conn) if own else 0
        except sqlite3.Error as exc:
            m.commit_errors += 1
            # Undo what this batch did to the caches; nodes resend what was not acked.
            for dev in quarantine:
                self._status[dev] = registry.ACTIVE
            log.error("commit failed, nothing acknowledged (nodes will resend): %s", exc)
            return []
        result.apply()
        if own and before == self._data_version:
            self._data_version = after
        m.commit_s += time.perf_counter() - t0
        m.batches += 1
        m.last_commit = now
        m.bursts += len(bursts)
        m.hellos += len(hellos)
        m.dead_letters += len(dead)
        m.quarantined += len(quarantine)
        for ack in result.acks:
            if ack.stored:
                m.readings_stored += ack.stored
        m.readings_duplicate += sum(len(b.readings) for _, b in bursts) - sum(
            a.stored for a in result.acks)
        for d, h in hellos:
            if self._status.get(d) == registry.PROVISIONED:
                self._status[d] = registry.ACTIVE
                device_log(d).info("first HELLO: provisioned -> active (fw %d)", h.fw_version)
        if self.on_committed is not None and upstream:
            self.on_committed(upstream)
        return self._answers(replies, result.acks, hellos, now, plans)

    def _to_gateway_clock(self, bursts: list[tuple[str, proto.Burst]],
                          hellos: list[tuple[str, proto.Hello]],
                          now: float) -> list[tuple[str, proto.Burst]]:
        # A node that does not know the time yet stamps on its own count; its HELLO's time
        # against our receipt of it (this batch's, or the registry's last) gives the shift.
        offsets = registry.clock_offsets(
            self.conn, {d for d, b in bursts if b.node_clock} - {d for d, _ in hellos})
        offsets.update((d, now - h.time) for d, h in hellos)
        return readings.to_gateway_clock(bursts, offsets)

    def _quarantine(self, device: str, reason: str, pending: dict[str, str]) -> None:
        if device not in pending:
            pending[device] = reason
            self._status[device] = registry.QUARANTINED
            device_log(device).warning("quarantined: %s", reason)

    def _enqueue_upstream(self, committed: list[readings.Committed], now: float) -> list[Queued]:
        from gateway import formats, outbox

        up = self.upstream
        assert up is not None
        return outbox.enqueue_queued(self.conn, [
            formats.readings_item(
                c.device, c.schema, c.series, topic_template=up.topic_readings,
                fmt=up.format, created=now, msg_id=c.msg_id,
            )
            for c in committed
        ])

    def _answers(self, replies: list[_Reply], acks: list[readings.AckState],
                 hellos: list[tuple[str, proto.Hello]], now: float,
                 plans: list[WakePlan]) -> Outgoing:
        out: Outgoing = []
        for r in replies:
            down = topics.down(r.device)
            if r.kind == 0:
                a = acks[r.index]
                out.append((down, proto.encode_ack(
                    proto.Ack(a.msg_id, a.cumulative, a.selective)), SESSION_QOS))
            elif r.kind == 1:
                dev, hello = hellos[r.index]
                left = awake = 0
                if plans:
                    extra, left = list(plans[r.index].frames), plans[r.index].left
                    awake = plans[r.index].awake_s
                else:
                    try:
                        extra = self.on_hello(dev, hello)
                    except Exception:
                        device_log(dev).exception("downlink hook failed; sending no downlink")
                        extra = []
                st = self.states.get(dev) or readings.DedupState()
                out.append((down, proto.encode_ack(proto.Ack(
                    # Rounded: the node sets its clock from it (whole seconds).
                    hello.msg_id, st.hwm, st.selective(), int(now + 0.5) & 0xFFFFFFFF,
                    min(len(extra), 255))), SESSION_QOS))
                out.extend((down, f, DOWNLINK_QOS) for f in extra)
                if not awake:  # under a stay_awake the node listens on; no SLEEP_NOW
                    out.append((down, proto.encode_sleep_now(
                        proto.SleepNow(hello.msg_id, 0, min(left, 255))), SESSION_QOS))
            else:
                out.extend((down, f, SESSION_QOS) for f in r.frames)
        return out

    # ------------------------------------------------------------ MQTT
    def offer(self, topic: str, payload: bytes) -> None:
        """Queue one received frame for the next batch."""
        if not self._accepting:
            return
        if not self._pending:
            self._oldest = time.monotonic()
        self._pending.append((topic, payload))
        self._have.set()
        self._more.set()
        if len(self._pending) >= self.cfg.batch_max_frames:
            self._full.set()

    async def run(self, client: aiomqtt.Client) -> None:
        """Subscribe and ingest until cancelled; on cancel, commit and answer what was
        already received, wait for those publishes, then re-raise."""
        # Frames straight from paho (gateway.mqtt.lean): aiomqtt's message iterator costs
        # a Message object, a queue item and a task per frame, about as much CPU as the
        # rest of ingest. The connection itself stays aiomqtt's; its end is `_disconnected`.
        self._accepting = True  # again, after a previous connection's run
        paho = client._client
        offer = self.offer

        def on_message(_client: Any, _userdata: Any, message: Any) -> None:
            offer(message.topic, message.payload)  # what lean() leaves to paho (QoS 2)

        paho.on_message = on_message
        self._publisher = mqtt.lean(client, received=offer)
        # What paho read before the hooks above went to aiomqtt's queue: the persistent
        # session's frames can come with the CONNACK.
        while not client._queue.empty():
            message = client._queue.get_nowait()
            if isinstance(message.payload, bytes | bytearray):
                offer(message.topic.value, bytes(message.payload))
        writer = self.writer or db.Writer("ingest-db")
        committer = asyncio.create_task(self._commit_loop(writer), name="ingest-commit")
        awake = None
        if self.downlink is not None:
            awake = asyncio.create_task(self._awake_loop(writer), name="ingest-awake")
        try:
            await client.subscribe(topics.UP_ALL, qos=1)
            log.info("ingesting %s", topics.UP_ALL)
            lost = client._disconnected
            await asyncio.wait((committer, lost), return_when=asyncio.FIRST_COMPLETED)
            if not lost.done():
                committer.result()  # it only ever ends by failing
            raise aiomqtt.MqttError("disconnected from the broker") from lost.exception()
        finally:
            paho.on_message = client._on_message
            self._accepting = False
            if awake is not None:
                awake.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await awake
            committer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await committer
            try:
                await self.drain(writer=writer)
            finally:
                if writer is not self.writer:
                    writer.close()

    async def drain(self, timeout: float = 5.0,
                    writer: db.Writer | None = None) -> None:
        """Answer the commit in flight, commit what is pending, publish its answers and
        wait for the in-flight publishes."""
        if self._inflight is not None:
            with contextlib.suppress(Exception):
                self._publish(await self._inflight)
            self._inflight = None
        if self._pending:
            batch, self._pending = self._pending, []
            writer = writer or self.writer
            out = await writer.run(self.process, batch) if writer else self.process(batch)
            self._publish(out)
        deadline = time.monotonic() + timeout
        while self._unconfirmed() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def _unconfirmed(self) -> int:
        """How many answers still wait for the broker's PUBACK; the oldest are let go
        past _UNCONFIRMED_MAX (their packet ids come round again)."""
        if self._publisher is None:
            return 0
        waiting = self._publisher.inflight
        while len(waiting) > _UNCONFIRMED_MAX:
            del waiting[next(iter(waiting))]
        return len(waiting)

    async def _commit_loop(self, writer: db.Writer) -> None:
        """Group commit: one batch commits on the writer thread while the next one grows
        on the event loop, which keeps reading MQTT. Under load a batch is whatever
        arrived during the previous commit (up to batch_max_frames), so batches grow with
        the load and one fsync covers them all; when idle, a frame waits at most
        batch_max_ms for company and then one commit. A batch that ends with a HELLO waits
        up to hello_linger_ms for the bursts that follow it, so that one commit (one fsync)
        answers the whole wake."""
        wait_s = self.cfg.batch_max_ms / 1000.0
        linger_s = self.cfg.hello_linger_ms / 1000.0
        cap = self.cfg.batch_max_frames
        while True:
            await self._have.wait()
            # Frames that arrived during the previous commit have waited already.
            left = self._oldest + wait_s - time.monotonic()
            if len(self._pending) < cap and left > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), left)
            until = time.monotonic() + linger_s
            while 0 < len(self._pending) < cap and _is_hello(self._pending[-1][1]):
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._more.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._more.wait(), left)
            batch = self._pending[:cap]
            del self._pending[:cap]
            self._full.clear()
            if not self._pending:
                self._have.clear()
            elif len(self._pending) >= cap:
                self._full.set()
            if batch:
                # Shielded: a cancel while the commit runs leaves its answers to drain().
                self._inflight = asyncio.ensure_future(writer.run(self.process, batch))
                out = await asyncio.shield(self._inflight)
                self._inflight = None
                self._publish(out)

    async def _awake_loop(self, writer: db.Writer) -> None:
        """Items queued for a node under stay_awake go out at once, not at its next wake."""
        assert self.downlink is not None
        while True:
            await asyncio.sleep(max(0.05, self.downlink.cfg.awake_poll_s))
            try:
                out = await writer.run(self._plan_awake)
            except sqlite3.Error as exc:
                log.error("delivery to awake nodes failed (retried): %s", exc)
                continue
            if out:
                self._publish(out)

    def _plan_awake(self) -> Outgoing:
        assert self.downlink is not None
        with db.transaction(self.conn):
            plans = self.downlink.plan_awake(self.conn, self.clock())
        return [(topics.down(d), f, DOWNLINK_QOS) for d, p in plans for f in p.frames]

    def _publish(self, out: Outgoing) -> None:
        """Queue the answers on the connection's publisher and write them at once,
        without waiting for each PUBACK (see gateway.mqtt). A lost answer costs nothing
        durable: the node keeps its readings and sends them again."""
        publisher = self._publisher
        assert publisher is not None, "answers are published only while run() holds a connection"
        self._unconfirmed()
        m = self.metrics
        for topic, payload, qos in out:
            if publisher.publish(topic.encode(), payload, qos=qos):
                m.acks_sent += 1
            else:
                m.publish_errors += 1
                log.warning("could not publish to %s: not connected", topic)
        publisher.send()


def hello_fields(hello: proto.Hello) -> dict[str, Any]:
    """What a `hello` event tells upstream about a wake."""
    return {
        "fw_version": hello.fw_version, "boot_cause": hello.boot_cause.name.lower(),
        "battery_mv": hello.battery_mv, "rssi": hello.rssi, "queue_depth": hello.queue_depth,
        "dropped": hello.dropped, "next_wake_s": hello.next_wake_s,
        "safe_mode": bool(hello.safe_mode),
    }


def enqueue_events(conn: sqlite3.Connection, upstream: UpstreamConfig | None,
                   events: Iterable[tuple[str, str, Mapping[str, Any]]], now: float) -> int:
    """Device events (device, kind, fields) into the upstream outbox, inside the caller's
    transaction, so an event is durable exactly when the change it reports is. Kinds:
    hello and quarantined (ingest), released and revoked (`torpor device ...`)."""
    return len(queue_events(conn, upstream, events, now))


def queue_events(conn: sqlite3.Connection, upstream: UpstreamConfig | None,
                 events: Iterable[tuple[str, str, Mapping[str, Any]]], now: float) -> list[Queued]:
    """`enqueue_events`, returning the queued items with their ids."""
    if upstream is None or not upstream.enabled:
        return []
    from gateway import formats, outbox

    return outbox.enqueue_queued(conn, [
        formats.event_item(device, kind, fields, topic_template=upstream.topic_events,
                           fmt=upstream.format, created=now)
        for device, kind, fields in events
    ])


def _is_hello(payload: bytes) -> bool:
    return len(payload) > 1 and payload[1] == proto.HELLO


def _ref(payload: bytes) -> int:
    return int.from_bytes(payload[2:6], "little") if len(payload) >= 6 else 0


def _error(code: proto.ErrorCode, ref: int, detail: str) -> bytes:
    text = detail.encode("utf-8")[:_DETAIL_MAX].decode("utf-8", "ignore")
    return proto.encode_error(proto.Error(ref, code, ref, text))
