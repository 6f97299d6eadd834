"""Backup under load and restore, on the whole stack: sim nodes running the real firmware
and a load generator sending bursts, the gateway as a process supervising its own
Mosquitto (mutual TLS from the PKI folder).

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
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiomqtt
import pytest

from gateway import proto
from gateway.security.pki import Pki
from gateway.store import db, readings
from gateway.transport import topics
from tests.firmware.test_node_cycle import node_clock_ids, read_log
from tests.gateway.test_service import BURST_N, burst
from tests.mpharness import micropython_binary
from tests.system.stack import ROOT, Stack

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(micropython_binary() is None, reason="no MicroPython unix port"),
]

NODES = ("b1", "b2", "b3")
LOAD = "load1"  # a load generator beside the nodes: bursts of 32 readings, one after another


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
        return {d: readings.stats(conn, d)[2] for d in (*NODES, LOAD)}


class Load:
    """Sends bursts as device LOAD, each once the previous one is acknowledged, until
    stopped; `acked` is the cumulative acknowledgement, with the time it came."""

    def __init__(self, stack: Stack) -> None:
        creds = Pki(stack.pki.path).device_credentials(LOAD)
        self.ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(stack.pki.ca_pem))
        self.ctx.load_cert_chain(str(creds.cert_pem), str(creds.key_pem))
        self.ctx.check_hostname = False
        self.host, self.port = stack.host, stack.port
        self.acked: list[tuple[float, int]] = [(time.monotonic(), 0)]
        self.stop = asyncio.Event()

    async def run(self) -> None:
        async with aiomqtt.Client(self.host, self.port, identifier=LOAD,
                                  tls_context=self.ctx) as c:
            await c.subscribe(topics.down(LOAD), qos=1)
            msgs = c.messages
            first = 1
            while not self.stop.is_set() and first < 1000 * BURST_N:
                await c.publish(topics.up(LOAD), burst(first), qos=1)
                try:
                    m = await asyncio.wait_for(msgs.__anext__(), 5.0)
                except TimeoutError:
                    continue  # send it again
                assert isinstance(m.payload, bytes)
                ack = proto.decode(m.payload)
                if isinstance(ack, proto.Ack) and ack.cumulative >= first + BURST_N - 1:
                    self.acked.append((time.monotonic(), ack.cumulative))
                    first = ack.cumulative + 1

    def between(self, t0: float, t1: float) -> int:
        """Readings acknowledged from t0 to t1."""
        inside = [n for t, n in self.acked if t0 <= t <= t1]
        before = [n for t, n in self.acked if t < t0]
        return (max(inside) - max(before)) if inside and before else 0


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

    old.cli("device", "add", LOAD, "--issue-cert")
    load = Load(old)
    window: list[float] = []

    async def under_load() -> None:
        await wakes(1)
        sending = asyncio.create_task(load.run())
        waking = asyncio.create_task(wakes(4))
        # The backup runs while the nodes wake and the load generator's bursts are being
        # committed and acknowledged.
        while len(load.acked) < 3:
            await asyncio.sleep(0.02)
        window.append(time.monotonic())
        await asyncio.to_thread(torpor, "gateway", "backup", str(online),
                                "--config", str(old.config_path))
        window.append(time.monotonic())
        await waking
        # On a loaded host the backup can outlast the nodes' wakes: the load generator goes on
        # until it has readings acknowledged after the backup too (the recovery check below
        # wants some that the online backup lacks), within a bound.
        until = time.monotonic() + 60
        while (not sending.done() and time.monotonic() < until
               and not any(t > window[1] for t, _ in load.acked)):
            await asyncio.sleep(0.05)
        load.stop.set()
        await sending

    before.update(store(old.db_path))
    asyncio.run(under_load())
    asyncio.run(wakes(1))  # each node has readings committed after the online backup
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
    during = load.between(window[0], window[1])
    assert during > 0, "no reading was acknowledged while the backup ran"
    # Readings and acknowledgement state are of the same commit.
    assert ack_totals(snap_dir / "gateway.db") == {
        d: len(snap.get(d, [])) for d in (*NODES, LOAD)}
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
            node_log = read_log(node.sim)
            logged = node_log.readings
            own_clock = node_clock_ids(node_log.text)
            ids = [r[0] for r in got[node.id]]
            assert len(ids) == len(set(ids)), f"{node.id}: a reading stored twice"
            assert sorted(ids) == sorted(logged), f"{node.id}: store and node log differ"
            for msg_id, ts, temp, hum, mv, *_ in got[node.id]:
                if msg_id in own_clock:
                    # Stamped before the node had the gateway's time: stored at the
                    # gateway's correction of it (the sim's compressed time is not ours).
                    assert logged[msg_id][1:] == (temp, hum, mv), (node.id, msg_id)
                else:
                    assert logged[msg_id] == (ts, temp, hum, mv), (node.id, msg_id)
            assert len(ids) > len(final_old[node.id])  # the restored gateway took new ones
        # Everything the old gateway acknowledged to the load generator, once.
        assert sorted(got[LOAD]) == sorted(final_old[LOAD])
        assert {r[0] for r in got[LOAD]} == set(range(1, load.acked[-1][1] + 1))
    finally:
        moved.close()

    # -- disaster recovery from the online backup: what came after it is gone, the rest
    # is there once, and the nodes' newer readings are accepted despite the gap --
    lost = {d: {r[0] for r in final_old[d]} - {r[0] for r in snap.get(d, [])}
            for d in (*NODES, LOAD)}
    assert all(lost.values()), lost
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
    assert sorted(after[LOAD]) == sorted(snap[LOAD])
    print(f"online backup: {n_snap} of {n_final} readings, {during} acknowledged while it "
          f"ran ({window[1] - window[0]:.2f} s); lost by recovering from it: "
          f"{sum(len(v) for v in lost.values())} readings (committed after it)")
