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
import select
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import proto
from gateway.store import readings
from gateway.store import session_keys as sk
from tests.fixtures.broker import free_port
from tests.mpharness import micropython_binary
from tests.system.stack import Stack, StackNode

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


async def until_psk_node(stack: Stack, node: StackNode, wakes: int = 5) -> list[int]:
    """Wake the node until a wake's session is the PSK one; the sessions seen."""
    seen = []
    for _ in range(wakes):
        t = await wake_ok(node)
        seen.append(t["session"])
        if t["session"] == PSK:
            return seen
        await until(lambda: (k := key_of(stack, node.id)) is not None, "a session key queued")
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
