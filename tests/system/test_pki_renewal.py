"""The gateway renews the CRL and the broker's certificate on its own, on real parts.

The real gateway process supervises a real Mosquitto (2.0), with an issuing CA under the
root, a CRL that lapses after CRL_S seconds and a server certificate that expires after
SERVER_S seconds. A node running the real firmware must still connect after both would
have lapsed; a session held open the whole time must never drop; a second broker given
the same files but no renewal shows that they really do lapse.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gateway.security.pki import Pki
from gateway.store import readings
from tests.fixtures.broker import RunningBroker
from tests.mpharness import micropython_binary
from tests.system.stack import Stack

pytestmark = [
    pytest.mark.skipif(micropython_binary() is None, reason="no MicroPython unix port"),
    pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="no mosquitto-clients"),
]

CRL_S = 14.0  # the CRL's life; the gateway renews it at half of it
SERVER_S = 18.0  # the server certificate's life; renewed when 10 s are left
DAY = 86400.0


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path / "stack", None)
    try:
        yield s
    finally:
        s.close()


def pub(pki: Pki, port: int, device: str, creds: Any = None) -> subprocess.CompletedProcess[str]:
    """One connect and publish by a client that shares no code with Torpor."""
    creds = creds or pki.device_credentials(device)
    return subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "--cafile", str(pki.ca_pem),
         "--cert", str(creds.cert_pem), "--key", str(creds.key_pem), "-q", "1",
         "-t", f"torpor/{device}/probe", "-m", "x"],
        capture_output=True, text=True, timeout=15)


def test_crl_and_server_certificate_renewed_live_session_kept(stack: Stack, tmp_path: Path) -> None:
    pki = stack.pki
    pki.init_issuing()
    pki.issue_server(["localhost", "127.0.0.1", "::1"], days=SERVER_S / DAY)
    node = stack.add_node("n1", seed=5)  # signed by the issuing CA
    pki.issue_device("watcher")  # holds a session open throughout
    pki.issue_device("prober")  # connects with mosquitto_pub (a client id of its own)
    # A device whose certificate has lived 5 of its 6 days: one expiry event (1 day).
    Pki(pki.path, clock=lambda: dt.datetime.now(dt.UTC) - dt.timedelta(days=5)).issue_device(
        "elder", days=6)
    pki.write_crl(days=CRL_S / DAY)
    crl_lapses = pki.crls()[0].next_update_utc
    server_lapses = pki.status().credentials[2].not_after
    old_server = pki.server.serial
    assert crl_lapses is not None
    with open(stack.config_path, "a") as f:
        f.write(f"[pki]\ncheck_interval_s = 0.5\ncrl_days = {CRL_S / DAY!r}\n"
                f"crl_renew_at = 0.5\nserver_days = 10.0\nserver_lead_days = {10 / DAY!r}\n")
    # The same files without a gateway to renew them: they must lapse there.
    frozen = Pki(tmp_path / "frozen")
    shutil.copytree(pki.path, frozen.path)
    control = RunningBroker(tmp_path / "frozen-broker", frozen)
    control.start()
    stack.start()
    try:
        asyncio.run(asyncio.wait_for(
            _scenario(stack, node, control, max(crl_lapses, server_lapses)), 120))
    finally:
        control.stop()
    # Renewals and one expiry event for the elder device, in the status, also after a
    # restart of the gateway.
    status = json.loads(stack.cli("gateway", "status", "--json", check=False).stdout)
    kinds = [(e["kind"], e["name"]) for e in status["credential_events"]]
    assert ("renewed", "crl") in kinds and ("renewed", "server") in kinds, kinds
    left = status["detail"]["credentials_days_left"]
    assert left["crl"] >= 0 and left["server"] >= 0 and left["root_ca"] > 3000, left
    assert pki.server.serial != old_server
    assert pki.crls()[0].next_update_utc > crl_lapses  # type: ignore[operator]
    # `torpor device revoke` still cuts a node off: the issuing CA signs the new CRL.
    n1 = pki.device_credentials("n1")
    stack.cli("device", "revoke", "n1")
    assert n1.serial in {r.serial_number for r in pki.crls()[0]}
    assert pub(pki, stack.port, "n1", n1).returncode != 0
    stack.stop()
    stack.start()
    time.sleep(1.5)  # three checks of the lifetimes task
    with stack.db() as conn:
        told = conn.execute("SELECT subject, threshold_days FROM credential_events "
                            "WHERE kind = 'expiring'").fetchall()
    # The 30- and 7-day thresholds never applied to a 6-day certificate; the CRLs and
    # server certificates, renewed in time, raise none.
    assert sorted(told) == [("elder", 1)], told
    assert stack.log_text().count("the device credential elder expires") == 1


async def _scenario(stack: Stack, node: Any, control: RunningBroker, lapse: dt.datetime) -> None:
    pki = stack.pki
    watcher = pki.device_credentials("watcher")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_pem))
    ctx.load_cert_chain(str(watcher.cert_pem), str(watcher.key_pem))
    async with aiomqtt.Client("127.0.0.1", stack.port, identifier="watcher", tls_context=ctx,
                              keepalive=5) as live:
        await live.subscribe("torpor/watcher/echo", qos=1)
        first = await node.wake()
        assert first.kinds["sleep"] == 1, (first.as_dict(), node.log_text()[-2000:])
        assert pub(pki, control.port, "prober").returncode == 0
        # Wait until both the first CRL and the first server certificate have lapsed.
        while dt.datetime.now(dt.UTC) < lapse + dt.timedelta(seconds=1.5):
            await asyncio.sleep(0.5)
        # Without renewal the broker refuses everyone...
        refused = pub(pki, control.port, "prober")
        assert refused.returncode != 0, "the control broker still accepts a lapsed CRL"
        # ...with it, a node running the real firmware connects and delivers,
        second = await node.wake()
        assert second.kinds["sleep"] == 1, (second.as_dict(), node.log_text()[-2000:])
        ok = pub(pki, stack.port, "prober")
        assert ok.returncode == 0, ok.stderr
        # and the session opened before every renewal is still the same one.
        await live.publish("torpor/watcher/echo", b"still here", qos=1)
        async with asyncio.timeout(5):
            async for message in live.messages:
                assert bytes(message.payload) == b"still here"
                break
    log = stack.log_text()
    assert "renewed the crl credential" in log and "renewed the server credential" in log, log[-3000:]
    assert log.count("mosquitto exited") == 0
    with stack.db() as conn:
        stored = readings.count_rows(conn, "n1")
    assert stored >= 2, "both wakes delivered readings"


def _openssl_accepts(port: int, cafile: Path, creds: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(cafile),
         "-cert", str(creds.cert_pem), "-key", str(creds.key_pem), "-verify_return_error",
         "-brief"], input="", capture_output=True, text=True, timeout=15)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_migrating_a_root_signed_fleet_keeps_its_nodes(tmp_path: Path) -> None:
    """A fleet whose root (pathlen 0) signed everything gets an issuing CA: old devices
    still connect, new ones are signed by the issuing CA, revocation works for both, and
    the broker's certificate stays one that nodes holding the old root accept."""
    pki = Pki(tmp_path / "pki")
    pki.init_ca(path_length=0)
    pki.issue_server(["localhost", "127.0.0.1"])
    pki.issue_gateway()
    pki.issue_device("old-node")
    pki.issue_device("prober")
    broker = RunningBroker(tmp_path / "broker", pki)
    broker.start()
    try:
        assert pub(pki, broker.port, "old-node").returncode == 0
        old_root = pki.path / "old-root.pem"
        shutil.copy(pki.ca_pem, old_root)
        pki.init_issuing()
        broker.restart()  # cafile (root + issuing) is read at start only
        assert pub(pki, broker.port, "old-node").returncode == 0
        pki.issue_device("new-node")
        assert pub(pki, broker.port, "new-node").returncode == 0
        # The server certificate, renewed now, is still signed by the root: a node holding
        # the old root (pathlen 0) accepts it; an issuing-CA one it would refuse.
        pki.renew_server(days=30)
        broker.reload()
        prober = pki.device_credentials("prober")
        seen = _openssl_accepts(broker.port, old_root, prober)
        assert "Verification: OK" in seen.stderr, seen.stderr
        held = {d: pki.device_credentials(d) for d in ("new-node", "old-node")}
        pki.revoke("new-node")  # on the issuing CA's CRL
        pki.revoke("old-node")  # on the root's (the root key is at hand here)
        broker.reload()
        for device, creds in held.items():
            assert pub(pki, broker.port, device, creds).returncode != 0, device
        assert pub(pki, broker.port, "prober").returncode == 0
        # Once every node holds the new root, the issuing CA signs the server's too.
        (pki.path / "ca-pathlen0.pem").unlink()
        pki.renew_server(days=30)
        broker.reload()
        refused = _openssl_accepts(broker.port, old_root, prober)
        assert "path length constraint exceeded" in refused.stdout + refused.stderr
        assert "Verification: OK" in _openssl_accepts(broker.port, pki.ca_pem, prober).stderr
        assert pub(pki, broker.port, "prober").returncode == 0
    finally:
        broker.stop()
