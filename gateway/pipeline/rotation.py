"""Device keys rotated over the air: the gateway's half (docs/credentials.md).

Ingest hands this module every CSR_UP frame and every HELLO that speaks of a rotation,
inside its commit transaction (`handle`). A request is checked here, against the session
it arrived on: the topic's device id is the certificate CN the broker bound, and the
request must name that device and nobody else, parse, verify under its own key, answer a
rotation this gateway asked that device for and has not finished, and come from a device
that is served. Anything else is dead-lettered with an event, and changes nothing.

The service's rotation task (`work`) then issues the certificate for the node's key
(the private key never leaves the node), queues it down in `install_cert` pieces, and
revokes the old certificate only once a HELLO says the node connected with the new one.
`start_due` starts rotations a lead time before device certificates expire.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway import proto
from gateway.config import PkiConfig, UpstreamConfig
from gateway.errors import GatewayError
from gateway.pipeline.events import queue_events
from gateway.store import db, deadletter
from gateway.store import devices as registry
from gateway.store import downlink_queue as q
from gateway.store import rotations as rs
from gateway.store.outbox import Queued

log = logging.getLogger(__name__)

# The lead time starts a device's next rotation at least this long after its last one ended:
# a failed one is retried daily, and a new certificate that is itself within the lead time
# (clamped by an issuing CA near its end) does not make a rotation loop.
RETRY_AFTER_S = 86400.0
# Room in an install_cert COMMAND besides its data: header, ids, args, priority, TTL.
_PIECE_OVERHEAD = 64
UPSTREAM_KIND = "rotation"

Event = tuple[str, str, dict[str, Any]]  # (device, kind, fields) for upstream


class Pki(Protocol):
    """What rotation needs of the fleet PKI (gateway.security.pki.Pki; the service passes it in)."""

    path: Path

    def device_records(self, device_id: str, include_revoked: bool = True) -> Sequence[Any]: ...

    def issue_device_for_key(self, device_id: str, public_key: ec.EllipticCurvePublicKey,
                             days: float = ...) -> x509.Certificate: ...

    def revoke(self, target: str | int) -> list[int]: ...

    def status(self) -> Any: ...


@dataclass(slots=True)
class Metrics:
    requests: int = 0
    refused: int = 0
    repeats: int = 0
    issued: int = 0
    confirmed: int = 0
    failed: int = 0
    revoked: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Handled:
    """What `handle` did that ingest accounts for: upstream events, dead letters."""

    events: list[Event] = field(default_factory=list)
    dead_letters: int = 0
    dead_bytes: int = 0


class CsrRefused(GatewayError):
    """A CSR_UP that is refused: `reason` is the dead letter's reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _hex(serial: bytes) -> str:
    return format(int.from_bytes(serial, "big"), "x")


def _spki(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


class RotationHandler:
    """The ingest hooks and the service's work for rotations (see the module doc)."""

    def __init__(self, pki: Pki | None, cfg: PkiConfig | None = None,
                 upstream: UpstreamConfig | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.pki = pki
        self.cfg = cfg or PkiConfig()
        self.upstream = upstream if upstream is not None and upstream.enabled else None
        self.clock = clock
        self.metrics = Metrics()

    # ------------------------------------------------------------ ingest hooks
    def handle(self, conn: sqlite3.Connection,
               csrs: Sequence[tuple[str, proto.CsrUp, bytes]],
               hellos: Sequence[tuple[str, proto.Hello]], now: float) -> Handled:
        """CSR_UP frames and HELLOs, inside ingest's transaction. A refused request is
        dead-lettered here; one device's failure never fails the batch."""
        out = Handled()
        events = out.events
        for device, frame, raw in csrs:
            self.metrics.requests += 1
            try:
                with db.savepoint(conn, "rotation_csr"):  # a refusal undoes this request alone
                    events += self._csr(conn, device, frame, now)
            except Exception as exc:  # CsrRefused, or a defect: the frame is a dead letter
                if not isinstance(exc, CsrRefused):
                    log.exception("[%s] handling a CSR_UP raised", device,
                                  extra={"device_id": device})
                    exc = CsrRefused("csr_error", f"{type(exc).__name__}: {exc}")
                events += self._refuse(conn, device, frame.rotation, exc, raw, now)
                out.dead_letters += 1
                out.dead_bytes += deadletter.row_size(device, exc.reason, str(exc)[:500], len(raw))
        for device, hello in hellos:
            if hello.cred_rotation or hello.cred_outcome:
                events += self._hello(conn, device, hello, now)
        return out

    def refused_unserved(self, conn: sqlite3.Connection, rows: Sequence[tuple[str, str]],
                         now: float) -> list[Event]:
        """Events for CSR_UP frames ingest refused because their device is not served
        (quarantined, revoked, unknown); ingest dead-lettered the frames."""
        out: list[Event] = []
        for device, status in rows:
            self.metrics.refused += 1
            reason = f"csr_device_{status}"
            self.metrics.by_reason[reason] = self.metrics.by_reason.get(reason, 0) + 1
            log.warning("[%s] certificate request refused: the device is %s", device, status,
                        extra={"device_id": device})
            rot = rs.open_of(conn, device)
            rs.event(conn, device, rot.id if rot else 0, "refused", f"{reason}", now)
            out.append((device, UPSTREAM_KIND, {"event": "csr_refused", "reason": reason}))
        return out

    def _refuse(self, conn: sqlite3.Connection, device: str, rotation: int, exc: CsrRefused,
                raw: bytes, now: float) -> list[Event]:
        self.metrics.refused += 1
        self.metrics.by_reason[exc.reason] = self.metrics.by_reason.get(exc.reason, 0) + 1
        log.warning("[%s] certificate request refused (%s): %s", device, exc.reason, exc,
                    extra={"device_id": device})
        deadletter.add_many(conn, [(device, now, exc.reason, str(exc)[:500], raw)], len(raw))
        deadletter.count_refused(conn, [(device, exc.reason, 1, len(raw), 1, now)])
        rs.event(conn, device, rotation, "refused", f"{exc.reason}: {exc}", now)
        return [(device, UPSTREAM_KIND, {"event": "csr_refused", "rotation": rotation,
                                         "reason": exc.reason, "detail": str(exc)[:200]})]

    def _csr(self, conn: sqlite3.Connection, device: str, frame: proto.CsrUp,
             now: float) -> list[Event]:
        dev = registry.find(conn, device)
        if dev is None or dev.status not in registry.SERVED:
            status = dev.status if dev is not None else "unknown"
            raise CsrRefused(f"csr_device_{status}", f"device is {status}")
        try:
            req = x509.load_der_x509_csr(frame.csr)
        except ValueError as exc:
            raise CsrRefused("csr_malformed", f"not a DER certificate request: {exc}") from None
        try:
            key = req.public_key()
        except (ValueError, TypeError) as exc:
            raise CsrRefused("csr_malformed", f"unreadable public key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise CsrRefused("csr_bad_key", "the key is not an EC P-256 key")
        try:
            valid = req.is_signature_valid
        except (ValueError, TypeError, x509.UnsupportedGeneralNameType) as exc:
            raise CsrRefused("csr_malformed", f"signature unreadable: {exc}") from None
        if not valid:
            raise CsrRefused("csr_bad_signature", "the signature does not verify under its key")
        want = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)])
        if req.subject != want:
            raise CsrRefused("csr_wrong_subject",
                             f"subject {req.subject.rfc4514_string()!r} is not CN={device}")
        rot = rs.get(conn, frame.rotation)
        if rot is None or rot.device != device:
            raise CsrRefused("csr_unknown_rotation",
                             f"rotation {frame.rotation} was not asked of {device}")
        digest = hashlib.sha256(frame.csr).hexdigest()
        if rot.state in (rs.CSR_OK, rs.ISSUED) and rot.csr_sha256 == digest:
            # The node sends its request each wake until the certificate arrives.
            self.metrics.repeats += 1
            return []
        if rot.state != rs.REQUESTED:
            raise CsrRefused("csr_replayed", f"rotation {rot.id} is {rot.state}: it takes no "
                             "other request")
        if self._known_key(device, key):
            raise CsrRefused("csr_key_reused", "the key is one this device was certified for "
                             "before")
        rs.store_csr(conn, rot.id, frame.csr, digest, now)
        rs.event(conn, device, rot.id, "csr", digest[:16], now)
        log.info("[%s] certificate request for rotation %d accepted", device, rot.id,
                 extra={"device_id": device})
        return [(device, UPSTREAM_KIND, {"event": "csr", "rotation": rot.id})]

    def _known_key(self, device: str, key: ec.EllipticCurvePublicKey) -> bool:
        if self.pki is None:
            return False
        mine = _spki(key)
        for rec in self.pki.device_records(device):
            path = self.pki.path / rec.path
            try:
                cert = x509.load_pem_x509_certificate(path.read_bytes())
            except (OSError, ValueError):
                continue
            if _spki(cert.public_key()) == mine:
                return True
        return False

    def _hello(self, conn: sqlite3.Connection, device: str, hello: proto.Hello,
               now: float) -> list[Event]:
        rot = rs.get(conn, hello.cred_rotation)
        if rot is None or rot.device != device:
            log.info("[%s] HELLO names rotation %d, which is not this device's", device,
                     hello.cred_rotation, extra={"device_id": device})
            return []
        serial = _hex(hello.cert_serial) if hello.cert_serial else ""
        outcome = proto.CredOutcome(hello.cred_outcome).name.lower()
        if serial and serial == rot.new_serial and rot.state == rs.ISSUED:
            # The node connected with the new certificate: every other one of the device
            # goes on the CRL now (the node has deleted their keys).
            old = [r.serial_hex for r in (self.pki.device_records(device, include_revoked=False)
                                          if self.pki is not None else ())
                   if r.serial_hex != serial]
            rs.confirmed(conn, rot.id, old, outcome, now)
            rs.event(conn, device, rot.id, "confirmed", f"serial {serial}", now)
            self.metrics.confirmed += 1
            log.info("[%s] rotation %d: connected with the new certificate %s", device, rot.id,
                     serial, extra={"device_id": device})
            return [(device, UPSTREAM_KIND, {"event": "confirmed", "rotation": rot.id,
                                             "serial": serial, "revoking": old})]
        fail = hello.cred_outcome in (proto.CredOutcome.REFUSED, proto.CredOutcome.NO_SESSION,
                                      proto.CredOutcome.MISMATCH, proto.CredOutcome.ABORTED,
                                      proto.CredOutcome.REPROVISIONED)
        if fail and rot.state in rs.ACTIVE:
            state = rs.CANCELLED if hello.cred_outcome == proto.CredOutcome.REPROVISIONED else rs.FAILED
            revoke = [rot.new_serial] if rot.new_serial else []
            self._cancel_items(conn, rot, now)
            rs.end(conn, rot.id, state, outcome, f"the node reports {outcome}", revoke, now)
            rs.event(conn, device, rot.id, state, outcome, now)
            self.metrics.failed += 1
            log.warning("[%s] rotation %d %s: the node reports %s and keeps its old "
                        "certificate", device, rot.id, state, outcome,
                        extra={"device_id": device})
            return [(device, UPSTREAM_KIND, {"event": state, "rotation": rot.id,
                                             "outcome": outcome})]
        return []

    def _cancel_items(self, conn: sqlite3.Connection, rot: rs.Rotation, now: float) -> None:
        for cid in (rot.command_id, *rot.pieces):
            if cid is None:
                continue
            try:
                if q.get(conn, rot.device, cid).status in q.ACTIVE:
                    q.cancel(conn, rot.device, cid, now=now)
            except q.QueueError:
                pass

    # ------------------------------------------------------------ the service's work
    def work(self, conn: sqlite3.Connection, now: float | None = None) -> tuple[bool, list[Queued]]:
        """Issue certificates for accepted requests and revoke what waits for it, in one
        transaction. Returns (the CRL changed: reload the broker, upstream items queued)."""
        now = self.clock() if now is None else now
        events: list[Event] = []
        changed = False
        with db.transaction(conn):
            for rot in rs.in_state(conn, rs.CSR_OK):
                events += self._issue(conn, rot, now)
            for rot in rs.with_revocations(conn):
                changed |= self._revoke(conn, rot, now)
            queued = queue_events(conn, self.upstream, events, now) if events else []
        return changed, queued

    def _issue(self, conn: sqlite3.Connection, rot: rs.Rotation, now: float) -> list[Event]:
        dev = registry.find(conn, rot.device)
        if dev is None or dev.status not in registry.SERVED:
            status = dev.status if dev is not None else "gone"
            rs.end(conn, rot.id, rs.CANCELLED, "", f"device is {status}", [], now)
            rs.event(conn, rot.device, rot.id, rs.CANCELLED, f"device is {status}", now)
            return []
        assert rot.csr is not None
        try:
            if self.pki is None:
                raise GatewayError("no PKI directory: nothing can issue a certificate")
            key = x509.load_der_x509_csr(rot.csr).public_key()
            assert isinstance(key, ec.EllipticCurvePublicKey)
            cert = self.pki.issue_device_for_key(rot.device, key, self.cfg.device_days)
        except GatewayError as exc:
            rs.end(conn, rot.id, rs.FAILED, "", f"issuing failed: {exc}", [], now)
            rs.event(conn, rot.device, rot.id, "issue_failed", str(exc), now)
            self._cancel_items(conn, rot, now)
            log.error("[%s] rotation %d: issuing the certificate failed: %s", rot.device,
                      rot.id, exc, extra={"device_id": rot.device})
            return [(rot.device, UPSTREAM_KIND, {"event": "issue_failed", "rotation": rot.id,
                                                 "detail": str(exc)[:200]})]
        der = cert.public_bytes(serialization.Encoding.DER)
        limits = proto.DEVICE_CLASSES[dev.device_class]
        size = max(32, min(q.MAX_DATA, limits.max_message - _PIECE_OVERHEAD))
        pieces = []
        for off in range(0, len(der), size):
            pieces.append(q.enqueue_command(
                conn, rot.device, "install_cert", [rot.id, off, len(der)], rs.ROTATE_PRIORITY,
                rs.ROTATE_TTL_S, der[off:off + size], now=now))
        serial = format(cert.serial_number, "x")
        rs.issued(conn, rot.id, serial, pieces, now)
        rs.event(conn, rot.device, rot.id, "issued", f"serial {serial}, {len(pieces)} piece(s)", now)
        self.metrics.issued += 1
        log.info("[%s] rotation %d: certificate %s issued, %d B in %d piece(s) queued",
                 rot.device, rot.id, serial, len(der), len(pieces),
                 extra={"device_id": rot.device})
        return [(rot.device, UPSTREAM_KIND, {"event": "issued", "rotation": rot.id,
                                             "serial": serial})]

    def _revoke(self, conn: sqlite3.Connection, rot: rs.Rotation, now: float) -> bool:
        if self.pki is None:
            return False
        done: list[str] = []
        fresh = 0
        for serial in rot.revoke:
            try:
                fresh += len(self.pki.revoke(int(serial, 16)))
                done.append(serial)
            except GatewayError as exc:
                log.error("[%s] rotation %d: revoking %s failed (retried): %s", rot.device,
                          rot.id, serial, exc, extra={"device_id": rot.device})
        if len(done) == len(rot.revoke):
            rs.revocations_done(conn, rot.id, done, now)
            rs.event(conn, rot.device, rot.id, "revoked", ",".join(done), now)
            self.metrics.revoked += fresh
            log.info("[%s] rotation %d: revoked %s", rot.device, rot.id, ", ".join(done),
                     extra={"device_id": rot.device})
        return fresh > 0

    def sweep(self, conn: sqlite3.Connection, now: float | None = None) -> list[int]:
        """End rotations whose items the queue gave up on (failed, cancelled): a rotate_key
        or a piece that the node refused or never answered over its deliveries. The new
        certificate, if any, is revoked; the node, still waiting, gives up by itself
        (creds.MAX_REQUESTS). An item that only expired (its TTL passed while the node
        could not reach the broker, or did not wake) ends nothing: it is queued again with
        a fresh TTL, so that a node back from an outage finds its rotation where it left
        it. Returns the rotation ids ended."""
        now = self.clock() if now is None else now
        dead = (q.FAILED, q.CANCELLED)
        ended = []
        for state in (rs.REQUESTED, rs.ISSUED):
            for rot in rs.in_state(conn, state):
                ids = (rot.command_id,) if state == rs.REQUESTED else rot.pieces
                gone = []
                expired: list[q.Item] = []
                for cid in ids:
                    if cid is None:
                        continue
                    try:
                        it = q.get(conn, rot.device, cid)
                    except q.QueueError:
                        gone.append(f"{cid} missing")
                        continue
                    if it.status in dead:
                        gone.append(f"{it.what.split()[0]} {it.status}")
                    elif it.status == q.EXPIRED:
                        expired.append(it)
                if not gone:
                    if expired:
                        self._requeue(conn, rot, expired, now)
                    continue
                why = f"{gone[0]}: the node did not take it"
                self._cancel_items(conn, rot, now)
                rs.end(conn, rot.id, rs.FAILED, "", why,
                       [rot.new_serial] if rot.new_serial else [], now)
                rs.event(conn, rot.device, rot.id, rs.FAILED, why, now)
                self.metrics.failed += 1
                log.warning("[%s] rotation %d failed: %s", rot.device, rot.id, why,
                            extra={"device_id": rot.device})
                ended.append(rot.id)
        return ended

    def _requeue(self, conn: sqlite3.Connection, rot: rs.Rotation, items: Sequence[q.Item],
                 now: float) -> None:
        """The same commands again (same arguments and bytes: the node takes a repeat as
        the same step), with a fresh TTL, in place of those that expired."""
        swap: dict[int, int] = {}
        for it in items:
            assert it.op is not None
            swap[it.command_id] = q.enqueue_command(
                conn, rot.device, it.op, it.args, rs.ROTATE_PRIORITY, rs.ROTATE_TTL_S, it.data,
                now=now)
        if rot.state == rs.REQUESTED and rot.command_id in swap:
            rs.set_command(conn, rot.id, swap[rot.command_id], now)
        else:
            rs.set_pieces(conn, rot.id, [swap.get(c, c) for c in rot.pieces], now)
        what = ", ".join(f"{it.what.split()[0]} {it.command_id}" for it in items)
        rs.event(conn, rot.device, rot.id, "requeued", f"{what} expired: queued again", now)
        log.info("[%s] rotation %d: %s expired before the node took it; queued again",
                 rot.device, rot.id, what, extra={"device_id": rot.device})

    def start_due(self, conn: sqlite3.Connection, now: float | None = None) -> list[int]:
        """Start a rotation for every served device whose newest certificate expires within
        the lead time (device_rotate_lead_days) and that has none in progress; returns the
        rotation ids."""
        if self.pki is None or not self.cfg.rotate_devices:
            return []
        now = self.clock() if now is None else now
        status = self.pki.status()
        horizon = self.cfg.device_rotate_lead_days
        busy = rs.open_devices(conn)
        ended = rs.last_ended(conn)
        served = {d: s for d, s in registry.statuses(conn).items() if s in registry.SERVED}
        started = []
        for life in status.device_lifetimes:
            dev = life.subject
            if dev not in served or dev in busy or life.days_left > horizon:
                continue
            if now - ended.get(dev, 0.0) < RETRY_AFTER_S:
                continue
            try:
                rot = rs.request(conn, dev, "expiry", [life.serial], now=now)
            except GatewayError as exc:
                log.warning("[%s] rotation before expiry not started: %s", dev, exc,
                            extra={"device_id": dev})
                continue
            log.info("[%s] certificate %s expires in %.1f days: rotation %d started", dev,
                     life.serial, life.days_left, rot.id, extra={"device_id": dev})
            started.append(rot.id)
        return started
