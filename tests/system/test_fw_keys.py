"""Firmware signing keys rotated end to end, on real parts: the real gateway process on a
real Mosquitto, a sim node booting through the real bootloader in the MicroPython unix
port, and `torpor` run as a process the way an operator runs it.

The node is provisioned trusting key 1 and running v1 signed by it. An image signed by key
2 is refused (unknown_key) until `torpor fw keys add` has sent a list that adds key 2 and
the node reports it; then the campaign confirms. Key 1 is retired; retiring the key the
node's running image was signed by, or the last key, is refused. A list signed by a key
the node does not trust, slipped into its queue past the gateway's own check, is refused
by the node.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway import proto
from gateway.ops import keylists
from gateway.ops import ota as ota_ops
from gateway.store import devices as registry
from gateway.store import downlink_queue as q
from gateway.store import ota_store
from tests.system.stack import ROOT, Stack, StackNode
from tests.system.test_ota_campaign import Images, boot_node, campaign
from tools.fw import image, keys
from tools.sim.field import FieldModel


@pytest.fixture
def k1_images(tmp_path: Path) -> Images:
    """Key 1 (baked into the node) and the images it signs."""
    paths = keys.keygen(tmp_path / "keys")
    return Images(tmp_path, keys.load_private(paths.private), keys.load_public(paths.public),
                  paths.public)


def torpor(stack: Stack, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`torpor <args> --gateway-config <file>`: the spelling a release script uses."""
    proc = subprocess.run([sys.executable, "-m", "tools.cli", *args, "--gateway-config",
                           str(stack.config_path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"torpor {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}{proc.stderr}")
    return proc


def held(stack: Stack, device: str) -> dict[str, object]:
    """The device's row of `torpor ota keys status --json` (what an operator reads)."""
    rows = json.loads(stack.cli("ota", "keys", "status", "--json").stdout)
    return next(r for r in rows if r["device"] == device)


def held_seq(stack: Stack, device: str) -> int:
    """The same, read in this process: the wake loops look after every wake."""
    return held_now(stack, device).held


def held_now(stack: Stack, device: str) -> keylists.NodeStatus:
    with stack.db() as conn:
        return keylists.node_status(conn, device)


def campaign_over(stack: Stack, cid: int) -> bool:
    with stack.db() as conn:
        return ota_ops.campaign(conn, cid).status != ota_ops.RUNNING


def wake_until(node: StackNode, done: Callable[[], bool], rounds: int) -> None:
    async def run() -> None:
        for _ in range(rounds):
            await node.wake()
            if done():
                return

    asyncio.run(run())


def campaign_device(stack: Stack, cid: int, device: str) -> ota_store.DeviceStatus:
    with stack.db() as conn:
        return next(d for d in ota_ops.campaign(conn, cid).devices if d.device == device)


def test_key_rotation_end_to_end(stack: Stack, k1_images: Images, tmp_path: Path) -> None:
    images = k1_images
    stack.start()
    node = boot_node(stack, images, "fk0", 91)
    asyncio.run(node.wake())  # registered, on v1
    k1_id = keys.key_id(images.public)
    k1_priv = images.root / "keys" / keys.PRIVATE_NAME
    k2 = keys.keygen(tmp_path / "k2")
    v2 = tmp_path / "v2"
    image.build_image("sim", 2, v2, display="2-k2")
    image.sign_image(v2, keys.load_private(k2.private))

    # Before the list: the node's bootloader refuses the image (the gateway has no list yet).
    stack.cli("ota", "campaign", "create", "--image", str(v2), "--devices", node.id,
              "--timeout", "1h")
    wake_until(node, lambda: campaign_over(stack, 1), 6)
    d = campaign_device(stack, 1, node.id)
    assert (d.status, d.reason) == ("refused", "unknown_key"), d

    # A list signed by a key the node does not trust, queued past the gateway's check.
    rogue = Ed25519PrivateKey.generate()
    rogue_id = keys.key_id(keys.public_raw(rogue.public_key()))
    _kl, forged = keys.next_list({rogue_id: keys.public_raw(rogue.public_key())}, 6, rogue,
                                 add=keys.load_public(k2.public))
    with stack.db() as conn:
        cids = [q.enqueue_command(conn, node.id, proto.CommandOp.SET_KEYS,
                                  [7, off, len(forged)], 3, 3600, forged[off:off + 200])
                for off in range(0, len(forged), 200)]

    def forged_answered() -> bool:
        with stack.db() as conn:
            return all(q.get(conn, node.id, c).status == q.FAILED for c in cids[-1:])

    wake_until(node, forged_answered, 4)
    with stack.db() as conn:
        last = q.get(conn, node.id, cids[-1])
    assert (last.status, last.result_status, last.result_detail) == ("failed", "refused", "unknown_key")

    # Add key 2: signed with key 1 on this machine, sent through the gateway's store.
    out = torpor(stack, "fw", "keys", "add", "--key", str(k2.private.parent), "--signing-key",
                 str(k1_priv), "--all").stdout
    assert f"key list seq 1 ({', '.join(sorted((k1_id, k2.key_id)))}); adds {k2.key_id}" in out
    # The node has not reported it yet: the gateway refuses a campaign it would refuse.
    refused = stack.cli("ota", "campaign", "create", "--image", str(v2), "--devices", node.id,
                        check=False)
    assert refused.returncode == 2 and f"signed by key {k2.key_id}" in refused.stderr, refused

    wake_until(node, lambda: held_seq(stack, node.id) == 1, 4)
    h = held(stack, node.id)
    assert h["keys_seq"] == 1 and h["push"] == "applied", h
    assert h["key_ids"] == sorted((k1_id, k2.key_id))
    show = stack.cli("device", "show", node.id).stdout
    assert f"firmware keys:   seq 1 ({','.join(sorted((k1_id, k2.key_id)))})" in show, show

    # Now the image signed by key 2 is accepted.
    stack.cli("ota", "campaign", "create", "--image", str(v2), "--devices", node.id,
              "--timeout", "1h")
    wake_until(node, lambda: campaign_over(stack, 2), 20)
    assert campaign_device(stack, 2, node.id).status == "confirmed", campaign(stack, 2)
    status = stack.cli("ota", "status", "2").stdout
    assert f"keys seq 1 ({','.join(sorted((k1_id, k2.key_id)))})" in status, status

    # Retire key 1, signed with key 2 (the node runs v2 now).
    out = torpor(stack, "fw", "keys", "retire", k1_id, "--signing-key", str(k2.private),
                 "--all").stdout
    assert f"key list seq 2 ({k2.key_id}); retires {k1_id}" in out, out
    wake_until(node, lambda: held_seq(stack, node.id) == 2, 4)
    assert held_now(stack, node.id).held_keys == (k2.key_id,)

    # The last key cannot go; nor the key the running image (v2) was signed by.
    only = torpor(stack, "fw", "keys", "retire", k2.key_id, "--signing-key", str(k2.private),
                  "--all", check=False)
    assert only.returncode != 0 and "last trusted key" in only.stderr, only
    k3 = keys.keygen(tmp_path / "k3")
    torpor(stack, "fw", "keys", "add", "--key", str(k3.public), "--signing-key",
           str(k2.private), "--all")
    running = torpor(stack, "fw", "keys", "retire", k2.key_id, "--signing-key",
                     str(k2.private), "--all", check=False)
    assert running.returncode != 0, running
    assert f"fk0 runs v2, signed by {k2.key_id}" in running.stderr, running
    # The node takes list 3 (keys 2 and 3) and still boots v2, signed by key 2.
    wake_until(node, lambda: held_seq(stack, node.id) == 3, 4)
    assert held_now(stack, node.id).held_keys == tuple(sorted((k2.key_id, k3.key_id)))
    with stack.db() as conn:
        dev = registry.find(conn, node.id)
    assert dev is not None and dev.fw_version == 2


def test_a_key_list_fits_the_esp32_heap_under_the_bootloader(stack: Stack, k1_images: Images,
                                                             tmp_path: Path) -> None:
    """On the ESP32 profile's heap (tools/sim/profiles.py), booting through the real
    bootloader as a fielded node does, the wake that takes a key list's last piece and the
    wake that checks and applies it both complete. Before, the last piece's wake checked the
    list with the session up, ran out of heap, crashed at every boot until safe mode, and
    safe mode refused the list."""
    images = k1_images
    stack.start()
    node = stack.add_node("ek0", seed=23, field=FieldModel.named("esp32"), send_every=2)
    image.install_sim(node.sim.dir, images.build(1), public_key=images.public)
    node.sim.entry = "boot"
    k1_priv = images.root / "keys" / keys.PRIVATE_NAME
    k2 = keys.keygen(tmp_path / "k2")

    async def send() -> str:
        before = len(node.log_text())
        text = ""
        for _ in range(4):  # a send every second wake, or the pending hint's early one
            await node.wake()
            text = node.log_text()[before:]
            if "connected in" in text:
                break
        assert "boot: slot a v1" in text and "connected in" in text, text
        return text

    async def main() -> None:
        await send()  # registered, on v1
        torpor(stack, "fw", "keys", "add", "--key", str(k2.private.parent), "--signing-key",
               str(k1_priv), "--all")
        for _ in range(4):
            await send()
            if held_seq(stack, node.id) == 1:
                break

    asyncio.run(asyncio.wait_for(main(), 240))
    h = held(stack, node.id)
    assert h["keys_seq"] == 1 and h["push"] == "applied", h
    log = node.log_text()
    assert "MemoryError" not in log and "wake failed" not in log and " safe=1 " not in log, log
    assert "firmware key list seq 1 applied" in log, log
    # The heap figures of the sending wakes (docs/ota.md, "Firmware signing keys"), for `-s`.
    for run in log.split("--- run ")[1:]:
        if "connected in" in run:
            what = ("apply" if "key list seq 1 applied" in run else
                    "pieces" if f"op={int(proto.CommandOp.SET_KEYS)} " in run else "send")
            print(what, next(ln for ln in run.splitlines() if ln.startswith("M ")))
