"""Delivery to sleeping nodes: what to send in one wake, what the node's answers retire,
and when each node is expected to listen next.

`Downlink.plan()` runs inside ingest's commit transaction for each HELLO: it expires stale
items, picks pending ones in priority order within the node's awake window, its class's
max_message and its byte budget, marks them sent (attempts + 1) and returns the encoded
frames, which ingest publishes after the ACK and before SLEEP_NOW. Because the marks are
committed before anything is published, a gateway killed after sending still knows the
item went out, and sends it again on the next wake (the node answers `duplicate`).
`handle_up()` applies COMMAND_RESULT and SHADOW_REPORT frames in the same transaction.
This module owns the `downlink_wakes` table.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway import proto
from gateway.config import DownlinkConfig
from gateway.store import db, devices, wakes
from gateway.store import downlink_queue as q

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class WakePlan:
    """The downlink of one wake: frames between ACK and SLEEP_NOW, items left queued."""

    frames: tuple[bytes, ...] = ()
    ids: tuple[int, ...] = ()
    left: int = 0
    awake_s: int = 0  # a stay_awake among the frames: no SLEEP_NOW, the node stays this long

    @property
    def bytes(self) -> int:
        return sum(len(f) for f in self.frames)


@dataclass(slots=True)
class Metrics:
    plans: int = 0
    frames: int = 0
    bytes: int = 0
    results: int = 0
    repeats: int = 0
    unknown_results: int = 0
    reports: int = 0
    expired: int = 0
    failed: int = 0
    errors: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


def _encode(item: q.Item, conn: sqlite3.Connection, now: float) -> bytes:
    if item.kind == proto.COMMAND:
        assert item.op is not None
        # ttl_s on the wire is what is left of it (0: none), capped to the field's u16.
        ttl = 0 if item.expires_at is None else max(1, min(0xFFFF, int(item.expires_at - now)))
        # expires_at on our clock, which the node's follows: it refuses the command once
        # that time has passed when it arrives (ttl_s says what was left when it was sent).
        expires = 0 if item.expires_at is None else min(0xFFFFFFFF, int(item.expires_at))
        return proto.encode_command(proto.Command(
            item.command_id, item.command_id, proto.CommandOp(item.op), item.args,
            item.priority, ttl, item.data, expires))
    if item.kind == proto.SHADOW_DELTA:
        assert item.config_version is not None
        return proto.encode_shadow_delta(proto.ShadowDelta(
            item.command_id, item.config_version, q.shadow_entries(conn, item.device)))
    return item.data


def _stay_awake_s(item: q.Item) -> int:
    if item.kind == proto.COMMAND and item.op == proto.CommandOp.STAY_AWAKE and item.args:
        return max(0, item.args[0])
    return 0


class Downlink:
    """Plans each wake's downlink and applies the node's answers (see the module doc)."""

    def __init__(self, cfg: DownlinkConfig | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg or DownlinkConfig()
        self.clock = clock
        self.metrics = Metrics()

    # ------------------------------------------------------------ ingest hooks
    def plan(self, conn: sqlite3.Connection, hellos: Sequence[tuple[str, proto.Hello]],
             now: float) -> list[WakePlan]:
        """One plan per HELLO, inside the caller's transaction. A failure for one device
        is rolled back to its savepoint and gives it no downlink, never failing the batch."""
        out: list[WakePlan] = []
        for device, hello in hellos:
            try:
                with db.savepoint(conn, "downlink_plan"):
                    plan = self.plan_one(conn, device, hello, now)
            except Exception:  # never let one device's downlink fail the batch
                self.metrics.errors += 1
                log.exception("[%s] downlink planning failed; no downlink this wake", device,
                              extra={"device_id": device})
                plan = WakePlan()
            out.append(plan)
        return out

    def plan_one(self, conn: sqlite3.Connection, device: str, hello: proto.Hello,
                 now: float) -> WakePlan:
        cfg = self.cfg
        limits = proto.DEVICE_CLASSES[devices.class_of(conn, device) or "sensor"]
        self.metrics.plans += 1
        self.metrics.expired += q.expire(conn, now, device)
        # The node already runs this configuration (its report may have been lost).
        q.record_report(conn, device, hello.config_version, (), now)
        items = q.pending(conn, device)
        # The node is away until it next connects (which may be several sampling wakes).
        interval = hello.next_listen_s or hello.next_wake_s or limits.wake_interval_s
        budget = limits.budget_bytes_per_min * interval / 60.0
        if hello.awake_window_ms <= 0:
            room = 0
        else:
            room = max(1, (hello.awake_window_ms - cfg.window_reserve_ms) // cfg.frame_cost_ms)
        frames: list[bytes] = []
        ids: list[int] = []
        spent = 0
        left = 0
        full = False
        awake_s = 0
        for it in items:
            if it.attempts >= cfg.max_attempts:
                q.retire(conn, device, it.command_id, q.FAILED, now, result="undelivered",
                         detail=f"no answer after {it.attempts} deliveries")
                self.metrics.failed += 1
                log.warning("[%s] item %d (%s) failed: no answer after %d deliveries", device,
                            it.command_id, it.what, it.attempts, extra={"device_id": device})
                continue
            frame = _encode(it, conn, now)
            if len(frame) > limits.max_message:
                q.retire(conn, device, it.command_id, q.FAILED, now, result="too_large",
                         detail=f"{len(frame)} B > max_message {limits.max_message}")
                self.metrics.failed += 1
                continue
            # Strict priority order: once one item does not fit, the rest wait too.
            if full or len(frames) >= room or (frames and spent + len(frame) > budget):
                full = True
                left += 1
                continue
            frames.append(frame)
            ids.append(it.command_id)
            spent += len(frame)
            kind = it.kind_name
            self.metrics.by_kind[kind] = self.metrics.by_kind.get(kind, 0) + 1
            awake_s = max(awake_s, _stay_awake_s(it))
        q.mark_sent(conn, device, ids, now)
        self._record_wake(conn, device, hello, now, len(frames), left, spent, awake_s)
        self.metrics.frames += len(frames)
        self.metrics.bytes += spent
        if frames:
            log.info("[%s] delivering %d item(s), %d B, %d left", device, len(frames), spent,
                     left, extra={"device_id": device})
        return WakePlan(tuple(frames), tuple(ids), left, awake_s)

    def plan_awake(self, conn: sqlite3.Connection, now: float) -> list[tuple[str, WakePlan]]:
        """Items queued for nodes under a stay_awake, to send at once (inside the caller's
        transaction): the node is connected and listening, so nothing waits for a wake.
        Each item is sent once here; an unanswered one goes again at the next HELLO."""
        out: list[tuple[str, WakePlan]] = []
        for device in wakes.awake(conn, now):
            q.expire(conn, now, device)
            frames: list[bytes] = []
            ids: list[int] = []
            awake_s = 0
            for it in q.pending(conn, device):
                if it.attempts:
                    continue  # sent in this stay already (or an earlier wake): awaits its result
                frame = _encode(it, conn, now)
                frames.append(frame)
                ids.append(it.command_id)
                awake_s = max(awake_s, _stay_awake_s(it))
            if not frames:
                continue
            q.mark_sent(conn, device, ids, now)
            if awake_s:
                wakes.extend_awake(conn, device, now + awake_s)
            self.metrics.frames += len(frames)
            log.info("[%s] awake: delivering %d item(s) at once", device, len(frames),
                     extra={"device_id": device})
            out.append((device, WakePlan(tuple(frames), tuple(ids), 0, awake_s)))
        return out

    def _record_wake(self, conn: sqlite3.Connection, device: str, hello: proto.Hello,
                     now: float, delivered: int, left: int, spent: int,
                     awake_s: int = 0) -> None:
        prev = wakes.expected(conn, device)
        missed = 0
        # When it next connects, which with send_every > 1 is not its next sampling wake.
        interval = hello.next_listen_s or hello.next_wake_s
        listen = interval + awake_s if interval else 0  # a stay, then its own schedule
        if prev is not None:
            expected_at, expected_interval = prev
            missed = wakes.missed_wakes(expected_at, expected_interval, now, self.cfg.grace_s)
            if missed and expected_at is not None:
                log.info("[%s] HELLO %.0fs after the expected wake: %d wake(s) missed", device,
                         now - expected_at, missed, extra={"device_id": device})
        wakes.record(conn, device, missed=missed, now=now,
                     expected_at=now + listen if listen else None, interval_s=interval or None,
                     window_ms=hello.awake_window_ms, delivered=delivered, left=left,
                     spent=spent, awake_until=now + awake_s if awake_s else None)

    def handle_up(self, conn: sqlite3.Connection,
                  frames: Sequence[tuple[str, proto.CommandResult | proto.ShadowReport]],
                  now: float) -> None:
        """Apply the nodes' answers inside the caller's transaction. Repeats change nothing."""
        for device, f in frames:
            if isinstance(f, proto.CommandResult):
                outcome = q.record_result(conn, device, f, now)
                if outcome == "retired":
                    self._stay_result(conn, device, f, now)
                if outcome == "retired":
                    self.metrics.results += 1
                    log.info("[%s] command %d: %s%s", device, f.command_id,
                             f.status.name.lower(), f" ({f.detail})" if f.detail else "",
                             extra={"device_id": device})
                elif outcome == "unknown":
                    self.metrics.unknown_results += 1
                    log.warning("[%s] result for unknown command id %d", device, f.command_id,
                                extra={"device_id": device})
                else:
                    self.metrics.repeats += 1
            else:
                self.metrics.reports += 1
                if q.record_report(conn, device, f.config_version, f.entries, now):
                    log.info("[%s] configuration v%d applied", device, f.config_version,
                             extra={"device_id": device})

    def _stay_result(self, conn: sqlite3.Connection, device: str, f: proto.CommandResult,
                     now: float) -> None:
        # A stay_awake runs from when the node ran it; one it refused (safe mode, bad
        # arguments) keeps nobody awake, so nothing more is sent at once.
        it = q.get(conn, device, f.command_id)
        stay = _stay_awake_s(it)
        if not stay:
            return
        until = now + stay if f.status == proto.ResultStatus.OK else None
        wakes.set_awake(conn, device, until)

    # ------------------------------------------------------------ housekeeping
    def sweep(self, conn: sqlite3.Connection, now: float | None = None) -> int:
        """Mark every item past its TTL expired (its own transaction)."""
        n = q.expire(conn, self.clock() if now is None else now)
        self.metrics.expired += n
        if n:
            log.info("%d downlink item(s) expired", n)
        return n

    async def sweep_loop(self, conn: sqlite3.Connection) -> None:
        while True:
            self.sweep(conn)
            await asyncio.sleep(self.cfg.sweep_interval_s)
