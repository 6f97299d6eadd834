"""The OTA campaign store on a real SQLite file, no broker: how an image is cut into frames,
rate and span parsing, the staged rollout, the abort rule, timeouts, cancel, and the device
states the node's OTA_STATUS frames and HELLOs move; the CLI's errors and exit codes."""

from __future__ import annotations

import sqlite3
import struct
from pathlib import Path

import pytest

from gateway import proto
from gateway.cli import ota as ota_cli
from gateway.ops import ota as ota_ops
from gateway.pipeline import ota_delivery
from gateway.store import db, ota_store
from gateway.store import devices as registry
from gateway.store import downlink_queue as q
from tools.cli import main as torpor
from tools.fw import image, keys

T0 = 1_800_000_000.0
OTA_KINDS = (proto.OTA_MANIFEST, proto.OTA_CHUNK)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, bytes]:
    """(v2 image dir, public key file, public key): a real sim image, signed."""
    root = tmp_path_factory.mktemp("img")
    kp = keys.keygen(root / "keys")
    img = root / "v2"
    image.build_image("sim", 2, img)
    image.sign_image(img, keys.load_private(kp.private))
    return img, kp.public, keys.load_public(kp.public)


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    c = db.open_db(tmp_path / "gateway.db")
    for i in range(5):
        registry.add(c, f"s{i}", "sensor", now=T0)
    registry.add(c, "c0", "controller", now=T0)
    return c


def ota_items(conn: sqlite3.Connection, device: str) -> list[q.Item]:
    return [it for it in q.pending(conn, device) if it.kind in OTA_KINDS]


def states(conn: sqlite3.Connection, cid: int) -> dict[str, str]:
    return {d.device: d.status for d in ota_store.get_campaign(conn, cid).devices}


def status(conn: sqlite3.Connection, device: str, version: int, state: proto.OtaState,
           chunks: int = 0, reason: proto.OtaReason = proto.OtaReason.NONE,
           now: float = T0 + 10) -> None:
    h = ota_delivery.OtaHandler()
    with db.transaction(conn):
        h.handle(conn, [(device, proto.OtaStatus(1, version, state, chunks, reason))], [], now)
    assert h.errors == 0


def hello(conn: sqlite3.Connection, device: str, fw: int,
          state: proto.OtaState = proto.OtaState.IDLE,
          reason: proto.OtaReason = proto.OtaReason.NONE, now: float = T0 + 10) -> None:
    frame = proto.Hello(1, fw, proto.BootCause.TIMER, 3300, -60, 40_000, 0, 0, 600, 2000,
                        int(now), proto.DeviceClass.SENSOR, 0, state, reason)
    h = ota_delivery.OtaHandler()
    with db.transaction(conn):
        h.handle(conn, [], [("s0" if device is None else device, frame)], now)
    assert h.errors == 0


# ---------------------------------------------------------------- image and framing
def test_chunking_puts_the_manifest_in_the_stream_when_it_does_not_fit(
        conn: sqlite3.Connection, signed: tuple[Path, Path, bytes]) -> None:
    img = ota_ops.import_image(conn, signed[0], public_key=signed[2], now=T0)
    assert ota_ops.import_image(conn, signed[0], now=T0).id == img.id  # stored once
    sensor = proto.DEVICE_CLASSES["sensor"]
    plan = ota_store.wire_plan(img, sensor)
    assert plan.chunk_size % 16 == 0 and plan.chunk_size > 512
    # A real signed manifest is over 1 KB: it leads the stream, u16 length first.
    assert len(img.manifest) > 1000 and not plan.inline
    assert plan.prefix == struct.pack("<H", len(img.manifest)) + img.manifest
    chunks = [plan.chunk(img, i) for i in range(plan.total(img))]
    assert b"".join(chunks) == plan.prefix + img.stream
    assert all(len(c) == plan.chunk_size for c in chunks[:plan.prefix_chunks() - 1])
    # The image's first chunk starts at the next index, not inside the manifest's last one.
    assert chunks[plan.prefix_chunks()] == img.stream[:plan.chunk_size]
    for i in range(plan.total(img)):
        assert len(ota_store._chunk_frame(img, plan, i)) <= sensor.max_message
    frame = proto.decode(ota_store._manifest_frame(img, plan))
    assert isinstance(frame, proto.OtaManifest) and frame.manifest == b""
    assert frame.signature == img.signature and frame.total_size == len(img.stream)
    # A class with longer frames takes the manifest inline and no prefix.
    big = ota_store.wire_plan(img, proto.DEVICE_CLASSES["gateway"])
    assert big.inline and big.prefix == b"" and big.prefix_chunks() == 0
    m = proto.decode(ota_store._manifest_frame(img, big))
    assert isinstance(m, proto.OtaManifest) and m.manifest == img.manifest
    assert len(ota_store._manifest_frame(img, big)) <= proto.DEVICE_CLASSES["gateway"].max_message


def test_import_refuses_unsigned_or_altered_images(
        conn: sqlite3.Connection, signed: tuple[Path, Path, bytes], tmp_path: Path) -> None:
    unsigned = tmp_path / "unsigned"
    image.build_image("sim", 3, unsigned)
    with pytest.raises(ota_store.OtaError, match="not signed"):
        ota_ops.import_image(conn, unsigned)
    other = keys.keygen(tmp_path / "other")
    with pytest.raises(ota_store.OtaError, match="signed by key"):
        ota_ops.import_image(conn, signed[0], public_key=keys.load_public(other.public))


# ---------------------------------------------------------------- parsing
@pytest.mark.parametrize("text,want", [("1", (1, False)), ("25", (25, False)),
                                       ("10%", (10, True)), ("100%", (100, True)),
                                       (" 5 ", (5, False))])
def test_rate_parses_counts_and_percentages(text: str, want: tuple[int, bool]) -> None:
    assert ota_cli.parse_rate(text) == want


@pytest.mark.parametrize("text", ["0", "0%", "101%", "-1", "x", "5%%", "1.5", ""])
def test_bad_rates_are_refused(text: str) -> None:
    with pytest.raises(ota_store.OtaError, match="bad rate"):
        ota_cli.parse_rate(text)


def test_spans_and_thresholds() -> None:
    assert ota_cli.parse_span("90") == 90
    assert ota_cli.parse_span("30m") == 1800
    assert ota_cli.parse_span("12h") == 43200
    assert ota_cli.parse_span("7d") == 7 * 86400
    for bad in ("0", "1w", "-5m", "soon"):
        with pytest.raises(ota_store.OtaError):
            ota_cli.parse_span(bad)
    assert ota_cli.parse_percent("25%") == 25.0
    for bad in ("101", "-1", "many"):
        with pytest.raises(ota_store.OtaError):
            ota_cli.parse_percent(bad)


# ---------------------------------------------------------------- the rollout
def campaign(conn: sqlite3.Connection, signed: tuple[Path, Path, bytes], devices: list[str],
             **kw: object) -> int:
    img = ota_ops.import_image(conn, signed[0], now=T0)
    return ota_store.create_campaign(conn, img.id, devices, now=T0, **kw)  # type: ignore[arg-type]


def test_first_wave_then_one_more_per_confirmation(
        conn: sqlite3.Connection, signed: tuple[Path, Path, bytes]) -> None:
    devs = [f"s{i}" for i in range(5)]
    cid = campaign(conn, signed, devs, rate=40, rate_percent=True, abort_threshold=50)
    # 40 % of 5 = 2 started, queued with their manifest and a window of chunks.
    assert states(conn, cid) == {"s0": "queued", "s1": "queued", "s2": "pending",
                                 "s3": "pending", "s4": "pending"}
    items = ota_items(conn, "s0")
    assert items[0].kind == proto.OTA_MANIFEST and items[0].priority == ota_store.OTA_PRIORITY
    assert len(items) == 1 + ota_store._window(proto.DEVICE_CLASSES["sensor"])
    assert ota_items(conn, "s2") == []
    # A trial widens nothing; a confirmation starts one more device.
    status(conn, "s0", 2, proto.OtaState.TRIAL, 60)
    assert states(conn, cid)["s2"] == "pending"
    status(conn, "s0", 2, proto.OtaState.CONFIRMED)
    assert states(conn, cid) == {"s0": "confirmed", "s1": "queued", "s2": "queued",
                                 "s3": "pending", "s4": "pending"}
    # A failure starts nobody (1 of 3 started = 33 %, under the 50 % threshold).
    status(conn, "s1", 2, proto.OtaState.FAILED, reason=proto.OtaReason.BAD_HASH)
    c = ota_store.get_campaign(conn, cid)
    assert c.status == ota_store.RUNNING and c.counts() == {"confirmed": 1, "failed": 1,
                                                      "queued": 1, "pending": 2}
    assert next(d for d in c.devices if d.device == "s1").reason == "bad_hash"


def test_abort_threshold_cancels_what_has_not_reached_trial(
        conn: sqlite3.Connection, signed: tuple[Path, Path, bytes]) -> None:
    cid = campaign(conn, signed, ["s0", "s1", "s2", "s3"], rate=3, abort_threshold=30)
    status(conn, "s1", 2, proto.OtaState.TRIAL, 60)
    status(conn, "s0", 2, proto.OtaState.REFUSED, reason=proto.OtaReason.DOWNGRADE)
    # 1 of 3 started failed: 33 % > 30 %: aborted. s2 (downloading) and s3 (pending) are
    # cancelled and their items leave the queue; s1's trial still reports.
    c = ota_store.get_campaign(conn, cid)
    assert c.status == ota_store.ABORTED and "1 of 3" in c.note
    assert states(conn, cid) == {"s0": "refused", "s1": "trial", "s2": "cancelled",
                                 "s3": "cancelled"}
    assert all(ota_items(conn, d) == [] for d in ("s0", "s1", "s2", "s3"))


def test_timeout_marks_devices_timed_out(
        conn: sqlite3.Connection, signed: tuple[Path, Path, bytes]) -> None:
    cid = campaign(conn, signed, ["s0", "s1"], rate=1, timeout_s=3600, abort_threshold=100)
    ota_store.sweep(conn, now=T0 + 3599)
    assert states(conn, cid) == {"s0": "queued", "s1": "pending"}
    ota_store.sweep(conn, now=T0 + 3601)
    c = ota_store.get_campaign(conn, cid)
    d0 = c.devices[0]
    assert (d0.status, d0.reason) == ("timed_out", "timeout") and d0.finished_at == T0 + 3601
    assert ota_items(conn, "s0") == []
    # The next device does not start on a timeout (only confirmations widen).
    assert c.devices[1].status == "pending" and c.status == ota_store.RUNNING


def test_cancel_dequeues_pending_items_and_keeps_trials(
        conn: sqlite3.Connection, signed: tuple[Path, Path, bytes]) -> None:
    cid = campaign(conn, signed, ["s0", "s1", "s2"], rate=2)
    status(conn, "s1", 2, proto.OtaState.TRIAL, 60)
    assert ota_items(conn, "s0")
    c = ota_store.cancel_campaign(conn, cid, now=T0 + 20)
    assert c.status == "cancelled"
    assert states(conn, cid) == {"s0": "cancelled", "s1": "trial", "s2": "cancelled"}
    assert ota_items(conn, "s0") == []
    cancelled = [it for it in q.history(conn, "s0") if it.kind in OTA_KINDS]
    assert cancelled and all(it.status == "cancelled" for it in cancelled)
    with pytest.raises(ota_store.OtaError, match="already cancelled"):
        ota_store.cancel_campaign(conn, cid)
    # The trial's outcome is still recorded.
    hello(conn, "s1", 1, proto.OtaState.REVERTED, proto.OtaReason.CRASHED)
    assert states(conn, cid)["s1"] == "reverted"


def test_device_states_follow_the_node(
        conn: sqlite3.Connection, signed: tuple[Path, Path, bytes]) -> None:
    cid = campaign(conn, signed, ["s0"], rate=1)
    img = ota_store.get_image(conn, ota_store.get_campaign(conn, cid).image_id)
    plan = ota_store.wire_plan(img, proto.DEVICE_CLASSES["sensor"])
    total = plan.total(img)
    # Progress: chunks below the node's mark are retired, the window moves on.
    status(conn, "s0", 2, proto.OtaState.DOWNLOADING, 3)
    d = ota_store.get_campaign(conn, cid).devices[0]
    assert (d.status, d.progress, d.chunks) == ("downloading", 3, total)
    idx = [proto.decode(it.data).index for it in ota_items(conn, "s0")]  # type: ignore[union-attr]
    assert idx == list(range(3, 3 + ota_store._window(proto.DEVICE_CLASSES["sensor"])))
    # A status for another version is ignored.
    status(conn, "s0", 7, proto.OtaState.DOWNLOADING, 9)
    assert ota_store.get_campaign(conn, cid).devices[0].progress == 3
    # IDLE: the node lost its manifest: start over, manifest queued again.
    status(conn, "s0", 2, proto.OtaState.IDLE)
    d = ota_store.get_campaign(conn, cid).devices[0]
    assert (d.status, d.progress) == ("queued", 0)
    assert [it.kind for it in ota_items(conn, "s0")].count(proto.OTA_MANIFEST) == 1
    # All in: verifying; then trial (items retired, done), then confirmed by the HELLO of
    # the new image (its OTA_STATUS went missing).
    status(conn, "s0", 2, proto.OtaState.DOWNLOADING, total)
    assert ota_store.get_campaign(conn, cid).devices[0].status == "verifying"
    status(conn, "s0", 2, proto.OtaState.TRIAL, total)
    assert ota_store.get_campaign(conn, cid).devices[0].status == "trial"
    assert ota_items(conn, "s0") == []
    hello(conn, "s0", 2, proto.OtaState.CONFIRMED)
    c = ota_store.get_campaign(conn, cid)
    assert c.devices[0].status == "confirmed" and c.status == ota_store.COMPLETED


def test_revert_reported_in_hello_after_trial(
        conn: sqlite3.Connection, signed: tuple[Path, Path, bytes]) -> None:
    cid = campaign(conn, signed, ["s0"], rate=1, abort_threshold=100)
    status(conn, "s0", 2, proto.OtaState.TRIAL, 60)
    hello(conn, "s0", 1, proto.OtaState.REVERTED, proto.OtaReason.HEALTH_CHECK)
    c = ota_store.get_campaign(conn, cid)
    d = c.devices[0]
    assert (d.status, d.reason, d.detail) == ("reverted", "health_check", "running v1")
    assert c.status == ota_store.COMPLETED


def test_a_trial_set_without_its_report_is_known_by_the_trial_images_hello(
        conn: sqlite3.Connection, signed: tuple[Path, Path, bytes]) -> None:
    """A node whose whole-image check found no heap beside a session runs it at the start
    of a later wake and restarts into the trial before it reports: every chunk in
    (verifying), then the HELLO of the new image, then its confirmation. A revert after
    such a trial comes in the old image's HELLO."""
    cid = campaign(conn, signed, ["s0", "s1"], rate=2, abort_threshold=100)
    img = ota_store.get_image(conn, ota_store.get_campaign(conn, cid).image_id)
    total = ota_store.wire_plan(img, proto.DEVICE_CLASSES["sensor"]).total(img)
    for dev in ("s0", "s1"):
        status(conn, dev, 2, proto.OtaState.DOWNLOADING, total)
    assert states(conn, cid) == {"s0": "verifying", "s1": "verifying"}
    # An old image's HELLO with nothing to report changes nothing.
    hello(conn, "s0", 1, proto.OtaState.IDLE)
    assert states(conn, cid)["s0"] == "verifying"
    hello(conn, "s0", 2, proto.OtaState.TRIAL)
    assert states(conn, cid)["s0"] == "trial" and ota_items(conn, "s0") == []
    status(conn, "s0", 2, proto.OtaState.CONFIRMED)
    hello(conn, "s1", 1, proto.OtaState.REVERTED, proto.OtaReason.HEALTH_CHECK)
    c = ota_store.get_campaign(conn, cid)
    got = {d.device: (d.status, d.reason) for d in c.devices}
    assert got == {"s0": ("confirmed", ""), "s1": ("reverted", "health_check")}, got


def test_create_refuses_bad_requests(
        conn: sqlite3.Connection, signed: tuple[Path, Path, bytes]) -> None:
    img = ota_ops.import_image(conn, signed[0], now=T0)
    with pytest.raises(ota_store.OtaError, match="no device 'nope'"):
        ota_store.create_campaign(conn, img.id, ["s0", "nope"], now=T0)
    with pytest.raises(ota_store.OtaError, match="at least one device"):
        ota_store.create_campaign(conn, img.id, [], now=T0)
    with pytest.raises(ota_store.OtaError, match="out of range"):
        ota_store.create_campaign(conn, img.id, ["s0"], rate=101, rate_percent=True, now=T0)
    with pytest.raises(ota_store.OtaError, match="not in the campaign"):
        ota_store.create_campaign(conn, img.id, ["s0"], overrides={"s1": img.id}, now=T0)
    cid = ota_store.create_campaign(conn, img.id, ["s0"], now=T0)
    with pytest.raises(ota_store.OtaError, match=f"already updating in campaign {cid}"):
        ota_store.create_campaign(conn, img.id, ["s1", "s0"], now=T0)
    with db.transaction(conn):
        registry.set_status(conn, "s2", "revoked", now=T0)
    with pytest.raises(ota_store.OtaError, match="revoked"):
        ota_store.create_campaign(conn, img.id, ["s2"], now=T0)


# ---------------------------------------------------------------- the CLI
def test_cli_errors_and_exit_codes(tmp_path: Path, signed: tuple[Path, Path, bytes],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n')
    c = db.open_db(tmp_path / "data" / "gateway.db")
    registry.add(c, "s0", "sensor", now=T0)
    registry.add(c, "s1", "sensor", now=T0)
    c.close()

    def run(*args: str) -> tuple[int, str]:
        code = torpor(["ota", *args, "--config", str(cfg)])
        out = capsys.readouterr()
        return code, out.out + out.err

    create = ("campaign", "create", "--image", str(signed[0]))
    code, out = run(*create, "--devices", "s0,ghost")
    assert code == 2 and "no device 'ghost'" in out
    code, out = run("campaign", "create", "--image", str(tmp_path / "missing"), "--devices", "s0")
    assert code == 2 and "missing" in out
    code, out = run(*create, "--devices", "s0", "--rate", "0")
    assert code == 2 and "bad rate" in out
    code, out = run(*create, "--devices", "s0", "--timeout", "soon")
    assert code == 2 and "bad timeout" in out
    code, out = run(*create, "--group", "site9-*")
    assert code == 2 and "matches no device" in out
    bad_key = tmp_path / "bad.pub"
    bad_key.write_text("not a key")
    code, out = run(*create, "--devices", "s0", "--pubkey", str(bad_key))
    assert code == 2 and "not a public key" in out
    code, out = run(*create, "--devices", "s0", "--override", "s1")
    assert code == 2 and "DEVICE=IMAGE_DIR" in out
    code, out = run("status", "9")
    assert code == 2 and "no campaign 9" in out
    code, out = run(*create, "--group", "sensor", "--rate", "50%", "--pubkey", str(signed[1]))
    assert code == 0 and "campaign 1: v2" in out and "to 2 device(s); started 1" in out
    code, out = run(*create, "--devices", "s1")
    assert code == 2 and "already updating in campaign 1" in out
    code, out = run("status")
    assert code == 0 and "campaign 1: v2 running (pending 1, queued 1)" in out
    code, out = run("cancel", "1")
    assert code == 0 and "cancelled" in out
    code, out = run("cancel", "1")
    assert code == 2 and "already cancelled" in out
