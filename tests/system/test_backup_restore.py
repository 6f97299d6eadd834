"""Backup under load and restore, on the whole stack: sim nodes running the real firmware,
the gateway as a process supervising its own Mosquitto (mutual TLS from the PKI folder).

What a backup promises (docs/backup.md):
- An online backup is the gateway as of one commit: its readings and its acknowledgement
  state agree, and its PKI and configuration were current at that commit.
- Moving a gateway (stop it, back up, restore, start the restored one) loses and duplicates
  nothing: every reading the nodes logged is in the resumed store exactly once, and the
  nodes are accepted by a broker running on the restored PKI.
- Disaster recovery from an older online backup loses the readings committed after that
  backup (the nodes deleted them once acknowledged; only upstream has them), and nothing
  else: the nodes' later readings are accepted despite the gap, none is stored twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import db, readings
from tests.firmware.test_node_cycle import read_log
from tests.mpharness import micropython_binary
from tests.system.stack import ROOT, Stack

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(micropython_binary() is None, reason="no MicroPython unix port"),
]

NODES = ("b1", "b2", "b3")


def torpor(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, f"torpor {' '.join(args)}: {done.stdout}{done.stderr}"
    return done


def store(path: Path) -> dict[str, list[tuple[int, ...]]]:
    """Every stored reading per device: (msg_id, ts, values...)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        out: dict[str, list[tuple[int, ...]]] = {}
        for row in readings.iter_readings(conn):
            out.setdefault(row[0], []).append(tuple(row[1:]))
        return out


def ack_totals(path: Path) -> dict[str, int]:
    """The acknowledgement state's count of readings per device (the dedup table)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return {d: readings.stats(conn, d)[2] for d in NODES}


def resumed(root: Path, restored: Path) -> Stack:
    """A Stack whose gateway runs from a restored folder (same broker port as before)."""
    s = Stack(root, None)
    s.config_path = restored / "gateway.toml"
    s.data_dir = restored
    return s


def test_backup_under_load_restore_and_resume(supervised_stack: Stack, tmp_path: Path) -> None:
    old = supervised_stack
    old.start()
    nodes = [old.add_node(name, seed=40 + i, send_every=1) for i, name in enumerate(NODES)]
    online = tmp_path / "online.tar.gz"
    offline = tmp_path / "offline.tar.gz"
    before: dict[str, int] = {}

    async def wakes(cycles: int) -> None:
        for s in await asyncio.gather(*(n.wake(cycles, wall_limit_s=90) for n in nodes)):
            assert not s.stopped_by_wall_limit, s.as_dict()

    async def under_load() -> None:
        await wakes(1)
        load = asyncio.create_task(wakes(4))
        # The backup runs while the nodes wake and the gateway commits their readings.
        while sum(len(r) for r in store(old.db_path).values()) <= sum(
                len(r) for r in before.values()) and not load.done():
            await asyncio.sleep(0.05)
        await asyncio.to_thread(torpor, "gateway", "backup", str(online),
                                "--config", str(old.config_path))
        await load

    before.update(store(old.db_path))
    asyncio.run(under_load())
    # The planned switch: stop the old gateway (it commits and acknowledges what it
    # holds), back it up, restore it elsewhere, start the restored one.
    old.stop()
    final_old = store(old.db_path)
    torpor("gateway", "backup", str(offline), "--config", str(old.config_path))

    # -- the online backup is one consistent state inside the run --
    snap_dir = tmp_path / "snap"
    torpor("gateway", "restore", str(online), "--dir", str(snap_dir))
    snap = store(snap_dir / "gateway.db")
    n_snap = sum(len(r) for r in snap.values())
    n_final = sum(len(r) for r in final_old.values())
    assert 0 < n_snap < n_final, (n_snap, n_final)  # taken while readings kept arriving
    assert ack_totals(snap_dir / "gateway.db") == {d: len(snap.get(d, [])) for d in NODES}
    for device, rows in snap.items():
        assert set(rows) <= set(final_old[device]), device  # nothing the old one lacks
    with contextlib.closing(db.connect(snap_dir / "gateway.db", readonly=True)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    # -- the planned switch: resume from the offline backup, the nodes carry on --
    moved_dir = tmp_path / "moved"
    torpor("gateway", "restore", str(offline), "--dir", str(moved_dir))
    moved = resumed(tmp_path / "moved-stack", moved_dir)
    try:
        moved.start()  # its own Mosquitto on the restored server certificate, CA and CRL
        asyncio.run(wakes(2))
        moved.stop()
        got = store(moved_dir / "gateway.db")
        for node in nodes:
            logged = read_log(node.sim).readings
            ids = [r[0] for r in got[node.id]]
            assert len(ids) == len(set(ids)), f"{node.id}: a reading stored twice"
            assert sorted(ids) == sorted(logged), f"{node.id}: store and node log differ"
            for msg_id, ts, temp, hum, mv, *_ in got[node.id]:
                assert logged[msg_id] == (ts, temp, hum, mv), (node.id, msg_id)
            assert len(ids) > len(final_old[node.id])  # the restored gateway took new ones
    finally:
        moved.close()

    # -- disaster recovery from the online backup: what came after it is gone, the rest
    # is there once, and the nodes' newer readings are accepted despite the gap --
    lost = {d: {r[0] for r in final_old[d]} - {r[0] for r in snap.get(d, [])} for d in NODES}
    assert any(lost.values())
    dr_dir = tmp_path / "recovered"
    torpor("gateway", "restore", str(online), "--dir", str(dr_dir))
    recovered = resumed(tmp_path / "dr-stack", dr_dir)
    moved_ids = {d: {r[0] for r in got[d]} for d in NODES}
    try:
        recovered.start()
        asyncio.run(wakes(2))
        recovered.stop()
    finally:
        recovered.close()
    after = store(dr_dir / "gateway.db")
    for node in nodes:
        ids = [r[0] for r in after[node.id]]
        assert len(ids) == len(set(ids)), f"{node.id}: a reading stored twice"
        logged = set(read_log(node.sim).readings)
        newer = logged - moved_ids[node.id]
        assert newer and newer <= set(ids), f"{node.id}: newer readings not accepted"
        expected_missing = lost[node.id] | (moved_ids[node.id] - {r[0] for r in final_old[node.id]})
        assert set(ids) == logged - expected_missing, node.id
    print(f"online backup: {n_snap} of {n_final} readings; lost by recovering from it: "
          f"{sum(len(v) for v in lost.values())} (committed after it)")
