"""Owns the `ota_*` tables: signed images, staged campaigns and each device's update,
with the rollout that widens as devices confirm.

The gateway stores signed images (built and signed elsewhere: it holds no private key),
cuts each into chunks that fit the device class's max_message, and queues OTA_MANIFEST
then a window of OTA_CHUNK frames per device in the downlink queue at a priority below
commands; the downlink planner sends what fits each wake. What the node reports in its
wake moves its update on (gateway.pipeline.ota_delivery); importing an image checks it
first (gateway.ops.ota). docs/ota.md tells the whole story.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sqlite3
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from gateway import proto
from gateway.errors import GatewayError
from gateway.store import db
from gateway.store import devices as registry
from gateway.store import downlink_queue as q

log = logging.getLogger(__name__)

STORE = "ota"
OTA_PRIORITY = 1  # below commands and configuration (queue.DEFAULT_PRIORITY = 4)
WINDOW = 8  # chunk items kept queued per device (never more than a quarter of max_downlink)

# Device states. Terminal ones end the device's part in its campaign.
PENDING, QUEUED, DOWNLOADING, VERIFYING, TRIAL = "pending", "queued", "downloading", "verifying", "trial"
CONFIRMED, REVERTED, FAILED, REFUSED = "confirmed", "reverted", "failed", "refused"
TIMED_OUT, CANCELLED = "timed_out", "cancelled"
IN_FLIGHT = (QUEUED, DOWNLOADING, VERIFYING, TRIAL)
BAD = (REVERTED, FAILED, REFUSED, TIMED_OUT)
TERMINAL = (CONFIRMED, *BAD, CANCELLED)
# Campaign states.
RUNNING, COMPLETED, ABORTED = "running", "completed", "aborted"

_STEPS = (
    """
    CREATE TABLE ota_images (
        id INTEGER PRIMARY KEY,
        version INTEGER NOT NULL,
        board TEXT NOT NULL,
        display TEXT NOT NULL,
        key_id TEXT NOT NULL,
        manifest BLOB NOT NULL,
        signature BLOB NOT NULL,
        stream BLOB NOT NULL,
        sha256 TEXT NOT NULL UNIQUE,
        source TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE ota_campaigns (
        id INTEGER PRIMARY KEY,
        image_id INTEGER NOT NULL REFERENCES ota_images(id),
        status TEXT NOT NULL,
        rate INTEGER NOT NULL,
        rate_percent INTEGER NOT NULL,
        abort_threshold REAL NOT NULL,
        timeout_s REAL NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        finished_at REAL,
        note TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE ota_devices (
        campaign INTEGER NOT NULL REFERENCES ota_campaigns(id),
        device TEXT NOT NULL,
        image_id INTEGER NOT NULL REFERENCES ota_images(id),
        seq INTEGER NOT NULL,
        status TEXT NOT NULL,
        chunk_size INTEGER NOT NULL DEFAULT 0,
        prefix INTEGER NOT NULL DEFAULT 0,
        chunks INTEGER NOT NULL DEFAULT 0,
        progress INTEGER NOT NULL DEFAULT 0,
        reason TEXT NOT NULL DEFAULT '',
        detail TEXT NOT NULL DEFAULT '',
        started_at REAL,
        updated_at REAL NOT NULL,
        finished_at REAL,
        PRIMARY KEY (campaign, device)
    ) WITHOUT ROWID;
    CREATE INDEX ota_devices_device ON ota_devices(device, status);
    """,
)


class OtaError(GatewayError):
    """An OTA operation was refused; the message says why."""


def migrate(conn: sqlite3.Connection) -> None:
    db.apply(conn, STORE, _STEPS)


@dataclass(frozen=True, slots=True)
class Image:
    id: int
    version: int
    board: str
    display: str
    key_id: str
    manifest: bytes
    signature: bytes
    stream: bytes
    sha256: str


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    device: str
    version: int
    status: str
    progress: int
    chunks: int
    reason: str
    detail: str
    started_at: float | None
    updated_at: float
    finished_at: float | None


@dataclass(frozen=True, slots=True)
class Campaign:
    id: int
    image_id: int
    version: int
    status: str
    rate: int
    rate_percent: bool
    abort_threshold: float
    timeout_s: float
    created_at: float
    updated_at: float
    finished_at: float | None
    note: str
    devices: tuple[DeviceStatus, ...]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.devices:
            out[d.status] = out.get(d.status, 0) + 1
        return out

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {n: getattr(self, n) for n in self.__slots__ if n != "devices"}
        d["counts"] = self.counts()
        d["devices"] = [{n: getattr(x, n) for n in x.__slots__} for x in self.devices]
        return d


# ---------------------------------------------------------------- images
def add_image(conn: sqlite3.Connection, *, version: int, board: str, display: str,
              key_id: str, manifest: bytes, signature: bytes, stream: bytes, source: str,
              now: float) -> Image:
    """Store a verified image (see gateway.ops.ota.import_image); the same image twice is
    stored once."""
    digest = hashlib.sha256(manifest + signature).hexdigest()
    row = conn.execute("SELECT id FROM ota_images WHERE sha256=?", (digest,)).fetchone()
    if row is None:
        with db.atomic(conn):
            cur = conn.execute(
                "INSERT INTO ota_images(version, board, display, key_id, manifest, signature, "
                "stream, sha256, source, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (version, board, display, key_id, manifest, signature, stream, digest,
                 source, now))
            image_id = int(cur.lastrowid or 0)
    else:
        image_id = int(row[0])
    return get_image(conn, image_id)


def get_image(conn: sqlite3.Connection, image_id: int) -> Image:
    row = conn.execute(
        "SELECT id, version, board, display, key_id, manifest, signature, stream, sha256 "
        "FROM ota_images WHERE id=?", (image_id,)).fetchone()
    if row is None:
        raise OtaError(f"no image {image_id}")
    return Image(int(row[0]), int(row[1]), row[2], row[3], row[4], bytes(row[5]), bytes(row[6]),
                 bytes(row[7]), row[8])


# ---------------------------------------------------------------- framing
def chunk_size_for(limits: proto.ClassLimits) -> int:
    """The biggest chunk (a multiple of 16) whose OTA_CHUNK frame fits max_message."""
    top = proto.MSG_ID_MAX
    empty = len(proto.encode_ota_chunk(proto.OtaChunk(top, top, 0xFFFF, b"")))
    room = min(limits.max_message - empty - 4, proto.OTA_CHUNK_DATA_MAX)  # 4: the length may grow
    return max(64, room // 16 * 16)


@dataclass(frozen=True, slots=True)
class Plan:
    """How one image travels to one device class: inline manifest or a stream prefix."""

    chunk_size: int
    inline: bool
    prefix: bytes  # u16 length + manifest at the head of the stream when not inline

    def prefix_chunks(self) -> int:
        return math.ceil(len(self.prefix) / self.chunk_size) if self.prefix else 0

    def total(self, img: Image) -> int:
        return self.prefix_chunks() + math.ceil(len(img.stream) / self.chunk_size)

    def chunk(self, img: Image, index: int) -> bytes:
        cs = self.chunk_size
        p = self.prefix_chunks()
        if index < p:
            return self.prefix[index * cs:(index + 1) * cs]
        i = index - p
        return img.stream[i * cs:(i + 1) * cs]


def wire_plan(img: Image, limits: proto.ClassLimits) -> Plan:
    cs = chunk_size_for(limits)
    frame = proto.encode_ota_manifest(proto.OtaManifest(
        proto.MSG_ID_MAX, img.version, len(img.stream), cs, img.manifest, img.signature))
    if len(frame) <= limits.max_message:
        return Plan(cs, True, b"")
    # The manifest does not fit one frame of this class: it leads the chunk stream.
    return Plan(cs, False, struct.pack("<H", len(img.manifest)) + img.manifest)


def _manifest_frame(img: Image, plan: Plan) -> bytes:
    return proto.encode_ota_manifest(proto.OtaManifest(
        img.version & 0xFFFFFFFF, img.version, len(img.stream), plan.chunk_size,
        img.manifest if plan.inline else b"", img.signature))


def _chunk_frame(img: Image, plan: Plan, index: int) -> bytes:
    return proto.encode_ota_chunk(proto.OtaChunk(
        index, img.version, index, plan.chunk(img, index)))


# ---------------------------------------------------------------- helpers
def limits_of(conn: sqlite3.Connection, device: str) -> proto.ClassLimits:
    device_class = registry.class_of(conn, device)
    if device_class is None:
        raise OtaError(f"no device {device!r} in the registry (see `torpor device list`)")
    return proto.DEVICE_CLASSES[device_class]


def ota_items(conn: sqlite3.Connection, device: str) -> list[tuple[q.Item, int, int]]:
    """Active OTA items of a device: (item, version, chunk index or -1 for the manifest)."""
    out = []
    for it in q.pending(conn, device):
        if it.kind == proto.OTA_MANIFEST:
            f = proto.decode(it.data)
            assert isinstance(f, proto.OtaManifest)
            out.append((it, f.version, -1))
        elif it.kind == proto.OTA_CHUNK:
            c = proto.decode(it.data)
            assert isinstance(c, proto.OtaChunk)
            out.append((it, c.version, c.index))
    return out


def clear_items(conn: sqlite3.Connection, device: str, now: float, done: bool) -> None:
    for it, _, _ in ota_items(conn, device):
        if done:
            q.retire(conn, device, it.command_id, q.DONE, now, result="ota_done")
        else:
            q.cancel(conn, device, it.command_id, now=now)


def _window(limits: proto.ClassLimits) -> int:
    return max(1, min(WINDOW, limits.max_downlink // 4))


def fill(conn: sqlite3.Connection, device: str, img: Image, plan: Plan, progress: int,
          ttl_s: float | None, now: float, manifest: bool) -> None:
    """Retire what the node has, queue the manifest (if asked) and the next window."""
    limits = limits_of(conn, device)
    have: set[int] = set()
    for it, version, index in ota_items(conn, device):
        if version != img.version:
            q.cancel(conn, device, it.command_id, now=now)
        elif index >= 0 and index < progress:
            q.retire(conn, device, it.command_id, q.DONE, now, result="received")
        elif index < 0 and not manifest:
            q.retire(conn, device, it.command_id, q.DONE, now, result="received")
        else:
            have.add(index)
    if manifest and -1 not in have:
        q.enqueue_frame(conn, device, proto.OTA_MANIFEST, _manifest_frame(img, plan),
                        OTA_PRIORITY, ttl_s, now=now)
    total = plan.total(img)
    for index in range(progress, min(total, progress + _window(limits))):
        if index not in have:
            try:
                q.enqueue_frame(conn, device, proto.OTA_CHUNK, _chunk_frame(img, plan, index),
                                OTA_PRIORITY, ttl_s, now=now)
            except q.QueueFull:
                break  # commands fill the queue: chunks follow once they leave


def set_device(conn: sqlite3.Connection, campaign: int, device: str, now: float, **cols: object) -> None:
    if cols.get("status") in TERMINAL:
        cols["finished_at"] = now
    sets = ", ".join(f"{k}=?" for k in cols)
    conn.execute(f"UPDATE ota_devices SET {sets}, updated_at=? WHERE campaign=? AND device=?",
                 (*cols.values(), now, campaign, device))


# ---------------------------------------------------------------- campaigns
def create_campaign(
    conn: sqlite3.Connection, image_id: int, devices: Sequence[str], *, rate: int = 1,
    rate_percent: bool = False, abort_threshold: float = 10.0, timeout_s: float = 7 * 86400,
    overrides: dict[str, int] | None = None, now: float | None = None,
) -> int:
    """A campaign for `devices` (in that order); `overrides` pins devices to another image
    (e.g. another hardware revision). The first wave is queued at once."""
    now = time.time() if now is None else now
    devs = list(dict.fromkeys(devices))
    if not devs:
        raise OtaError("a campaign needs at least one device")
    if rate < 1 or (rate_percent and rate > 100):
        raise OtaError(f"rate {rate}{'%' if rate_percent else ''} is out of range")
    if not 0 <= abort_threshold <= 100:
        raise OtaError(f"abort threshold {abort_threshold:g}% is out of range 0..100")
    if timeout_s <= 0:
        raise OtaError("timeout must be positive")
    overrides = dict(overrides or {})
    for d in overrides:
        if d not in devs:
            raise OtaError(f"image override for {d!r}, which is not in the campaign")
    with db.atomic(conn):
        img = get_image(conn, image_id)
        for d in devs:
            status = registry.status_of(conn, d)
            if status is None:
                raise OtaError(f"no device {d!r} in the registry (see `torpor device list`)")
            if status in (registry.REVOKED, registry.DECOMMISSIONED):
                raise OtaError(f"device {d!r} is {status}: it will not connect again")
            busy = conn.execute(
                "SELECT campaign FROM ota_devices WHERE device=? AND status IN "
                f"({','.join('?' * (len(IN_FLIGHT) + 1))})", (d, PENDING, *IN_FLIGHT)).fetchone()
            if busy is not None:
                raise OtaError(f"device {d!r} is already updating in campaign {busy[0]}")
            get_image(conn, overrides.get(d, img.id))
        cur = conn.execute(
            "INSERT INTO ota_campaigns(image_id, status, rate, rate_percent, abort_threshold, "
            "timeout_s, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (img.id, RUNNING, rate, int(rate_percent), abort_threshold, timeout_s, now, now))
        cid = int(cur.lastrowid or 0)
        conn.executemany(
            "INSERT INTO ota_devices(campaign, device, image_id, seq, status, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(cid, d, overrides.get(d, img.id), i, PENDING, now) for i, d in enumerate(devs)])
        advance(conn, cid, now)
    log.info("campaign %d: image v%d to %d device(s), rate %d%s", cid, img.version, len(devs),
             rate, "%" if rate_percent else "")
    return cid


def start_device(conn: sqlite3.Connection, cid: int, device: str, image_id: int, timeout_s: float,
           now: float) -> None:
    img = get_image(conn, image_id)
    plan = wire_plan(img, limits_of(conn, device))
    set_device(conn, cid, device, now, status=QUEUED, chunk_size=plan.chunk_size,
         prefix=plan.prefix_chunks(), chunks=plan.total(img), progress=0, started_at=now)
    fill(conn, device, img, plan, 0, timeout_s, now, manifest=True)
    log.info("[%s] campaign %d: v%d queued, %d chunks of %d B", device, cid, img.version,
             plan.total(img), plan.chunk_size, extra={"device_id": device})


def advance(conn: sqlite3.Connection, cid: int, now: float) -> None:
    """Timeouts, the abort rule, widening and completion of one running campaign."""
    row = conn.execute(
        "SELECT status, rate, rate_percent, abort_threshold, timeout_s FROM ota_campaigns "
        "WHERE id=?", (cid,)).fetchone()
    if row is None or row[0] != RUNNING:
        return
    _, rate, pct, threshold, timeout_s = row
    for (device,) in conn.execute(
            "SELECT device FROM ota_devices WHERE campaign=? AND status IN (?, ?, ?, ?) AND "
            "started_at <= ?", (cid, *IN_FLIGHT, now - timeout_s)).fetchall():
        clear_items(conn, device, now, done=False)
        set_device(conn, cid, device, now, status=TIMED_OUT, reason="timeout",
             detail=f"not confirmed within {timeout_s:g}s")
        log.warning("[%s] campaign %d: timed out", device, cid, extra={"device_id": device})
    rows = conn.execute("SELECT device, image_id, status FROM ota_devices WHERE campaign=? "
                        "ORDER BY seq", (cid,)).fetchall()
    total = len(rows)
    started = [r for r in rows if r[2] != PENDING]
    bad = sum(1 for r in rows if r[2] in BAD)
    confirmed = sum(1 for r in rows if r[2] == CONFIRMED)
    if started and bad * 100.0 / len(started) > threshold:
        # Stop widening; downloads not yet on trial stop too. Trials still report.
        for device, _, status in rows:
            if status in (PENDING, QUEUED, DOWNLOADING, VERIFYING):
                clear_items(conn, device, now, done=False)
                set_device(conn, cid, device, now, status=CANCELLED, reason="aborted")
        conn.execute("UPDATE ota_campaigns SET status=?, updated_at=?, finished_at=?, note=? "
                     "WHERE id=?", (ABORTED, now, now,
                                    f"{bad} of {len(started)} started devices failed "
                                    f"(threshold {threshold:g}%)", cid))
        log.warning("campaign %d aborted: %d of %d started devices failed", cid, bad,
                    len(started))
        return
    first = math.ceil(total * rate / 100.0) if pct else rate
    allowed = min(total, first + confirmed)  # widens as confirmations arrive
    for device, image_id, status in rows:
        if len(started) >= allowed:
            break
        if status == PENDING:
            start_device(conn, cid, device, image_id, timeout_s, now)
            started.append((device, image_id, QUEUED))
    if all(r[2] in TERMINAL for r in conn.execute(
            "SELECT device, image_id, status FROM ota_devices WHERE campaign=?", (cid,))):
        conn.execute("UPDATE ota_campaigns SET status=?, updated_at=?, finished_at=? WHERE id=?",
                     (COMPLETED, now, now, cid))
        log.info("campaign %d completed", cid)
    else:
        conn.execute("UPDATE ota_campaigns SET updated_at=? WHERE id=?", (now, cid))


def sweep(conn: sqlite3.Connection, now: float | None = None) -> None:
    """Timeouts and widening of every running campaign."""
    now = time.time() if now is None else now
    with db.atomic(conn):
        for (cid,) in conn.execute("SELECT id FROM ota_campaigns WHERE status=?",
                                   (RUNNING,)).fetchall():
            advance(conn, int(cid), now)


def cancel_campaign(conn: sqlite3.Connection, cid: int, *, now: float | None = None) -> Campaign:
    """Stop a campaign: pending OTA items leave the queues. A node already on trial keeps
    its outcome (its bootloader decides), which is still recorded."""
    now = time.time() if now is None else now
    with db.atomic(conn):
        c = get_campaign(conn, cid)
        if c.status != RUNNING:
            raise OtaError(f"campaign {cid} is already {c.status}")
        for d in c.devices:
            if d.status in (PENDING, QUEUED, DOWNLOADING, VERIFYING):
                clear_items(conn, d.device, now, done=False)
                set_device(conn, cid, d.device, now, status=CANCELLED, reason="cancelled")
        conn.execute("UPDATE ota_campaigns SET status=?, updated_at=?, finished_at=?, note=? "
                     "WHERE id=?", (CANCELLED, now, now, "cancelled by the operator", cid))
    return get_campaign(conn, cid)


def get_campaign(conn: sqlite3.Connection, cid: int) -> Campaign:
    row = conn.execute(
        "SELECT c.id, c.image_id, i.version, c.status, c.rate, c.rate_percent, "
        "c.abort_threshold, c.timeout_s, c.created_at, c.updated_at, c.finished_at, c.note "
        "FROM ota_campaigns c JOIN ota_images i ON i.id=c.image_id WHERE c.id=?",
        (cid,)).fetchone()
    if row is None:
        raise OtaError(f"no campaign {cid} (see `torpor ota status`)")
    devs = tuple(DeviceStatus(*r) for r in conn.execute(
        "SELECT d.device, i.version, d.status, d.progress, d.chunks, d.reason, d.detail, "
        "d.started_at, d.updated_at, d.finished_at FROM ota_devices d JOIN ota_images i ON "
        "i.id=d.image_id WHERE d.campaign=? ORDER BY d.seq", (cid,)))
    return Campaign(int(row[0]), int(row[1]), int(row[2]), row[3], int(row[4]), bool(row[5]),
                    float(row[6]), float(row[7]), row[8], row[9], row[10], row[11], devs)


def campaigns(conn: sqlite3.Connection) -> list[Campaign]:
    return [get_campaign(conn, int(r[0]))
            for r in conn.execute("SELECT id FROM ota_campaigns ORDER BY id")]


def summaries(conn: sqlite3.Connection) -> list[tuple[Campaign, dict[str, int]]]:
    """Every campaign, newest first, without its device rows but with their counts by
    status (two queries, whatever the campaigns' sizes)."""
    counts: dict[int, dict[str, int]] = {}
    for cid, status, n in conn.execute(
            "SELECT campaign, status, count(*) FROM ota_devices GROUP BY campaign, status"):
        counts.setdefault(int(cid), {})[status] = int(n)
    rows = conn.execute(
        "SELECT c.id, c.image_id, i.version, c.status, c.rate, c.rate_percent, "
        "c.abort_threshold, c.timeout_s, c.created_at, c.updated_at, c.finished_at, c.note "
        "FROM ota_campaigns c JOIN ota_images i ON i.id=c.image_id ORDER BY c.id DESC")
    return [(Campaign(int(r[0]), int(r[1]), int(r[2]), r[3], int(r[4]), bool(r[5]), float(r[6]),
                      float(r[7]), r[8], r[9], r[10], r[11], ()), counts.get(int(r[0]), {}))
            for r in rows]


def state_counts(conn: sqlite3.Connection) -> tuple[dict[str, int], dict[str, int]]:
    """(campaigns by status, devices of running campaigns by status)."""
    camps = {r[0]: int(r[1]) for r in conn.execute(
        "SELECT status, count(*) FROM ota_campaigns GROUP BY status")}
    devs = {r[0]: int(r[1]) for r in conn.execute(
        "SELECT d.status, count(*) FROM ota_devices d JOIN ota_campaigns c ON c.id = d.campaign"
        " WHERE c.status = ? GROUP BY d.status", (RUNNING,))}
    return camps, devs


# ---------------------------------------------------------------- a device's update
def active(conn: sqlite3.Connection, device: str) -> tuple[int, str, Image, int] | None:
    """(campaign, status, image, progress) of the device's update in progress, if any."""
    row = conn.execute(
        "SELECT campaign, status, image_id, progress FROM ota_devices WHERE device=? AND "
        "status IN (?, ?, ?, ?) ORDER BY campaign DESC LIMIT 1", (device, *IN_FLIGHT)).fetchone()
    if row is None:
        return None
    return int(row[0]), row[1], get_image(conn, int(row[2])), int(row[3])


def plan_of(conn: sqlite3.Connection, device: str, img: Image) -> Plan:
    return wire_plan(img, limits_of(conn, device))


def timeout_of(conn: sqlite3.Connection, cid: int) -> float:
    return float(conn.execute("SELECT timeout_s FROM ota_campaigns WHERE id=?",
                              (cid,)).fetchone()[0])


def running_campaigns(conn: sqlite3.Connection) -> list[int]:
    """The ids of the campaigns still running."""
    return [int(r[0]) for r in conn.execute("SELECT id FROM ota_campaigns WHERE status=?",
                                            (RUNNING,)).fetchall()]


def signing_keys(conn: sqlite3.Connection) -> tuple[list[tuple[int, str, str]], list[tuple[str, int, str]]]:
    """Who signed what, for retiring a firmware key: (version, board, key id) of every stored
    image, and (device, version, key id) of every update in flight."""
    images = [(int(r[0]), str(r[1]), str(r[2])) for r in conn.execute(
        "SELECT version, board, key_id FROM ota_images ORDER BY version")]
    flying = [(str(r[0]), int(r[1]), str(r[2])) for r in conn.execute(
        "SELECT d.device, i.version, i.key_id FROM ota_devices d JOIN ota_images i "
        "ON i.id = d.image_id WHERE d.status IN (?, ?, ?, ?)", IN_FLIGHT)]
    return images, flying
