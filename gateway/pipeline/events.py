"""Events for upstream: a change of a device or a credential, formatted like the
pipeline's readings and queued in the outbox inside the caller's transaction.

Raised by ingest (hello, quarantined), by operator actions (released, revoked) and by
credential renewals, so it is the one pipeline module ops and security may use.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from typing import Any

from gateway.config import UpstreamConfig
from gateway.pipeline import formats
from gateway.store import outbox
from gateway.store.outbox import Queued


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
    return outbox.enqueue_queued(conn, [
        formats.event_item(device, kind, fields, topic_template=upstream.topic_events,
                           fmt=upstream.format, created=now)
        for device, kind, fields in events
    ])
