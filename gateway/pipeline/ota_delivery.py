"""OTA delivery in a node's wake: its OTA_STATUS frames and HELLOs move its update on.

Ingest calls `OtaHandler.handle` inside its commit transaction. The node's OTA_STATUS
(`chunks` = wire index of the first chunk it still needs) retires what it has and tops the
window up; its HELLO reports trial outcomes. Images, campaigns and the rollout live in
gateway.store.ota_store; docs/ota.md tells the whole story.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence

from gateway import proto
from gateway.store import db, keylists, ota_store

log = logging.getLogger(__name__)

_REASONS = {r.value: r.name.lower() for r in proto.OtaReason}


class OtaHandler:
    """Ingest's hook: OTA_STATUS frames and HELLOs, inside its commit transaction."""

    def __init__(self) -> None:
        self.statuses = 0
        self.changes = 0
        self.errors = 0

    def handle(self, conn: sqlite3.Connection,
               statuses: Sequence[tuple[str, proto.OtaStatus]],
               hellos: Sequence[tuple[str, proto.Hello]], now: float) -> None:
        """Never fails the caller's batch: an error rolls back the OTA part only."""
        try:
            with db.savepoint(conn, "ota_handle"):
                self._handle(conn, statuses, hellos, now)
        except Exception:
            self.errors += 1
            log.exception("OTA handling failed for this batch")

    def _handle(self, conn: sqlite3.Connection,
                statuses: Sequence[tuple[str, proto.OtaStatus]],
                hellos: Sequence[tuple[str, proto.Hello]], now: float) -> None:
        touched: set[int] = set()
        for device, st in statuses:
            self.statuses += 1
            cid = self._status(conn, device, st, now)
            if cid:
                touched.add(cid)
        if hellos:  # which firmware key list each node holds (docs/ota.md)
            keylists.note_held(conn, [(d, h.keys_seq) for d, h in hellos], now)
        for device, hello in hellos:
            cid = self._hello(conn, device, hello, now)
            if cid:
                touched.add(cid)
        for cid in touched:
            ota_store.advance(conn, cid, now)
        if hellos:
            # Timeouts of devices that stopped waking; cheap when no campaign runs.
            for cid in ota_store.running_campaigns(conn):
                if cid not in touched:
                    ota_store.advance(conn, cid, now)

    def _finish(self, conn: sqlite3.Connection, cid: int, device: str, status: str,
                now: float, reason: str = "", detail: str = "") -> None:
        ota_store.clear_items(conn, device, now, done=status in (ota_store.TRIAL, ota_store.CONFIRMED))
        ota_store.set_device(conn, cid, device, now, status=status, reason=reason, detail=detail)
        self.changes += 1
        log.log(logging.INFO if status in (ota_store.TRIAL, ota_store.CONFIRMED) else logging.WARNING,
                "[%s] campaign %d: %s%s", device, cid, status,
                f" ({reason}{': ' + detail if detail else ''})" if reason else "",
                extra={"device_id": device})

    def _status(self, conn: sqlite3.Connection, device: str, st: proto.OtaStatus,
                now: float) -> int:
        act = ota_store.active(conn, device)
        if act is None or act[2].version != st.version:
            log.info("[%s] OTA status for v%d (%s) outside any running update", device,
                     st.version, st.state.name.lower(), extra={"device_id": device})
            return 0
        cid, status, img, _ = act
        reason = _REASONS.get(int(st.reason), str(int(st.reason))) if st.reason else ""
        s = st.state
        if s in (proto.OtaState.DOWNLOADING, proto.OtaState.IDLE, proto.OtaState.VERIFYING):
            if status == ota_store.TRIAL:
                return 0  # a late progress report
            plan = ota_store.plan_of(conn, device, img)
            progress = min(st.chunks, plan.total(img))
            new = ota_store.VERIFYING if progress >= plan.total(img) else ota_store.DOWNLOADING
            if s == proto.OtaState.IDLE:
                new, progress = ota_store.QUEUED, 0  # the node has no manifest for it: start over
            ota_store.set_device(conn, cid, device, now, status=new, progress=progress)
            ota_store.fill(conn, device, img, plan, progress, ota_store.timeout_of(conn, cid), now,
                  manifest=s == proto.OtaState.IDLE)
            return cid
        if s == proto.OtaState.TRIAL:
            self._finish(conn, cid, device, ota_store.TRIAL, now)
            ota_store.set_device(conn, cid, device, now, progress=st.chunks)
        elif s == proto.OtaState.CONFIRMED:
            self._finish(conn, cid, device, ota_store.CONFIRMED, now)
        elif s == proto.OtaState.REVERTED:
            self._finish(conn, cid, device, ota_store.REVERTED, now, reason or "reverted", st.detail)
        elif s == proto.OtaState.REFUSED:
            self._finish(conn, cid, device, ota_store.REFUSED, now, reason or "refused", st.detail)
        else:
            self._finish(conn, cid, device, ota_store.FAILED, now, reason or "failed", st.detail)
        return cid

    def _hello(self, conn: sqlite3.Connection, device: str, hello: proto.Hello,
               now: float) -> int:
        act = ota_store.active(conn, device)
        if act is None:
            return 0
        cid, status, img, progress = act
        if status == ota_store.VERIFYING and hello.fw_version == img.version:
            # Every chunk was in and the node's whole-image check, left for the start of a
            # later wake for want of heap, set the trial and restarted into it before it
            # could report: the trial image's HELLO says so.
            self._finish(conn, cid, device, ota_store.TRIAL, now)
            status = ota_store.TRIAL
        if hello.ota_state == proto.OtaState.REVERTED and (
                status == ota_store.TRIAL
                or (status == ota_store.VERIFYING and hello.fw_version != img.version)):
            reason = _REASONS.get(int(hello.ota_reason), "reverted")
            self._finish(conn, cid, device, ota_store.REVERTED, now, reason,
                         f"running v{hello.fw_version}")
            return cid
        if status == ota_store.TRIAL and hello.fw_version == img.version and (
                hello.ota_state in (proto.OtaState.CONFIRMED, proto.OtaState.IDLE)):
            self._finish(conn, cid, device, ota_store.CONFIRMED, now)  # its OTA_STATUS went missing
            return cid
        if status in (ota_store.QUEUED, ota_store.DOWNLOADING, ota_store.VERIFYING) and not ota_store.ota_items(conn, device):
            # Items expired or failed in the queue (a node that slept through them): resend.
            ota_store.fill(conn, device, img, ota_store.plan_of(conn, device, img), progress,
                  ota_store.timeout_of(conn, cid), now, manifest=status == ota_store.QUEUED)
        return 0
