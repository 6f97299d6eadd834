"""Credential lifetimes: what the gateway renews on its own, and the events it raises.

Raises every expiry warning (30, 7 and 1 days before a credential lapses, each once per
credential, so a restart does not repeat one) and records every renewal the gateway made
or failed to make, in `credential_events` (gateway.store.events). `torpor gateway status` and the status page
read it; each event also goes upstream like a device event.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.config import PkiConfig, UpstreamConfig
from gateway.errors import GatewayError
from gateway.pipeline.events import queue_events
from gateway.security.pki import BACKDATE, Lifetime, Pki, PkiStatus
from gateway.store import db
from gateway.store import events as events_store
from gateway.store.events import CredentialEvent
from gateway.store.outbox import Queued

log = logging.getLogger(__name__)

# Days before the end of a credential's validity at which an `expiring` event is raised.
THRESHOLDS_DAYS = (30, 7, 1)
EVENT_KINDS = ("expiring", "renewed", "renewal_failed")
# The upstream event kind (formats.event_item): one kind, the fields say which credential.
UPSTREAM_KIND = "credential"
BACKDATE_SLACK_DAYS = 1 / 24
# A renewal that keeps failing (no key) is told once a day, not at every check.
FAILED_REPEAT_S = 86400.0


def crossed(lifetime: Lifetime) -> int | None:
    """The tightest threshold a credential has reached, or None. A threshold counts only
    for a credential that lived longer than it: a 30-day CRL the gateway renews every 15
    days is not "30 days from expiry" the moment it is issued, but a CRL whose renewal
    keeps failing reaches 7 and 1."""
    reached = [t for t in THRESHOLDS_DAYS if lifetime.days_left <= t and _applies(lifetime, t)]
    return min(reached) if reached else None


def _applies(lifetime: Lifetime, threshold: int) -> bool:
    # Validity starts backdated (pki.BACKDATE): a 30-day CRL lives 30 days and minutes.
    whole = lifetime.life_days
    return whole is None or whole > threshold + BACKDATE_SLACK_DAYS


def watched(status: PkiStatus) -> list[Lifetime]:
    """Every credential whose expiry raises events: the gateway's own and every device's
    current certificate."""
    return [*status.credentials, *status.device_lifetimes]


# --- renewal: which credential is due, as a table -----------------------------------------

def _crl_due(life: Lifetime, cfg: PkiConfig) -> bool:
    if life.not_before is None:
        return True
    issued = life.not_before + BACKDATE  # lastUpdate is backdated like certificates
    return life.now >= issued + (life.not_after - issued) * cfg.crl_renew_at


# (credential name, is it due, how to renew it). The root's CRL, the root and the issuing CA
# need the offline root key: they only raise events.
RENEWALS: tuple[tuple[str, Callable[[Lifetime, PkiConfig], bool],
                      Callable[[Pki, PkiConfig], object]], ...] = (
    ("crl", _crl_due, lambda pki, cfg: pki.write_crl(days=cfg.crl_days)),
    ("server", lambda life, cfg: life.days_left <= cfg.server_lead_days,
     lambda pki, cfg: pki.renew_server(days=cfg.server_days)),
    ("gateway", lambda life, cfg: life.days_left <= cfg.gateway_lead_days,
     lambda pki, cfg: pki.renew_gateway(days=cfg.gateway_days)),
    ("control", lambda life, cfg: life.days_left <= cfg.gateway_lead_days,
     lambda pki, cfg: pki.renew_gateway(days=cfg.gateway_days)),
)


@dataclass(frozen=True, slots=True)
class RenewalReport:
    renewed: tuple[Lifetime, ...]  # the credential as it was before renewal
    failed: tuple[tuple[Lifetime, str], ...]

    @property
    def broker_files_changed(self) -> bool:
        """The broker reads the CRL and its server pair: it must reload."""
        return any(life.name in ("crl", "server") for life in self.renewed)


def renew_due(pki: Pki, cfg: PkiConfig, now: dt.datetime | None = None) -> RenewalReport:
    """Renew what is due (file work: run it off the event loop). A failure (no key) is
    reported, never raised: the expiry events keep warning."""
    status = pki.status(now)
    renewed: list[Lifetime] = []
    failed: list[tuple[Lifetime, str]] = []
    done: set[int] = set()
    by_name = {life.name: life for life in status.credentials}
    for name, due, renew in RENEWALS:
        life = by_name.get(name)
        if life is None or not due(life, cfg) or id(renew) in done:
            continue
        try:
            renew(pki, cfg)
        except (GatewayError, OSError, ValueError) as exc:
            log.warning("could not renew the %s credential (%s): %s", name, life.subject, exc)
            failed.append((life, str(exc)))
            continue
        # gateway and control renew together
        if name in ("gateway", "control"):
            done.add(id(renew))
            renewed += [by_name[n] for n in ("gateway", "control") if n in by_name]
        else:
            renewed.append(life)
        log.info("renewed the %s credential (%s), it had %.1f days left", name, life.subject,
                 life.days_left)
    return RenewalReport(tuple(renewed), tuple(failed))


# --- events -------------------------------------------------------------------------------

def record(
    conn: sqlite3.Connection,
    status: PkiStatus,
    report: RenewalReport | None = None,
    *,
    upstream: UpstreamConfig | None = None,
    gateway_id: str = "torpor-gateway",
    now: float,
) -> tuple[list[CredentialEvent], list[Queued]]:
    """Store the renewals of `report` and every expiry threshold newly reached in `status`,
    and queue each upstream, in one transaction. An event for a device goes out under the
    device's id; for the gateway's own credentials under `gateway_id`."""
    events: list[CredentialEvent] = []
    renewed = {life.key for life in report.renewed} if report is not None else set()
    with db.transaction(conn):
        if report is not None:
            events += [_event("renewed", life, None, now) for life in report.renewed]
            for life, why in report.failed:
                if not events_store.failed_lately(conn, life.key, now - FAILED_REPEAT_S):
                    events.append(_event("renewal_failed", life, None, now, why))
        fresh: list[CredentialEvent] = []
        for life in watched(status):
            threshold = crossed(life)
            if threshold is None or life.key in renewed:
                continue
            # Every threshold reached is marked, the tightest is told: a gateway that was
            # off for weeks says "1 day left" once, not three times.
            told = False
            for t in sorted(t for t in THRESHOLDS_DAYS if t >= threshold and _applies(life, t)):
                ev = _event("expiring", life, t, now)
                if events_store.add_once(conn, ev, now) and not told:
                    fresh.append(ev)
                    told = True
        events_store.add(conn, events, now)
        events = [*events, *fresh]
        if events:
            events_store.trim(conn)
        queued: list[Queued] = []
        if events and upstream is not None and upstream.enabled:
            queued = queue_events(conn, upstream, [
                (ev.subject if ev.name == "device" else gateway_id, UPSTREAM_KIND,
                 {k: v for k, v in ev.as_dict().items() if k != "at"})
                for ev in events
            ], now)
    for ev in events:
        if ev.kind == "expiring":
            log.warning("the %s credential %s expires in %.1f days (%s UTC)", ev.name,
                        ev.subject, ev.days_left, ev.not_after,
                        extra={"device_id": ev.subject} if ev.name == "device" else None)
    return events, queued


def _event(kind: str, life: Lifetime, threshold: int | None, at: float,
           detail: str = "") -> CredentialEvent:
    return CredentialEvent(kind=kind, credential=life.key, name=life.name, subject=life.subject,
                           not_after=life.not_after.isoformat(), threshold_days=threshold,
                           days_left=round(life.days_left, 3), detail=detail, at=at)


def recent(conn: sqlite3.Connection, limit: int = 20) -> list[CredentialEvent]:
    """The newest events first (an empty list before the gateway first ran)."""
    return events_store.recent(conn, limit)


def summary(status: PkiStatus) -> dict[str, Any]:
    """Days left per credential, for the status row."""
    out: dict[str, Any] = {life.name: round(life.days_left, 2) for life in status.credentials}
    out["devices_expiring"] = status.devices_expiring
    if status.devices:
        out["device_soonest"] = round(status.devices[0].days_left, 2)
    return out


__all__: Sequence[str] = (
    "THRESHOLDS_DAYS", "CredentialEvent", "RenewalReport", "crossed", "recent",
    "record", "renew_due", "summary",
)
