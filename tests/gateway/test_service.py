"""The gateway as a process: kill -9 during ingest loses and duplicates nothing; SIGTERM
shuts down cleanly; status is readable from the database."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gateway import proto
from gateway.security.pki import Pki
from gateway.store import db, devices, readings
from gateway.store.status import read_status
from gateway.transport import topics
from tests.fixtures.broker import RunningBroker, mqtt_client

BURST_N = 32


def burst(first: int) -> bytes:
    s = proto.Series(tuple(1_700_000_000 + i for i in range(BURST_N)),
                     (tuple(range(BURST_N)), tuple(range(BURST_N)), (3000,) * BURST_N))
    return proto.encode_burst(proto.Burst(first, proto.SCHEMA_ENV3, 1, s))


def write_config(broker: RunningBroker, tmp: Path) -> Path:
    assert broker.pki is not None
    path = tmp / "gateway.toml"
    path.write_text(
        f'[gateway]\ndata_dir = "{tmp / "data"}"\nstatus_interval_s = 0.2\nlog_level = "info"\n'
        f'[broker]\nmode = "external"\nhost = "{broker.host}"\nport = {broker.port}\n'
        f'pki_dir = "{broker.pki.path}"\n'
        '[ingest]\nbatch_max_ms = 2\nrate_limit_frames_per_min = 100000\n'
    )
    return path


def start_gateway(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tools.cli", "gateway", "run", "--config", str(config)],
            stdout=out, stderr=out, cwd=Path(__file__).resolve().parents[2],
        )


def provision(pki: Pki, db_path: Path, *names: str) -> None:
    conn = db.open_db(db_path)
    for n in names:
        pki.issue_device(n)
        devices.add(conn, n)
    conn.close()


def wait_running(db_path: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db_path.exists():
            conn = db.open_db(db_path)
            try:
                st = read_status(conn)
                if st.running and st.detail.get("mqtt_connected"):
                    return
            finally:
                conn.close()
        time.sleep(0.05)
    raise AssertionError("the gateway did not come up")


async def node_sends(broker: RunningBroker, pki: Pki, device: str, total: int,
                     deadline: float) -> tuple[int, int]:
    """Like a node: send unacked bursts (a window of 4), resend on silence; returns
    (acked ids, resends)."""
    acked = 0
    resends = 0
    pending: dict[int, float] = {}
    next_first = 1
    async with mqtt_client(broker, pki.device_credentials(device)) as c:
        await c.subscribe(topics.down(device), qos=1)
        msgs = c.messages
        while acked < total:
            if time.monotonic() > deadline:
                raise AssertionError(f"{device}: only {acked}/{total} acknowledged")
            while len(pending) < 4 and next_first <= total:
                await c.publish(topics.up(device), burst(next_first), qos=1)
                pending[next_first] = time.monotonic()
                next_first += BURST_N
            try:
                m = await asyncio.wait_for(msgs.__anext__(), 1.0)
            except TimeoutError:
                for first in list(pending):  # silence: send everything unacked again
                    await c.publish(topics.up(device), burst(first), qos=1)
                    pending[first] = time.monotonic()
                    resends += 1
                continue
            assert isinstance(m.payload, bytes)
            ack = proto.decode(m.payload)
            assert isinstance(ack, proto.Ack)
            acked = max(acked, ack.cumulative)
            for first in list(pending):
                if first + BURST_N - 1 <= ack.cumulative or first in ack.selective:
                    del pending[first]
    return acked, resends


def stored(db_path: Path) -> int:
    """Readings committed so far, read beside the running gateway."""
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1)
        try:
            return int(conn.execute("SELECT coalesce(sum(total), 0) FROM dedup").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def test_kill_9_during_ingest_loses_and_duplicates_nothing(broker: RunningBroker, tmp_path: Path) -> None:
    assert broker.pki is not None
    config = write_config(broker, tmp_path)
    db_path = tmp_path / "data" / "gateway.db"
    names = ["k1", "k2", "k3"]
    provision(broker.pki, db_path, *names)
    total = 200 * BURST_N
    log = tmp_path / "gateway.log"
    proc = start_gateway(config, log)
    kills = 0
    mid_ingest: list[bool] = []
    try:
        wait_running(db_path)

        async def scenario() -> list[tuple[int, int]]:
            deadline = time.monotonic() + 60
            senders = asyncio.gather(*(node_sends(broker, broker.pki, n, total, deadline)  # type: ignore[arg-type]
                                       for n in names))
            nonlocal proc, kills
            for k in range(3):
                # Kill at a quarter, half and three quarters of the readings committed, so
                # every kill lands mid-ingest however fast the gateway is.
                target = (k + 1) * total * len(names) // 4
                while stored(db_path) < target and not senders.done():
                    await asyncio.sleep(0.01)
                mid_ingest.append(not senders.done())
                proc.kill()  # SIGKILL: no chance to finish anything
                proc.wait(5)
                kills += 1
                proc = start_gateway(config, log)
            return await senders

        results = asyncio.run(scenario())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    assert kills == 3
    assert all(mid_ingest), "a kill came after the nodes had finished"
    assert all(acked == total for acked, _ in results), results
    conn = db.open_db(db_path)
    for n in names:
        ids = [r[1] for r in readings.iter_readings(conn, n)]
        assert len(ids) == len(set(ids)), f"{n}: duplicates"
        assert sorted(ids) == list(range(1, total + 1)), f"{n}: missing readings"
        assert readings.stats(conn, n) == (total, 0, total)


def test_sigterm_shuts_down_cleanly_and_status_reports(broker: RunningBroker, tmp_path: Path) -> None:
    assert broker.pki is not None
    config = write_config(broker, tmp_path)
    db_path = tmp_path / "data" / "gateway.db"
    provision(broker.pki, db_path, "s1")
    log = tmp_path / "gateway.log"
    proc = start_gateway(config, log)
    try:
        wait_running(db_path)

        async def one() -> Any:
            async with mqtt_client(broker, broker.pki.device_credentials("s1")) as c:  # type: ignore[union-attr]
                await c.subscribe(topics.down("s1"), qos=1)
                await c.publish(topics.up("s1"), burst(1), qos=1)
                async with asyncio.timeout(5):
                    async for m in c.messages:
                        return proto.decode(m.payload)  # type: ignore[arg-type]

        assert asyncio.run(one()) == proto.Ack(1, BURST_N, ())
        out = subprocess.run(
            [sys.executable, "-m", "tools.cli", "gateway", "status", "--config", str(config)],
            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=30)
        assert out.returncode == 0, out.stderr
        assert "running" in out.stdout and f"{BURST_N} stored" in out.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(10)
    assert code == 0, log.read_text()
    text = log.read_text()
    assert "gateway stopped" in text and "Traceback" not in text
    conn = db.open_db(db_path)
    st = read_status(conn)
    assert not st.running and st.state == "stopped"
    out = subprocess.run(
        [sys.executable, "-m", "tools.cli", "gateway", "status", "--config", str(config)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=30)
    assert out.returncode == 1 and "not running" in out.stdout
    assert os.path.exists(db_path)


def _modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.iterdir()]
            if not p.name.startswith(".")}


def test_status_says_connected_at_once_and_every_file_is_private(tmp_path: Path) -> None:
    """`torpor gateway status` right after the log says connected (not at the next status
    tick, 60 s away here); the database with its WAL and SHM, and the supervised broker's
    configuration, ACL, dynamic-security and persistence files are 0600 in 0700 folders."""
    from tests.fixtures.broker import free_port, make_pki

    pki = make_pki(tmp_path / "pki")
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[gateway]\ndata_dir = "{tmp_path / "data"}"\nstatus_interval_s = 60\n'
        f'log_level = "info"\n[broker]\nmode = "supervised"\nport = {free_port()}\n'
        f'pki_dir = "{pki.path}"\n')
    log = tmp_path / "gateway.log"
    os.umask(old := os.umask(0o022))  # the usual umask: the files must not depend on it
    proc = start_gateway(config, log)
    try:
        deadline = time.monotonic() + 20
        while "connected to the broker" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        t0 = time.monotonic()
        while True:
            out = subprocess.run(
                [sys.executable, "-m", "tools.cli", "gateway", "status", "--config", str(config)],
                capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
            if "mqtt:           connected" in out.stdout:
                break
            assert time.monotonic() - t0 < 5, out.stdout + out.stderr
        print(f"status said connected {time.monotonic() - t0:.2f} s after the log")
        data = _modes(tmp_path / "data")
        assert data["data"] == 0o700 and data["gateway.db"] == 0o600, data
        assert data["gateway.db-wal"] == 0o600 and data["gateway.db-shm"] == 0o600, data
        broker_dir = tmp_path / "data" / "broker"
        for name, mode in _modes(broker_dir).items():
            assert mode == (0o700 if name == "broker" else 0o600), (name, oct(mode))
        assert {"mosquitto.conf", "acl", "dynsec.json"} <= set(_modes(broker_dir))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    # The broker saved its persistence file at its clean stop: private too.
    broker_modes = _modes(tmp_path / "data" / "broker")
    assert broker_modes.get("mosquitto.db") == 0o600, broker_modes
    assert old == os.umask(old)
