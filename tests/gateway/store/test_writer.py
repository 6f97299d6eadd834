"""The gateway's writer thread: group commit under load, checkpoints off the commit path."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from gateway.store import db, readings
from tests.fixtures.broker import RunningBroker
from tests.gateway.pipeline.test_ingest import Node, aio, burst, gateway_config, provision, running


def test_writer_runs_every_call_on_one_thread_off_the_loop() -> None:
    async def main() -> set[int]:
        writer = db.Writer()
        try:
            got = await asyncio.gather(*(writer.run(threading.get_ident) for _ in range(20)))
        finally:
            writer.close()
        return set(got)

    threads = asyncio.run(main())
    assert len(threads) == 1 and threading.get_ident() not in threads


@aio
async def test_bursts_arriving_during_a_commit_share_the_next_one(
        broker: RunningBroker, tmp_path: Path) -> None:
    pki = provision(broker, tmp_path, "g1", "g2")
    cfg = gateway_config(broker, tmp_path, batch_max_ms=0, rate_limit_frames_per_min=100_000)
    n = 120
    async with running(cfg) as svc, Node(broker, pki, "g1") as a, Node(broker, pki, "g2") as b:
        # Both nodes publish everything at once: the first commit takes the first frames,
        # the rest pile up on the event loop while it runs and go in the next ones.
        await asyncio.gather(*(node.send(burst(1 + 64 * i)) for i in range(n) for node in (a, b)))
        acks = [[await node.recv(10.0) for _ in range(n)] for node in (a, b)]
        assert svc.ingest is not None
        metrics = svc.ingest.metrics
        assert metrics.bursts == 2 * n
        assert metrics.batches < n, metrics.batches
    for node_acks in acks:
        assert max(ack.cumulative for ack in node_acks) == 64 * n
    conn = db.connect(tmp_path / "data" / "gateway.db")
    assert readings.total(conn) == 2 * 64 * n
    assert readings.count_rows(conn) == 2 * 64 * n


def test_commits_without_autocheckpoint_leave_the_wal_to_checkpoint_loop(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    conn = db.connect(path, autocheckpoint=False)
    conn.execute("CREATE TABLE t (b BLOB)")
    big = bytes(3000)

    def fill(rows: int) -> None:
        for _ in range(rows):
            with db.transaction(conn):
                conn.execute("INSERT INTO t VALUES (?)", (big,))

    # 1200 one-page commits: past SQLite's default autocheckpoint (1000 pages), yet
    # nothing reaches the database file while no one checkpoints...
    fill(1200)
    assert path.stat().st_size < 100_000
    assert int(conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]) == 0

    async def main() -> None:
        task = asyncio.create_task(db.checkpoint_loop(path, every_s=0.05))
        try:
            for _ in range(100):
                await asyncio.sleep(0.05)
                if path.stat().st_size > 1200 * 3000:
                    return
        finally:
            task.cancel()

    # ... and checkpoint_loop copies it back from its own connection.
    asyncio.run(main())
    assert path.stat().st_size > 1200 * 3000
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 1200
    conn.close()


def test_registry_version_moves_with_statuses_only(tmp_path: Path) -> None:
    from gateway.store import devices, outbox

    conn = db.open_db(tmp_path / "g.db")
    v0 = devices.version(conn)
    devices.add(conn, "r1")
    v1 = devices.version(conn)
    assert v1 > v0
    # Writes that do not change a status (seen times, the outbox) leave it alone, so
    # ingest does not reload every status after each relay delete.
    with db.transaction(conn):
        devices.touch_many(conn, [(1.0, "r1")])
    box = outbox.Outbox(tmp_path / "g.db")
    box.put([outbox.OutboxItem("t", b"x", 1.0, "r1", "readings")])
    box.delete([q.id for q in box.peek(10)])
    box.close()
    assert devices.version(conn) == v1
    with db.transaction(conn):
        devices.quarantine(conn, "r1", "test", now=2.0)
    assert devices.version(conn) > v1
    conn.close()
