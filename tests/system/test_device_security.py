"""A device is its certificate, end to end: the gateway as a process with its own supervised
Mosquitto (mutual TLS, ACL, CRL), sim nodes running the real firmware, MQTT clients holding
device certificates, and an upstream broker receiving the device events.

Revocation (`torpor device revoke`) cuts a live session within seconds and refuses the next
connect; a device cannot publish as another; foreign-CA, expired and self-signed
certificates get nothing in and the node keeps its readings in flash; malformed frames land
in the dead-letter table byte for byte and quarantine the sender until
`torpor device release`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway import proto
from gateway.security.pki import DeviceCredentials, Pki
from gateway.transport import topics
from tests.firmware.test_node_cycle import read_log
from tests.fixtures.broker import RunningBroker, free_port, make_pki
from tests.mpharness import micropython_binary
from tests.system.test_gateway_faults import (
    ROOT,
    Gateway,
    Received,
    gateway_config,
    sim_node,
    stored,
    subscribe_upstream,
    until,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(micropython_binary() is None, reason="no MicroPython unix port"),
]


@dataclasses.dataclass(slots=True)
class SecStack:
    gw: Gateway
    pki: Pki
    port: int
    upstream: RunningBroker
    tmp: Path


def _stack(tmp: Path, pki: Pki, upstream: RunningBroker, ingest: str = "") -> Iterator[SecStack]:
    port = free_port()
    gw = Gateway(gateway_config(tmp, pki, broker_port=port, external=False,
                                upstream_port=upstream.port, ingest=ingest))
    gw.start()
    try:
        gw.wait_running()
        yield SecStack(gw, pki, port, upstream, tmp)
    finally:
        code = gw.stop()
    assert code == 0, gw.log.read_text()[-3000:]


@pytest.fixture
def sec_stack(tmp_path: Path, pki: Pki, broker_factory: Callable[..., RunningBroker]) -> Iterator[SecStack]:
    yield from _stack(tmp_path, pki, broker_factory(tls=False))


@pytest.fixture
def strict_sec_stack(tmp_path: Path, pki: Pki,
                 broker_factory: Callable[..., RunningBroker]) -> Iterator[SecStack]:
    yield from _stack(tmp_path, pki, broker_factory(tls=False),
                      ingest="malformed_threshold = 3\nmalformed_window_s = 60")


def device_client(s: SecStack, creds: DeviceCredentials, identifier: str | None = None,
                  **kw: object) -> aiomqtt.Client:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(s.pki.ca_pem))
    ctx.load_cert_chain(str(creds.cert_pem), str(creds.key_pem))
    return aiomqtt.Client("127.0.0.1", s.port, tls_context=ctx, timeout=5,
                          identifier=identifier or creds.device_id, **kw)  # type: ignore[arg-type]


def burst(first: int, n: int = 4) -> bytes:
    series = proto.Series(tuple(1_767_225_600 + 60 * i for i in range(n)),
                          (tuple(2000 + i for i in range(n)), (5000,) * n, (3700,) * n))
    return proto.encode_burst(proto.Burst(first, proto.SCHEMA_ENV3, 60, series))


async def send_until_acked(c: aiomqtt.Client, device: str, frame: bytes, first: int,
                           tries: int = 20) -> proto.Ack:
    """Publish a burst and wait for its ACK, resending on silence (as a node would)."""
    for _ in range(tries):
        await c.publish(topics.up(device), frame, qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                async for m in c.messages:
                    f = proto.decode(bytes(m.payload))  # type: ignore[arg-type]
                    if isinstance(f, proto.Ack) and f.msg_id == first:
                        return f
    raise AssertionError(f"{device}: burst {first} never acknowledged")


async def cli(s: SecStack, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tools.cli", *args, "--config", str(s.gw.config), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


# ---- certificates the fleet CA did not issue (or issued long ago) --------------------------

def _write_creds(folder: Path, device_id: str, cert: x509.Certificate,
                 key: ec.EllipticCurvePrivateKey, ca_der: Path) -> DeviceCredentials:
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "cert.pem": cert.public_bytes(serialization.Encoding.PEM),
        "cert.der": cert.public_bytes(serialization.Encoding.DER),
        "key.pem": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()),
        "key.der": key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return DeviceCredentials(
        device_id=device_id, serial=cert.serial_number, not_after=cert.not_valid_after_utc,
        cert_pem=folder / "cert.pem", key_pem=folder / "key.pem", cert_der=folder / "cert.der",
        key_der=folder / "key.der", ca_pem=ca_der.with_suffix(".pem"), ca_der=ca_der,
    )


def forged(pki: Pki, folder: Path, device_id: str, *, self_signed: bool = False,
           expired: bool = False) -> DeviceCredentials:
    """A client certificate with CN = device_id: signed by the fleet CA but expired, or
    self-signed. The node trusts the fleet CA, so only the broker's check stands between it
    and the fleet."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    now = dt.datetime.now(dt.UTC)
    if self_signed:
        issuer, signer = subject, key
    else:
        ca = x509.load_pem_x509_certificate(pki.ca_pem.read_bytes())
        ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        issuer, signer = ca.subject, ca_key
    start, end = (now - dt.timedelta(days=30), now - dt.timedelta(days=1)) if expired else (
        now - dt.timedelta(minutes=5), now + dt.timedelta(days=30))
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(signer, hashes.SHA256())
    )
    return _write_creds(folder, device_id, cert, key, pki.ca_der)


# ---- tests --------------------------------------------------------------------------------

def test_revoke_cuts_the_live_session_within_seconds_and_refuses_the_next_connect(
    sec_stack: SecStack,
) -> None:
    s = sec_stack
    creds = s.gw.register(s.pki, "rv1", "ok1")
    node = sim_node(s.tmp, "rv1", 61, s.port, creds["rv1"], send_every=1, awake_budget_ms=3000)
    got = Received()

    async def main() -> float:
        ready = asyncio.Event()
        consumer = asyncio.create_task(
            subscribe_upstream(s.upstream, got, ready, time.monotonic() + 90))
        await asyncio.wait_for(ready.wait(), 10)
        first = await node.run(1, wall_limit_s=30)
        assert first.kinds["sleep"] == 1
        assert [r[0] for r in stored(s.gw, "rv1")] == [1], "the node got in before revocation"
        # A live session of rv1 (its own client id, so the node's wakes do not replace it)
        # and one of another device, which must survive the kick.
        async with device_client(s, creds["rv1"], "rv1-live") as live, \
                device_client(s, creds["ok1"]) as other:
            for c, dev in ((live, "rv1"), (other, "ok1")):
                await c.subscribe(topics.down(dev), qos=1)
            await send_until_acked(live, "rv1", burst(1000), 1000)
            await send_until_acked(other, "ok1", burst(1), 1)
            t0 = time.monotonic()
            code, out = await cli(s, "device", "revoke", "rv1")
            assert code == 0, out
            assert "revoked" in out and "new connections refused" in out and "cut" in out, out
            with pytest.raises(aiomqtt.MqttError):
                async with asyncio.timeout(15):
                    async for _ in live.messages:
                        pass
            cut_s = time.monotonic() - t0
            await send_until_acked(other, "ok1", burst(5), 5)
        with pytest.raises(aiomqtt.MqttError):
            async with device_client(s, creds["rv1"], "rv1-again") as again:
                await again.publish(topics.up("rv1"), burst(2000), qos=1)
        # The node's next wake is refused by the broker; its readings stay in flash.
        second = await node.run(2, wall_limit_s=40)
        assert second.kinds["sleep"] == 2
        await until(lambda: "revoked" in got.event_kinds("rv1"), 10, "the revoked event")
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        return cut_s

    cut_s = asyncio.run(main())
    print(f"\nrevoke command to session cut: {cut_s:.2f}s")
    assert cut_s < 10.0, "the live session outlived the revocation by more than seconds"
    log = read_log(node)
    assert "send failed" in log.text and log.timings[-1]["depth"] == 2
    assert [r[0] for r in stored(s.gw, "rv1")] == [1] + list(range(1000, 1004))
    assert [r[0] for r in stored(s.gw, "ok1")] == list(range(1, 9))
    (status, reason), = s.gw.query("SELECT status, status_reason FROM devices WHERE id='rv1'")
    assert status == "revoked" and "operator" in reason
    assert creds["rv1"].serial in s.pki.revoked_serials()
    assert s.gw.query("SELECT status FROM devices WHERE id='ok1'") == [("provisioned",)]
    event = next(e for e in got.events if e["device"] == "rv1" and e["event"] == "revoked")
    assert event["fields"]["serials"] == [format(creds["rv1"].serial, "x")]
    # Revoking again is harmless and says so; an unknown device is an error.
    again = s.gw.cli("device", "revoke", "rv1")
    assert again.returncode == 0 and "none new" in again.stdout, again.stdout + again.stderr
    unknown = s.gw.cli("device", "revoke", "nobody")
    assert unknown.returncode == 2 and "no device 'nobody'" in unknown.stderr


def test_a_device_cannot_publish_or_listen_as_another(sec_stack: SecStack) -> None:
    s = sec_stack
    creds = s.gw.register(s.pki, "sa", "sb")
    overheard: list[str] = []

    async def main() -> None:
        async with device_client(s, creds["sa"]) as a, device_client(s, creds["sb"]) as b:
            # The broker's ACL confines sa to torpor/sa/#: what it publishes elsewhere is
            # dropped before the gateway sees it, and it hears nothing of other devices.
            await a.subscribe(topics.down("sb"), qos=1)
            await a.subscribe("torpor/+/down", qos=1)
            await a.publish(topics.up("sb"), burst(1), qos=1)
            await a.publish(topics.up("sb"), proto.encode_hello(hello(1)), qos=1)
            # Its own topic works, and the gateway handles frames in order: once this is
            # acknowledged, a forwarded spoof would have been processed already.
            await send_until_acked(a, "sa", burst(100), 100)
            await b.subscribe(topics.down("sb"), qos=1)
            await send_until_acked(b, "sb", burst(50), 50)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    async for m in a.messages:
                        overheard.append(str(m.topic))

    asyncio.run(main())
    assert all(t == topics.down("sa") for t in overheard), overheard
    assert [r[0] for r in stored(s.gw, "sb")] == list(range(50, 54)), "a spoofed frame got in"
    assert [r[0] for r in stored(s.gw, "sa")] == list(range(100, 104))
    assert s.gw.query("SELECT count(*) FROM dead_letters") == [(0,)]
    assert s.gw.query("SELECT last_hello_at FROM devices WHERE id='sb'") == [(None,)]


def hello(msg_id: int) -> proto.Hello:
    return proto.Hello(msg_id, 1, proto.BootCause.TIMER, 3700, -60, 50000, 0, 0, 60, 1000,
                       1_767_225_600, proto.DeviceClass.SENSOR)


def test_foreign_expired_and_self_signed_certificates_are_refused(sec_stack: SecStack) -> None:
    s = sec_stack
    s.gw.register(s.pki, "xf", "xe", "xs", issue=False)
    foreign_pki = make_pki(s.tmp / "foreign-pki")
    bad = {
        # Issued by another CA; it trusts our broker, so only the client check refuses it.
        "xf": dataclasses.replace(foreign_pki.issue_device("xf"), ca_der=s.pki.ca_der),
        "xe": forged(s.pki, s.tmp / "forged-xe", "xe", expired=True),
        "xs": forged(s.pki, s.tmp / "forged-xs", "xs", self_signed=True),
    }
    nodes = {d: sim_node(s.tmp, d, 70 + i, s.port, c, send_every=1, awake_budget_ms=3000)
             for i, (d, c) in enumerate(bad.items())}

    async def main() -> None:
        await asyncio.gather(*(n.run(2, wall_limit_s=40) for n in nodes.values()))
        for d, c in bad.items():
            with pytest.raises(aiomqtt.MqttError):
                async with device_client(s, c) as client:
                    await client.publish(topics.up(d), burst(1), qos=1)

    asyncio.run(main())
    for d, node in nodes.items():
        log = read_log(node)
        assert "send failed" in log.text, d
        assert sorted(log.readings) == [1, 2] and log.timings[-1]["depth"] == 2, (d, log.timings)
        assert stored(s.gw, d) == []
    assert s.gw.query("SELECT count(*) FROM dead_letters") == [(0,)]
    assert s.gw.query("SELECT count(*) FROM devices WHERE last_seen IS NOT NULL") == [(0,)]


def test_malformed_frames_are_kept_raw_quarantine_the_sender_and_release_lets_it_back(
    strict_sec_stack: SecStack,
) -> None:
    s = strict_sec_stack
    creds = s.gw.register(s.pki, "mq")
    junk = [b"\x00", b"\x01\x02" + bytes(range(40)), burst(1)[:-3]]
    got = Received()

    async def main() -> None:
        ready = asyncio.Event()
        consumer = asyncio.create_task(
            subscribe_upstream(s.upstream, got, ready, time.monotonic() + 90))
        await asyncio.wait_for(ready.wait(), 10)
        with contextlib.suppress(aiomqtt.MqttError):  # the broker cuts it at quarantine
            async with device_client(s, creds["mq"]) as c:
                await c.subscribe(topics.down("mq"), qos=1)
                await send_until_acked(c, "mq", burst(1), 1)
                for payload in junk:
                    await c.publish(topics.up("mq"), payload, qos=1)
                await until(lambda: s.gw.query("SELECT status FROM devices WHERE id='mq'")
                            == [("quarantined",)], 10, "quarantine")
                for _ in range(300):  # the broker refuses it within a status interval
                    await asyncio.sleep(0.1)
                    await c.publish(topics.down("mq"), b"", qos=0)  # raises once cut
            raise AssertionError("the quarantined device's session was not cut")
        # Quarantined: the broker takes its connection but passes nothing it publishes.
        async with device_client(s, creds["mq"]) as c:
            await c.publish(topics.up("mq"), burst(5), qos=1)
            await asyncio.sleep(1.0)
        assert not s.gw.query("SELECT count(*) FROM dead_letters WHERE reason='quarantined'")[0][0]
        code, out = await cli(s, "device", "release", "mq")
        assert code == 0 and "active" in out, out
        await asyncio.sleep(1.0)  # the broker serves it again within a status interval
        async with device_client(s, creds["mq"]) as c:
            await c.subscribe(topics.down("mq"), qos=1)
            await send_until_acked(c, "mq", burst(5), 5)
        await until(lambda: {"quarantined", "released"} <= set(got.event_kinds("mq")), 10,
                    "the quarantine events upstream")
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer

    asyncio.run(main())
    letters = s.gw.query("SELECT reason, raw FROM dead_letters WHERE device='mq' ORDER BY id")
    assert [(r, bytes(b)) for r, b in letters] == [("malformed", j) for j in junk]
    assert [r[0] for r in stored(s.gw, "mq")] == list(range(1, 9))
    kinds = got.event_kinds("mq")
    assert kinds.index("quarantined") < kinds.index("released")
    q = next(e for e in got.events if e["event"] == "quarantined")
    assert "3 malformed frames" in q["fields"]["reason"]


def test_revoke_with_an_external_broker_reloads_the_given_pid(
    tmp_path: Path, broker: RunningBroker,
) -> None:
    pki = broker.pki
    assert pki is not None
    gw = Gateway(gateway_config(tmp_path, pki, broker_port=broker.port, external=True,
                                upstream_port=None))
    creds = gw.register(pki, "ex1", "ex2")
    gw.start()
    try:
        gw.wait_running()
        s = SecStack(gw, pki, broker.port, broker, tmp_path)

        async def main() -> None:
            async with device_client(s, creds["ex1"]) as live:
                await live.subscribe(topics.down("ex1"), qos=1)
                await send_until_acked(live, "ex1", burst(1), 1)
                code, out = await cli(s, "device", "revoke", "ex1", "--broker-pid",
                                      str(broker.pid))
                assert code == 0, out
                with pytest.raises(aiomqtt.MqttError):
                    async with asyncio.timeout(15):
                        async for _ in live.messages:
                            pass

        asyncio.run(main())
        # Without a pid and without a systemd unit to reload, the revocation is recorded
        # and the operator is told what is left to do.
        no_pid = gw.cli("device", "revoke", "ex2")
        if no_pid.returncode != 0:
            assert no_pid.returncode == 2 and "not reloaded" in no_pid.stderr, no_pid.stderr
        assert gw.query("SELECT status FROM devices WHERE id='ex2'") == [("revoked",)]
    finally:
        assert gw.stop() == 0
    assert {creds["ex1"].serial, creds["ex2"].serial} <= pki.revoked_serials()
    assert [r[0] for r in stored(gw, "ex1")] == [1, 2, 3, 4]
