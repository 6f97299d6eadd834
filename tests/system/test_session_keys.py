"""TLS-PSK session keys for routine sends, on real parts: the real gateway process
supervising a real Mosquitto with a mutual-TLS and a PSK listener, and a sim node running
the real firmware in the MicroPython unix port.

The gateway issues a key over the node's certificate session (install_psk); the node's
next routine sends take the PSK listener; readings are stored exactly once across the
switch; a wrong key is refused and the node falls back to its certificate in the same
wake; revoking the device takes its key off the broker and cuts a live PSK session within
seconds. Attacks use mosquitto_pub and mosquitto_sub, which share no code with Torpor.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import select
import shutil
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import proto
from gateway.store import db, readings
from gateway.store import devices as registry
from gateway.store import session_keys as sk
from tests.fixtures.broker import free_port
from tests.mpharness import micropython_binary
from tests.system.stack import ROOT, Stack, StackNode

pytestmark = [
    pytest.mark.skipif(micropython_binary() is None, reason="no MicroPython unix port"),
    pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="no mosquitto-clients"),
]

INSTALL_PSK = int(proto.CommandOp.INSTALL_PSK)
CERT, PSK, FALLBACK = 0, 1, 2  # the node's "T" line session=


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path / "stack", None)
    s.psk_port = free_port()  # type: ignore[attr-defined]
    text = s.config_path.read_text().replace("[broker]\n", f"[broker]\npsk_port = {s.psk_port}\n", 1)  # type: ignore[attr-defined]
    s.config_path.write_text(text + "[pki]\nrotation_poll_s = 0.1\n")
    try:
        yield s
    finally:
        s.close()


def aio(coro: Any) -> None:
    asyncio.run(asyncio.wait_for(coro, 240))


async def until(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"not met within {timeout:g}s: {what}"
        await asyncio.sleep(0.05)


async def wake_ok(node: StackNode) -> dict[str, int]:
    """One wake that reaches the gateway and has its readings acknowledged: its T line."""
    before = len(node.log_text())
    summary = await node.wake()
    text = node.log_text()[before:]
    assert summary.kinds.get("sleep") == 1, summary.as_dict()
    assert "connected in" in text and "send failed" not in text and "no ACK" not in text, text
    return node.log().timings[-1]


def key_of(stack: Stack, device: str) -> sk.SessionKey | None:
    with stack.db() as conn:
        return sk.get(conn, device)


def psk_pub(stack: Stack, device: str, key: bytes, *, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    """One message on the device's topic over the PSK listener, by mosquitto_pub."""
    return subprocess.run(
        ["mosquitto_pub", "-h", stack.host, "-p", str(stack.psk_port),  # type: ignore[attr-defined]
         "--psk", key.hex(), "--psk-identity", device, "-q", "1",
         "-t", f"torpor/{device}/status", "-m", "psk probe"],
        capture_output=True, text=True, timeout=timeout)


def stored(stack: Stack, device: str) -> tuple[int, int]:
    """(readings stored, distinct (device, id) rows): equal when stored exactly once."""
    with stack.db() as conn:
        rows = readings.count_rows(conn, device)
        _, _, total = readings.stats(conn, device)
    return rows, total


async def key_in_force(stack: Stack, device: str) -> sk.SessionKey:
    """Wait until the node's newly stored key is on the broker (the gateway activates it
    within a poll and reloads the broker): a sim node's next wake follows at once, a real
    node's minutes later."""
    await until(lambda: (n := key_of(stack, device)) is not None and n.state == sk.ACTIVE,
                "the key active")
    k = key_of(stack, device)
    assert k is not None
    await until(lambda: psk_pub(stack, device, k.key).returncode == 0, "the broker takes the key")
    return k


async def until_psk_node(stack: Stack, node: StackNode, wakes: int = 5) -> list[int]:
    """Wake the node until a wake's session is the PSK one; the sessions seen."""
    seen = []
    for _ in range(wakes):
        ran = len([e for e in node.executions() if e.op == INSTALL_PSK])
        t = await wake_ok(node)
        seen.append(t["session"])
        if t["session"] == PSK:
            return seen
        if len([e for e in node.executions() if e.op == INSTALL_PSK]) > ran:
            await key_in_force(stack, node.id)
        else:
            await until(lambda: key_of(stack, node.id) is not None, "a session key queued")
    raise AssertionError(f"no PSK session in {wakes} wakes ({seen}):\n{stack.log_text()[-4000:]}")


def test_routine_sends_take_the_session_key_and_readings_are_stored_once(stack: Stack) -> None:
    async def main() -> None:
        stack.start()
        node = stack.add_node("n1", seed=5)
        sessions = await until_psk_node(stack, node)
        assert sessions[0] == CERT, sessions  # the first wake has no key yet
        assert INSTALL_PSK in [e.op for e in node.executions()]
        k = key_of(stack, "n1")
        assert k is not None and k.state == sk.ACTIVE and len(k.key) == 32
        # Further routine wakes stay on the PSK path.
        for _ in range(3):
            assert (await wake_ok(node))["session"] == PSK
        logged = node.log().readings
        rows, total = stored(stack, "n1")
        assert rows == total == len(logged), (rows, total, len(logged))
        # The key works for a client that shares no code with Torpor, as the device only.
        assert psk_pub(stack, "n1", k.key).returncode == 0
        assert psk_pub(stack, "n1", bytes(32)).returncode != 0
        assert psk_pub(stack, "n2", k.key).returncode != 0

    aio(main())


def flash_write(node: StackNode, path: str, data: bytes) -> None:
    """Write a file into the sleeping node's littlefs image (the same simflash the sim
    board mounts), as a fault or an attacker with the flash chip would."""
    sim = node.sim
    code = (
        "import simflash, binascii\n"
        f"simflash.mount({str(sim.dir / 'flash.img')!r}, '/flash', {sim.model.block_size}, "
        f"{sim.model.block_count})\n"
        f"f = open('/flash/' + {path!r}, 'wb')\n"
        f"f.write(binascii.unhexlify({data.hex()!r}))\n"
        "f.close()\n"
    )
    proc = subprocess.run([sim.binary, "-c", code], capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, MICROPYPATH=f".frozen:{ROOT / 'boards'}"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def psk_file(key_id: int, port: int, key: bytes) -> bytes:
    """certs/psk.bin as firmware/psk.py writes it."""
    body = struct.pack("<IH", key_id, port) + key
    return body + hashlib.sha256(body).digest()[:4]


def test_a_wrong_key_is_refused_and_the_node_falls_back_to_its_certificate(stack: Stack) -> None:
    async def main() -> None:
        stack.start()
        node = stack.add_node("n1", seed=6)
        await until_psk_node(stack, node)
        k = key_of(stack, "n1")
        assert k is not None
        flash_write(node, "certs/psk.bin", psk_file(k.key_id, stack.psk_port, b"\xee" * 32))  # type: ignore[attr-defined]
        before = len(node.log_text())
        t = await wake_ok(node)
        text = node.log_text()[before:]
        assert t["session"] == FALLBACK, text
        assert f"session key {k.key_id} refused" in text, text
        # The refused key is dropped and the HELLO said so: once the node sleeps, the gateway
        # withdraws the key it no longer holds and queues a new one.
        await until(lambda: (n := key_of(stack, "n1")) is not None and n.key_id != k.key_id,
                    "a new key queued", timeout=20)
        # The next routine send goes straight to the certificate and receives it; the one
        # after is on PSK again.
        assert (await wake_ok(node))["session"] == CERT
        await key_in_force(stack, "n1")
        assert (await wake_ok(node))["session"] == PSK
        logged = node.log().readings
        rows, total = stored(stack, "n1")
        assert rows == total == len(logged), (rows, total, len(logged))

    aio(main())


def test_the_key_is_renewed_before_it_lapses_over_the_certificate(tmp_path: Path) -> None:
    s = Stack(tmp_path / "stack", None)
    s.psk_port = free_port()  # type: ignore[attr-defined]
    text = s.config_path.read_text().replace("[broker]\n", f"[broker]\npsk_port = {s.psk_port}\n", 1)  # type: ignore[attr-defined]
    # A key lives 20 s and is withdrawn for renewal 10 s before that.
    s.config_path.write_text(text + "[pki]\nrotation_poll_s = 0.1\nsession_key_days = "
                             f"{20 / 86400!r}\nsession_key_lead_days = {10 / 86400!r}\n")

    async def main() -> None:
        s.start()
        node = s.add_node("n1", seed=7)
        await until_psk_node(s, node)
        old = key_of(s, "n1")
        assert old is not None and old.state == sk.ACTIVE
        # Due: the old key leaves the broker, a new one waits in the queue.
        await until(lambda: (k := key_of(s, "n1")) is not None and k.key_id != old.key_id,
                    "a new key queued", timeout=30)
        await until(lambda: psk_pub(s, "n1", old.key).returncode != 0, "the old key refused")
        # The node's old key is refused: the certificate carries the wake and the new key.
        t = await wake_ok(node)
        assert t["session"] == FALLBACK
        await key_in_force(s, "n1")
        assert (await wake_ok(node))["session"] == PSK
        new = key_of(s, "n1")
        assert new is not None and new.key != old.key

    try:
        aio(main())
    finally:
        s.close()


def test_revoking_the_device_cuts_a_live_psk_session_and_refuses_its_key(stack: Stack) -> None:
    async def main() -> None:
        stack.start()
        node = stack.add_node("n1", seed=8)
        await until_psk_node(stack, node)
        k = key_of(stack, "n1")
        assert k is not None
        # A live session on the device's key, held by a client that shares no code with Torpor.
        sub = subprocess.Popen(
            ["stdbuf", "-oL", "mosquitto_sub", "-h", stack.host, "-p", str(stack.psk_port),  # type: ignore[attr-defined]
             "--psk", k.key.hex(), "--psk-identity", "n1", "-t", "torpor/n1/down", "-d"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert sub.stdout is not None
        out = ""
        try:
            deadline = time.monotonic() + 10
            while "SUBACK" not in out:
                assert time.monotonic() < deadline, f"mosquitto_sub never subscribed:\n{out}"
                if select.select([sub.stdout], [], [], 0.2)[0]:
                    out += sub.stdout.readline()
            t0 = time.monotonic()
            stack.cli("device", "revoke", "n1")
            # Cut: mosquitto_sub sees its connection end and cannot open a new one.
            deadline = t0 + 10
            while "Connection error" not in out and "Error" not in out.split("SUBACK", 1)[1]:
                assert time.monotonic() < deadline, f"the PSK session was not cut:\n{out}"
                if select.select([sub.stdout], [], [], 0.2)[0]:
                    out += sub.stdout.readline()
                    if not out.endswith("\n"):
                        break
            cut_s = time.monotonic() - t0
        finally:
            sub.kill()
            sub.wait(5)
        assert psk_pub(stack, "n1", k.key).returncode != 0
        assert key_of(stack, "n1") is None
        print(f"\nrevoke command to PSK session cut: {cut_s:.2f}s")

    aio(main())


def test_a_quarantined_device_loses_its_key_and_gets_a_new_one_when_released(stack: Stack) -> None:
    async def main() -> None:
        stack.start()
        node = stack.add_node("n1", seed=9)
        await until_psk_node(stack, node)
        k = key_of(stack, "n1")
        assert k is not None and psk_pub(stack, "n1", k.key).returncode == 0
        # Quarantined as ingest does it (the registry), the broker follows within seconds.
        with stack.db() as conn, db.transaction(conn):
            registry.quarantine(conn, "n1", "test: hostile frames")
        await until(lambda: psk_pub(stack, "n1", k.key).returncode != 0, "the key refused")
        await until(lambda: key_of(stack, "n1") is None, "the key row dropped")
        stack.cli("device", "release", "n1")
        # Released: its key is gone, so the next wake falls back to the certificate and
        # receives a new key; the one after is on PSK again.
        assert (await wake_ok(node))["session"] == FALLBACK
        await key_in_force(stack, "n1")
        assert (await wake_ok(node))["session"] == PSK
        new = key_of(stack, "n1")
        assert new is not None and new.key != k.key

    aio(main())
