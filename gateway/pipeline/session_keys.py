"""TLS-PSK session keys for routine sends: issued, rotated and withdrawn by the gateway
(docs/session-keys.md).

The rule that keeps identity rooted in the certificate: an install_psk command is queued
for a device only while the broker holds no key for it, and only after the broker has
been reloaded without the old key and the device's live sessions cut. While the broker
holds no key for a device, no session can be opened as that device but with its
certificate; the command (and the key in it) can only reach a certificate-authenticated
session. The node stores the key and answers; only then does the key enter the broker's
psk_file.

The service runs one pass at a time (`plan`, then the broker, then `issue`):
- `plan` (a transaction): activates the keys the node confirmed, ends the rows of
  devices no longer served, notices failed deliveries, and withdraws keys that are due for
  renewal (their rows leave the broker's set). Returns the keys the broker must hold.
- the service writes them to the psk_file, reloads the broker and cuts the sessions of
  every device whose key went away (gateway.transport.broker.set_session_keys), then tells
  this module which devices the broker now holds keys for (`broker_applied`).
- `issue` (a transaction): a fresh key for every served device that has spoken to the
  gateway, has no key, holds none on the broker and has no certificate rotation open.

While a device's certificate is rotated, it holds no key either: the rotation's commands
and its certificate request then travel on certificate sessions only.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from gateway import proto
from gateway.config import PkiConfig
from gateway.store import db, rotations
from gateway.store import devices as registry
from gateway.store import downlink_queue as q
from gateway.store import session_keys as sk

log = logging.getLogger(__name__)

KEY_BYTES = 32
PRIORITY = 5  # above commands (queue.DEFAULT_PRIORITY = 4), below key rotation (6)
TTL_S = 7 * 86400.0  # undelivered by then: a fresh key is queued
UNSUPPORTED_RETRY_S = 86400.0  # firmware without install_psk is asked again a day later
KEY_ID_MAX = 2**31 - 1  # the install_psk argument's range in the spec


@dataclass(slots=True)
class Metrics:
    issued: int = 0
    activated: int = 0
    renewed: int = 0
    withdrawn: int = 0
    undelivered: int = 0
    replaced: int = 0  # the node said it holds another key (or none)
    by_device: dict[str, str] = field(default_factory=dict)


class SessionKeys:
    """See the module doc. `port`: the broker's PSK listener as the nodes reach it."""

    def __init__(self, port: int, cfg: PkiConfig | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.port = port
        self.cfg = cfg or PkiConfig()
        self.clock = clock
        self.metrics = Metrics()
        # Devices whose key the running broker holds (set by the service once applied):
        # nothing is issued to them.
        self.on_broker: frozenset[str] = frozenset()

    def broker_applied(self, devices: Iterable[str]) -> None:
        self.on_broker = frozenset(devices)

    # ------------------------------------------------------------ plan
    def plan(self, conn: sqlite3.Connection, now: float | None = None) -> dict[str, bytes]:
        """One transaction of bookkeeping (see the module doc); the keys the broker must hold."""
        now = self.clock() if now is None else now
        life = self.cfg.session_key_days * 86400.0
        lead = min(self.cfg.session_key_lead_days * 86400.0, life / 2)
        with db.transaction(conn):
            status = registry.statuses(conn)
            rotating = rotations.open_devices(conn)
            awake = {d.id for d in registry.list_devices(conn)
                     if d.awake_until is not None and d.awake_until > now}
            for row in sk.every(conn):
                served = status.get(row.device) in registry.SERVED
                if not served or row.device in rotating:
                    # A device no longer served loses its key; so does one whose certificate
                    # is being rotated, so that rotate_key, CSR_UP and install_cert travel
                    # on certificate sessions only (a new key follows the rotation).
                    sk.remove(conn, row.device)
                    self.metrics.withdrawn += 1
                    why = "a certificate rotation is under way" if served else \
                        f"the device is {status.get(row.device, 'gone')}"
                    log.info("[%s] session key withdrawn: %s", row.device, why,
                             extra={"device_id": row.device})
                    if row.state == sk.QUEUED and row.command_id is not None:
                        self._cancel(conn, row.device, row.command_id, now)
                elif row.state == sk.QUEUED:
                    self._delivery(conn, row, now, life)
                elif row.device in awake:
                    continue  # renewal and replacement cut sessions: not in a node's window
                elif row.state == sk.STALE or (row.state == sk.ACTIVE and row.expires_at is not None
                                               and now >= row.expires_at - lead):
                    # Renewal starts by taking the old key off the broker: the new one is
                    # queued only once no session can be opened with it (module doc).
                    sk.remove(conn, row.device)
                    self.metrics.renewed += 1
                    log.info("[%s] session key %d due for renewal: withdrawn, a new one "
                             "follows over the certificate", row.device, row.key_id,
                             extra={"device_id": row.device})
                elif row.state == sk.UNSUPPORTED and row.expires_at is not None \
                        and now >= row.expires_at:
                    sk.remove(conn, row.device)
            return sk.broker_keys(conn)

    def _delivery(self, conn: sqlite3.Connection, row: sk.SessionKey, now: float,
                  life: float) -> None:
        assert row.command_id is not None
        try:
            item = q.get(conn, row.device, row.command_id)
        except q.QueueError:
            sk.remove(conn, row.device)
            return
        if item.status == q.DONE:
            sk.activate(conn, row.device, now, now + life)
            self.metrics.activated += 1
            log.info("[%s] session key %d stored by the node: the broker takes it",
                     row.device, row.key_id, extra={"device_id": row.device})
        elif item.status not in q.ACTIVE:
            if item.result_status == proto.ResultStatus.UNKNOWN_OP.name.lower():
                sk.unsupported(conn, row.device, now + UNSUPPORTED_RETRY_S)
                log.info("[%s] the node's firmware has no session keys: certificate "
                         "sessions only", row.device, extra={"device_id": row.device})
            else:
                sk.remove(conn, row.device)  # a fresh key is queued on a later pass
                self.metrics.undelivered += 1
                log.warning("[%s] session key %d not installed (%s%s)", row.device, row.key_id,
                            item.status, f": {item.result_detail}" if item.result_detail else "",
                            extra={"device_id": row.device})

    def _cancel(self, conn: sqlite3.Connection, device: str, cid: int, now: float) -> None:
        try:
            if q.get(conn, device, cid).status in q.ACTIVE:
                q.cancel(conn, device, cid, now=now)
        except q.QueueError:
            pass

    # ------------------------------------------------------------ ingest hook
    def observe(self, conn: sqlite3.Connection, hellos: Sequence[tuple[str, proto.Hello]],
                now: float) -> None:
        """HELLOs, inside ingest's transaction: a device whose active key is not the one
        its node says it holds (it dropped a refused key, lost its flash, or the database
        was restored) has that key withdrawn; the next passes replace it over the
        certificate. Nothing is issued here: the broker may still hold the old key."""
        for device, hello in hellos:
            row = sk.get(conn, device)
            if row is None or row.state != sk.ACTIVE or hello.session_key == row.key_id:
                continue
            if row.active_at is not None and row.active_at >= now:
                continue
            # Withdrawn by `plan` once the node sleeps: the cut that goes with it would end
            # the session this HELLO came on.
            sk.stale(conn, device)
            self.metrics.replaced += 1
            log.info("[%s] the node holds session key %d, not %d: replaced over the "
                     "certificate once it sleeps", device, hello.session_key, row.key_id,
                     extra={"device_id": device})

    # ------------------------------------------------------------ issue
    def issue(self, conn: sqlite3.Connection, now: float | None = None) -> list[str]:
        """Queue a fresh key for every served device that has sent a HELLO, has no key and
        none on the broker; returns the devices."""
        now = self.clock() if now is None else now
        out = []
        with db.transaction(conn):
            have = {r.device for r in sk.every(conn)}
            rotating = rotations.open_devices(conn)
            for dev in registry.list_devices(conn):
                if (dev.status not in registry.SERVED or dev.last_hello_at is None
                        or dev.id in have or dev.id in self.on_broker or dev.id in rotating):
                    continue
                key = secrets.token_bytes(KEY_BYTES)
                kid = secrets.randbelow(KEY_ID_MAX) + 1
                try:
                    cid = q.enqueue_command(conn, dev.id, "install_psk", [kid, self.port],
                                            PRIORITY, TTL_S, key, now=now)
                except q.QueueError as exc:  # a full queue: asked again on a later pass
                    log.info("[%s] session key not queued: %s", dev.id, exc,
                             extra={"device_id": dev.id})
                    continue
                sk.queued(conn, dev.id, kid, key, cid, now)
                self.metrics.issued += 1
                log.info("[%s] session key %d queued (install_psk, command %d)", dev.id, kid,
                         cid, extra={"device_id": dev.id})
                out.append(dev.id)
        return out
