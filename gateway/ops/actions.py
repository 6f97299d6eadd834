"""Operator actions on devices: queue a command, cancel an item, release a quarantine, rotate
a key over the air.

Commands are checked by the same code as `torpor device command` (gateway.store.downlink_queue), so
the web page and the CLI refuse the same things with the same messages."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway import proto
from gateway.errors import GatewayError
from gateway.store import db, rotations
from gateway.store import devices as registry
from gateway.store import downlink_queue as q
from gateway.store.rotations import RotationError, refuse_own_op


class ActionError(GatewayError):
    """An action was refused; `field` names the input at fault, when one is."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class Queued:
    device: str
    command_id: int
    what: str


def queue_command(conn: sqlite3.Connection, device: str, op: str, args: Sequence[int] = (),
                  *, priority: int = q.DEFAULT_PRIORITY,
                  ttl_s: float | None = q.DEFAULT_TTL_S) -> Queued:
    if registry.find(conn, device) is None:
        raise ActionError(f"no device {device!r}", "device")
    try:
        cop = q.parse_op(op)
        refuse_own_op(cop)
    except (q.QueueError, RotationError) as exc:
        raise ActionError(str(exc), "op") from None
    try:
        checked = q.check_args(cop, args)
    except q.QueueError as exc:
        raise ActionError(str(exc), "args") from None
    try:
        cid = q.enqueue_command(conn, device, cop, checked, priority, ttl_s)
    except q.QueueError as exc:
        raise ActionError(str(exc), exc.field) from None
    return Queued(device, cid, q.get(conn, device, cid).what)


@dataclass(frozen=True, slots=True)
class ConfigSet:
    device: str
    version: int
    values: dict[str, int]


def set_config(conn: sqlite3.Connection, device: str, values: Mapping[str, object],
               *, priority: int = q.DEFAULT_PRIORITY) -> ConfigSet:
    """Desired configuration values (checked as `torpor device config` checks them)."""
    if registry.find(conn, device) is None:
        raise ActionError(f"no device {device!r}", "device")
    if not values:
        raise ActionError("values: no configuration values given", "values")
    checked: dict[str, int] = {}
    for key, value in values.items():
        try:
            name = q.parse_key(key).name.lower()
        except q.QueueError as exc:
            raise ActionError(str(exc), f"values.{key}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ActionError(f"values.{key}: expected an integer, got {value!r}", f"values.{key}")
        checked[name] = value
    try:
        wanted: dict[str | int | proto.ConfigKey, int] = {k: v for k, v in checked.items()}
        version = q.set_config(conn, device, wanted, priority)
    except q.QueueError as exc:
        raise ActionError(str(exc), "values") from None
    return ConfigSet(device, version, checked)


def cancel(conn: sqlite3.Connection, device: str, command_id: int) -> q.Item:
    try:
        return q.cancel(conn, device, command_id)
    except q.QueueError as exc:
        raise ActionError(str(exc), "command_id") from None


def release(conn: sqlite3.Connection, device: str) -> registry.Device:
    try:
        return registry.release(conn, device)
    except registry.RegistryError as exc:
        raise ActionError(str(exc), "device") from None


def rotate_key(conn: sqlite3.Connection, pki_dir: Path, device: str) -> rotations.Rotation:
    """Start a key rotation of `device` over the air (its own transaction): the node makes
    the key at its next wake; the certificates valid now are revoked once it uses the new one."""
    from gateway.security.pki import Pki

    try:
        old = [r.serial_hex for r in Pki(pki_dir).device_records(device, include_revoked=False)]
        with db.transaction(conn):
            return rotations.request(conn, device, "operator", old)
    except registry.RegistryError as exc:
        raise ActionError(str(exc), "device") from None
    except rotations.RotationError as exc:
        raise ActionError(str(exc), "device") from None
