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
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway import proto
from gateway.config import IngestConfig, UpstreamConfig
from gateway.pipeline.downlink import Downlink, WakePlan
from gateway.pipeline.events import queue_events
from gateway.pipeline.ota_delivery import OtaHandler
from gateway.store import db, deadletter, readings, wake_log
from gateway.store import devices as registry
from gateway.store.outbox import Queued
from gateway.transport import topics
from gateway.transport.client import MqttClient
from gateway.transport.codec import Oversized, Publish
from gateway.transport.errors import ConnectionLost, ErrorCode, TransportError

if TYPE_CHECKING:
    from gateway.pipeline.rotation import RotationHandler
    from gateway.pipeline.session_keys import SessionKeys

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
    proto.CSR_UP,
})
_DETAIL_MAX = proto.ERROR_DETAIL_MAX
_SAMPLED_MAX = 100_000  # (device, reason) pairs remembered for dead-letter sampling
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
    refused: int = 0  # frames dead-lettered, stored as a letter or only counted
    device_errors: int = 0  # devices whose frames raised while being handled
    isolated_batches: int = 0  # batches written device by device because of them
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
    kind: int  # 0 burst ack, 1 hello, 2 error frames
    index: int = 0  # into the device's bursts or hellos
    frames: list[bytes] = field(default_factory=list)


@dataclass(slots=True)
class _Dev:
    """One device's frames of a batch, decoded and checked, not written yet."""

    device: str
    bursts: list[proto.Burst] = field(default_factory=list)
    hellos: list[proto.Hello] = field(default_factory=list)
    answers: list[proto.CommandResult | proto.ShadowReport] = field(default_factory=list)
    ota: list[proto.OtaStatus] = field(default_factory=list)
    csrs: list[tuple[proto.CsrUp, bytes]] = field(default_factory=list)
    replies: list[_Reply] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)  # the frames to be written
    failed: str = ""  # why handling its frames raised


@dataclass(slots=True)
class _Stage:
    """A batch between decoding and the commit."""

    devs: dict[str, _Dev]
    dead: list[deadletter.Row]
    counts: dict[tuple[str, str], list[int]]  # (device, reason) -> [frames, bytes, stored]
    quarantine: dict[str, str]
    seen: dict[str, float] = field(default_factory=dict)
    csr_refused: list[tuple[str, str]] = field(default_factory=list)  # (device, its status)

    def dev(self, device: str) -> _Dev:
        d = self.devs.get(device)
        if d is None:
            d = self.devs[device] = _Dev(device)
        return d


@dataclass(slots=True)
class _Written:
    """What writing some devices' frames gave: to apply and send after the COMMIT."""

    result: readings.CommitResult
    upstream: list[Queued]
    out: Outgoing
    readings: int  # readings in their bursts, duplicates included
    events: list[Queued] = field(default_factory=list)

    @staticmethod
    def empty() -> _Written:
        """A holder for the batch's own events after a device-by-device write."""
        return _Written(readings.CommitResult([], [], {}, {}), [], [], 0)


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
        rotation: RotationHandler | None = None,
        session_keys: SessionKeys | None = None,
        on_committed: Callable[[list[Queued]], None] | None = None,
        clock: Callable[[], float] = time.time,
        writer: db.Writer | None = None,
        on_commit: Callable[[float], None] | None = None,
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
        # OTA_STATUS frames and HELLOs' OTA outcomes (gateway.pipeline.ota_delivery), before
        # downlink planning.
        self.ota = ota
        # CSR_UP frames and HELLOs' rotation fields (gateway.pipeline.rotation).
        self.rotation = rotation
        self.session_keys = session_keys  # HELLOs' session_key (gateway.pipeline.session_keys)
        self.on_committed = on_committed
        self.on_commit = on_commit  # on_commit(seconds) after each commit (metrics)
        self.clock = clock
        self.metrics = Metrics()
        self.states: dict[str, readings.DedupState] = readings.load_states(conn, repair=True)
        self._status: dict[str, str] = registry.statuses(conn)
        self._unknown: dict[str, float] = {}
        self._guards: dict[str, _Guard] = {}
        self._sampled: dict[tuple[str, str], float] = {}
        self._dead_bytes = deadletter.totals(conn)[1]
        self._data_version = self._read_data_version()
        self._status_checked = time.monotonic()
        self._rate = cfg.rate_limit_frames_per_min / 60.0
        self._pending: list[tuple[str, bytes]] = []
        self._have = asyncio.Event()
        self._more = asyncio.Event()  # set by every offer
        self._full = asyncio.Event()
        self._accepting = True
        # The broker connection run() holds: its `inflight` are the QoS 1 answers not yet
        # acknowledged by the broker (for drain()).
        self._client: MqttClient | None = None
        self.max_packet = 0  # the connection's packet bound, for the log
        self._inflight: asyncio.Future[Outgoing] | None = None
        self._oldest = 0.0  # time.monotonic() when the oldest pending frame arrived
        if self.upstream is not None:
            from gateway.pipeline import formats

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
        found = registry.status_of(self.conn, device)
        if found is None:
            self._unknown[device] = now
            return None
        self._status[device] = found
        return found

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
        when the commit fails: the nodes keep their readings and send them again.

        No frame raises out of here. Every frame is checked before anything derived from
        it is written, and the answers are encoded before the COMMIT. Should handling one
        device's frames raise all the same, the batch is written again device by device
        (a savepoint each): that device's frames are dead-lettered, it is quarantined and
        answered ERROR internal, and everyone else's frames commit and are acknowledged."""
        now = self.clock()
        self._refresh_statuses()
        st = _Stage({}, [], {}, {})
        for topic, payload in batch:
            self.metrics.frames += 1
            raw = bytes(payload)
            try:
                self._stage(st, topic, raw, now)
            except Exception as exc:  # a defect: the frame is kept, the device stopped
                device = _device_of(topic)
                device_log(device).exception("staging a frame raised")
                dev = st.dev(device)
                dev.failed = f"{type(exc).__name__}: {exc}"
                if not (dev.payloads and dev.payloads[-1] is raw):
                    dev.payloads.append(raw)
        try:
            return self._commit(st, now)
        except Exception:
            # The last resort (a defect past the commit): answer nothing this time. What
            # was committed stays; the nodes send again and their duplicates are acked.
            self.metrics.commit_errors += 1
            log.exception("answering a batch failed; nothing acknowledged")
            return []

    def _stage(self, st: _Stage, topic: str, payload: bytes, now: float) -> None:
        """Decode and check one frame into the stage; nothing is written yet."""
        try:
            device = topics.parse_up(topic)
        except topics.TopicError as exc:
            log.warning("frame on an unexpected topic: %s", exc)
            self._dead(st, "", "bad_topic", topic[:200], payload, now, sample=True)
            return
        status = self._status_of(device, now)
        if status is None or status not in registry.SERVED:
            reason = "not_provisioned" if status is None else status
            # A certificate request from a device that is not served is always kept, with
            # an event: a rotation never re-admits a revoked or quarantined device.
            csr = len(payload) > 1 and payload[1] == proto.CSR_UP and self.rotation is not None
            if csr:
                st.csr_refused.append((device, reason))
            self._dead(st, device, reason, "certificate request" if csr else "", payload, now,
                       sample=not csr)
            if status is None or status == registry.PROVISIONED:
                st.dev(device).replies.append(_Reply(2, frames=[_error(
                    proto.ErrorCode.NOT_PROVISIONED, _ref(payload), "not provisioned")]))
            return
        dev = st.dev(device)
        if dev.failed:
            dev.payloads.append(payload)
            return
        g = self._guard(device, now)
        # A wall clock set back is no time passed (not a debt of frames that quarantines
        # every device sending next).
        g.tokens = min(float(self.cfg.rate_limit_frames_per_min),
                       g.tokens + max(0.0, now - g.refilled) * self._rate)
        g.refilled = now
        if g.tokens < 1.0:
            reason = f"over {self.cfg.rate_limit_frames_per_min} frames/min"
            self._quarantine(device, reason, st.quarantine)
            self._dead(st, device, "rate_limited", reason, payload, now, sample=True)
            dev.replies.append(_Reply(2, frames=[_error(
                proto.ErrorCode.QUARANTINED, _ref(payload), "rate limited")]))
            return
        g.tokens -= 1.0
        st.seen[device] = now
        problem = ""
        frame: proto.Frame | None = None
        code = proto.ErrorCode.MALFORMED
        try:
            frame = proto.decode(payload)
        except proto.ProtocolError as exc:
            problem = str(exc)
            code = exc.code
        else:
            if payload[1] not in _UP_TYPES:
                problem = f"{type(frame).__name__} is a gateway-to-node frame"
                code = proto.ErrorCode.UNKNOWN_FRAME
            elif isinstance(frame, proto.Burst):
                # Checked here, before anything derived from it is written (readings).
                problem = readings.burst_problem(frame.msg_id, len(frame.readings))
        if problem:
            self._dead(st, device, "malformed", problem[:500], payload, now, sample=False)
            device_log(device).warning("malformed frame: %s", problem)
            dev.replies.append(_Reply(2, frames=[_error(code, _ref(payload), problem)]))
            g.malformed.append(now)
            if (len(g.malformed) >= self.cfg.malformed_threshold
                    and now - g.malformed[0] <= self.cfg.malformed_window_s):
                if device not in st.quarantine:
                    dev.replies.append(_Reply(2, frames=[_error(
                        proto.ErrorCode.QUARANTINED, _ref(payload), "quarantined")]))
                self._quarantine(
                    device, f"{len(g.malformed)} malformed frames in "
                    f"{self.cfg.malformed_window_s:g}s", st.quarantine)
            return
        dev.payloads.append(payload)
        if isinstance(frame, proto.Burst):
            dev.replies.append(_Reply(0, len(dev.bursts)))
            dev.bursts.append(frame)
        elif isinstance(frame, proto.Hello):
            dev.replies.append(_Reply(1, len(dev.hellos)))
            dev.hellos.append(frame)
        elif self.downlink is not None and isinstance(
                frame, proto.CommandResult | proto.ShadowReport):
            dev.answers.append(frame)
        elif self.ota is not None and isinstance(frame, proto.OtaStatus):
            dev.ota.append(frame)
        elif self.rotation is not None and isinstance(frame, proto.CsrUp):
            dev.csrs.append((frame, payload))
        else:
            # Up frames served by later modules (command results, shadow, OTA status).
            dev.payloads.pop()
            self._dead(st, device, "unhandled", type(frame).__name__, payload, now,
                       sample=False)
            dev.replies.append(_Reply(2, frames=[_error(
                proto.ErrorCode.UNKNOWN_FRAME, _ref(payload), "not served by this gateway")]))

    def _dead(self, st: _Stage, device: str, reason: str, detail: str, payload: bytes,
              now: float, *, sample: bool) -> None:
        """Dead-letter a refused frame: every one is counted; with `sample` (refused for
        who sent it, not for what it holds) one per device and reason is stored every
        deadletter_sample_s."""
        store = True
        if sample:
            key = (device, reason)
            last = self._sampled.get(key)
            store = last is None or now - last >= self.cfg.deadletter_sample_s or now < last
            if store:
                if len(self._sampled) >= _SAMPLED_MAX:
                    self._sampled.clear()
                self._sampled[key] = now
        c = st.counts.setdefault((device, reason), [0, 0, 0])
        c[0] += 1
        c[1] += len(payload)
        if store:
            c[2] += 1
            st.dead.append((device, now, reason, detail, payload))

    def _commit(self, st: _Stage, now: float) -> Outgoing:
        """Write the stage in one transaction; device by device when that raises."""
        m = self.metrics
        t0 = time.perf_counter()
        devs = [d for d in st.devs.values() if not d.failed]
        failed = [d for d in st.devs.values() if d.failed]
        # Status changes of our own (first HELLO, quarantine) need no reload of the cache:
        # note the registry version around them (the write lock is ours, so nobody else
        # moves it in between).
        own = bool(failed or st.quarantine or any(d.hellos for d in devs))
        before = after = 0
        try:
            try:
                with db.transaction(self.conn):
                    if own:
                        before = registry.version(self.conn)
                    w = self._write(devs, now)
                    self._write_common(st, failed, w, now)
                    if own:
                        after = registry.version(self.conn)
                results = [w]
            except (sqlite3.OperationalError, sqlite3.InterfaceError):
                raise
            except Exception as exc:
                m.isolated_batches += 1
                log.warning("a batch of %d devices raised (%s: %s); writing it device by "
                            "device", len(devs), type(exc).__name__, exc)
                results = []
                own = True
                with db.transaction(self.conn):
                    before = registry.version(self.conn)
                    for dev in devs:
                        try:
                            with db.savepoint(self.conn, "device"):
                                results.append(self._write([dev], now))
                        except (sqlite3.OperationalError, sqlite3.InterfaceError):
                            raise
                        except Exception as exc1:
                            device_log(dev.device).exception(
                                "its frames raised in ingest; dead-lettered, quarantined")
                            dev.failed = f"{type(exc1).__name__}: {exc1}"
                            failed.append(dev)
                    w = _Written.empty()
                    self._write_common(st, failed, w, now)
                    after = registry.version(self.conn)
        except sqlite3.Error as exc:
            m.commit_errors += 1
            # Undo what this batch did to the caches; nodes resend what was not acked.
            for name in st.quarantine:
                self._status[name] = registry.ACTIVE
            for d in failed:
                self._status[d.device] = registry.ACTIVE
            log.error("commit failed, nothing acknowledged (nodes will resend): %s", exc)
            return []
        for r in results:
            r.result.apply()
        if own and before == self._data_version:
            self._data_version = after
        elapsed = time.perf_counter() - t0
        m.commit_s += elapsed
        if self.on_commit is not None:
            self.on_commit(elapsed)
        m.batches += 1
        m.last_commit = now
        m.bursts += sum(len(d.bursts) for d in devs if not d.failed)
        m.hellos += sum(len(d.hellos) for d in devs if not d.failed)
        m.dead_letters += len(st.dead) + sum(len(d.payloads) for d in failed)
        m.refused += sum(c[0] for c in st.counts.values()) + sum(len(d.payloads) for d in failed)
        m.quarantined += len(st.quarantine)
        m.device_errors += len(failed)
        for r in results:
            for ack in r.result.acks:
                m.readings_stored += ack.stored
            m.readings_duplicate += r.readings - sum(a.stored for a in r.result.acks)
        for dev in devs:
            if dev.failed:
                continue
            for h in dev.hellos:
                if self._status.get(dev.device) == registry.PROVISIONED:
                    self._status[dev.device] = registry.ACTIVE
                    device_log(dev.device).info(
                        "first HELLO: provisioned -> active (fw %d)", h.fw_version)
        upstream = [q for r in results for q in r.upstream] + w.events
        if self.on_committed is not None and upstream:
            self.on_committed(upstream)
        out = [o for r in results for o in r.out]
        for dev in failed:
            # ERROR internal for each of its frames (set by _write_common).
            down = topics.down(dev.device)
            out.extend((down, f, SESSION_QOS) for r in dev.replies for f in r.frames)
        return out

    def _write(self, devs: list[_Dev], now: float) -> _Written:
        """The writes of `devs`' frames and their answers, encoded (inside the caller's
        transaction or savepoint: anything that raises here leaves nothing behind)."""
        bursts = [(d.device, b) for d in devs for b in d.bursts]
        hellos = [(d.device, h) for d in devs for h in d.hellos]
        answers = [(d.device, a) for d in devs for a in d.answers]
        ota_frames = [(d.device, o) for d in devs for o in d.ota]
        upstream: list[Queued] = []
        plans: list[WakePlan] = []
        if any(b.node_clock for _, b in bursts):
            bursts = self._to_gateway_clock(bursts, hellos, now)
        result = readings.commit_bursts(
            self.conn, bursts, self.states, now=now, in_transaction=True,
            low_water=[(d, h.first_id) for d, h in hellos if h.first_id])
        if self.upstream is not None and result.committed:
            upstream += self._enqueue_upstream(result.committed, now)
        if self.upstream is not None and hellos:
            upstream += queue_events(self.conn, self.upstream, [
                (d, "hello", hello_fields(h)) for d, h in hellos], now)
        if self.ota is not None and (ota_frames or hellos):
            self.ota.handle(self.conn, ota_frames, hellos, now)
        csrs = [(d.device, f, raw) for d in devs for f, raw in d.csrs]
        if self.rotation is not None and (csrs or any(h.cred_rotation for _, h in hellos)):
            done = self.rotation.handle(self.conn, csrs, hellos, now)
            self._dead_bytes += done.dead_bytes  # refused requests, dead-lettered there
            self.metrics.dead_letters += done.dead_letters
            if done.events and self.upstream is not None:
                upstream += queue_events(self.conn, self.upstream, done.events, now)
        if self.session_keys is not None and hellos:
            self.session_keys.observe(self.conn, hellos, now)
        if self.downlink is not None:
            if answers:
                self.downlink.handle_up(self.conn, answers, now)
            if hellos:
                plans = self.downlink.plan(self.conn, hellos, now)
        if hellos:
            registry.record_hellos(
                self.conn, [registry.hello_row(d, h, now) for d, h in hellos], now)
        wake_log.record(self.conn, hellos, [d.device for d in devs], result.committed, now)
        out = self._answers(devs, result, plans, now)
        return _Written(result, upstream, out, sum(len(b.readings) for _, b in bursts))

    def _write_common(self, st: _Stage, failed: list[_Dev], w: _Written, now: float) -> None:
        """The batch's own writes: last seen, dead letters and their counts, quarantines,
        after the devices' frames (in the same transaction)."""
        dead = list(st.dead)
        counts = {k: list(v) for k, v in st.counts.items()}  # this attempt's own
        for dev in failed:
            dev.replies = [_Reply(2, frames=[_error(
                proto.ErrorCode.INTERNAL, _ref(p), "could not be stored")]) for p in dev.payloads]
            for p in dev.payloads:
                dead.append((dev.device, now, "ingest_error", dev.failed[:500], p))
                c = counts.setdefault((dev.device, "ingest_error"), [0, 0, 0])
                c[0] += 1
                c[1] += len(p)
                c[2] += 1
            self._quarantine(dev.device, f"its frames raised in ingest ({dev.failed[:200]})",
                             st.quarantine)
        if st.seen:
            registry.touch_many(self.conn, [(t, d) for d, t in st.seen.items()])
        if dead:
            self._dead_bytes += deadletter.add_many(
                self.conn, dead, self.cfg.deadletter_raw_max_bytes)
            if self._dead_bytes > self.cfg.deadletter_max_bytes:
                deadletter.trim(self.conn, self.cfg.deadletter_max_bytes)
                self._dead_bytes = deadletter.totals(self.conn)[1]
        if counts:
            deadletter.count_refused(self.conn, [
                (d, r, c[0], c[1], c[2], now) for (d, r), c in counts.items()])
        if self.rotation is not None and st.csr_refused:
            events = self.rotation.refused_unserved(self.conn, st.csr_refused, now)
            if self.upstream is not None:
                w.events += queue_events(self.conn, self.upstream, events, now)
        if self.upstream is not None and st.quarantine:
            w.events += queue_events(self.conn, self.upstream, [
                (d, "quarantined", {"reason": r}) for d, r in st.quarantine.items()], now)
        for name, reason in st.quarantine.items():
            registry.quarantine(self.conn, name, reason, now=now)

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
        from gateway.pipeline import formats
        from gateway.store import outbox

        up = self.upstream
        assert up is not None
        return outbox.enqueue_queued(self.conn, [
            formats.readings_item(
                c.device, c.schema, c.series, topic_template=up.topic_readings,
                fmt=up.format, created=now, msg_id=c.msg_id,
            )
            for c in committed
        ])

    def _answers(self, devs: list[_Dev], result: readings.CommitResult,
                 plans: list[WakePlan], now: float) -> Outgoing:
        """The answers to `devs`' frames, encoded (an ACK that cannot be encoded raises
        before the commit, not after it)."""
        out: Outgoing = []
        acks = result.acks
        b = h = 0  # the first burst and hello of the device in the batch
        for dev in devs:
            down = topics.down(dev.device)
            for r in dev.replies:
                if r.kind == 0:
                    a = acks[b + r.index]
                    out.append((down, proto.encode_ack(
                        proto.Ack(a.msg_id, a.cumulative, a.selective)), SESSION_QOS))
                elif r.kind == 1:
                    hello = dev.hellos[r.index]
                    left = awake = 0
                    if plans:
                        plan = plans[h + r.index]
                        extra, left, awake = list(plan.frames), plan.left, plan.awake_s
                    else:
                        try:
                            extra = self.on_hello(dev.device, hello)
                        except Exception:
                            device_log(dev.device).exception(
                                "downlink hook failed; sending no downlink")
                            extra = []
                    st = result.state(dev.device) or readings.DedupState()
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
            b += len(dev.bursts)
            h += len(dev.hellos)
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

    def on_message(self, message: Publish) -> None:
        """The connection's `on_message`: every PUBLISH, as it is decoded."""
        self.offer(message.topic, message.payload)

    def on_oversized(self, dropped: Oversized) -> None:
        """The connection's `on_oversized`: a frame over the packet bound, let go unread
        (and acknowledged, so the broker does not send it again)."""
        device = _device_of(dropped.topic)
        log.warning("dropped a packet of %d bytes on %r: over the %d-byte bound",
                    dropped.size, dropped.topic[:80], self.max_packet,
                    extra={"device_id": device} if device else None)

    async def run(self, client: MqttClient) -> None:
        """Subscribe and ingest until cancelled or the connection ends (raising its
        `ConnectionLost`); on either, commit and answer what was already received, wait
        for those publishes, then re-raise. `client` is connected; frames go straight
        from its decoder to `offer` (see `on_message`)."""
        self._accepting = True  # again, after a previous connection's run
        self.max_packet = client.options.max_packet
        # What the client queued before it was handed over: a persistent session's frames
        # come with the CONNACK. receive() returns at once when the queue holds some.
        if client.on_message is None:
            while client.queued:
                for message in await client.receive(client.queued):
                    self.on_message(message)
            client.on_message = self.on_message
        if client.on_oversized is None:
            client.on_oversized = self.on_oversized
        self._client = client
        writer = self.writer or db.Writer("ingest-db")
        committer = asyncio.create_task(self._commit_loop(writer), name="ingest-commit")
        awake = None
        if self.downlink is not None:
            awake = asyncio.create_task(self._awake_loop(writer), name="ingest-awake")
        closed = asyncio.ensure_future(client.wait_closed())
        try:
            await client.subscribe((topics.UP_ALL, 1))
            log.info("ingesting %s", topics.UP_ALL)
            await asyncio.wait((committer, closed), return_when=asyncio.FIRST_COMPLETED)
            if not closed.done():
                committer.result()  # it only ever ends by failing
            raise closed.result() or ConnectionLost(ErrorCode.CONNECTION_LOST,
                                                    "disconnected from the broker")
        finally:
            closed.cancel()
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
        """How many answers still wait for the broker's PUBACK."""
        client = self._client
        return client.inflight if client is not None and client.connected else 0

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
        """Write the answers on the connection at once, without waiting for each PUBACK
        (they go out together, in one write, when the event loop next runs). A lost
        answer costs nothing durable: the node keeps its readings and sends them again."""
        client = self._client
        assert client is not None, "answers are published only while run() holds a connection"
        m = self.metrics
        for topic, payload, qos in out:
            try:
                client.publish_nowait(topic, payload, qos)
            except TransportError as exc:
                m.publish_errors += 1
                log.warning("could not publish to %s: %s", topic, exc)
            else:
                m.acks_sent += 1


def hello_fields(hello: proto.Hello) -> dict[str, Any]:
    """What a `hello` event tells upstream about a wake."""
    return {
        "fw_version": hello.fw_version, "boot_cause": hello.boot_cause.name.lower(),
        "battery_mv": hello.battery_mv, "rssi": hello.rssi, "queue_depth": hello.queue_depth,
        "dropped": hello.dropped, "next_wake_s": hello.next_wake_s,
        "safe_mode": bool(hello.safe_mode),
    }


def _device_of(topic: str) -> str:
    try:
        return topics.parse_up(topic)
    except Exception:
        return ""


def _is_hello(payload: bytes) -> bool:
    return len(payload) > 1 and payload[1] == proto.HELLO


def _ref(payload: bytes) -> int:
    return int.from_bytes(payload[2:6], "little") if len(payload) >= 6 else 0


def _error(code: proto.ErrorCode, ref: int, detail: str) -> bytes:
    text = detail.encode("utf-8")[:_DETAIL_MAX].decode("utf-8", "ignore")
    return proto.encode_error(proto.Error(ref, code, ref, text))
