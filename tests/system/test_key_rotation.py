"""Device keys rotated over the air, on real parts: the real gateway process supervising a
real Mosquitto with an issuing CA, and sim nodes running the real firmware in the
MicroPython unix port.

A rotation: `torpor device rotate` queues rotate_key; the node makes a P-256 key and sends
its CSR (CSR_UP); the gateway checks it, issues the certificate and queues it down in
install_cert pieces; the node connects with it on trial, keeps it, and says so in its
HELLO; only then is the old certificate revoked. Attacks use mosquitto_pub with frames from
the spec's codec.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway import proto
from gateway.errors import PkiError
from gateway.security.pki import Pki
from gateway.store import deadletter
from gateway.store import devices as registry
from gateway.store import downlink_queue as q
from gateway.store import rotations as rs
from gateway.store.status import read_status
from tests.mpharness import micropython_binary
from tests.system.stack import ROOT, Stack, StackNode, kill_node_process
from tools.fw import image
from tools.fw import keys as fw_keys
from tools.sim.field import FieldModel

pytestmark = [
    pytest.mark.skipif(micropython_binary() is None, reason="no MicroPython unix port"),
    pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="no mosquitto-clients"),
]

ROTATE_KEY = int(proto.CommandOp.ROTATE_KEY)
INSTALL_CERT = int(proto.CommandOp.INSTALL_CERT)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path / "stack", None)
    s.pki.init_issuing()  # as a renewing fleet runs: the issuing CA signs the new certificates
    with open(s.config_path, "a") as f:
        f.write("[pki]\nrotation_poll_s = 0.1\n")
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


async def wake_ok(node: StackNode) -> str:
    """One wake that must reach the gateway and have its readings acknowledged; returns
    the node's log of it."""
    before = len(node.log_text())
    summary = await node.wake()
    text = node.log_text()[before:]
    assert summary.kinds.get("sleep") == 1, summary.as_dict()
    assert "connected in" in text and "send failed" not in text and "no ACK" not in text, text
    return text


def flash_read(node: StackNode, path: str) -> bytes | None:
    """A file of the node's flash (None if absent), read from its littlefs image while the
    node sleeps, with the same simflash the sim board mounts."""
    sim = node.sim
    code = (
        "import os, simflash, binascii\n"
        f"simflash.mount({str(sim.dir / 'flash.img')!r}, '/flash', {sim.model.block_size}, "
        f"{sim.model.block_count})\n"
        "try:\n"
        f"    f = open('/flash/' + {path!r}, 'rb')\n"
        "    print(binascii.hexlify(f.read()).decode())\n"
        "except OSError:\n"
        "    print('-')\n"
    )
    proc = subprocess.run([sim.binary, "-c", code], capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, MICROPYPATH=f".frozen:{ROOT / 'boards'}"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.strip()
    return None if out == "-" else bytes.fromhex(out)


def rotation(stack: Stack, rid: int) -> rs.Rotation:
    with stack.db() as conn:
        r = rs.get(conn, rid)
    assert r is not None
    return r


def start(stack: Stack, device: str) -> int:
    out = stack.cli("device", "rotate", device).stdout
    return int(out.split("rotation ")[1].split()[0])


def revoked(stack: Stack) -> set[str]:
    return {format(s, "x") for s in Pki(stack.pki.path).revoked_serials()}


def valid_serials(stack: Stack, device: str) -> set[str]:
    return {r.serial_hex for r in Pki(stack.pki.path).device_records(device, include_revoked=False)}


def pub(stack: Stack, device: str, payload: bytes, tmp: Path,
        cert: Path | None = None, key: Path | None = None) -> subprocess.CompletedProcess[str]:
    """One frame on the device's up topic by a client that shares no code with Torpor."""
    if cert is None or key is None:  # the provisioned pair: the one whose key is here
        pki = Pki(stack.pki.path)
        folders = [(pki.path / r.path).parent for r in pki.device_records(device)]
        folder = next(f for f in folders if (f / "key.pem").exists())
        cert, key = folder / "cert.pem", folder / "key.pem"
    f = tmp / f"frame-{time.monotonic_ns()}.bin"
    f.write_bytes(payload)
    return subprocess.run(
        ["mosquitto_pub", "-h", stack.host, "-p", str(stack.port), "--cafile", str(stack.pki.ca_pem),
         "--cert", str(cert), "--key", str(key), "-q", "1",
         "-t", f"torpor/{device}/up", "-f", str(f)],
        capture_output=True, text=True, timeout=15)


def csr_for(cn: str, key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    req = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))
    return req.public_bytes(serialization.Encoding.DER)


def csr_frame(rid: int, der: bytes, msg_id: int = 0x7000_0001) -> bytes:
    return proto.encode_csr_up(proto.CsrUp(msg_id, rid, der))


def broker_reload(stack: Stack) -> None:
    with stack.db() as conn:
        pid = read_status(conn).detail.get("broker_pid")
    assert pid, "the gateway reports no supervised broker"
    os.kill(int(pid), signal.SIGHUP)


async def refused_by_broker(stack: Stack, device: str, tmp: Path, cert: Path, key: Path) -> None:
    await until(lambda: pub(stack, device, b"x", tmp, cert, key).returncode != 0,
                f"the broker refuses {cert}")


# ---------------------------------------------------------------- the whole rotation

def test_rotation_over_the_air_old_certificate_revoked_only_after_use(stack: Stack,
                                                                       tmp_path: Path) -> None:
    async def main() -> None:
        stack.start()
        node = stack.add_node("n1", seed=11)
        await wake_ok(node)
        old = valid_serials(stack, "n1")
        assert len(old) == 1
        rid = start(stack, "n1")
        assert rotation(stack, rid).state == rs.REQUESTED

        # Wake 1: rotate_key runs; the node makes its key and sends the CSR.
        await wake_ok(node)
        assert [e.op for e in node.executions()] == [ROTATE_KEY]
        await until(lambda: rotation(stack, rid).state == rs.ISSUED, "certificate issued")
        rot = rotation(stack, rid)
        assert rot.new_serial and rot.pieces
        assert revoked(stack).isdisjoint(old), "the old certificate is revoked before use"

        # Cross-checks with `cryptography`: the node's CSR verifies, names the device, and
        # the issued certificate carries its key, signed by the issuing CA.
        assert rot.csr is not None
        req = x509.load_der_x509_csr(rot.csr)
        assert req.is_signature_valid
        assert req.subject.rfc4514_string() == "CN=n1"
        cert = x509.load_pem_x509_certificate(
            (stack.pki.path / "devices" / "n1" / rot.new_serial / "cert.pem").read_bytes())
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        assert cert.public_key().public_bytes(der, spki) == req.public_key().public_bytes(der, spki)
        issuing = x509.load_pem_x509_certificate(stack.pki.issuing_pem.read_bytes())
        cert.verify_directly_issued_by(issuing)

        # Wake 2: the certificate comes down in pieces; the node installs it for trial.
        text = await wake_ok(node)
        assert [e.op for e in node.executions()][1:] == [INSTALL_CERT] * len(rot.pieces), text
        assert rotation(stack, rid).state == rs.ISSUED
        assert revoked(stack).isdisjoint(old)

        # Wake 3: the node connects with the new pair (the broker checks its TLS signature
        # under the new certificate's key), keeps it, and tells the gateway: the old one goes.
        text = await wake_ok(node)
        assert "new credentials kept" in text, text
        await until(lambda: rotation(stack, rid).state == rs.DONE, "old certificate revoked")
        rot = rotation(stack, rid)
        assert set(rot.revoked) == old and rot.outcome == "rotated"
        assert old <= revoked(stack) and rot.new_serial not in revoked(stack)
        assert valid_serials(stack, "n1") == {rot.new_serial}
        # On the node: the new pair alone, its key never left it; a signature made with it
        # verifies under the issued certificate's key; the provisioned pair is gone.
        key_der = flash_read(node, "certs/k1/key.der")
        assert key_der is not None and flash_read(node, "certs/key.der") is None
        assert flash_read(node, "certs/k1/cert.der") == cert.public_bytes(der)
        node_key = serialization.load_der_private_key(key_der, password=None)
        assert isinstance(node_key, ec.EllipticCurvePrivateKey)
        sig = node_key.sign(b"torpor", ec.ECDSA(hashes.SHA256()))
        pub_key = cert.public_key()
        assert isinstance(pub_key, ec.EllipticCurvePublicKey)
        pub_key.verify(sig, b"torpor", ec.ECDSA(hashes.SHA256()))
        # The node's own signature (its CSR, made on the node) verifies under it too.
        pub_key.verify(req.signature, req.tbs_certrequest_bytes, ec.ECDSA(hashes.SHA256()))
        # The broker refuses the old certificate now; the node keeps working with the new.
        old_dir = stack.pki.path / "devices" / "n1" / next(iter(old))
        await refused_by_broker(stack, "n1", tmp_path, old_dir / "cert.pem", old_dir / "key.pem")
        # Its only valid key is on the node: nothing here can provision it with it.
        with pytest.raises(PkiError, match="rotated over the air"):
            Pki(stack.pki.path).device_credentials("n1")
        text = await wake_ok(node)
        assert "new credentials" not in text
        with stack.db() as conn:
            events = [e.kind for e in reversed(rs.events(conn, "n1"))]
            assert deadletter.count(conn, "n1") == 0
        assert events == ["requested", "csr", "issued", "confirmed", "revoked"], events

    aio(main())


def test_fallback_when_the_new_certificate_is_refused(stack: Stack) -> None:
    async def main() -> None:
        stack.start()
        node = stack.add_node("n2", seed=12)
        await wake_ok(node)
        old = valid_serials(stack, "n2")
        rid = start(stack, "n2")
        await wake_ok(node)
        await until(lambda: rotation(stack, rid).state == rs.ISSUED, "certificate issued")
        new = rotation(stack, rid).new_serial
        assert new is not None
        # The broker will not take the new certificate (revoked behind the gateway's back).
        Pki(stack.pki.path).revoke(int(new, 16))
        broker_reload(stack)
        await wake_ok(node)  # pieces installed: on trial from the next connect
        # The trial connect is refused; the node falls back to its old pair in the same
        # wake, delivers its readings, and reports why.
        text = await wake_ok(node)
        assert "new credentials refused" in text, text
        await until(lambda: rotation(stack, rid).state == rs.FAILED, "rotation failed")
        rot = rotation(stack, rid)
        assert rot.outcome == "refused"
        assert revoked(stack).isdisjoint(old), "the old certificate was revoked"
        assert valid_serials(stack, "n2") == old
        text = await wake_ok(node)
        assert "new credentials" not in text
        # A later rotation works from there.
        rid2 = start(stack, "n2")
        for _ in range(3):
            await wake_ok(node)
        await until(lambda: rotation(stack, rid2).state == rs.DONE, "second rotation done")
        assert old <= revoked(stack)

    aio(main())


def test_a_trial_waits_out_a_broker_that_is_down(stack: Stack) -> None:
    """The broker down when the node first tries its new certificate (a gateway host
    restarting): connection refused, then a listener that never answers (TLS timeouts).
    Neither is a refusal of the certificate: the node keeps the new pair on trial, however
    many sends that takes, and keeps it once the broker answers; the gateway never fails the
    rotation."""
    async def main() -> None:
        stack.start()
        node = stack.add_node("n6", seed=16, awake_budget_ms=4000)
        await wake_ok(node)
        old = valid_serials(stack, "n6")
        rid = start(stack, "n6")
        await wake_ok(node)  # rotate_key, CSR_UP
        await until(lambda: rotation(stack, rid).state == rs.ISSUED, "certificate issued")
        await wake_ok(node)  # the pieces: on trial from the next connect
        stack.stop()  # the gateway and its broker: TCP connections to the port are refused
        down = len(node.log_text())

        def tries() -> int:  # sends that failed since the broker went down
            return node.log_text()[down:].count("send failed")

        async def fail_until(n: int) -> None:
            for _ in range(40):  # the node backs off between failed sends: wakes, not sends
                if tries() >= n:
                    return
                await node.wake()
            raise AssertionError(f"fewer than {n} trial connects:\n{node.log_text()[-3000:]}")

        await fail_until(2)
        assert "refused or reset" in node.log_text()
        # Something that accepts TCP and never answers: the TLS handshake times out.
        silent = socket.socket()
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        silent.bind((stack.host, stack.port))
        silent.listen(8)
        try:
            await fail_until(creds_max_tries() + 2)
        finally:
            silent.close()
        text = node.log_text()[down:]
        assert "timed out" in text, text[-3000:]
        assert "new credentials refused" not in text
        assert text.count("new credentials not tried: broker not reached") == tries(), text
        assert rotation(stack, rid).state == rs.ISSUED
        stack.start()
        before = len(node.log_text())
        for _ in range(20):  # the node's backoff: the first wakes may not send
            await node.wake()
            if "connected in" in node.log_text()[before:]:
                break
        text = node.log_text()[before:]
        assert "new credentials kept" in text, text[-3000:]
        await until(lambda: rotation(stack, rid).state == rs.DONE, "old certificate revoked")
        rot = rotation(stack, rid)
        assert rot.outcome == "rotated" and set(rot.revoked) == old
        assert valid_serials(stack, "n6") == {rot.new_serial}
        await wake_ok(node)

    aio(main())


def test_a_rotation_fits_the_esp32_heap_under_the_bootloader(stack: Stack, tmp_path: Path) -> None:
    """On the ESP32 profile's heap (tools/sim/profiles.py), booting through the real
    bootloader as a fielded node does, every wake of a rotation completes: the one that makes
    the key (in the session when the heap has room, else noted and made at the start of the
    next sending wake, before the session; p256 and csr are dropped after it) and the one
    that takes the certificate's pieces (it loads neither). Before, these wakes ran out of
    heap, crashed at every boot until safe mode, and the certificate expired."""
    async def main() -> None:
        paths = fw_keys.keygen(tmp_path / "fwkeys")
        v1 = tmp_path / "v1"
        image.build_image("sim", 1, v1, display="1")
        image.sign_image(v1, fw_keys.load_private(paths.private))
        stack.start()
        node = stack.add_node("e1", seed=21, field=FieldModel.named("esp32"), send_every=2)
        image.install_sim(node.sim.dir, v1, public_key=fw_keys.load_public(paths.public))
        node.sim.entry = "boot"

        async def send() -> str:
            before = len(node.log_text())
            for _ in range(4):  # a send every second wake
                await node.wake()
                text = node.log_text()[before:]
                if "connected in" in text:
                    break
            assert "boot: slot a v1" in text, text
            assert "connected in" in text and "send failed" not in text, text
            return text

        await send()
        old = valid_serials(stack, "e1")
        rid = start(stack, "e1")
        await send()  # rotate_key: the key and CSR_UP, or the key noted for the next send
        for _ in range(3):
            with contextlib.suppress(AssertionError):
                await until(lambda: rotation(stack, rid).state == rs.ISSUED, "issued", 5.0)
                break
            await send()  # the key made before the session, CSR_UP at the window's end
        assert rotation(stack, rid).state == rs.ISSUED
        await send()  # the pieces
        text = await send()
        assert "new credentials kept" in text, text
        await until(lambda: rotation(stack, rid).state == rs.DONE, "old certificate revoked")
        assert set(rotation(stack, rid).revoked) == old
        await send()
        log = node.log_text()
        assert "MemoryError" not in log and "wake failed" not in log and " safe=1 " not in log, log
        assert "the command comes again" not in log, log
        # The heap figures of the sending wakes (docs/credentials.md, "Heap"), for `-s`.
        for run in log.split("--- run ")[1:]:
            if "connected in" in run:
                what = ("rotate_key (key later)" if "made at the next send" in run else
                        "rotate_key" if f"op={ROTATE_KEY} " in run else
                        "install_cert" if f"op={INSTALL_CERT} " in run else
                        "trial" if "new credentials kept" in run else "send")
                print(what, next(ln for ln in run.splitlines() if ln.startswith("M ")))

    aio(main())


# Shadows firmware/creds.py on the node's path: the real module, unchanged, except that
# while an `oom_once` file exists in the hook folder the next put_piece runs on a heap filled
# to its last bytes, so the real code meets a real MemoryError (the file goes first).
_OOM_ONCE = """
import os
import sys

# The real module, imported as usual (its source compiled by the import, not copied here):
# this folder leaves the path for that import, and the real module takes its place.
_here = [p for p in sys.path if p.endswith('.hooks/lib')]
_at = sys.path.index(_here[0])
sys.path.remove(_here[0])
del sys.modules['creds']
try:
    import creds as _real
finally:
    sys.path.insert(_at, _here[0])
globals().update(_real.__dict__)

_FLAG = os.getenv('TORPOR_HOOK_DIR') + '/oom_once'
_real_put = Credentials.put_piece


def _fill():
    hog = []
    for size in (4096, 512, 64, 16):
        try:
            while True:
                hog.append(bytearray(size))
        except MemoryError:
            pass
    return hog


def _put(self, rid, offset, total, data):
    try:
        os.stat(_FLAG)
    except OSError:
        return _real_put(self, rid, offset, total, data)
    os.remove(_FLAG)
    hog = _fill()
    try:
        return _real_put(self, rid, offset, total, data)
    finally:
        hog = None


Credentials.put_piece = _put
"""


def test_out_of_heap_taking_a_piece_is_retried_not_a_crash(stack: Stack) -> None:
    """A certificate piece that meets a full heap (the ESP32 profile's, filled to its last
    bytes for that one call) is neither kept nor answered: the wake goes on to its sleep
    (no crash, nothing counted towards safe mode), the gateway sends the piece again at the
    next send, and the rotation completes."""
    async def main() -> None:
        stack.start()
        node = stack.add_node("m1", seed=17, field=FieldModel.named("esp32"))
        # The execution record's commands hook compiles commands.py from source on this
        # heap; this test reads the gateway's queue instead.
        (node.hooks / "lib" / "commands.py").unlink()
        (node.hooks / "lib" / "creds.py").write_text(_OOM_ONCE)
        await wake_ok(node)
        rid = start(stack, "m1")
        await wake_ok(node)
        await until(lambda: rotation(stack, rid).state == rs.ISSUED, "certificate issued")
        pieces = rotation(stack, rid).pieces
        assert len(pieces) >= 2
        (node.hooks / "oom_once").write_text("")
        text = await wake_ok(node)
        assert "rotation: out of heap, the command comes again" in text, text
        assert "wake failed" not in text and "MemoryError" not in text, text
        with stack.db() as conn:
            first = q.get(conn, "m1", pieces[0])
        assert first.status in q.ACTIVE and first.result_status is None, first
        # The next sends: the piece comes again and the certificate is tried and kept (the
        # piece's file may have been whole on flash before the heap ran out: then the other
        # piece completed the certificate, and the node, past that rotation, refuses the
        # repeat; the power-cut test's cut after the last piece meets the same).
        text = ""
        for _ in range(3):
            text += await wake_ok(node)
            if rotation(stack, rid).state in (rs.CONFIRMED, rs.DONE):
                break
        assert "new credentials kept" in text and "out of heap" not in text, text
        assert "wake failed" not in node.log_text() and " safe=1 " not in node.log_text()
        def first_piece() -> q.Item:
            with stack.db() as conn:
                return q.get(conn, "m1", pieces[0])

        await until(lambda: first_piece().status not in q.ACTIVE, "the piece answered")
        assert first_piece().attempts == 2, first_piece()
        await until(lambda: rotation(stack, rid).state == rs.DONE, "old certificate revoked")

    aio(main())


# Shadows firmware/commands.py: the real module, except that a ping with the tag 13 raises
# outside safe mode, so two wakes in a row crash and the node enters its safe mode.
_POISON = """
import sys

for _p in sys.path:
    if _p.endswith('/firmware'):
        with open(_p + '/commands.py') as _f:
            exec(_f.read(), globals())
        break

_real = execute


def execute(cmd, cfg, st, board, effects, buf, msg_id, safe=False):
    if not safe and cmd[proto.COMMAND_OP] == proto.COMMAND_OP_PING and list(cmd[proto.COMMAND_ARGS]) == [13]:
        raise RuntimeError('poisoned command')
    return _real(cmd, cfg, st, board, effects, buf, msg_id, safe)
"""


def test_a_node_in_safe_mode_still_rotates_its_key(stack: Stack) -> None:
    """Safe mode keeps a broken node reachable and runs nothing but a fix; its certificate's
    upkeep is part of staying reachable (an expired certificate locks it out for good), so
    rotate_key and install_cert run there while every other command is still refused."""
    async def main() -> None:
        stack.start()
        node = stack.add_node("s1", seed=18, safe_mode_after=2)
        (node.hooks / "lib" / "commands.py").write_text(_POISON)
        stack.cli("device", "send", "s1", "ping", "13")
        await node.wake(2)  # the command crashes both wakes
        assert node.log_text().count("wake failed: RuntimeError('poisoned command'") == 2
        old = valid_serials(stack, "s1")
        rid = start(stack, "s1")
        text = await wake_ok(node)  # safe mode from this boot: rotate_key, CSR_UP
        assert " safe=1 " in text, text
        assert f"op={ROTATE_KEY} -> status={int(proto.ResultStatus.OK)}" in text, text
        await until(lambda: rotation(stack, rid).state == rs.ISSUED, "certificate issued")
        text = await wake_ok(node)
        assert " safe=1 " in text and f"op={INSTALL_CERT} -> status=0" in text, text
        ping = int(stack.cli("device", "send", "s1", "ping").stdout.split("queued command ")[1]
                   .split()[0])
        text = await wake_ok(node)
        assert " safe=1 " in text and "new credentials kept" in text, text
        await until(lambda: rotation(stack, rid).state == rs.DONE, "old certificate revoked")
        assert old <= revoked(stack)
        with stack.db() as conn:
            it = q.get(conn, "s1", ping)
        assert (it.status, it.result_status, it.result_detail) == (q.FAILED, "refused",
                                                                    "safe mode"), it

    aio(main())


def creds_max_tries() -> int:
    """firmware/creds.py's MAX_TRIES, read from the source the node runs."""
    text = (ROOT / "firmware" / "creds.py").read_text()
    return int(text.split("MAX_TRIES = const(")[1].split(")")[0])


# ---------------------------------------------------------------- power cuts

@pytest.mark.parametrize("cut", ["rotate_key", "first_piece", "last_piece", "trial_session"])
def test_power_cut_at_each_step_leaves_a_node_that_connects(stack: Stack, cut: str) -> None:
    """SIGKILL the node right after the step's command ran and its effect is on flash
    (before its result is sent); every later wake connects, and the rotation completes.
    trial_session: in the first session with the new pair, once the node has kept it and
    told the gateway, at a ping that wake runs.
    tests/firmware/test_creds_powercut.py cuts at every flash operation of the same steps."""
    async def main() -> None:
        stack.start()
        node = stack.add_node("n3", seed=13)
        await wake_ok(node)
        old = valid_serials(stack, "n3")
        rid = start(stack, "n3")
        if cut != "rotate_key":
            await wake_ok(node)
            await until(lambda: rotation(stack, rid).state == rs.ISSUED, "certificate issued")
        rot = rotation(stack, rid)
        if cut == "rotate_key":
            at = rot.command_id
        elif cut == "trial_session":
            await wake_ok(node)  # the pieces: on trial from the next connect
            out = stack.cli("device", "send", "n3", "ping", "1").stdout
            at = int(out.split("queued command ")[1].split()[0])
        else:
            assert len(rot.pieces) >= 2, rot  # the certificate comes in pieces
            at = rot.pieces[0] if cut == "first_piece" else rot.pieces[-1]
        assert at is not None
        node.hold_next(at)
        run = asyncio.create_task(node.wake())
        pid, cid = await node.wait_held()
        assert cid == at
        kill_node_process(pid)
        summary = await run
        assert summary.runs[-1].kind == "killed", summary.as_dict()
        if cut == "trial_session":
            assert "new credentials kept" in node.log_text()  # cut after keeping the pair
        else:
            assert revoked(stack).isdisjoint(old)
        # From here every wake reaches the gateway, and the rotation finishes.
        for _ in range(4):
            await wake_ok(node)
            if rotation(stack, rid).state in (rs.CONFIRMED, rs.DONE):
                break
        await until(lambda: rotation(stack, rid).state == rs.DONE, "rotation done")
        assert old <= revoked(stack)
        await wake_ok(node)

    aio(main())


# ---------------------------------------------------------------- bad requests

def test_bad_certificate_requests_are_refused_with_a_dead_letter(stack: Stack,
                                                                 tmp_path: Path) -> None:
    # The broker refuses quarantined devices itself by default; with that off, what is
    # tested below is the gateway's own refusal behind it.
    text = stack.config_path.read_text()
    stack.config_path.write_text(text.replace("[broker]\n", "[broker]\nrefuse_quarantined = false\n", 1))

    async def main() -> None:
        stack.start()
        for dev in ("b1", "b2", "b3"):
            stack.cli("device", "add", dev, "--issue-cert")
        rid = start(stack, "b1")
        good_key = ec.generate_private_key(ec.SECP256R1())
        good = csr_for("b1", good_key)
        bad_sig = bytearray(good)
        bad_sig[-10] ^= 0x01  # inside the signature's s: still DER, no longer valid
        cases = [
            (csr_frame(rid, b"\x30\x03\x02\x01\x00"), "csr_malformed"),
            (csr_frame(rid, csr_for("b2")), "csr_wrong_subject"),
            (csr_frame(rid, bytes(bad_sig)), "csr_bad_signature"),
            (csr_frame(12345, good), "csr_unknown_rotation"),
        ]
        for frame, _ in cases:
            assert pub(stack, "b1", frame, tmp_path).returncode == 0
        reasons = [r for _, r in cases]

        def letters(dev: str) -> list[str]:
            with stack.db() as conn:
                return sorted(d.reason for d in deadletter.list_recent(conn, dev, limit=50))

        await until(lambda: letters("b1") == sorted(reasons), "four dead letters")
        assert rotation(stack, rid).state == rs.REQUESTED, "a bad request changed the rotation"
        # The good one is taken; a different request for the same rotation is a replay,
        # and so is any request once the rotation has ended.
        assert pub(stack, "b1", csr_frame(rid, good), tmp_path).returncode == 0
        await until(lambda: rotation(stack, rid).state == rs.ISSUED, "issued")
        assert pub(stack, "b1", csr_frame(rid, good), tmp_path).returncode == 0  # a repeat
        assert pub(stack, "b1", csr_frame(rid, csr_for("b1")), tmp_path).returncode == 0
        await until(lambda: letters("b1").count("csr_replayed") == 1, "replay refused")
        assert len(letters("b1")) == 5, letters("b1")
        # A request for b2's rotation sent over b1's session names b2: refused, as the
        # session is b1's (the topic is b1's, the only one its certificate may publish to).
        rid2 = start(stack, "b2")
        assert pub(stack, "b1", csr_frame(rid2, csr_for("b2")), tmp_path).returncode == 0
        await until(lambda: letters("b1").count("csr_wrong_subject") == 2, "other subject")
        assert pub(stack, "b1", csr_frame(rid2, csr_for("b1")), tmp_path).returncode == 0
        await until(lambda: letters("b1").count("csr_unknown_rotation") == 2, "other rotation")
        assert rotation(stack, rid2).state == rs.REQUESTED

        # A quarantined device: refused with a dead letter and an event, never issued.
        with stack.db() as conn:
            from gateway.store import db

            with db.transaction(conn):
                registry.quarantine(conn, "b2", "test", now=time.time())
        await asyncio.sleep(0.8)  # ingest re-reads statuses every 0.5 s
        assert pub(stack, "b2", csr_frame(rid2, csr_for("b2")), tmp_path).returncode == 0
        await until(lambda: "quarantined" in letters("b2"), "quarantined device refused")
        assert rotation(stack, rid2).state == rs.REQUESTED
        # The rotation's own commands cannot be queued by hand.
        out = stack.cli("device", "send", "b1", "rotate_key", "5", check=False)
        assert out.returncode != 0 and "torpor device rotate" in out.stderr, out.stderr
        # Nor can a quarantined or revoked device be asked to rotate.
        assert stack.cli("device", "rotate", "b2", check=False).returncode != 0
        stack.cli("device", "revoke", "b3")
        out = stack.cli("device", "rotate", "b3", check=False)
        assert out.returncode != 0 and "revoked" in out.stderr, out.stderr
        # A revoked device's request never gets past the broker.
        assert pub(stack, "b3", csr_frame(1, csr_for("b3")), tmp_path).returncode != 0
        with stack.db() as conn:
            kinds = [(e.device, e.kind, e.detail.split(":")[0]) for e in rs.events(conn)]
        assert ("b2", "refused", "csr_device_quarantined") in kinds, kinds
        assert sum(1 for d, k, _ in kinds if d == "b1" and k == "refused") == 7, kinds

    aio(main())


def test_rotation_starts_a_lead_time_before_expiry(stack: Stack) -> None:
    async def main() -> None:
        with open(stack.config_path, "a") as f:
            f.write("check_interval_s = 0.2\ndevice_rotate_lead_days = 400.0\n")
        stack.start()
        node = stack.add_node("n4", seed=14)  # a 10-year certificate: not due
        far = Pki(stack.pki.path).device_records("n4")[0]
        await wake_ok(node)
        await asyncio.sleep(1.0)
        with stack.db() as conn:
            assert rs.of_device(conn, "n4") == []
        # A device whose certificate expires within the lead time gets a rotation queued.
        stack.cli("device", "add", "n5")
        Pki(stack.pki.path).issue_device("n5", days=300)

        def due() -> list[rs.Rotation]:
            with stack.db() as conn:
                return rs.of_device(conn, "n5")

        await until(lambda: bool(due()), "rotation started before expiry")
        rot = due()[0]
        assert rot.reason == "expiry" and rot.state == rs.REQUESTED
        with stack.db() as conn:
            cmd = q.get(conn, "n5", rot.command_id or 0)
        assert cmd.op == ROTATE_KEY and cmd.args == (rot.id,)
        assert far.revoked_at is None

    aio(main())
