"""Backup and restore of a gateway folder (gateway.ops.backup) on real SQLite files and a
real PKI: the round trip, the consistency retry, rotation, and every refusal of restore
(corrupt byte, truncated archive, checksum mismatch, unknown manifest version, missing
file, a database failing its integrity check, a non-empty target), none of which leaves
anything behind."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from gateway import config as gwconfig
from gateway.ops import backup
from gateway.security.pki import Pki
from gateway.store import db
from gateway.store import devices as registry
from tests.fixtures.broker import make_pki


@pytest.fixture()
def site(tmp_path: Path) -> gwconfig.GatewayConfig:
    """A gateway folder: configuration, PKI with a device, database with rows."""
    root = tmp_path / "site"
    root.mkdir()
    make_pki(root / "pki").issue_device("n1")
    cfg_path = root / "gateway.toml"
    cfg_path.write_text('[gateway]\ndata_dir = "data"\nlog_level = "info"\n\n'
                        '[broker]\npki_dir = "pki"\n\n[ingest]\n'
                        'rate_limit_frames_per_min = 300\n')
    cfg = gwconfig.load_config(cfg_path)
    conn = db.open_db(cfg.db_path)
    try:
        registry.add(conn, "n1", "sensor", None)
        registry.add(conn, "n2", "sensor", None)
    finally:
        conn.close()
    return cfg


def _no_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".restore-" in p.name or p.name.startswith(".torpor")]


def test_round_trip_restores_a_folder_the_gateway_loads(site: gwconfig.GatewayConfig,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "b" / "gw.tar.gz"
    result = backup.backup(site, out)
    assert out.stat().st_mode & 0o777 == 0o600
    m = result.manifest
    assert m["format"] == backup.FORMAT and m["version"] == backup.MANIFEST_VERSION
    assert m["database"]["row_counts"]["devices"] == 2
    assert m["database"]["schema_versions"]["registry"] >= 1
    names = {f["name"] for f in m["files"]}
    assert {backup.DB_NAME, backup.CONFIG_NAME, "pki/ca.pem", "pki/ca.key", "pki/crl.pem"} <= names
    with tarfile.open(out) as tar:
        modes = {i.name: i.mode for i in tar}
    assert modes[backup.DB_NAME] == modes[backup.CONFIG_NAME] == modes["pki/ca.key"] == 0o600

    target = tmp_path / "restored"
    res = backup.restore(out, target)
    cfg = gwconfig.load_config(res.config)
    assert cfg.db_path == target / "gateway.db" and cfg.pki_dir == target / "pki"
    assert cfg.ingest.rate_limit_frames_per_min == 300
    assert (target / "pki" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (target / "gateway.db").stat().st_mode & 0o777 == 0o600
    for f in m["files"]:
        if f["name"].startswith("pki/"):
            data = (target / f["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == f["sha256"]
    conn = db.open_db(cfg.db_path)
    try:
        assert {d.id for d in registry.list_devices(conn)} == {"n1", "n2"}
    finally:
        conn.close()
    # The restored PKI still signs: a new device certificate chains to the same CA.
    assert Pki(cfg.pki_dir).issue_device("n3").serial
    assert _no_leftovers(tmp_path) == []


def test_backup_while_a_writer_commits_is_one_consistent_state(
        site: gwconfig.GatewayConfig, tmp_path: Path) -> None:
    """Rows committed in pairs by another connection during the backup: the snapshot holds
    whole pairs only (one commit's state), passes its integrity check, and the writer was
    never blocked for long."""
    conn = db.connect(site.db_path)
    conn.execute("CREATE TABLE pairs (k INTEGER, half INTEGER)")
    stop = threading.Event()
    done = [0]

    def write() -> None:
        while not stop.is_set() and done[0] < 20_000:
            with db.transaction(conn):
                conn.execute("INSERT INTO pairs VALUES (?, 0)", (done[0],))
                conn.execute("INSERT INTO pairs VALUES (?, 1)", (done[0],))
            done[0] += 1

    t = threading.Thread(target=write)
    t.start()
    try:
        results = [backup.backup(site, tmp_path / f"b{i}.tar") for i in range(3)]
    finally:
        stop.set()
        t.join()
        conn.close()
    for i, result in enumerate(results):
        target = tmp_path / f"r{i}"
        backup.restore(result.path, target)
        snap = sqlite3.connect(target / "gateway.db")
        try:
            halves = dict(snap.execute("SELECT half, count(*) FROM pairs GROUP BY half").fetchall())
        finally:
            snap.close()
        assert halves.get(0, 0) == halves.get(1, 0)
        assert result.manifest["database"]["row_counts"]["pairs"] == 2 * halves.get(0, 0)
    assert done[0] > 0


def test_a_pki_change_during_the_snapshot_is_captured_again(
        site: gwconfig.GatewayConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A certificate issued while the database was being copied: the first capture is
    thrown away and the second holds the new certificate with a database of that time."""
    real = db.backup_to
    calls = [0]

    def issue_during(source: str | Path, dest: str | Path) -> None:
        calls[0] += 1
        real(source, dest)
        if calls[0] == 1:
            Pki(site.pki_dir).issue_device("late")

    monkeypatch.setattr(db, "backup_to", issue_during)
    result = backup.backup(site, tmp_path / "b.tar")
    assert result.attempts == 2
    assert any(f["name"].startswith("pki/devices/late/") for f in result.manifest["files"])


def test_rotation_keeps_the_newest(site: gwconfig.GatewayConfig, tmp_path: Path) -> None:
    folder = tmp_path / "nightly"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a backup")
    t0 = 1_800_000_000.0
    gone: list[Path] = []
    for day in range(4):
        gone += backup.backup_rotating(site, folder, keep=2, now=t0 + day * 86400).rotated_out
    left = sorted(p.name for p in folder.iterdir())
    assert left == sorted([backup.rotate_name(t0 + 2 * 86400),
                           backup.rotate_name(t0 + 3 * 86400), "notes.txt"])
    assert [p.name for p in gone] == [backup.rotate_name(t0), backup.rotate_name(t0 + 86400)]


# ---------------------------------------------------------------- refusals

@pytest.fixture()
def archive(site: gwconfig.GatewayConfig, tmp_path: Path) -> Path:
    return backup.backup(site, tmp_path / "gw.tar").path


def _refused(path: Path, target: Path, code: str) -> str:
    with pytest.raises(backup.BackupError) as info:
        backup.restore(path, target)
    assert info.value.code == code, str(info.value)
    assert not target.exists()
    assert _no_leftovers(target.parent) == []
    return str(info.value)


def _member_offset(path: Path, name: str) -> int:
    with tarfile.open(path) as tar:
        return tar.getmember(name).offset_data


def _rebuild(src: Path, dest: Path, change: dict[str, bytes], *, resum: bool) -> None:
    """`src` with some members replaced; with `resum` the manifest and SHA256SUMS are
    recomputed so that only the content itself is wrong."""
    with tarfile.open(src) as tar:
        members = {i.name: tar.extractfile(i).read() for i in tar}  # type: ignore[union-attr]
    members.update(change)
    if resum:
        manifest = json.loads(members[backup.MANIFEST])
        for f in manifest["files"]:
            f["size"] = len(members[f["name"]])
            f["sha256"] = hashlib.sha256(members[f["name"]]).hexdigest()
        members[backup.MANIFEST] = json.dumps(manifest).encode()
        sums = "".join(f"{hashlib.sha256(members[n]).hexdigest()}  {n}\n"
                       for n in members if n != backup.SUMS)
        members[backup.SUMS] = sums.encode()
    with tarfile.open(dest, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_flipped_byte_in_the_database_is_a_checksum_mismatch(archive: Path, tmp_path: Path) -> None:
    data = bytearray(archive.read_bytes())
    data[_member_offset(archive, backup.DB_NAME) + 5000] ^= 0x40
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    assert "db/gateway.db" in _refused(bad, tmp_path / "out", "checksum")


def test_a_corrupt_byte_in_a_compressed_archive_is_refused(
        site: gwconfig.GatewayConfig, tmp_path: Path) -> None:
    good = backup.backup(site, tmp_path / "gw.tar.gz").path
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(backup.BackupError) as info:
        backup.restore(bad, tmp_path / "out")
    # Where the damage lands decides the symptom: bad compressed data, a member that no
    # longer matches, or tar framing that ends early and leaves members missing.
    assert info.value.code in ("corrupt", "checksum", "truncated", "missing")
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path) == []


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_a_truncated_archive_is_refused(site: gwconfig.GatewayConfig, tmp_path: Path,
                                        suffix: str) -> None:
    good = backup.backup(site, tmp_path / f"gw{suffix}").path
    data = good.read_bytes()
    bad = tmp_path / f"cut{suffix}"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(backup.BackupError) as info:
        backup.restore(bad, tmp_path / "out")
    assert info.value.code in ("truncated", "corrupt", "missing")
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path) == []


def test_an_unknown_manifest_version_is_refused(archive: Path, tmp_path: Path) -> None:
    with tarfile.open(archive) as tar:
        manifest = json.loads(tar.extractfile(backup.MANIFEST).read())  # type: ignore[union-attr]
    manifest["version"] = 99
    bad = tmp_path / "v99.tar"
    _rebuild(archive, bad, {backup.MANIFEST: json.dumps(manifest).encode()}, resum=True)
    assert "manifest version 99" in _refused(bad, tmp_path / "out", "version")


def test_a_missing_file_is_refused(archive: Path, tmp_path: Path) -> None:
    with tarfile.open(archive) as tar:
        members = {i.name: tar.extractfile(i).read() for i in tar}  # type: ignore[union-attr]
    bad = tmp_path / "missing.tar"
    with tarfile.open(bad, "w") as tar:
        for name, data in members.items():
            if name != "pki/ca.key":
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert "pki/ca.key" in _refused(bad, tmp_path / "out", "missing")


def test_a_database_failing_its_integrity_check_is_refused(archive: Path, tmp_path: Path) -> None:
    with tarfile.open(archive) as tar:
        data = bytearray(tar.extractfile(backup.DB_NAME).read())  # type: ignore[union-attr]
    page = int.from_bytes(data[16:18], "big")
    # Scramble the second page (a table's b-tree) past its header: checksums recomputed.
    for i in range(page + 8, page + 200):
        data[i] = 0xA5
    bad = tmp_path / "rotten.tar"
    _rebuild(archive, bad, {backup.DB_NAME: bytes(data)}, resum=True)
    assert "integrity_check" in _refused(bad, tmp_path / "out", "integrity")


def test_a_non_empty_target_is_refused_unless_forced(archive: Path, tmp_path: Path) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(backup.BackupError) as info:
        backup.restore(archive, target)
    assert info.value.code == "target"
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    res = backup.restore(archive, target, force=True)
    assert res.replaced is not None and (res.replaced / "keep.txt").read_text() == "mine"
    assert (target / "gateway.db").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert backup.restore(archive, empty).dir == empty


def test_cli_exit_codes(archive: Path, tmp_path: Path) -> None:
    """`torpor gateway restore`: 3 for a refused archive, 2 for a target in use, 0 done."""
    bad = tmp_path / "cut.tar"
    bad.write_bytes(archive.read_bytes()[:3000])
    env = dict(os.environ)

    def restore(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tools.cli", "gateway", "restore", *args],
                              capture_output=True, text=True, env=env, timeout=60)

    done = restore(str(bad), "--dir", str(tmp_path / "a"))
    assert done.returncode == 3 and "error" in done.stderr and "Traceback" not in done.stderr
    done = restore(str(archive), "--dir", str(tmp_path / "a"))
    assert done.returncode == 0, done.stderr
    assert "torpor gateway run --config" in done.stdout
    done = restore(str(archive), "--dir", str(tmp_path / "a"))
    assert done.returncode == 2 and "not empty" in done.stderr
