"""The gateway's health, its upstream outbox and its dead letters, for the operator."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from gateway.store import deadletter
from gateway.store import status as status_store
from gateway.store.outbox import Outbox


@dataclass(frozen=True, slots=True)
class OutboxHealth:
    depth: int
    oldest_age_s: float | None
    enqueued: int
    delivered: int
    dropped_full: int
    dropped_age: int
    upstream_connected: bool | None  # None: the relay is not running

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class Health:
    status: status_store.Status
    outbox: OutboxHealth
    dead_letters: int
    dead_letter_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {"gateway": self.status.as_dict(), "outbox": self.outbox.as_dict(),
                "dead_letters": self.dead_letters, "dead_letter_bytes": self.dead_letter_bytes}


def status(conn: sqlite3.Connection, now: float | None = None) -> status_store.Status:
    """The gateway's state from the database alone (works while it runs or not)."""
    return status_store.read_status(conn, now)


def health(conn: sqlite3.Connection, now: float | None = None) -> Health:
    now = time.time() if now is None else now
    st = status_store.read_status(conn, now)
    box = Outbox(conn)
    oldest = box.oldest()
    c = box.counters()
    relay = st.detail.get("relay_connected") if st.running else None
    rows, size = deadletter.totals(conn)
    return Health(
        status=st,
        outbox=OutboxHealth(box.depth(), None if oldest is None else max(0.0, now - oldest),
                            c.enqueued, c.delivered, c.dropped_full, c.dropped_age,
                            None if relay is None else bool(relay)),
        dead_letters=rows, dead_letter_bytes=size,
    )


@dataclass(frozen=True, slots=True)
class DeadLetters:
    letters: tuple[deadletter.DeadLetter, ...]
    refused: tuple[deadletter.Count, ...]
    total: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "letters": [{"id": d.id, "device": d.device, "at": d.at, "reason": d.reason,
                         "detail": d.detail, "raw_hex": d.raw.hex(), "raw_len": d.raw_len,
                         "truncated": d.truncated} for d in self.letters],
            "refused": [{n: getattr(c, n) for n in c.__slots__} for c in self.refused],
        }


def dead_letters(conn: sqlite3.Connection, device: str | None = None,
                 limit: int = 100) -> DeadLetters:
    return DeadLetters(tuple(deadletter.list_recent(conn, device, limit)),
                       tuple(deadletter.refused(conn, device)), deadletter.count(conn, device))
