"""TLS-PSK from the MicroPython unix port to a real Mosquitto PSK listener, next to the full
mutual-TLS connect in the same run: is PSK a workable cheap path for routine sends?

One Mosquitto serves both: the fleet's mutual-TLS listener as Torpor renders it, plus a PSK
listener (psk_hint, psk_file, use_identity_as_username) sharing its ACL, so a PSK identity
is held to its own topics like a certificate CN. The figures (bytes on the wire and the
node's CPU per TLS + MQTT connect) are printed, never asserted.
"""

from __future__ import annotations

import json
import os
import resource
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import median
from typing import Any

import pytest

from gateway.security.pki import Pki
from gateway.transport import broker as gwbroker
from tests.fixtures.broker import BROKERS_KEY, RunningBroker, free_port
from tests.mpharness import run_micropython

DEVICE = "node-7"
PSK = bytes(range(32))  # a 256-bit per-device session key
CONNECTS = 5


class PskBroker(RunningBroker):
    """The fleet broker with one more listener, for pre-shared keys."""

    def __init__(self, folder: Path, pki: Pki, psk_file: Path) -> None:
        super().__init__(folder, pki)
        self.psk_port = free_port()
        self.psk_file = psk_file

    def _write_config(self) -> None:
        extra = (
            "\n# Pre-shared keys: the identity becomes the username, so the ACL above applies.\n"
            f"psk_file {self.psk_file}\n"
            f"listener {self.psk_port} {self.host}\n"
            "protocol mqtt\n"
            "psk_hint torpor\n"
            "use_identity_as_username true\n"
            "tls_version tlsv1.2\n"
            "set_tcp_nodelay true\n"
        )
        gwbroker.write_config(self.settings, self.pki, self.folder, extra=extra)  # type: ignore[arg-type]


@pytest.fixture
def psk_broker(request: pytest.FixtureRequest, pki: Pki, tmp_path: Path) -> Iterator[PskBroker]:
    if gwbroker.find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (`make mosquitto`)")
    psk_file = tmp_path / "psk"
    psk_file.write_text(f"{DEVICE}:{PSK.hex()}\n")
    b = PskBroker(tmp_path / "broker", pki, psk_file)
    request.node.stash[BROKERS_KEY] = [b]
    b.start()
    yield b
    b.stop()


# Runs inside the node: `n` connects on each path, alternating, then one PSK publish.
_NODE = """
import json, time, tls, socket
import mqtt
if {nodelay!r}:
    # What the node's own socket would do with TCP_NODELAY (IPPROTO_TCP 6, option 1 on
    # Linux and lwIP): the unix port's socket module has no names for them.
    class _Socket:
        pass
    shim = _Socket()
    for n in dir(socket):
        setattr(shim, n, getattr(socket, n))
    def _nodelay_socket(*a):
        s = socket.socket(*a)
        s.setsockopt(6, 1, 1)
        return s
    shim.socket = _nodelay_socket
    mqtt.socket = shim
def rd(p):
    with open(p, 'rb') as f:
        return f.read()
def psk_ctx(key):
    ctx = tls.SSLContext(tls.PROTOCOL_TLS_CLIENT)
    ctx.psk_identity = {device!r}.encode()
    ctx.psk_key = key
    ctx.verify_mode = tls.CERT_NONE  # no certificate on this path: the key is the proof
    return ctx
def measure(ctx, port):
    c = mqtt.MQTTClient({device!r}, {host!r}, port, ssl=ctx, server_hostname='localhost')
    t = time.ticks_us()
    c.connect(mqtt.deadline(10000))
    us = time.ticks_diff(time.ticks_us(), t)
    fig = {{'us': us, 'out': c.bytes_out, 'in': c.bytes_in}}
    return c, fig
paths = {paths!r}
figs = {{p: [] for p in paths}}
for i in range({n}):
    for p in paths:
        if p == 'mtls':
            ctx = mqtt.make_tls_context(rd({cert!r}), rd({key!r}), rd({ca!r}))
            c, fig = measure(ctx, {mtls_port})
        else:
            c, fig = measure(psk_ctx(bytes(range(32))), {psk_port})
        figs[p].append(fig)
        c.disconnect()
if {publish!r}:
    c, _ = measure(psk_ctx(bytes(range(32))), {psk_port})
    c.publish('torpor/{device}/up', b'over psk', qos=1)
    c.wait_pubacks(mqtt.deadline(5000))
    c.disconnect()
if {wrong_key!r}:
    try:
        measure(psk_ctx(b'\\xee' * 32), {psk_port})
        figs['wrong_key'] = 'accepted'
    except Exception as e:
        figs['wrong_key'] = 'refused: %r' % (e,)
print('OUT ' + json.dumps(figs))
"""


def _node(broker: PskBroker, creds: Any, tmp_path: Path, *, paths: tuple[str, ...], n: int,
          publish: bool = False, wrong_key: bool = False, nodelay: bool = False,
          ) -> tuple[dict[str, Any], float]:
    """Run the node script; its result and the CPU seconds (user + system) it used."""
    code = _NODE.format(
        device=DEVICE, host=broker.host, mtls_port=broker.port, psk_port=broker.psk_port,
        cert=str(creds.cert_der), key=str(creds.key_der), ca=str(creds.ca_der),
        paths=paths, n=n, publish=publish, wrong_key=wrong_key, nodelay=nodelay,
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = run_micropython(code, cwd=tmp_path, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0, proc.stdout + proc.stderr + broker.logs
    line = next(x for x in proc.stdout.splitlines() if x.startswith("OUT "))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(line[4:]), cpu


def _subscriber(broker: PskBroker) -> subprocess.Popen[str]:
    """mosquitto_sub as the gateway (its certificate, on the mutual-TLS listener): a client
    that shares no code with Torpor. Returns once its subscription is acknowledged."""
    gw = broker.pki.gateway  # type: ignore[union-attr]
    # mosquitto_sub block-buffers a pipe; stdbuf makes its SUBACK line visible at once.
    argv = [
        "stdbuf", "-oL", "mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-d",
        "--cafile", str(broker.pki.ca_pem), "--cert", str(gw.cert_pem), "--key", str(gw.key_pem),  # type: ignore[union-attr]
        "-t", f"torpor/{DEVICE}/up", "-q", "1", "-C", "1", "-W", "20", "-F", "PAYLOAD %p",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 10
    seen = ""
    while "SUBACK" not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            proc.kill()
            raise AssertionError(f"mosquitto_sub never subscribed:\n{seen}")
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"mosquitto_sub exited:\n{seen}")
        seen += line
    return proc


def test_psk_session_publishes_and_a_wrong_key_is_refused(
    psk_broker: PskBroker, pki: Pki, tmp_path: Path
) -> None:
    creds = pki.issue_device(DEVICE)
    sub = _subscriber(psk_broker)
    try:
        res, _ = _node(psk_broker, creds, tmp_path, paths=("psk",), n=1, publish=True, wrong_key=True)
        out, _ = sub.communicate(timeout=20)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait(5)
    assert "PAYLOAD over psk" in out, out + psk_broker.logs
    assert res["wrong_key"].startswith("refused"), res
    # The broker saw the PSK identity as the username: the per-device ACL applied.
    assert f"u'{DEVICE}'" in psk_broker.logs, psk_broker.logs


def test_psk_and_mutual_tls_connect_cost(psk_broker: PskBroker, pki: Pki, tmp_path: Path) -> None:
    creds = pki.issue_device(DEVICE)
    # The node's CPU per connect: a process making 1 + k connects against one making 1, the
    # least of two runs each, so process start, imports and scheduling noise cancel out.
    extra = {"mtls": 10, "psk": 30}

    def cpu(p: str, n: int) -> float:
        return min(_node(psk_broker, creds, tmp_path, paths=(p,), n=n)[1] for _ in range(2))

    cpu_ms = {p: 1000 * (cpu(p, 1 + k) - cpu(p, 1)) / k for p, k in extra.items()}
    both, _ = _node(psk_broker, creds, tmp_path, paths=("mtls", "psk"), n=CONNECTS)
    fast, _ = _node(psk_broker, creds, tmp_path, paths=("mtls", "psk"), n=CONNECTS, nodelay=True)
    rows = []
    for p in ("mtls", "psk"):
        figs = both[p]
        rows.append((p, median(f["out"] for f in figs), median(f["in"] for f in figs),
                     median(f["us"] for f in figs) / 1000, cpu_ms[p]))
        assert all(f["out"] > 0 and f["in"] > 0 for f in figs)
    print(f"\nTLS + MQTT connect from the unix port, median of {CONNECTS} (loopback, {os.cpu_count()} cores):")
    print(f"{'path':6} {'bytes out':>10} {'bytes in':>9} {'wall ms':>8} {'node CPU ms':>12} "
          f"{'wall ms, TCP_NODELAY':>21}")
    for p, o, i, ms, cpu in rows:
        nd = median(f["us"] for f in fast[p]) / 1000
        print(f"{p:6} {o:>10.0f} {i:>9.0f} {ms:>8.1f} {cpu:>12.1f} {nd:>21.1f}")
    (m, mo, mi, mms, mcpu), (_, po, pi, pms, pcpu) = rows
    print(f"psk / mtls: bytes {(po + pi) / (mo + mi):.2f}, wall {pms / mms:.2f}"
          + (f", CPU {pcpu / mcpu:.2f}" if mcpu > 0 else ""))
