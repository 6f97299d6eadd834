"""Firmware key lists on the gateway, on a real SQLite file with real keys: a signed list
checked against the one before, queued per device as set_keys pieces (with the lists a
device lacks), the refusals (untrusted signer, old seq, a key a running image needs), what
a HELLO's keys_seq records, and the campaign guard."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway import proto
from gateway.ops import keylists
from gateway.ops import ota as ota_ops
from gateway.pipeline import ota_delivery
from gateway.security import keylist
from gateway.store import db, ota_store
from gateway.store import devices as registry
from gateway.store import downlink_queue as q
from tools.fw import image, keys

T0 = 1_800_000_000.0


def pair() -> tuple[Ed25519PrivateKey, bytes, str]:
    k = Ed25519PrivateKey.generate()
    raw = keys.public_raw(k.public_key())
    return k, raw, keys.key_id(raw)


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    c = db.open_db(tmp_path / "gateway.db")
    for i in range(3):
        registry.add(c, f"s{i}", "sensor", now=T0)
    return c


def hello(conn: sqlite3.Connection, device: str, keys_seq: int, fw: int = 1) -> None:
    frame = proto.Hello(1, fw, proto.BootCause.TIMER, 3300, -60, 40_000, 0, 0, 600, 2000,
                        int(T0), proto.DeviceClass.SENSOR, keys_seq=keys_seq)
    h = ota_delivery.OtaHandler()
    with db.transaction(conn):
        registry.record_hellos(conn, [registry.hello_row(device, frame, T0 + 5)], T0 + 5)
        h.handle(conn, [], [(device, frame)], T0 + 5)
    assert h.errors == 0


def set_keys_items(conn: sqlite3.Connection, device: str) -> list[q.Item]:
    return [it for it in q.pending(conn, device) if it.op == proto.CommandOp.SET_KEYS]


def reassemble(items: list[q.Item], seq: int) -> bytes:
    parts = sorted((it.args[1], it.data) for it in items if it.args[0] == seq)
    total = next(it.args[2] for it in items if it.args[0] == seq)
    blob = b"".join(d for _, d in parts)
    assert len(blob) == total
    return blob


def test_add_then_retire_chain_and_status(conn: sqlite3.Connection) -> None:
    k1, p1, id1 = pair()
    k2, p2, id2 = pair()
    kl1, blob1 = keys.next_list({id1: p1}, 0, k1, add=p2)
    assert kl1.seq == 1 and kl1.key_ids == tuple(sorted((id1, id2)))
    r = keylists.push(conn, blob1, devices="s0,s1", baked={id1: p1}, now=T0)
    assert r.queued == ("s0", "s1") and r.added == (id2,) and r.retired == ()
    items = set_keys_items(conn, "s0")
    assert len(items) >= 2  # two keys and a signature do not fit one 256-byte piece
    assert reassemble(items, 1) == blob1
    assert all(it.priority > ota_store.OTA_PRIORITY for it in items)
    assert keylists.node_status(conn, "s0").outcome == "queued"
    assert keylists.node_status(conn, "s0").held_keys == (id1,)  # the baked set, recorded
    # The node applied it and says so.
    hello(conn, "s0", 1)
    st = keylists.node_status(conn, "s0")
    assert (st.held, st.held_keys, st.outcome) == (1, kl1.key_ids, "applied")
    # Retire the old key, signed by the new one. s1 never got list 1: it gets both, in order.
    cur = keylists.current(conn)
    assert cur is not None and cur.seq == 1
    kl2, blob2 = keys.next_list(cur.keys, cur.seq, k2, retire=id1)
    r = keylists.push(conn, blob2, group="all", now=T0 + 10)
    assert r.retired == (id1,) and r.queued == ("s0", "s1", "s2")
    s1 = set_keys_items(conn, "s1")
    assert [it.args[0] for it in s1] == sorted(it.args[0] for it in s1)  # list 1 goes first
    assert {it.args[0] for it in s1} == {1, 2}
    assert reassemble(s1, 1) == blob1 and reassemble(s1, 2) == blob2
    assert {it.args[0] for it in set_keys_items(conn, "s0")} == {2}  # holds 1 already
    # A HELLO without a list writes nothing for a node that never held one.
    hello(conn, "s2", 0)
    assert keylists.node_status(conn, "s2").held == 0


def test_refusals(conn: sqlite3.Connection) -> None:
    k1, p1, id1 = pair()
    k2, p2, id2 = pair()
    kx, px, idx = pair()
    with pytest.raises(keylist.KeyListError, match="not trusted"):
        keys.next_list({id1: p1}, 0, kx, add=p2)
    with pytest.raises(keylist.KeyListError, match="last trusted key"):
        keys.next_list({id1: p1}, 0, k1, retire=id1)
    with pytest.raises(keylists.KeyListRefused, match="no key list yet"):
        keys_blob = keys.next_list({id1: p1}, 0, k1, add=p2)[1]
        keylists.push(conn, keys_blob, group="all")
    # Signed by a key the nodes do not trust (the gateway checks against its newest list).
    _kl, forged = keys.next_list({idx: px}, 0, kx, add=p2)
    with pytest.raises(keylists.KeyListRefused, match=f"signed by key {idx}"):
        keylists.push(conn, forged, group="all", baked={id1: p1})
    _kl, blob1 = keys.next_list({id1: p1}, 0, k1, add=p2)
    keylists.push(conn, blob1, group="all", baked={id1: p1})
    with pytest.raises(keylists.KeyListRefused, match="not above seq 1"):
        keylists.push(conn, keys.next_list({id1: p1}, 0, k1, add=px)[1], group="all")
    tampered = bytearray(keys.next_list({id1: p1, id2: p2}, 1, k1, add=px)[1])
    tampered[-1] ^= 1
    with pytest.raises(keylists.KeyListRefused, match="does not verify"):
        keylists.push(conn, bytes(tampered), group="all")
    with pytest.raises(keylists.KeyListRefused, match="malformed|canonical|signature"):
        keylists.push(conn, b"x" * 100, group="all")


def test_retiring_the_key_of_a_running_image_is_refused(conn: sqlite3.Connection,
                                                       tmp_path: Path) -> None:
    kp = keys.keygen(tmp_path / "k1")
    k1 = keys.load_private(kp.private)
    p1 = keys.load_public(kp.public)
    k2, p2, id2 = pair()
    v1 = tmp_path / "v1"
    image.build_image("sim", 1, v1)
    image.sign_image(v1, k1)
    ota_ops.import_image(conn, v1, now=T0)
    hello(conn, "s0", 0, fw=1)  # s0 runs v1, signed by key 1
    _kl, blob1 = keys.next_list({kp.key_id: p1}, 0, k1, add=p2)
    keylists.push(conn, blob1, group="all", baked={kp.key_id: p1})
    _kl, blob2 = keys.next_list({kp.key_id: p1, id2: p2}, 1, k2, retire=kp.key_id)
    with pytest.raises(keylists.KeyListRefused, match=f"s0 runs v1, signed by {kp.key_id}"):
        keylists.push(conn, blob2, group="all")
    # Nothing of the refused list was kept or queued.
    cur = keylists.current(conn)
    assert cur is not None and cur.seq == 1


def test_campaign_waits_for_the_key_list(conn: sqlite3.Connection, tmp_path: Path) -> None:
    k1, p1, id1 = pair()
    kp = keys.keygen(tmp_path / "k2")
    v2 = tmp_path / "v2"
    image.build_image("sim", 2, v2)
    image.sign_image(v2, keys.load_private(kp.private))
    _kl, blob1 = keys.next_list({id1: p1}, 0, k1, add=keys.load_public(kp.public))
    keylists.push(conn, blob1, devices="s0", baked={id1: p1})
    with pytest.raises(ota_store.OtaError, match=f"signed by key {kp.key_id}.*s0 \\(seq 0"):
        ota_ops.create_campaign(conn, v2, devices="s0")
    hello(conn, "s0", 1)
    c = ota_ops.create_campaign(conn, v2, devices="s0")
    assert [d.device for d in c.devices] == ["s0"]


def test_cli_sign_offline_then_push_from_the_gateway_host(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tools.cli import main as torpor

    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n')
    c = db.open_db(tmp_path / "data" / "gateway.db")
    registry.add(c, "s0", "sensor", now=T0)
    c.close()
    k1 = keys.keygen(tmp_path / "k1")
    k2 = keys.keygen(tmp_path / "k2")

    def run(*args: str) -> tuple[int, str]:
        try:
            code = torpor(list(args))
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return code, out.out + out.err

    env_free = ("--signing-key", str(k1.private))
    # Signed on the build machine with no gateway at hand: only the file.
    lst = tmp_path / "keylist.bin"
    code, out = run("fw", "keys", "add", "--key", str(k2.public), *env_free, "--out", str(lst))
    assert code == 0 and "key list seq 1" in out, out
    kl, _data, _sig = keylist.split(lst.read_bytes())
    assert kl.key_ids == tuple(sorted((k1.key_id, k2.key_id)))
    # Sent from the gateway host: the first list is checked against the baked key.
    code, out = run("ota", "keys", "push", str(lst), "--all", "--config", str(cfg))
    assert code == 2 and "no key list yet" in out, out
    code, out = run("ota", "keys", "push", str(lst), "--all", "--baked", str(k1.public),
                    "--config", str(cfg))
    assert code == 0 and "queued for 1 device(s)" in out, out
    code, out = run("ota", "keys", "status", "--config", str(cfg))
    assert code == 0 and f"s0                   seq 0 (baked: {k1.key_id}); seq 1 queued" in out, out
    # Errors: an unknown key id, a signing key not trusted, a bad private key file.
    code, out = run("fw", "keys", "retire", "deadbeef", "--signing-key", str(k2.private),
                    "--gateway-config", str(cfg))
    assert code != 0 and "deadbeef is not in key list seq 1" in out, out
    k3 = keys.keygen(tmp_path / "k3")
    code, out = run("fw", "keys", "add", "--key", str(k2.public), "--signing-key",
                    str(k3.private), "--gateway-config", str(cfg))
    assert code != 0 and f"signing key {k3.key_id} is not trusted" in out, out
    code, out = run("fw", "keys", "add", "--key", str(k3.private.parent), "--signing-key",
                    str(k3.public), "--gateway-config", str(cfg))
    assert code != 0 and ("readable by others" in out or "not a PEM" in out), out
    # set_keys by hand would reach nodes unchecked: only a key list sends it.
    code, out = run("device", "send", "s0", "set_keys", "1", "0", "100", "--config", str(cfg))
    assert code == 2 and "torpor fw keys add|retire" in out, out
