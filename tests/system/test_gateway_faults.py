"""The whole stack under faults: sim nodes running the real firmware, a Mosquitto with
mutual TLS, the gateway as a process (`torpor gateway run`) and an upstream Mosquitto.

Every reading a node logged as durable is stored exactly once and arrives upstream at least
once, even when the gateway is killed with SIGKILL 20 times and the upstream broker is down
for a while in the middle of the run. Duplicates upstream are counted and must be re-sends
of the same reading (same time, same values), never different data under one id.

The helpers here (`Gateway`, `gateway_config`, `Upstream`, `sim_node`) are shared with
tests/system/test_device_security.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gateway.security.pki import DeviceCredentials, Pki
from gateway.store import db, devices, readings
from gateway.store.status import read_status
from tests.firmware.test_node_cycle import START_MS, node_clock_ids, provision, read_log
from tests.fixtures.broker import RunningBroker
from tests.mpharness import micropython_binary
from tools.sim.node import SimNode

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(micropython_binary() is None, reason="no MicroPython unix port"),
]


# ---- the gateway as a process -------------------------------------------------------------

def gateway_config(
    tmp: Path, pki: Pki, *, broker_port: int, external: bool, upstream_port: int | None,
    ingest: str = "",
) -> Path:
    """A gateway TOML: external mode uses the test's broker, supervised mode starts its own
    Mosquitto on `broker_port`."""
    lines = [
        "[gateway]", f'data_dir = "{tmp / "data"}"', "status_interval_s = 0.2",
        'log_level = "info"',
        "[broker]", f'mode = "{"external" if external else "supervised"}"',
        'host = "127.0.0.1"', f"port = {broker_port}", f'pki_dir = "{pki.path}"',
        f'config_dir = "{tmp / "broker"}"',
        "[ingest]", "batch_max_ms = 2", "rate_limit_frames_per_min = 100000", ingest,
    ]
    if upstream_port is not None:
        lines += [
            "[upstream]", "enabled = true", 'host = "127.0.0.1"', f"port = {upstream_port}",
            "tls = false", "reconnect_min_s = 0.2", "reconnect_max_s = 1.0",
        ]
    path = tmp / "gateway.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Gateway:
    """`torpor gateway run` as a child process, its database and its CLI."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.db_path = config.parent / "data" / "gateway.db"
        self.log = config.parent / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tools.cli", "gateway", "run", "--config", str(self.config)],
                stdout=out, stderr=out, cwd=ROOT,
            )
        self.starts += 1

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return None

    def wait_running(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the gateway exited:\n{self.log.read_text()[-4000:]}")
            if self.db_path.exists():
                with contextlib.closing(db.connect(self.db_path, readonly=True)) as conn:
                    try:
                        st = read_status(conn)
                    except sqlite3.OperationalError:
                        st = None
                if st is not None and st.running and st.detail.get("mqtt_connected") \
                        and st.pid == self.proc.pid:
                    return
            time.sleep(0.05)
        raise AssertionError(f"the gateway did not come up:\n{self.log.read_text()[-4000:]}")

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tools.cli", *args, "--config", str(self.config)],
            capture_output=True, text=True, cwd=ROOT, timeout=timeout,
        )

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with contextlib.closing(db.connect(self.db_path, readonly=True)) as conn:
            return conn.execute(sql, params).fetchall()

    def register(self, pki: Pki, *names: str, issue: bool = True) -> dict[str, DeviceCredentials]:
        creds = {}
        with contextlib.closing(db.open_db(self.db_path)) as conn:
            for n in names:
                if issue:
                    creds[n] = pki.issue_device(n)
                devices.add(conn, n)
        return creds


# ---- the upstream broker and a subscriber that survives its restarts ----------------------

class Upstream(RunningBroker):
    """Plain MQTT on loopback, the stand-in for a site's cloud broker. Persistent sessions
    survive a stop/start, as on a real cloud broker, so the subscriber misses nothing the
    relay delivered while it was reconnecting."""

    def _write_config(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            f"listener {self.port} {self.host}\nallow_anonymous true\nuser {getpass.getuser()}\n"
            f"persistence true\npersistence_location {self.folder}/\nautosave_interval 0\n"
            "max_queued_messages 1000000\nset_tcp_nodelay true\n"
            "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n"
            "connection_messages true\n"
        )


@dataclass(slots=True)
class Received:
    """What arrived upstream: readings messages and events, in arrival order."""

    readings: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    connects: int = 0

    def rows(self) -> dict[tuple[str, int], list[dict[str, Any]]]:
        """(device, reading id) -> every copy of that reading that arrived."""
        out: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for msg in self.readings:
            # "json" version 2: a times array and one array per measurement.
            assert msg["version"] == 2, msg
            values = msg["values"]
            for k, t in enumerate(msg["t"]):
                row = {"t": t, **{name: col[k] for name, col in values.items()}}
                out.setdefault((msg["device"], msg["id"] + k), []).append(row)
        return out

    def event_kinds(self, device: str) -> list[str]:
        return [e["event"] for e in self.events if e["device"] == device]


async def subscribe_upstream(up: RunningBroker, got: Received, ready: asyncio.Event,
                             deadline: float) -> None:
    """A QoS 1 subscriber with a persistent session, reconnecting while the broker is away."""
    while time.monotonic() < deadline:
        try:
            async with aiomqtt.Client(up.host, up.port, identifier="upstream-consumer",
                                      clean_session=False, timeout=5) as client:
                await client.subscribe("torpor/+/readings", qos=1)
                await client.subscribe("torpor/+/events", qos=1)
                got.connects += 1
                ready.set()
                async for m in client.messages:
                    assert isinstance(m.payload, bytes | bytearray)
                    payload = bytes(m.payload)
                    doc = json.loads(payload)
                    if str(m.topic).endswith("/readings"):
                        got.readings.append(doc)
                        got.raw.append(payload)
                    else:
                        got.events.append(doc)
        except aiomqtt.MqttError:
            await asyncio.sleep(0.2)


# ---- sim nodes ----------------------------------------------------------------------------

def sim_node(tmp: Path, name: str, seed: int, port: int, creds: DeviceCredentials | None,
             device_id: str | None = None, time_scale: float = 0.0, **over: Any) -> SimNode:
    node = SimNode(tmp / f"node-{name}", seed=seed, time_scale=time_scale, start_ms=START_MS)
    provision(node, node_cfg(device_id or name, port, **over), creds)
    return node


def node_cfg(device_id: str, port: int, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "device_id": device_id, "broker_host": "127.0.0.1", "broker_port": port,
        "server_hostname": "localhost", "sample_interval_s": 60, "send_every": 2,
        "send_max_age_s": 86400, "awake_window_ms": 2000, "awake_budget_ms": 5000,
        "align_s": 60,
    }
    cfg.update(over)
    return cfg


def stored(gw: Gateway, device: str) -> list[tuple[int, int, int, int, int]]:
    with contextlib.closing(db.connect(gw.db_path, readonly=True)) as conn:
        return [(r[1], r[2], r[3], r[4], r[5]) for r in readings.iter_readings(conn, device)]


async def in_session(nodes: list[Any], timeout: float) -> bool:
    """Return True once some node logs a new MQTT connect, False after `timeout`."""
    def connects() -> int:
        total = 0
        for n in nodes:
            path = Path(n.dir) / "node.log"
            if path.exists():
                total += path.read_text(errors="replace").count("connected in")
        return total

    base = connects()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if connects() != base:
            return True
        await asyncio.sleep(0.01)
    return False


async def until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


# ---- the test -----------------------------------------------------------------------------

NODES = 4
KILLS = 20
CHAOS_S = 75.0


def test_20_gateway_kills_and_an_upstream_outage_lose_and_duplicate_nothing(
    tmp_path: Path, broker: RunningBroker, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    pki = broker.pki
    assert pki is not None
    up = Upstream(tmp_path_factory.mktemp("upstream"), None)
    up.start()
    gw = Gateway(gateway_config(tmp_path, pki, broker_port=broker.port, external=True,
                                upstream_port=up.port))
    names = [f"f{i}" for i in range(NODES)]
    creds = gw.register(pki, *names)
    # Time compressed 60x: a node samples every virtual minute, one real second apart.
    nodes = [sim_node(tmp_path, n, 40 + i, broker.port, creds[n], time_scale=60.0,
                      send_every=2 + i % 2, awake_window_ms=1000) for i, n in enumerate(names)]
    got = Received()
    outage: list[float] = []
    held_in_outage: list[int] = []
    in_session_kills: list[int] = []
    gw.start()
    try:
        gw.wait_running()

        async def scenario() -> None:
            ready = asyncio.Event()
            consumer = asyncio.create_task(
                subscribe_upstream(up, got, ready, time.monotonic() + 170))
            await asyncio.wait_for(ready.wait(), 10)
            t0 = time.monotonic()
            runs = [asyncio.create_task(n.run(500, wall_limit_s=CHAOS_S)) for n in nodes]
            kills = 0
            for k in range(KILLS):
                # Kill at moments spread over the run; start again at once, as systemd would.
                await asyncio.sleep(max(0.0, t0 + 1.5 + k * (CHAOS_S - 8) / KILLS - time.monotonic()))
                if k == 6:
                    await asyncio.to_thread(up.stop)
                    outage.append(time.monotonic())
                if k == 11:
                    held_in_outage.append(gw.query("SELECT count(*) FROM outbox")[0][0])
                    await asyncio.to_thread(up.start)
                    outage.append(time.monotonic())
                assert gw.proc is not None and gw.proc.poll() is None, gw.log.read_text()[-3000:]
                if k % 2 and await in_session(nodes, 3.0):
                    # Every other kill waits (briefly) for a node to be inside a session, so
                    # kills fall between a node's publish and its ACK.
                    in_session_kills.append(k)
                gw.kill()
                kills += 1
                gw.start()
            assert kills == KILLS
            summaries = await asyncio.gather(*runs)
            for s in summaries:
                assert set(s.kinds) <= {"sleep", "stopped"}, s.as_dict()
                assert s.kinds["sleep"] >= 15, s.as_dict()
            # Drain: every node sends what it still holds.
            await asyncio.to_thread(gw.wait_running)
            for n, name in zip(nodes, names, strict=True):
                provision(n, node_cfg(name, broker.port, send_every=1), None)
            await asyncio.gather(*(n.run(2, wall_limit_s=40) for n in nodes))
            logs = {name: read_log(n) for n, name in zip(nodes, names, strict=True)}
            for name in names:
                assert logs[name].timings[-1]["depth"] == 0, f"{name} still holds readings"
            want = {(name, i) for name in names for i in logs[name].readings}
            await until(lambda: want <= set(got.rows()), 40, "every reading upstream")
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer

        asyncio.run(scenario())
    finally:
        code = gw.stop()
        up.stop()
    assert code == 0, gw.log.read_text()[-3000:]
    assert gw.starts == KILLS + 1
    assert len(outage) == 2 and outage[1] - outage[0] >= 8.0
    assert held_in_outage[0] > 0, "nothing waited in the outbox during the outage"
    upstream_rows = got.rows()
    total = dupes = unacked = 0
    for i, name in enumerate(names):
        node_log = read_log(nodes[i])
        rows = stored(gw, name)
        ids = [r[0] for r in rows]
        # Exactly once in the store: every durable reading, no id twice, the logged values.
        assert len(ids) == len(set(ids)), f"{name}: duplicates in the store"
        missing = sorted(set(node_log.readings) - set(ids))
        assert not missing, f"{name}: logged readings missing from the store: {missing}"
        # The wall limit ends a node's chaos run by killing the wake in progress, as a
        # power cut would: a reading made durable just before it was never logged, and the
        # node sends it later like any other. At most one such reading per killed wake.
        unlogged = sorted(set(ids) - set(node_log.readings))
        killed = node_log.text.count(" ended: stopped ")
        assert len(unlogged) <= killed, f"{name}: readings the node never logged: {unlogged}"
        own_clock = node_clock_ids(node_log.text)
        for msg_id, ts, temp, hum, mv in rows:
            if msg_id in own_clock:
                # Stamped before the node had the gateway's time: stored at the gateway's
                # correction of it (the sim's compressed time is not the gateway's).
                assert node_log.readings[msg_id][1:] == (temp, hum, mv), (name, msg_id)
            elif msg_id not in unlogged:
                assert node_log.readings[msg_id] == (ts, temp, hum, mv), (name, msg_id)
            copies = upstream_rows[(name, msg_id)]
            # At least once upstream; every extra copy is the same reading sent again.
            assert all(c == copies[0] for c in copies), (name, msg_id, copies)
            assert copies[0]["t"] == ts
            dupes += len(copies) - 1
        total += len(rows)
        # Wakes that sent but left readings unacknowledged (the gateway was down or restarting).
        unacked += sum(1 for t in node_log.timings if t["sent"] and t["depth"])
        assert "hello" in got.event_kinds(name)
    assert {d for d, _ in upstream_rows} == set(names)
    raw_dupes = sum(c - 1 for c in Counter(got.raw).values())
    print(f"\n{total} readings stored once from {NODES} nodes; upstream: {len(got.readings)} "
          f"messages, {dupes} duplicate readings ({raw_dupes} whole messages re-sent), "
          f"{got.connects} consumer connects; {unacked} wakes unacknowledged and resent; "
          f"{held_in_outage[0]} messages held in the outbox during the outage")
    assert total >= NODES * 15
    # A node whose session a kill interrupted either got its ACK from the restarted gateway
    # within its window (the broker kept the gateway's session) or resent on a later wake.
    assert len(in_session_kills) >= 5, f"only {len(in_session_kills)} kills hit a node's session"
    assert got.connects >= 2, "the consumer never saw the upstream outage"
