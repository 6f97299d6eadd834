"""The operator's device groups (gateway.store.groups): what the edge rules' groups hold
beyond their id globs. Nothing here prints."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from gateway.config import GatewayConfig
from gateway.ops.actions import ActionError
from gateway.store import db, groups
from gateway.store import devices as registry


@dataclass(frozen=True, slots=True)
class Grouped:
    device: str
    group: str | None


def set_group(conn: sqlite3.Connection, device: str, name: str | None) -> Grouped:
    """Put `device` in group `name`, or in none (None)."""
    if registry.find(conn, device) is None:
        raise ActionError(f"no device {device!r}", "device")
    try:
        groups.set_group(conn, device, name)
    except groups.GroupError as exc:
        raise ActionError(str(exc), "group") from None
    return Grouped(device, name)


def group_of(conn: sqlite3.Connection, device: str) -> str | None:
    if registry.find(conn, device) is None:
        raise ActionError(f"no device {device!r}", "device")
    return groups.group_of(conn, device)


def assign(cfg: GatewayConfig, device: str, name: str | None) -> Grouped:
    """`torpor device group`: `set_group` on the configured gateway's database."""
    conn = db.open_db(cfg.db_path)
    try:
        return set_group(conn, device, name)
    finally:
        conn.close()


def show(cfg: GatewayConfig, device: str) -> str | None:
    conn = db.open_db(cfg.db_path)
    try:
        return group_of(conn, device)
    finally:
        conn.close()
