"""Power cuts against a credential rotation on the node: a MicroPython worker rotates the
device pair on a littlefs image (store the new key, install its certificate, connect on
trial, keep or drop it) and the flash tears at each program/erase operation in turn. After
every cut the node must name a complete pair it can connect with, the old or the new one,
never lose a rotation it had kept, and finish the rotation from where it stopped."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.security.pki import Pki
from tests.mpharness import micropython_binary, mp_env

DEVICE = "node-7"
STEPS = ("begun", "installed", "trial", "kept", "dropped", "DONE")
MAX_OPS = 600  # far above a clean rotation's flash operations: a bound, not a guess

_MOUNT = """
import sys
import simflash, creds
bdev = simflash.mount(sys.argv[1], "/flash", 4096, 64)
def rd(p):
    with open(p, "rb") as f:
        return f.read()
"""

# Provision: the pair `torpor flash` writes, as files on the node's flash.
PROVISION = _MOUNT + """
import os
os.mkdir("/flash/certs")
for name, src in (("cert.der", sys.argv[2]), ("key.der", sys.argv[3])):
    with open("/flash/certs/" + name, "wb") as f:
        f.write(rd(src))
"""

# One rotation, each step reported once done (one write per line: a cut never halves one).
# The port's block-device glue turns the PowerCut raised inside littlefs into an OSError,
# and a cut flash ignores every later write: only steps reported before the cut count.
WORKER = _MOUNT + """
def say(s):
    if not bdev.dead:
        sys.stdout.write(s + "\\n")
mode, key, cert = sys.argv[2], rd(sys.argv[3]), rd(sys.argv[4])
def pieces(c):
    # As the gateway sends it over the air: install_cert pieces, the last one installs.
    half = len(cert) // 2
    c.put_piece(7, 0, len(cert), cert[:half])
    c.put_piece(7, half, len(cert), cert[half:])
try:
    c = creds.Credentials("/flash/certs")
    if mode == "pieces":
        c.begin(key, 7, b"0" * 230)  # a request's size
    else:
        c.begin(key)
    say("begun")
    if mode == "pieces":
        pieces(c)
    else:
        c.install(cert)
    say("installed")
    c.for_connect()
    say("trial")
    if mode != "drop":
        c.session_ok()
        say("kept")
    else:
        c.session_refused()
        say("dropped")
    c.reported()
    say("DONE")
except BaseException as e:
    if not bdev.dead:
        raise
if bdev.dead:
    sys.stdout.write("CUT\\n")
"""


# After the cut: what would this node connect with? Then finish the rotation from there.
CHECK = _MOUNT + """
import os
from hashlib import sha256
from binascii import hexlify
def h(p):
    return hexlify(sha256(rd(p)).digest()).decode()
mode, key, cert = sys.argv[2], rd(sys.argv[3]), rd(sys.argv[4])
c = creds.Credentials("/flash/certs")
cp, kp, trial = c.for_connect()
print("NOW", h(cp), h(kp), c.state)
if mode != "drop":
    if c.state == creds.ST_IDLE and not trial and rd(kp) != key:
        c.begin(key, 7, b"0" * 230)  # the rotation never started (or its start was cut): again
    if c.state == creds.ST_KEYED:
        half = len(cert) // 2
        c.put_piece(c.rotation, 0, len(cert), cert[:half])  # the gateway sends every piece again
        c.put_piece(c.rotation, half, len(cert), cert[half:])
    if c.state == creds.ST_TRIAL:
        c.for_connect()
        c.session_ok()
elif c.state != creds.ST_IDLE:
    c.session_refused() if c.state == creds.ST_TRIAL else c.abort()
cp, kp, trial = c.for_connect()
print("END", h(cp), h(kp), c.state)
print("LS", " ".join(sorted(os.listdir("/flash/certs"))))
for name in os.listdir("/flash/certs"):
    if name[:1] == "k" and name[1:].isdigit():
        print("LSK", " ".join(sorted(os.listdir("/flash/certs/" + name))))
"""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _new_pair(pki: Pki) -> tuple[bytes, bytes]:
    """A new key in the layout the node writes (SEC1 with curve and public key) and a
    certificate from the fleet CA for it."""
    key = ec.generate_private_key(ec.SECP256R1())
    key_der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    ca = x509.load_pem_x509_certificate(pki.ca_pem.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)]))
        .issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=30))
        .sign(ca_key, hashes.SHA256())
    )
    return key_der, cert.public_bytes(serialization.Encoding.DER)


def _run(code: str, *args: str, tear: int | None = None) -> subprocess.CompletedProcess[str]:
    binary = micropython_binary()
    if binary is None:
        pytest.skip("the MicroPython unix port (`micropython`) is not installed")
    env = mp_env()
    if tear is not None:
        env["TORPOR_SIMFLASH_TEAR"] = f"{tear}:{tear + 1}"
    return subprocess.run([binary, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("mode", ["keep", "drop", "pieces"])
def test_a_cut_at_every_flash_operation_leaves_a_pair_that_connects(
    mode: str, pki: Pki, tmp_path: Path
) -> None:
    old = pki.issue_device(DEVICE)
    old_cert, old_key = old.cert_der.read_bytes(), old.key_der.read_bytes()
    new_key, new_cert = _new_pair(pki)
    files = {}
    for name, data in (("key", new_key), ("cert", new_cert)):
        files[name] = tmp_path / f"new-{name}.der"
        files[name].write_bytes(data)
    base = tmp_path / "provisioned.img"
    proc = _run(PROVISION, str(base), str(old.cert_der), str(old.key_der))
    assert proc.returncode == 0, proc.stderr
    old_pair = (_sha(old_cert), _sha(old_key))
    new_pair = (_sha(new_cert), _sha(new_key))
    want_end = old_pair if mode == "drop" else new_pair
    want_ls = "cert.der key.der" if mode == "drop" else "k1"
    args = (mode, str(files["key"]), str(files["cert"]))

    cuts = 0
    for n in range(MAX_OPS):
        img = tmp_path / "node.img"
        shutil.copyfile(base, img)
        work = _run(WORKER, str(img), *args, tear=n)
        done = [w for w in work.stdout.split() if w in STEPS]
        assert work.returncode == 0, work.stdout + work.stderr
        if "CUT" not in work.stdout:
            assert "DONE" in done, work.stdout
            break
        cuts += 1
        check = _run(CHECK, str(img), *args)
        assert check.returncode == 0, f"cut at op {n} after {done}:\n{check.stdout}{check.stderr}"
        lines = {ln.split()[0]: ln.split()[1:] for ln in check.stdout.splitlines()}
        now, end = tuple(lines["NOW"][:2]), tuple(lines["END"][:2])
        where = f"cut at flash op {n} after {done}"
        assert now in (old_pair, new_pair), where
        if "begun" not in done:
            assert now == old_pair, where  # no certificate was being installed yet
        if "kept" in done:
            assert now == new_pair, where  # a kept rotation is never lost
        if "dropped" in done:
            assert now == old_pair, where
        assert end == want_end, where
        # Nothing but the pair in use (and the record, once one was written) stays on flash.
        assert " ".join(x for x in lines["LS"] if x != "creds.json") == want_ls, where
        if mode != "drop":  # the new pair's folder holds the pair alone
            assert lines["LSK"] == ["cert.der", "key.der"], where
    else:
        pytest.fail(f"the rotation did not finish within {MAX_OPS} flash operations")
    assert cuts > 10, cuts  # the rotation really was cut at many points
    print(f"\n{mode}: a clean rotation takes {cuts} flash operations; cut at each of them")
