"""The alerts the edge rules raised (gateway.pipeline.rules), for the page and the API, and
the operator's clearing of one. Nothing here prints."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from gateway.config import GatewayConfig
from gateway.store import alerts, db
from gateway.store.alerts import Alert

STATES = ("open", "cleared")


class AlertNotFound(LookupError):
    """No open alert with that id (the message says which)."""


@dataclass(frozen=True, slots=True)
class AlertsPage:
    alerts: tuple[Alert, ...]
    total: int  # alerts matching the filter
    open: int  # open alerts in all
    offset: int
    limit: int

    def as_dict(self) -> dict[str, Any]:
        return {"alerts": [a.as_dict() for a in self.alerts], "total": self.total,
                "open": self.open, "offset": self.offset, "limit": self.limit}


def alerts_page(conn: sqlite3.Connection, *, state: str | None = None, device: str | None = None,
                rule: str | None = None, offset: int = 0, limit: int = 50) -> AlertsPage:
    """Alerts newest first, filtered by state (open, cleared), device and rule."""
    rows, total = alerts.page(conn, state=state, device=device, rule=rule, offset=offset,
                              limit=limit)
    return AlertsPage(tuple(rows), total, alerts.count_open(conn), offset, limit)


def clear(conn: sqlite3.Connection, alert_id: int, *, now: float | None = None) -> Alert:
    """Clear an open alert by hand (an aborted campaign dealt with, say)."""
    with_now = time.time() if now is None else now
    a = alerts.operator_clear(conn, alert_id, now=with_now)
    if a is None:
        raise AlertNotFound(f"no open alert {alert_id}")
    return a


def open_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """device id -> open alerts, for the fleet page."""
    return alerts.open_devices(conn)


def list_alerts(cfg: GatewayConfig, *, state: str | None = "open", device: str | None = None,
                limit: int = 50) -> AlertsPage:
    """`torpor gateway alerts`: `alerts_page` on the configured gateway's database."""
    conn = db.open_db(cfg.db_path)
    try:
        return alerts_page(conn, state=state, device=device, limit=limit)
    finally:
        conn.close()
