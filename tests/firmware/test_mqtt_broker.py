"""firmware/mqtt.py in the MicroPython unix port against a real Mosquitto with mutual TLS.

Each test runs a small MicroPython script with a freshly issued device certificate; the
gateway side is a CPython aiomqtt client with the gateway's certificate.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gateway.security.pki import DeviceCredentials, Pki
from tests.fixtures.broker import RunningBroker, make_pki, mqtt_client
from tests.mpharness import micropython_binary, mp_env, run_micropython

DEVICE = "node-7"
# Slack on a deadline check: process scheduling on a loaded 2-core CI box, not a benchmark.
SLACK_MS = 400


def prelude(
    host: str,
    port: int,
    creds: DeviceCredentials | None,
    *,
    ca_der: Path | None = None,
    server_hostname: str | None = None,
) -> str:
    """MicroPython source defining `client(**kw)` for a device and `out(**kv)` to report."""
    head = "import json, time\nimport mqtt\n"
    head += "def out(**kv):\n    print('OUT ' + json.dumps(kv))\n"
    if creds is None:
        return head + (
            f"def client(**kw):\n"
            f"    return mqtt.MQTTClient({DEVICE!r}, {host!r}, {port}, **kw)\n"
        )
    ca = ca_der or creds.ca_der
    return head + (
        "def rd(p):\n    with open(p, 'rb') as f:\n        return f.read()\n"
        f"CTX = mqtt.make_tls_context(rd({str(creds.cert_der)!r}), rd({str(creds.key_der)!r}), "
        f"rd({str(ca)!r}))\n"
        f"def client(**kw):\n"
        f"    return mqtt.MQTTClient({creds.device_id!r}, {host!r}, {port}, ssl=CTX, "
        f"server_hostname={server_hostname!r}, **kw)\n"
    )


def run_mp(code: str, timeout: float = 60) -> dict[str, Any]:
    """Run `code`; it must succeed. Returns the merged `out(...)` reports."""
    proc = run_micropython(code, timeout=timeout)
    assert proc.returncode == 0, f"MicroPython failed:\n{proc.stdout}\n{proc.stderr}"
    result: dict[str, Any] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("OUT "):
            result.update(json.loads(line[4:]))
    return result


async def collect(
    gw: aiomqtt.Client, n: int, timeout: float
) -> list[aiomqtt.Message]:
    """Up to `n` messages within `timeout` seconds."""
    got: list[aiomqtt.Message] = []
    try:
        async with asyncio.timeout(timeout):
            async for m in gw.messages:
                got.append(m)
                if len(got) >= n:
                    break
    except TimeoutError:
        pass
    return got


@pytest.fixture
def device(pki: Pki) -> DeviceCredentials:
    return pki.issue_device(DEVICE)


# --- publishing, subscribing, keepalive -----------------------------------------------


def test_publish_qos0_and_qos1_reach_the_gateway(
    broker: RunningBroker, device: DeviceCredentials
) -> None:
    code = prelude(broker.host, broker.port, device) + (
        "c = client()\n"
        "sp = c.connect(mqtt.deadline(5000))\n"
        f"p0 = c.publish('torpor/{DEVICE}/up', b'qos zero')\n"
        f"p1 = c.publish('torpor/{DEVICE}/up', b'qos one', qos=1)\n"
        "c.wait_pubacks(mqtt.deadline(3000))\n"
        "out(sp=sp, p0=p0, p1=p1, pending=c.pending())\n"
        "c.disconnect()\n"
    )

    async def scenario() -> tuple[dict[str, Any], list[aiomqtt.Message]]:
        async with mqtt_client(broker) as gw:
            await gw.subscribe(f"torpor/{DEVICE}/up", qos=1)
            res = await asyncio.to_thread(run_mp, code)
            return res, await collect(gw, 2, 5)

    res, msgs = asyncio.run(scenario())
    assert res == {"sp": False, "p0": 0, "p1": 1, "pending": 0}
    assert [(m.payload, m.qos) for m in msgs] == [(b"qos zero", 0), (b"qos one", 1)]


def test_twenty_qos1_in_flight_then_all_acked(
    broker: RunningBroker, device: DeviceCredentials
) -> None:
    code = prelude(broker.host, broker.port, device) + (
        "c = client()\n"
        "c.connect(mqtt.deadline(5000))\n"
        f"pids = [c.publish('torpor/{DEVICE}/up', b'reading %d' % i, qos=1) for i in range(20)]\n"
        "before = c.pending()\n"
        "c.wait_pubacks(mqtt.deadline(5000))\n"
        "out(pids=pids, before=before, after=c.pending())\n"
        "c.disconnect()\n"
    )

    async def scenario() -> tuple[dict[str, Any], list[aiomqtt.Message]]:
        async with mqtt_client(broker) as gw:
            await gw.subscribe(f"torpor/{DEVICE}/up", qos=1)
            res = await asyncio.to_thread(run_mp, code)
            return res, await collect(gw, 20, 5)

    res, msgs = asyncio.run(scenario())
    assert len(set(res["pids"])) == 20
    assert res["after"] == 0
    # All 20 went out before the first wait; the broker may already have acked some.
    assert 0 < res["before"] <= 20
    assert sorted(bytes(m.payload) for m in msgs) == sorted(
        b"reading %d" % i for i in range(20)
    )


def test_downlink_published_while_connected(
    broker: RunningBroker, device: DeviceCredentials
) -> None:
    code = prelude(broker.host, broker.port, device) + (
        "c = client()\n"
        "c.connect(mqtt.deadline(5000))\n"
        f"g = c.subscribe('torpor/{DEVICE}/down', 1, mqtt.deadline(3000))\n"
        "print('SUBSCRIBED', g)\n"
        "m = c.wait_msg(mqtt.deadline(8000))\n"
        "out(granted=g, topic=m[0], payload=m[1].decode())\n"
        "c.disconnect()\n"
    )
    binary = micropython_binary()
    assert binary

    async def scenario() -> str:
        async with mqtt_client(broker) as gw:
            proc = await asyncio.create_subprocess_exec(
                binary, "-c", code, env=mp_env(),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )
            assert proc.stdout
            async with asyncio.timeout(20):
                line = await proc.stdout.readline()
                assert line.startswith(b"SUBSCRIBED 1"), line
                await gw.publish(f"torpor/{DEVICE}/down", b"set interval 300", qos=1)
                rest, _ = await proc.communicate()
            assert proc.returncode == 0, rest.decode()
            return rest.decode()

    outp = asyncio.run(scenario())
    report = json.loads(next(x for x in outp.splitlines() if x.startswith("OUT "))[4:])
    assert report == {
        "granted": 1, "topic": f"torpor/{DEVICE}/down", "payload": "set interval 300",
    }, outp


def test_downlink_queued_while_asleep_arrives_on_next_wake(
    broker: RunningBroker, device: DeviceCredentials
) -> None:
    # The sleeping-node pattern: a persistent session holds QoS 1 downlink for the node.
    pre = prelude(broker.host, broker.port, device)
    first = pre + (
        "c = client(clean_session=False)\n"
        "c.connect(mqtt.deadline(5000))\n"
        f"c.subscribe('torpor/{DEVICE}/down', 1, mqtt.deadline(3000))\n"
        "c.disconnect()\n"
    )
    wake = pre + (
        "c = client(clean_session=False)\n"
        "sp = c.connect(mqtt.deadline(5000))\n"
        "m = c.wait_msg(mqtt.deadline(5000))\n"
        "out(sp=sp, payload=m[1].decode())\n"
        "c.disconnect()\n"
    )

    async def scenario() -> dict[str, Any]:
        await asyncio.to_thread(run_mp, first)
        async with mqtt_client(broker) as gw:
            await gw.publish(f"torpor/{DEVICE}/down", b"reboot", qos=1)
        return await asyncio.to_thread(run_mp, wake)

    assert asyncio.run(scenario()) == {"sp": True, "payload": "reboot"}


def test_keepalive_pings_keep_an_idle_connection(
    broker: RunningBroker, device: DeviceCredentials
) -> None:
    # keepalive 1 s: Mosquitto drops a client silent for 1.5 s. wait_msg pings on its own.
    code = prelude(broker.host, broker.port, device) + (
        "c = client(keepalive=1)\n"
        "c.connect(mqtt.deadline(5000))\n"
        "t0 = time.ticks_ms()\n"
        "while time.ticks_diff(time.ticks_ms(), t0) < 2500:\n"
        "    assert c.wait_msg(mqtt.deadline(200)) is None\n"
        "t1 = time.ticks_ms()\n"
        "c.ping(mqtt.deadline(2000))\n"
        "out(ping_ms=time.ticks_diff(time.ticks_ms(), t1), connected=c.is_connected())\n"
        "c.disconnect()\n"
    )
    res = run_mp(code)
    assert res["connected"] is True
    assert res["ping_ms"] < 2000


def test_clean_disconnect_has_no_will_but_a_crash_does(
    broker: RunningBroker, device: DeviceCredentials
) -> None:
    pre = prelude(broker.host, broker.port, device) + (
        "c = client()\n"
        f"c.connect(mqtt.deadline(5000), will=('torpor/{DEVICE}/status', b'lost', 1, False))\n"
    )
    planned = pre + "c.disconnect()\n"
    # close() then stay alive a moment: the broker must see the drop, not a process exit.
    crash = pre + "c.close()\ntime.sleep(1)\nout(closed=not c.is_connected())\n"

    async def scenario() -> tuple[list[aiomqtt.Message], list[aiomqtt.Message], dict[str, Any]]:
        async with mqtt_client(broker) as gw:
            await gw.subscribe(f"torpor/{DEVICE}/status", qos=1)
            await asyncio.to_thread(run_mp, planned)
            after_sleep = await collect(gw, 1, 1.0)
            res = await asyncio.to_thread(run_mp, crash)
            after_crash = await collect(gw, 1, 5)
            return after_sleep, after_crash, res

    after_sleep, after_crash, res = asyncio.run(scenario())
    assert after_sleep == []
    assert res == {"closed": True}
    assert [(m.payload, m.qos) for m in after_crash] == [(b"lost", 1)]


# --- failures are bounded and named ---------------------------------------------------


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts TCP and reads everything, never answers: a broker that hangs."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.1)
    stop = threading.Event()
    conns: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                pass
            else:
                conn.settimeout(0.1)
                conns.append(conn)
            for conn in conns:
                try:
                    conn.recv(4096)
                except (TimeoutError, OSError):
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield int(srv.getsockname()[1])
    stop.set()
    t.join(5)
    for conn in conns:
        conn.close()
    srv.close()


FAIL_SCRIPT = (
    "t0 = time.ticks_ms()\n"
    "try:\n"
    "    c.connect(mqtt.deadline({budget}))\n"
    "    out(code=None)\n"
    "except mqtt.MQTTError as e:\n"
    "    out(code=e.code, msg=str(e), connected=c.is_connected())\n"
    "out(ms=time.ticks_diff(time.ticks_ms(), t0))\n"
)


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_silent_broker_costs_no_more_than_the_deadline(
    silent_server: int, pki: Pki, tls: bool
) -> None:
    creds = pki.issue_device(DEVICE) if tls else None
    budget = 1500
    code = prelude("127.0.0.1", silent_server, creds) + "c = client()\n"
    code += FAIL_SCRIPT.format(budget=budget)
    res = run_mp(code)
    assert res["code"] == -1, res  # mqtt.TIMEOUT
    assert res["connected"] is False
    assert budget - 20 <= res["ms"] <= budget + SLACK_MS, res


def test_refused_port_fails_fast(pki: Pki) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])  # bound, never listening: connections are refused
        code = prelude("127.0.0.1", port, pki.issue_device(DEVICE)) + "c = client()\n"
        res = run_mp(code + FAIL_SCRIPT.format(budget=5000))
    assert res["code"] == -3, res  # mqtt.NETWORK
    assert res["ms"] < 500, res


def test_broker_signed_by_another_ca_is_refused(
    broker: RunningBroker, device: DeviceCredentials, tmp_path: Path
) -> None:
    other = make_pki(tmp_path / "other")
    code = prelude(broker.host, broker.port, device, ca_der=other.ca_der) + "c = client()\n"
    res = run_mp(code + FAIL_SCRIPT.format(budget=5000))
    assert res["code"] == -4, res  # mqtt.TLS_FAILED
    assert "verif" in res["msg"].lower() or "certificate" in res["msg"].lower(), res


def test_hostname_mismatch_is_refused(broker: RunningBroker, device: DeviceCredentials) -> None:
    code = prelude(
        broker.host, broker.port, device, server_hostname="gateway.example.org"
    ) + "c = client()\n"
    res = run_mp(code + FAIL_SCRIPT.format(budget=5000))
    assert res["code"] == -4, res
    assert "CN" in res["msg"] or "name" in res["msg"].lower(), res


def test_device_of_another_fleet_is_refused_by_the_broker(
    broker: RunningBroker, tmp_path: Path
) -> None:
    # Trusts the right CA, but its own certificate comes from a foreign one.
    foreign = make_pki(tmp_path / "foreign").issue_device(DEVICE)
    assert broker.pki is not None
    code = prelude(broker.host, broker.port, foreign, ca_der=broker.pki.ca_der)
    res = run_mp(code + "c = client()\n" + FAIL_SCRIPT.format(budget=5000))
    assert res["code"] in (-2, -3, -4), res  # closed, reset or TLS alert: never connected
    assert res["connected"] is False


# --- figures --------------------------------------------------------------------------


def test_wire_bytes_and_connect_time(broker: RunningBroker, device: DeviceCredentials) -> None:
    """One wake's transport cost: TLS + CONNECT + a 200-byte QoS 1 publish + DISCONNECT."""
    code = prelude(broker.host, broker.port, device) + (
        "import gc\n"
        "runs = []\n"
        "for i in range(3):\n"
        "    c = client()\n"
        "    gc.collect()\n"
        "    free = gc.mem_free()\n"
        "    t0 = time.ticks_ms()\n"
        "    c.connect(mqtt.deadline(5000))\n"
        "    t1 = time.ticks_ms()\n"
        "    hs_in, hs_out = c.bytes_in, c.bytes_out\n"
        f"    c.publish('torpor/{DEVICE}/up', bytes(200), qos=1)\n"
        "    c.wait_pubacks(mqtt.deadline(3000))\n"
        "    c.disconnect()\n"
        "    runs.append([time.ticks_diff(t1, t0), hs_in, hs_out, c.bytes_in, c.bytes_out,\n"
        "                 free - gc.mem_free()])\n"
        "out(runs=runs)\n"
    )
    runs = run_mp(code)["runs"]
    for connect_ms, hs_in, hs_out, total_in, total_out, _heap in runs:
        assert connect_ms < 5000
        # TLS records wrap the 221-byte PUBLISH: more than the payload goes out.
        assert total_out - hs_out > 221
        assert hs_in > 300 and hs_out > 300  # certificates went both ways
        assert total_in > hs_in
    best = min(runs)
    print(
        "\nMQTT over mutual TLS (P-256), one wake, MicroPython unix port -> Mosquitto:\n"
        f"  connect (TCP+TLS+CONNACK): {best[0]} ms (runs: {[r[0] for r in runs]})\n"
        f"  handshake bytes in/out:    {best[1]} / {best[2]}\n"
        f"  + PUBLISH 200 B QoS 1 + PUBACK + DISCONNECT, total in/out: {best[3]} / {best[4]}\n"
        f"  GC heap allocated during the wake (garbage included): {best[5]} bytes"
    )
