"""A firmware campaign end to end: images built and signed off the gateway, a staged
rollout through the real gateway to sim nodes that boot through the real bootloader, one
node given an image that never reaches the gateway (its trial is reverted by the
bootloader), and the campaign's record of it all."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.firmware.test_node_cycle import provision
from tests.system.stack import Stack, StackNode
from tools.fw import image, keys

# A trial image that starts, never connects and sleeps: the bootloader's health check
# (no confirm within one trial boot) reverts it.
SILENT_MAIN = "import board\nprint('silent image up')\nboard.deep_sleep(60000)\n"


@dataclass(frozen=True, slots=True)
class Images:
    root: Path
    key: Ed25519PrivateKey
    public: bytes
    pubkey_path: Path

    def build(self, version: int, main: str | None = None, tag: str = "") -> Path:
        out = self.root / f"v{version}{tag}"
        if not (out / image.SIGNATURE).exists():
            image.build_image("sim", version, out, display=f"{version}{tag}",
                              overrides={"main": main} if main else None)
            image.sign_image(out, self.key)
        return out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    root = tmp_path_factory.mktemp("images")
    paths = keys.keygen(root / "keys")
    return Images(root, keys.load_private(paths.private), keys.load_public(paths.public),
                  paths.public)


def boot_node(stack: Stack, images: Images, name: str, seed: int, **config: object) -> StackNode:
    """A stack node provisioned with the v1 image, booting through the bootloader. Class
    controller: 2 KB frames and a budget of about 16 KB per 30 s wake, so an image of about
    50 KB arrives in a handful of wakes (the sensor class takes about 50; see docs/ota.md)."""
    node = stack.add_node(name, seed, device_class="controller")
    cfg: dict[str, object] = {
        "device_id": name, "broker_host": stack.host, "broker_port": stack.port,
        "server_hostname": "localhost", "sample_interval_s": 600, "send_every": 1,
        "send_max_age_s": 86400, "awake_window_ms": 3000, "awake_budget_ms": 8000,
        "align_s": 60, "device_class": 3, **config}
    provision(node.sim, cfg, node.creds)
    image.install_sim(node.sim.dir, images.build(1), public_key=images.public)
    node.sim.entry = "boot"
    return node


def campaign(stack: Stack, cid: int) -> dict[str, object]:
    out = stack.cli("ota", "status", str(cid), "--json")
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def device_states(stack: Stack, cid: int) -> dict[str, str]:
    return {d["device"]: d["status"] for d in campaign(stack, cid)["devices"]}  # type: ignore[attr-defined, index]


async def wake_all(nodes: list[StackNode], rounds: int) -> None:
    for _ in range(rounds):
        await asyncio.gather(*(n.wake() for n in nodes))


def test_campaign_confirms_four_and_records_the_revert(stack: Stack, images: Images) -> None:
    stack.start()
    nodes = [boot_node(stack, images, f"ota{i}", 50 + i) for i in range(5)]
    asyncio.run(wake_all(nodes, 1))  # registered and seen on v1
    v2 = images.build(2)
    bad = images.build(2, SILENT_MAIN, "silent")
    stack.cli("ota", "campaign", "create", "--image", str(v2), "--devices",
              ",".join(n.id for n in nodes), "--rate", "2", "--abort-threshold", "25",
              "--timeout", "1h", "--pubkey", str(images.pubkey_path),
              "--override", f"ota4={bad}")
    assert sorted(device_states(stack, 1).values()) == ["pending"] * 3 + ["queued"] * 2

    async def run() -> None:
        for _ in range(40):
            await wake_all(nodes, 1)
            if campaign(stack, 1)["status"] != "running":
                return

    asyncio.run(run())
    c = campaign(stack, 1)
    states = device_states(stack, 1)
    assert c["status"] == "completed", (c, stack.log_text()[-4000:])
    assert states == {"ota0": "confirmed", "ota1": "confirmed", "ota2": "confirmed",
                      "ota3": "confirmed", "ota4": "reverted"}
    reverted = next(d for d in c["devices"] if d["device"] == "ota4")  # type: ignore[attr-defined]
    assert reverted["reason"] == "health_check"
    # The nodes run what the campaign says: v2 on four, v1 back on the fifth.
    with stack.db() as conn:
        fw = dict(conn.execute("SELECT id, fw_version FROM devices").fetchall())
    assert fw == {"ota0": 2, "ota1": 2, "ota2": 2, "ota3": 2, "ota4": 1}
    assert "silent image up" in nodes[4].log_text()
    # Every OTA item left the queues.
    with stack.db() as conn:
        left = conn.execute("SELECT count(*) FROM downlink_items WHERE kind IN (8, 9) AND "
                            "status IN ('queued', 'sent')").fetchone()[0]
    assert left == 0


def test_abort_threshold_stops_widening(stack: Stack, images: Images) -> None:
    stack.start()
    nodes = [boot_node(stack, images, f"ab{i}", 70 + i) for i in range(3)]
    asyncio.run(wake_all(nodes, 1))
    bad = images.build(2, SILENT_MAIN, "silent")
    stack.cli("ota", "campaign", "create", "--image", str(bad), "--devices",
              ",".join(n.id for n in nodes), "--rate", "1", "--abort-threshold", "0")

    async def run() -> None:
        for _ in range(20):
            await wake_all(nodes[:1], 1)
            if campaign(stack, 1)["status"] != "running":
                return

    asyncio.run(run())
    c = campaign(stack, 1)
    assert c["status"] == "aborted", c
    assert device_states(stack, 1) == {"ab0": "reverted", "ab1": "cancelled", "ab2": "cancelled"}
    asyncio.run(wake_all(nodes[1:], 1))
    assert all("boot: slot a v1 trial=0" in n.log_text() for n in nodes[1:])
    with stack.db() as conn:
        left = conn.execute("SELECT count(*) FROM downlink_items WHERE kind IN (8, 9) AND "
                            "status IN ('queued', 'sent')").fetchone()[0]
    assert left == 0
