"""The gateway's Mosquitto with a real broker: who gets in, what each identity may touch,
revocation of new and live sessions, queue bounds, the supervisor, and a MicroPython node's
mutual-TLS handshake with the DER credentials the firmware ships."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.security.pki import Pki
from gateway.transport import broker as gwbroker
from tests.fixtures.broker import RunningBroker, free_port, make_pki, mqtt_client
from tests.mpharness import run_micropython


def _ctx(pki: Pki, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_pem))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _connect(broker: RunningBroker, cert: Path | None, key: Path | None) -> int:
    assert broker.pki is not None
    return gwbroker.mqtt_probe(broker.host, broker.port, _ctx(broker.pki, cert, key))


def _refused(broker: RunningBroker, cert: Path | None, key: Path | None) -> bool:
    try:
        code = _connect(broker, cert, key)
    except (ssl.SSLError, ConnectionError, OSError):
        return True
    return code != 0


async def _drain(client: aiomqtt.Client, seconds: float) -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []
    try:
        async with asyncio.timeout(seconds):
            async for m in client.messages:
                got.append((str(m.topic), bytes(m.payload)))  # type: ignore[arg-type]
    except TimeoutError:
        pass
    return got


def test_rendered_config(broker: RunningBroker) -> None:
    conf = broker.config_path.read_text()
    lines = {line.split(" ", 1)[0]: line for line in conf.splitlines() if line and line[0] != "#"}
    assert conf.count("\nlistener ") == 1 and f"listener {broker.port} 127.0.0.1" in conf
    for expected in ("require_certificate true", "use_identity_as_username true",
                     "allow_anonymous false", "set_tcp_nodelay true", "tls_version tlsv1.2",
                     "max_queued_messages 100000", "persistence true", "log_dest stderr",
                     "use_username_as_clientid true",
                     f"max_packet_size {gwbroker.MAX_PACKET_SIZE}"):
        assert expected in conf
    assert lines["crlfile"].endswith("crl.pem") and lines["cafile"].endswith("ca.pem")
    acl = (broker.config_path.parent / "acl").read_text()
    assert "user torpor-gateway\ntopic readwrite #\n" in acl
    if broker.settings.dynsec_plugin:
        assert f"user torpor-control\ntopic readwrite {gwbroker.CONTROL_TOPIC}/#\n" in acl
    assert "pattern readwrite torpor/%u/#" in acl


def test_device_confined_to_its_own_topics(broker: RunningBroker, pki: Pki) -> None:
    n1, n2 = pki.issue_device("node-1"), pki.issue_device("node-2")

    async def main() -> None:
        async with mqtt_client(broker) as gw, mqtt_client(broker, n1) as c1, \
                mqtt_client(broker, n2) as c2:
            await gw.subscribe("#", qos=1)
            await c1.subscribe("torpor/node-1/down", qos=1)
            await c1.subscribe("torpor/node-2/down", qos=1)  # another's: denied
            await c1.subscribe("torpor/+/down", qos=1)  # wildcard over others: denied
            await c1.subscribe("#", qos=1)
            await c2.subscribe("torpor/node-2/down", qos=1)
            await c1.publish("torpor/node-1/up", b"mine", qos=1)
            await c1.publish("torpor/node-2/up", b"forged", qos=1)
            await c1.publish("other/topic", b"stray", qos=1)
            await gw.publish("torpor/node-2/down", b"for-2", qos=1)
            await gw.publish("torpor/node-1/down", b"for-1", qos=1)
            got_gw, got1, got2 = await asyncio.gather(_drain(gw, 1.0), _drain(c1, 1.0), _drain(c2, 1.0))
        assert ("torpor/node-1/up", b"mine") in got_gw
        assert all(p not in (b"forged", b"stray") for _, p in got_gw)
        # Its `#` subscription yields only its own topics (mosquitto checks read access
        # per message), so it also sees its own uplink echoed.
        assert sorted(got1) == [("torpor/node-1/down", b"for-1"), ("torpor/node-1/up", b"mine")]
        assert got2 == [("torpor/node-2/down", b"for-2")]

    asyncio.run(main())


def test_device_cannot_use_the_control_api(broker: RunningBroker, pki: Pki) -> None:
    if broker.settings.dynsec_plugin is None:
        pytest.skip("mosquitto_dynamic_security.so is not installed")
    n1, n2 = pki.issue_device("node-1"), pki.issue_device("node-2")
    victim = socket.create_connection((broker.host, broker.port))
    tls = _ctx(pki, n2.cert_pem, n2.key_pem).wrap_socket(victim, server_hostname=broker.host)
    tls.sendall(gwbroker.probe_connect("node-2"))
    assert tls.recv(4)[3] == 0

    async def main() -> list[tuple[str, bytes]]:
        async with mqtt_client(broker, n1) as c1:
            await c1.subscribe(gwbroker.CONTROL_TOPIC + "/#", qos=1)
            cmd = {"commands": [{"command": "createClient", "username": "node-2"},
                                {"command": "deleteClient", "username": "node-2"}]}
            await c1.publish(gwbroker.CONTROL_TOPIC, json.dumps(cmd), qos=1)
            return await _drain(c1, 1.0)

    assert asyncio.run(main()) == []
    tls.settimeout(2)
    tls.sendall(b"\xc0\x00")  # PINGREQ: node-2 is still connected
    assert tls.recv(2) == b"\xd0\x00"
    tls.close()


def _forge(pki_ca: Pki | None, cn: str, *, past: bool) -> tuple[Path, Path]:
    """A client certificate the fleet CA would not issue: expired, or self-signed."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    if pki_ca is not None:
        ca = x509.load_pem_x509_certificate(pki_ca.ca_pem.read_bytes())
        signer = serialization.load_pem_private_key(pki_ca.ca_key.read_bytes(), None)
        issuer = ca.subject
    else:
        signer, issuer = key, name
    start, end = (now - dt.timedelta(days=10), now - dt.timedelta(days=1)) if past else (
        now - dt.timedelta(minutes=5), now + dt.timedelta(days=1))
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(issuer)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    )
    folder = Path(pki_ca.path if pki_ca else Path(os.environ.get("TMPDIR", "/tmp"))) / f"forged-{cn}"
    folder.mkdir(exist_ok=True)
    (folder / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "k.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return folder / "c.pem", folder / "k.pem"


def test_untrusted_clients_refused(broker: RunningBroker, pki: Pki, tmp_path: Path) -> None:
    good = pki.issue_device("node-1")
    assert _connect(broker, good.cert_pem, good.key_pem) == 0
    foreign = make_pki(tmp_path / "foreign").issue_device("node-1")
    assert _refused(broker, foreign.cert_pem, foreign.key_pem), "foreign CA"
    assert _refused(broker, *_forge(pki, "node-x", past=True)), "expired"
    cert, key = _forge(None, "node-y", past=False)
    assert _refused(broker, cert, key), "self-signed"
    assert _refused(broker, None, None), "no certificate"
    # The broker's own server certificate is not a client certificate.
    assert _refused(broker, pki.server.cert_pem, pki.server.key_pem), "server cert as client"
    assert "node-x" not in broker.logs.replace("forged-node-x", "")


def test_revoked_refused_and_live_session_cut(broker: RunningBroker, pki: Pki) -> None:
    n1, n2 = pki.issue_device("node-1"), pki.issue_device("node-2")
    lives = []
    for creds in (n1, n2):
        raw = socket.create_connection((broker.host, broker.port))
        s = _ctx(pki, creds.cert_pem, creds.key_pem).wrap_socket(raw, server_hostname=broker.host)
        s.sendall(gwbroker.probe_connect(creds.device_id))
        assert s.recv(4)[3] == 0
        s.settimeout(5)
        lives.append(s)

    # Revoking and reloading alone refuses new connections but leaves the live one up.
    pki.revoke(n1.serial)
    broker.reload()
    assert _refused(broker, n1.cert_pem, n1.key_pem)
    lives[0].sendall(b"\xc0\x00")
    assert lives[0].recv(2) == b"\xd0\x00", "SIGHUP alone did cut the session: simplify kick"

    t0 = time.monotonic()
    broker.revoke_and_kick("node-1")
    assert lives[0].recv(16) == b""  # closed by the broker
    assert time.monotonic() - t0 < 3.0
    assert _refused(broker, n1.cert_pem, n1.key_pem)
    # Other nodes are untouched.
    lives[1].sendall(b"\xc0\x00")
    assert lives[1].recv(2) == b"\xd0\x00"
    assert _connect(broker, n2.cert_pem, n2.key_pem) == 0
    for s in lives:
        s.close()


def _queued_delivery(broker: RunningBroker, pki: Pki, count: int) -> int:
    """The gateway's persistent-session subscriber is away while a node publishes `count`
    QoS 1 messages; returns how many reach it when it comes back."""
    node = pki.issue_device("node-1")

    async def main() -> int:
        async with mqtt_client(broker, identifier="gw-sub", clean_session=False) as gw:
            await gw.subscribe("torpor/+/up", qos=1)
        async with mqtt_client(broker, node, max_queued_outgoing_messages=0) as c:
            sem = asyncio.Semaphore(200)

            async def pub(i: int) -> None:
                async with sem:
                    await c.publish("torpor/node-1/up", i.to_bytes(4, "big"), qos=1)

            await asyncio.gather(*(pub(i) for i in range(count)))
        seen: set[int] = set()
        async with mqtt_client(broker, identifier="gw-sub", clean_session=False) as gw:
            messages = aiter(gw.messages)
            while len(seen) < count:
                try:  # the queue is drained once nothing more comes for 2 s
                    m = await asyncio.wait_for(anext(messages), 2.0)
                except TimeoutError:
                    break
                seen.add(int.from_bytes(bytes(m.payload), "big"))  # type: ignore[arg-type]
        return len(seen)

    return int(asyncio.run(main()))


def test_slow_qos1_subscriber_loses_nothing(broker: RunningBroker, pki: Pki) -> None:
    assert _queued_delivery(broker, pki, 5000) == 5000


def test_mosquitto_default_queue_bound_would_drop(
    broker_factory: Callable[..., RunningBroker], pki: Pki
) -> None:
    # Why max_queued_messages is raised: with mosquitto's default most of the burst is lost.
    small = broker_factory(pki, settings=gwbroker.BrokerSettings(max_queued_messages=1000))
    assert _queued_delivery(small, pki, 3000) <= 1000 + 100


def test_fixture_lifecycle_and_plain_broker(
    broker: RunningBroker, broker_factory: Callable[..., RunningBroker]
) -> None:
    port = broker.port
    broker.restart()
    assert broker.port == port and broker.probe() == 0
    broker.kill()
    with pytest.raises(OSError):
        broker.probe(timeout=0.5)
    broker.start()
    assert broker.probe() == 0
    upstream = broker_factory(tls=False)
    assert upstream.probe() == 0 and upstream.port != broker.port

    async def roundtrip() -> list[tuple[str, bytes]]:
        async with mqtt_client(upstream) as a, mqtt_client(upstream) as b:
            await b.subscribe("x/#", qos=1)
            await a.publish("x/1", b"hi", qos=1)
            return await _drain(b, 0.5)

    assert asyncio.run(roundtrip()) == [("x/1", b"hi")]


def test_supervisor_restarts_killed_mosquitto(pki: Pki, tmp_path: Path) -> None:
    settings = gwbroker.BrokerSettings(port=free_port())

    async def main() -> None:
        sup = gwbroker.BrokerSupervisor(pki, tmp_path / "broker", settings)
        await sup.start()
        try:
            first = sup.pid
            assert first is not None and await sup.healthy()
            os.kill(first, signal.SIGKILL)
            async with asyncio.timeout(10):
                while sup.restarts == 0:
                    await asyncio.sleep(0.05)
            assert sup.pid not in (None, first) and await sup.healthy()
            # revoke_and_kick through the supervisor too
            node = pki.issue_device("node-1")
            assert await sup.revoke_and_kick("node-1") == [node.serial]
            ctx = _ctx(pki, node.cert_pem, node.key_pem)
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                await gwbroker.async_mqtt_probe(settings.host, settings.port, ctx)
        finally:
            await sup.stop()
        assert not await sup.healthy(timeout=0.5)
        external = gwbroker.BrokerSupervisor(pki, tmp_path / "broker", settings, external=True)
        assert not await external.healthy(timeout=0.5)

    asyncio.run(main())


_MP_CLIENT = """
import socket, tls
def rd(p):
    with open(p, 'rb') as f:
        return f.read()
ctx = tls.SSLContext(tls.PROTOCOL_TLS_CLIENT)
ctx.verify_mode = tls.CERT_REQUIRED
ctx.load_verify_locations(rd({ca!r}))
ctx.load_cert_chain(rd({cert!r}), rd({key!r}))
s = socket.socket()
s.settimeout(5)
s.connect(socket.getaddrinfo('127.0.0.1', {port})[0][-1])
t = ctx.wrap_socket(s, server_hostname='localhost')
cid = b'node-1'
body = b'\\x00\\x04MQTT\\x04\\x02\\x00\\x3c' + bytes([0, len(cid)]) + cid
t.write(bytes([0x10, len(body)]) + body)
ack = t.read(4)
print('CONNACK', ack[0], ack[3])
t.write(b'\\xe0\\x00')
t.close()
"""


@pytest.mark.parametrize("key_format", ["pkcs8", "sec1"])
def test_micropython_mtls_handshake_with_der(broker: RunningBroker, pki: Pki, key_format: str) -> None:
    creds = pki.issue_device("node-1")
    key = creds.key_der
    if key_format == "sec1":
        loaded = serialization.load_der_private_key(creds.key_der.read_bytes(), None)
        key = creds.key_der.with_name("key.sec1.der")
        key.write_bytes(loaded.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))
    code = _MP_CLIENT.format(ca=str(creds.ca_der), cert=str(creds.cert_der), key=str(key),
                             port=broker.port)
    proc = run_micropython(code, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CONNACK 32 0" in proc.stdout
    assert "as node-1 (p2, c1, k60, u'node-1')" in broker.logs


def test_expired_crl_is_named_and_broker_errors_reach_the_log_as_warnings(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With an expired CRL Mosquitto runs but fails every handshake with only "certificate
    verify failed", at its own error level: the supervisor names the cause, and Mosquitto's
    errors reach the gateway's log at warning level (once per kind, not once per client)."""
    pki.write_crl(days=0)  # next update: now
    time.sleep(1.1)
    settings = gwbroker.BrokerSettings(port=free_port())
    sup = gwbroker.BrokerSupervisor(pki, tmp_path / "broker", settings)

    async def main() -> str:
        try:
            await sup.start(timeout=3.0)
        except gwbroker.BrokerError as exc:
            return str(exc)
        finally:
            await sup.stop()
        raise AssertionError("the broker accepted the gateway with an expired CRL")

    with caplog.at_level("DEBUG", logger="gateway.transport.broker"):
        message = asyncio.run(main())
    assert "CRL" in message and "expired on" in message and "torpor pki crl" in message, message
    warned = [r.getMessage() for r in caplog.records
              if r.name == "gateway.transport.broker" and r.levelname == "WARNING"]
    assert any("certificate verify failed" in w for w in warned), warned
    # Many probes failed the same way; a few warnings say so, not one per probe.
    probes = sum("certificate verify failed" in line for line in sup.logs)
    assert probes > len([w for w in warned if "certificate verify failed" in w]), (probes, warned)


def test_broker_problem_lines() -> None:
    for line in ("2026-01-01T00:00:00: OpenSSL Error[0]: error:0A000086:SSL routines::"
                 "certificate verify failed",
                 "2026-01-01T00:00:00: Error: Unable to open log file",
                 "2026-01-01T00:00:00: Client n1 disconnected due to oversize packet."):
        assert gwbroker.is_broker_problem(line), line
    for line in ("2026-01-01T00:00:00: New connection from 127.0.0.1:5 on port 8883.",
                 "2026-01-01T00:00:00: Client n1 disconnected.",
                 "2026-01-01T00:00:00: mosquitto version 2.0.11 running"):
        assert not gwbroker.is_broker_problem(line), line


def test_packet_size_bound_follows_the_spec_and_larger_publishes_are_refused(
    broker: RunningBroker, pki: Pki
) -> None:
    """The largest frame on the longest topic goes through; a larger PUBLISH closes the
    sender's connection and reaches nobody (mosquitto_pub, which Torpor shares no code with)."""
    import shutil
    import subprocess

    from gateway import proto

    if shutil.which("mosquitto_pub") is None:
        pytest.skip("mosquitto-clients is not installed (`make mosquitto`)")
    assert gwbroker.MAX_PACKET_SIZE == proto.MAX_FRAME + gwbroker.MAX_TOPIC + gwbroker.MQTT_OVERHEAD
    longest = "d" * 32
    dev = pki.issue_device(longest)
    topic = f"torpor/{longest}/status"
    assert len(topic) == gwbroker.MAX_TOPIC

    def pub(payload: Path) -> int:
        return subprocess.run(
            ["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "--cafile",
             str(pki.ca_pem), "--cert", str(dev.cert_pem), "--key", str(dev.key_pem),
             "-i", longest, "-t", topic, "-q", "1", "-f", str(payload)],
            capture_output=True, timeout=30).returncode

    largest = pki.path / "largest.bin"
    largest.write_bytes(b"\x01" * proto.MAX_FRAME)
    larger = pki.path / "larger.bin"
    larger.write_bytes(b"\x02" * gwbroker.MAX_PACKET_SIZE)

    async def main() -> tuple[list[bytes], int, int]:
        async with mqtt_client(broker) as gw:
            await gw.subscribe(topic, qos=1)
            ok = await asyncio.to_thread(pub, largest)
            bad = await asyncio.to_thread(pub, larger)
            got = [p for _, p in await _drain(gw, 1.0)]
        return got, ok, bad

    got, ok, bad = asyncio.run(main())
    assert ok == 0 and bad != 0, (ok, bad)
    assert got == [b"\x01" * proto.MAX_FRAME]


def test_supervisor_refuses_service_to_quarantined_devices(pki: Pki, tmp_path: Path) -> None:
    """Mosquitto 2.0 cannot refuse a certificate-identified client's connection short of
    revocation, so a quarantined device's session is cut and, when it comes back, nothing
    it publishes gets through and nothing reaches it, until it is released."""
    settings = gwbroker.BrokerSettings(port=free_port())
    node = pki.issue_device("n1")
    sup = gwbroker.BrokerSupervisor(pki, tmp_path / "broker", settings)

    class Broker:  # what mqtt_client needs of a broker
        host, port, tls = settings.host, settings.port, True

    Broker.pki = pki  # type: ignore[attr-defined]

    async def round_trip(gw: aiomqtt.Client, payload: bytes) -> tuple[bool, bool]:
        """(the gateway got n1's publish, n1 got the gateway's)"""
        async with mqtt_client(Broker, node) as c:  # type: ignore[arg-type]
            await c.subscribe("torpor/n1/down", qos=1)
            await c.publish("torpor/n1/up", payload, qos=1)
            await gw.publish("torpor/n1/down", payload, qos=1)
            up = [p for _, p in await _drain(gw, 0.7)]
            down = [p for _, p in await _drain(c, 0.7)]
        return payload in up, payload in down

    async def main() -> None:
        await sup.start()
        try:
            async with mqtt_client(Broker) as gw:  # type: ignore[arg-type]
                await gw.subscribe("torpor/+/up", qos=1)
                assert await round_trip(gw, b"before") == (True, True)
                async with mqtt_client(Broker, node) as live:  # type: ignore[arg-type]
                    await live.subscribe("torpor/n1/down", qos=1)
                    assert await sup.set_refused({"n1"}) == {"n1"}
                    with pytest.raises(aiomqtt.MqttError):  # its live session was cut
                        async with asyncio.timeout(3):
                            await _drain(live, 3.0)
                            await live.publish("torpor/n1/up", b"x", qos=1)
                assert await round_trip(gw, b"quarantined") == (False, False)
                assert await sup.set_refused(set()) == set()
                assert await round_trip(gw, b"released") == (True, True)
        finally:
            await sup.stop()

    asyncio.run(main())
    assert "user n1\ntopic deny #" not in (tmp_path / "broker" / "acl").read_text()


def test_the_gateway_session_survives_a_broker_crash_once_saved(pki: Pki, tmp_path: Path) -> None:
    """The service asks the supervised broker to save its persistence file once the gateway
    is subscribed; after a SIGKILL and the supervisor's restart, a node's frame published
    before the gateway is back waits in the gateway's session."""
    settings = gwbroker.BrokerSettings(port=free_port())
    node = pki.issue_device("n1")
    sup = gwbroker.BrokerSupervisor(pki, tmp_path / "broker", settings)

    class Broker:  # what mqtt_client needs of a broker
        host, port, tls = settings.host, settings.port, True

    Broker.pki = pki  # type: ignore[attr-defined]

    async def main() -> list[bytes]:
        await sup.start()
        try:
            async with mqtt_client(Broker, clean_session=False) as gw:  # type: ignore[arg-type]
                await gw.subscribe("torpor/+/up", qos=1)
                assert sup.save()
                saved = tmp_path / "broker" / gwbroker.PERSISTENCE_NAME
                async with asyncio.timeout(5):  # mosquitto logs first, then writes
                    while not saved.exists():
                        await asyncio.sleep(0.05)
                pid = sup.pid
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                async with asyncio.timeout(15):
                    while sup.restarts == 0:
                        await asyncio.sleep(0.05)
                async with mqtt_client(Broker, node) as c:  # type: ignore[arg-type]
                    await c.publish("torpor/n1/up", b"while away", qos=1)
        except aiomqtt.MqttError:
            pass  # the gateway's connection went with the broker
        try:
            async with mqtt_client(Broker, clean_session=False) as gw:  # type: ignore[arg-type]
                return [p for _, p in await _drain(gw, 1.5)]
        finally:
            await sup.stop()

    got = asyncio.run(main())
    assert got == [b"while away"], "\n".join(sup.logs)
