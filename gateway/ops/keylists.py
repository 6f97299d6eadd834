"""Operator actions on firmware signing keys: push a signed key list to nodes, and see
which list each node holds.

The list is signed on the build machine (`torpor fw keys add|retire`); the gateway never
holds a private key. It checks a list against the newest one it sent (signer trusted,
seq growing), refuses one that retires a key a node's running image or an update in flight
needs, and queues it per device as set_keys COMMAND pieces: a node that holds an older list
gets every list after it, in order, so each one is signed by a key the node trusts by then.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway import proto
from gateway.errors import GatewayError
from gateway.ops import ota as ota_ops
from gateway.security import keylist, manifest
from gateway.store import db, ota_store
from gateway.store import devices as registry
from gateway.store import downlink_queue as q
from gateway.store import keylists as store

KEYS_PRIORITY = 3  # before OTA items (1): an image's key list arrives before its manifest
KEYS_TTL_S = 30 * 86400.0
_PIECE_OVERHEAD = 64  # room in a set_keys COMMAND besides its data


class KeyListRefused(GatewayError):
    """A key list the gateway will not send; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Pushed:
    seq: int
    key_ids: tuple[str, ...]
    added: tuple[str, ...]
    retired: tuple[str, ...]
    queued: tuple[str, ...]  # devices the list was queued for
    holding: tuple[str, ...]  # devices that hold it (or a newer one) already
    failed: tuple[tuple[str, str], ...]  # (device, why) that could not be queued
    unknown_images: tuple[str, ...]  # devices running a version this gateway holds no image of


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """Which key list a device holds (its HELLO's keys_seq), and its last push."""

    device: str
    held: int
    held_keys: tuple[str, ...] | None  # None: a list this gateway never saw
    reported_at: float | None
    pushed: int
    outcome: str  # '', queued, sent, delivered, applied, refused, failed, expired
    detail: str

    def as_dict(self) -> dict[str, object]:
        return {"device": self.device, "keys_seq": self.held,
                "key_ids": list(self.held_keys) if self.held_keys is not None else None,
                "reported_at": self.reported_at, "pushed_seq": self.pushed,
                "push": self.outcome, "detail": self.detail}

    @property
    def line(self) -> str:
        keys = ",".join(self.held_keys) if self.held_keys is not None else "?"
        text = f"seq {self.held} ({'baked: ' if self.held == 0 else ''}{keys})"
        if self.pushed and self.outcome != "applied":
            text += f"; seq {self.pushed} {self.outcome}" + (f": {self.detail}" if self.detail else "")
        return text


def load_keys(paths: Sequence[Path]) -> dict[str, bytes]:
    """id -> raw key of public key files (.pub hex or PEM), or KeyListRefused."""
    out = {}
    for p in paths:
        try:
            raw = manifest.load_public(p)
        except manifest.KeyFileError as exc:
            raise KeyListRefused(str(exc)) from exc
        out[manifest.key_id(raw)] = raw
    return out


def current(conn: sqlite3.Connection) -> store.StoredList | None:
    """The newest list this gateway holds (seq 0: the baked set, as recorded)."""
    return store.latest(conn)


def _who_needs(conn: sqlite3.Connection, retired: set[str],
               local_images: Sequence[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(what needs a retired key, devices whose running image's key is unknown here)."""
    images, flying = ota_store.signing_keys(conn)
    by_version: dict[int, set[str]] = {}
    for version, _board, kid in images:
        by_version.setdefault(version, set()).add(kid)
    needs: list[str] = []
    unknown: list[str] = []
    for dev in registry.list_devices(conn):
        if dev.status in (registry.REVOKED, registry.DECOMMISSIONED) or dev.fw_version is None:
            continue
        kids = by_version.get(dev.fw_version)
        if kids is None:
            unknown.append(dev.id)
        elif kids & retired:
            needs.append(f"{dev.id} runs v{dev.fw_version}, signed by {','.join(sorted(kids & retired))}")
    for device, version, kid in flying:
        if kid in retired:
            needs.append(f"{device} is being updated to v{version}, signed by {kid}")
    for label, kid in local_images:
        if kid in retired:
            needs.append(f"image {label} is signed by {kid}")
    return needs, unknown


def _pieces(blob: bytes, limits: proto.ClassLimits) -> list[tuple[int, bytes]]:
    size = max(32, min(q.MAX_DATA, limits.max_message - _PIECE_OVERHEAD))
    return [(off, blob[off:off + size]) for off in range(0, len(blob), size)]


def push(conn: sqlite3.Connection, blob: bytes, *, group: str | None = None,
         devices: str | None = None, baked: Mapping[str, bytes] | None = None,
         local_images: Sequence[tuple[str, str]] = (), now: float | None = None) -> Pushed:
    """Check a signed list (JSON + signature) and queue it, with the lists before it that a
    device lacks, for `devices` (a,b,c) or a `group` (`all`, a class, a pattern).

    baked: the keys provisioned nodes were baked with, recorded as seq 0 when this gateway
    holds no list yet (the first list must be signed by one of them)."""
    now = time.time() if now is None else now
    try:
        kl, data, sig = keylist.split(blob)
    except keylist.KeyListError as exc:
        raise KeyListRefused(str(exc)) from exc
    with db.atomic(conn):
        prev = store.latest(conn)
        if prev is None:
            if not baked:
                raise KeyListRefused(
                    "this gateway holds no key list yet: name the keys the nodes were "
                    "provisioned with (their fleet_keys), the first list must be signed by one")
            store.add_list(conn, 0, "", dict(baked), b"", b"", now)
            prev = store.latest(conn)
            assert prev is not None
        if kl.seq == prev.seq and data == prev.data:
            added: tuple[str, ...] = ()
            retired: tuple[str, ...] = ()
        elif kl.seq <= prev.seq:
            raise KeyListRefused(f"key list seq {kl.seq} is not above seq {prev.seq}, the newest "
                                 "this gateway sent: make the list from the gateway's newest")
        else:
            try:
                keylist.verify(data, sig, prev.keys)
            except keylist.KeyListError as exc:
                raise KeyListRefused(f"{exc} (by list seq {prev.seq})") from exc
            added = tuple(sorted(set(kl.keys) - set(prev.keys)))
            retired = tuple(sorted(set(prev.keys) - set(kl.keys)))
        needs, unknown = _who_needs(conn, set(retired), local_images) if retired else ([], [])
        if needs:
            more = f" (and {len(needs) - 5} more)" if len(needs) > 5 else ""
            raise KeyListRefused(
                f"retiring {', '.join(retired)} is refused: " + "; ".join(needs[:5]) + more
                + ". Ship an image signed by a key the list keeps first.")
        targets = ota_ops.select_devices(conn, group, devices)
        store.add_list(conn, kl.seq, kl.signer, kl.keys, data, sig, now)
        chain = [lst for lst in store.lists(conn) if lst.seq > 0]
        queued: list[str] = []
        holding: list[str] = []
        failed: list[tuple[str, str]] = []
        for dev in targets:
            try:
                with db.savepoint(conn, "keys_push"):
                    if _push_one(conn, dev, kl.seq, chain, now):
                        queued.append(dev)
                    else:
                        holding.append(dev)
            except GatewayError as exc:
                failed.append((dev, str(exc)))
    return Pushed(kl.seq, kl.key_ids, added, retired, tuple(queued), tuple(holding),
                  tuple(failed), tuple(unknown))


def _push_one(conn: sqlite3.Connection, dev: str, seq: int, chain: Sequence[store.StoredList],
              now: float) -> bool:
    node = store.node(conn, dev)
    if node.held >= seq:
        return False
    limits = ota_store.limits_of(conn, dev)  # an unknown device raises here
    for _s, cid in node.items:  # an earlier push, superseded by this one
        try:
            if q.get(conn, dev, cid).status in q.ACTIVE:
                q.cancel(conn, dev, cid, now=now)
        except q.QueueError:
            pass
    items: list[tuple[int, int]] = []
    for lst in chain:
        if node.held < lst.seq <= seq:
            blob = lst.blob
            for off, piece in _pieces(blob, limits):
                cid = q.enqueue_command(conn, dev, proto.CommandOp.SET_KEYS, [lst.seq, off, len(blob)],
                                        KEYS_PRIORITY, KEYS_TTL_S, piece, now=now)
                items.append((lst.seq, cid))
    store.pushed(conn, dev, seq, items, now)
    return True


def _outcome(conn: sqlite3.Connection, node: store.NodeKeys) -> tuple[str, str]:
    if not node.pushed:
        return "", ""
    if node.held >= node.pushed:
        return "applied", ""
    states = []
    for s, cid in node.items:
        try:
            it = q.get(conn, node.device, cid)
        except q.QueueError:
            return "expired", f"list {s}: its queue items are gone"
        if it.status == q.FAILED:
            what = "refused" if it.result_status == "refused" else "failed"
            return what, f"list {s}: {it.result_detail or it.result_status or 'no answer'}"
        if it.status in (q.EXPIRED, q.CANCELLED):
            return "expired", f"list {s}: {it.status}"
        states.append(it.status)
    if all(st == q.DONE for st in states):
        return "delivered", "waiting for a HELLO with its seq"
    return ("sent" if q.SENT in states else "queued"), ""


def node_status(conn: sqlite3.Connection, device: str,
                lists: Mapping[int, store.StoredList] | None = None) -> NodeStatus:
    if lists is None:
        lists = {lst.seq: lst for lst in store.lists(conn)}
    node = store.node(conn, device)
    held = lists.get(node.held)
    outcome, detail = _outcome(conn, node)
    return NodeStatus(device, node.held, held.key_ids if held else None, node.reported_at,
                      node.pushed, outcome, detail)


def fleet_status(conn: sqlite3.Connection) -> list[NodeStatus]:
    """Every device in service, by id."""
    lists = {lst.seq: lst for lst in store.lists(conn)}
    return [node_status(conn, dev, lists) for dev, _cls in registry.in_service(conn)]


def check_campaign(conn: sqlite3.Connection, key_id: str, devices: Sequence[str]) -> None:
    """OtaError naming the devices whose key list (as they last reported it) lacks `key_id`:
    their bootloader would refuse the image (unknown_key). Devices whose list this gateway
    never saw are let through: the node checks anyway."""
    lists = {lst.seq: lst for lst in store.lists(conn)}
    if not lists:
        return
    lacking = []
    for dev in devices:
        node = store.node(conn, dev)
        lst = lists.get(node.held)
        if lst is not None and key_id not in lst.keys:
            lacking.append(f"{dev} (seq {node.held}: {','.join(lst.key_ids)})")
    if lacking:
        more = f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""
        raise ota_store.OtaError(
            f"the image is signed by key {key_id}, which the key list of "
            f"{', '.join(lacking[:5])}{more} lacks: push a list that adds it (`torpor fw keys "
            "add`) and start the campaign once the nodes report it (`torpor ota status`)")
