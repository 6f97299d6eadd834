"""Downlink to sleeping nodes for the operator: queue a command or configuration, cancel
an item, and what is queued and when each node next listens, as data."""

from __future__ import annotations

import sqlite3
from typing import Any

from gateway import proto
from gateway.store import devices, rotations
from gateway.store import downlink_queue as q
from gateway.store import wakes as wake_store

QueueError, BadArguments = q.QueueError, q.BadArguments
OPS, CONFIG_KEYS = q.OPS, q.CONFIG_KEYS
DEFAULT_PRIORITY, DEFAULT_TTL_S = q.DEFAULT_PRIORITY, q.DEFAULT_TTL_S
parse_key = q.parse_key
# The CLI checks an op before it parses the op's arguments.
refuse_own_op = rotations.refuse_own_op


def send(conn: sqlite3.Connection, device: str, op: str, args: list[int], priority: int,
         ttl_s: float | None, data: bytes = b"") -> tuple[int, str]:
    """Queue a command; (its id, what it does in words). The commands a key rotation
    sends are its own (`torpor device rotate`) and refused here."""
    refuse_own_op(op)
    cid = q.enqueue_command(conn, device, op, args, priority, ttl_s, data)
    return cid, q.get(conn, device, cid).what


def configure(conn: sqlite3.Connection, device: str,
              values: dict[str | int | proto.ConfigKey, int], priority: int,
              ttl_s: float | None) -> int:
    """Desired configuration values; the configuration version that carries them."""
    return q.set_config(conn, device, values, priority, ttl_s)


def cancel(conn: sqlite3.Connection, device: str, command_id: int) -> q.Item:
    return q.cancel(conn, device, command_id)


def next_listen(conn: sqlite3.Connection, device: str) -> tuple[float, float] | None:
    """(from, until) of the node's next expected listening window: its last HELLO plus the
    next_wake_s it announced, for awake_window_ms."""
    st = wake_store.wake_stats(conn, device)
    if st is not None and st.listen_window is not None:
        return st.listen_window
    announced = devices.announced_wake(conn, device)
    if announced is None:
        return None
    at, window_ms = announced
    return at, at + window_ms / 1000.0


def gather(conn: sqlite3.Connection, device: str) -> dict[str, Any]:
    """The downlink part of `device show`, as data."""
    st = wake_store.wake_stats(conn, device)
    w = next_listen(conn, device)
    return {
        "pending": [i.as_dict() for i in q.pending(conn, device)],
        "recent": [i.as_dict() for i in q.history(conn, device, limit=5)
                   if i.status not in q.ACTIVE],
        "config": [{name: getattr(c, name) for name in c.__slots__}
                   for c in q.config_state(conn, device)],
        "wakes": st.as_dict() if st is not None else None,
        "next_listen_at": w[0] if w else None,
        "next_listen_until": w[1] if w else None,
    }


def pending(conn: sqlite3.Connection) -> list[tuple[str, int, tuple[float, float] | None]]:
    """(device, items pending, next listening window) of every device with queued items."""
    counts = q.pending_counts(conn)
    return [(d, n, next_listen(conn, d)) for d, n in sorted(counts.items())]
