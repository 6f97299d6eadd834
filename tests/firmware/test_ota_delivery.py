"""OTA on the node, driven by the real gateway: sim nodes booting through the real
bootloader take an update over several wakes at the sensor class's budget and confirm it
on the gateway's ACK; every refused or failed image leaves the running one running, and
its reason reaches the gateway in OTA_STATUS (or the HELLO, for a revert)."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.ops import ota as ota_ops
from gateway.store import devices as registry
from gateway.store import ota_store
from tests.fixtures.broker import RunningBroker
from tests.system.stack import Stack, StackNode
from tests.system.test_ota_campaign import Images, images  # noqa: F401 (fixture)
from tools.fw import image, keys
from tools.sim.field import FieldModel

CRASHING = "raise RuntimeError('this image is broken')\n"


@pytest.fixture
def stack(tmp_path: Path, broker: RunningBroker) -> Iterator[Stack]:
    s = Stack(tmp_path / "stack", broker)
    try:
        yield s
    finally:
        s.close()


def sensor_node(stack: Stack, imgs: Images, name: str, seed: int, **config: object) -> StackNode:
    node = stack.add_node(name, seed, sample_interval_s=60, **config)
    image.install_sim(node.sim.dir, imgs.build(1), public_key=imgs.public)
    node.sim.entry = "boot"
    return node


def test_update_over_many_small_wakes_ends_confirmed_and_replay_is_refused(
        stack: Stack, images: Images) -> None:  # noqa: F811
    stack.start()
    node = sensor_node(stack, images, "s1", 11)
    asyncio.run(node.wake())
    with stack.db() as conn:
        img = ota_ops.import_image(conn, images.build(2))
        cid = ota_store.create_campaign(conn, img.id, ["s1"], abort_threshold=100)

    async def until_done(cid: int, limit: int | None = None) -> int:
        n = 0
        while n < (limit or wake_bound(stack, cid)):
            n += 1
            await node.wake()
            with stack.db() as conn:
                if ota_store.get_campaign(conn, cid).status != ota_store.RUNNING:
                    break
        return n

    wakes = asyncio.run(until_done(cid))
    with stack.db() as conn:
        c = ota_store.get_campaign(conn, cid)
        fw = conn.execute("SELECT fw_version FROM devices WHERE id='s1'").fetchone()[0]
    assert c.devices[0].status == ota_store.CONFIRMED, (c, node.log_text()[-3000:])
    # 1 KB frames, about 1 KB of budget per 30 s wake: one chunk per wake.
    assert wakes > 20
    assert fw == 2
    asyncio.run(node.wake())  # reports confirmed in its HELLO once, then idle
    assert "boot: slot b v2 trial=0" in node.log_text()
    # The same manifest again (a replay) is refused: versions never go down or repeat.
    with stack.db() as conn:
        cid2 = ota_store.create_campaign(conn, img.id, ["s1"], abort_threshold=100)
    # The manifest's prefix takes a wake a chunk, its check the start of the next wake.
    asyncio.run(until_done(cid2, 6))
    with stack.db() as conn:
        d = ota_store.get_campaign(conn, cid2).devices[0]
    assert (d.status, d.reason) == (ota_store.REFUSED, "downgrade")
    assert "boot: slot b v2 trial=0" in last_run(node)


# Wakes beyond the download: the trial boot, the crash's revert and restart, the wake whose
# HELLO reports the outcome, and a few lost to a slow moment.
SETTLE_WAKES = 10
# Whatever the image's size, no campaign in these tests may take more wakes than this.
MAX_WAKES = 400


def wake_bound(stack: Stack, cid: int) -> int:
    """How many wakes a campaign may take: at the sensor class's budget a node takes one
    chunk a wake, so the largest download's chunk count (set by the firmware's size, which
    grows) plus the wakes that settle the outcome; bounded."""
    with stack.db() as conn:
        chunks = max((d.chunks for d in ota_store.get_campaign(conn, cid).devices), default=0)
    return min(MAX_WAKES, chunks + SETTLE_WAKES)


def last_run(node: StackNode) -> str:
    return re.split(r"^--- run \d+ cause=", node.log_text(), flags=re.M)[-1]


async def wake_all(nodes: list[StackNode]) -> None:
    await asyncio.gather(*(n.wake() for n in nodes))


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def test_each_refusal_keeps_the_running_image_and_reaches_the_gateway(
        stack: Stack, images: Images, tmp_path: Path) -> None:  # noqa: F811
    stack.start()
    v2 = images.build(2)
    # Bad signature: one bit of the signature flipped.
    bad_sig = _copy(v2, tmp_path / "badsig")
    sig = bytearray((bad_sig / image.SIGNATURE).read_bytes())
    sig[5] ^= 1
    (bad_sig / image.SIGNATURE).write_bytes(bytes(sig))
    # Unknown key: signed by a key the nodes do not trust.
    other = keys.keygen(tmp_path / "other")
    unknown = _copy(v2, tmp_path / "unknown")
    image.sign_image(unknown, keys.load_private(other.private))
    # Wrong board: a real ESP32 image.
    esp = tmp_path / "esp32"
    image.build_image("esp32", 2, esp)
    image.sign_image(esp, images.key)
    crash = images.build(3, CRASHING, "crash")
    cases = {
        "r-sig": bad_sig, "r-key": unknown, "r-board": esp, "r-down": images.build(1),
        "r-hash": images.build(4), "r-trunc": images.build(5), "r-crash": crash,
        "r-batt": v2,
    }
    nodes = [sensor_node(stack, images, name, 30 + i,
                         **({"low_battery_mv": 5000} if name == "r-batt" else {}))
             for i, name in enumerate(cases)]
    asyncio.run(wake_all(nodes))
    with stack.db() as conn:
        ids = {name: ota_ops.import_image(conn, path).id for name, path in cases.items()}
        # Data spoiled after signing, as a bad link or a bad store would: a flipped byte,
        # and a stream one byte short.
        stream = conn.execute("SELECT stream FROM ota_images WHERE id=?",
                              (ids["r-hash"],)).fetchone()[0]
        spoiled = bytearray(stream)
        spoiled[100] ^= 0xFF
        conn.execute("UPDATE ota_images SET stream=? WHERE id=?", (bytes(spoiled), ids["r-hash"]))
        stream = conn.execute("SELECT stream FROM ota_images WHERE id=?",
                              (ids["r-trunc"],)).fetchone()[0]
        conn.execute("UPDATE ota_images SET stream=? WHERE id=?", (stream[:-1], ids["r-trunc"]))
        cid = ota_store.create_campaign(conn, ids["r-sig"], list(cases), rate=100, rate_percent=True,
                                  abort_threshold=100, overrides=ids)

    async def run() -> None:
        wakes = 0
        while wakes < wake_bound(stack, cid):
            wakes += 1
            await asyncio.gather(*(n.wake() for n in nodes))
            with stack.db() as conn:
                if ota_store.get_campaign(conn, cid).status != ota_store.RUNNING:
                    return

    asyncio.run(run())
    with stack.db() as conn:
        c = ota_store.get_campaign(conn, cid)
    got = {d.device: (d.status, d.reason) for d in c.devices}
    assert got == {
        "r-sig": ("refused", "bad_signature"),
        "r-key": ("refused", "unknown_key"),
        "r-board": ("refused", "wrong_board"),
        "r-down": ("refused", "downgrade"),
        "r-hash": ("failed", "bad_hash"),
        "r-trunc": ("refused", "truncated"),
        "r-crash": ("reverted", "crashed"),
        "r-batt": ("refused", "low_battery"),
    }, stack.log_text()[-3000:]
    asyncio.run(wake_all(nodes))
    for n in nodes:
        last = last_run(n)
        assert "boot: slot a v1 trial=0" in last, (n.id, last)


def test_a_download_of_several_frames_a_wake_completes_on_the_esp32_heap(
        stack: Stack, images: Images) -> None:  # noqa: F811
    """On the ESP32 profile's heap (tools/sim/profiles.py), booting through the bootloader,
    a node whose next send is an hour away takes as many OTA frames a wake as its window
    holds (about 8 of 1 KB), as fielded nodes do, and the campaign confirms. Before: the
    stream's prefix was read whole to measure it and the fourth frame found no 2 KB block,
    which dropped the staging, so every wake began again at chunk 0; a copy of each frame
    killed wakes; and the whole-slot check after the last chunk never found room beside the
    session, so the download stood one chunk short until the campaign timed out."""
    stack.start()
    node = stack.add_node("e-ota", 41, field=FieldModel.named("esp32"), sample_interval_s=3600)
    image.install_sim(node.sim.dir, images.build(1), public_key=images.public)
    node.sim.entry = "boot"

    async def registered() -> None:
        # The first send after power-on follows the bootloader's full signature check, and
        # on this heap it can fail for want of a block (docs/ota.md, "Limits"); its retry
        # registers the node. The download's wakes are judged from the next wake on.
        for _ in range(4):
            await node.wake()
            with stack.db() as conn:
                if registry.find(conn, node.id).last_seen:  # type: ignore[union-attr]
                    return
        raise AssertionError(node.log_text()[-3000:])

    asyncio.run(registered())
    before = len(node.log_text())
    with stack.db() as conn:
        img = ota_ops.import_image(conn, images.build(2))
        cid = ota_store.create_campaign(conn, img.id, [node.id], abort_threshold=100)
    chunks = 0
    wakes = 0

    async def run() -> None:
        nonlocal chunks, wakes
        while wakes < wake_bound(stack, cid):
            wakes += 1
            await node.wake()
            with stack.db() as conn:
                c = ota_store.get_campaign(conn, cid)
                chunks = c.devices[0].chunks
                if c.status != ota_store.RUNNING:
                    return

    asyncio.run(run())
    with stack.db() as conn:
        d = ota_store.get_campaign(conn, cid).devices[0]
    log = node.log_text()[before:]
    assert d.status == ota_store.CONFIRMED, (d, log[-4000:])
    # Several chunks a wake: at one a wake this would take about `chunks` wakes.
    assert wakes <= chunks // 4 + SETTLE_WAKES, (wakes, chunks)
    assert "wake failed" not in log and "MemoryError" not in log and " safe=1 " not in log, log
    asyncio.run(node.wake())
    assert "boot: slot b v2 trial=0" in last_run(node)
