"""The firmware's wake cycle end to end: a sim node (the real firmware on the unix port)
against a real Mosquitto with mutual TLS, and a small acking gateway written here with
aiomqtt and gateway/proto.py. Time is compressed: slept intervals are not waited.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gateway import proto
from gateway.security.pki import DeviceCredentials
from tests.fixtures.broker import RunningBroker, mqtt_client
from tests.mpharness import micropython_binary, mp_env
from tools.sim.node import SimNode

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
R_LINE = re.compile(r"^R id=(\d+) t=(\d+) temp=(-?\d+) hum=(\d+) mv=(\d+)$")
T_LINE = re.compile(r"^T (.*)$")

pytestmark = pytest.mark.skipif(micropython_binary() is None, reason="no MicroPython unix port")


# ---- provisioning and node output ------------------------------------------------------

_PROVISION = """
import os, sim
sim.configure({dir!r})
sim.init()
def mk(p):
    try:
        os.mkdir(p)
    except OSError:
        pass
mk('/flash/certs')
for name, src in {files!r}:
    with open(src, 'rb') as f:
        data = f.read()
    with open('/flash/' + name, 'wb') as f:
        f.write(data)
print('OK')
"""


def provision(node: SimNode, config: dict[str, Any], creds: DeviceCredentials | None) -> None:
    """Write config.json and the DER credentials into the node's flash, as flashing would."""
    stage = node.dir / "provision"
    stage.mkdir(exist_ok=True)
    (stage / "config.json").write_text(json.dumps(config))
    files = [("config.json", str(stage / "config.json"))]
    if creds is not None:
        files += [
            ("certs/cert.der", str(creds.cert_der)),
            ("certs/key.der", str(creds.key_der)),
            ("certs/ca.der", str(creds.ca_der)),
        ]
    binary = micropython_binary()
    assert binary is not None
    proc = subprocess.run(
        [binary, "-c", _PROVISION.format(dir=str(node.dir), files=files)],
        capture_output=True, text=True, timeout=30, env=mp_env(),
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def node_config(broker: RunningBroker, device_id: str, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "device_id": device_id,
        "broker_host": broker.host,
        "broker_port": broker.port,
        "server_hostname": "localhost",
        "sample_interval_s": 60,
        "send_every": 3,
        "send_max_age_s": 86400,
        "awake_window_ms": 3000,
        "awake_budget_ms": 8000,
        "align_s": 60,
    }
    cfg.update(over)
    return cfg


def make_node(tmp: Path, name: str, seed: int, **kw: Any) -> SimNode:
    return SimNode(tmp / name, seed=seed, time_scale=0, start_ms=START_MS, **kw)


@dataclass(frozen=True, slots=True)
class NodeLog:
    readings: dict[int, tuple[int, int, int, int]]  # msg id -> (t, temp, hum, mv), as logged
    timings: list[dict[str, int]]
    text: str


def read_log(node: SimNode) -> NodeLog:
    text = (node.dir / "node.log").read_text(errors="replace")
    readings: dict[int, tuple[int, int, int, int]] = {}
    timings: list[dict[str, int]] = []
    for line in text.splitlines():
        m = R_LINE.match(line)
        if m:
            i, t, temp, hum, mv = (int(x) for x in m.groups())
            readings[i] = (t, temp, hum, mv)
            continue
        m = T_LINE.match(line)
        if m:
            pairs = [kv.split("=", 1) for kv in m.group(1).split()]
            if any(len(kv) != 2 or not kv[1].lstrip("-").isdigit() for kv in pairs):
                continue  # a line a power cut ended half-printed: the wake's figures are lost
            timings.append({k: int(v) for k, v in pairs})
    return NodeLog(readings, timings, text)


def node_clock_ids(text: str) -> set[int]:
    """Ids of the readings a node logged while its clock was its own count: from each
    power-on until the gateway's time set it."""
    out: set[int] = set()
    unset = False
    for line in text.splitlines():
        if line.startswith("--- run ") and " cause=POWER_ON " in line:
            unset = True
        elif "clock set from the gateway" in line:
            unset = False
        elif unset and line.startswith("R id="):
            out.add(int(line.split()[1][3:]))
    return out


# ---- the test gateway --------------------------------------------------------------------

@dataclass(slots=True)
class _Dev:
    got: set[int] = field(default_factory=set)
    first_seen: list[int] = field(default_factory=list)
    expect: int = 0
    since_hello: int = 0
    hellos: list[proto.Hello] = field(default_factory=list)


class TestGateway:
    """Acks bursts (cumulative + selective), delivers queued commands after HELLO, and
    sends SLEEP_NOW once the readings the HELLO announced have arrived."""

    __test__ = False

    def __init__(self, broker: RunningBroker, ack: bool = True) -> None:
        self.broker = broker
        self.ack = ack
        self.devs: dict[str, _Dev] = {}
        self.readings: dict[str, dict[int, tuple[int, int, int, int]]] = {}
        self.commands: dict[str, list[proto.Command]] = {}
        self.results: list[tuple[str, proto.CommandResult]] = []
        self.reports: list[tuple[str, proto.ShadowReport]] = []
        self.deltas: dict[str, proto.ShadowDelta] = {}
        self.frames: list[tuple[str, proto.Frame]] = []
        self.bursts: list[tuple[str, int, int]] = []  # device, first id, count
        self._msg = 0
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    def queue_command(self, device: str, command_id: int, op: proto.CommandOp, *args: int) -> None:
        self.commands.setdefault(device, []).append(
            proto.Command(0, command_id, op, tuple(args), priority=1, ttl_s=3600)
        )

    async def __aenter__(self) -> TestGateway:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def _run(self) -> None:
        async with mqtt_client(self.broker) as client:
            self._client = client
            await client.subscribe("torpor/+/up", qos=1)
            self._ready.set()
            async for m in client.messages:
                device = str(m.topic).split("/")[1]
                assert isinstance(m.payload, bytes | bytearray)
                await self._handle(device, proto.decode(bytes(m.payload)))

    async def _send(self, device: str, frame: proto.Frame) -> None:
        assert self._client is not None
        await self._client.publish(f"torpor/{device}/down", proto.encode(frame), qos=1)

    def _id(self) -> int:
        self._msg += 1
        return self._msg

    async def _handle(self, device: str, frame: proto.Frame) -> None:
        self.frames.append((device, frame))
        dev = self.devs.setdefault(device, _Dev())
        if isinstance(frame, proto.Hello):
            dev.hellos.append(frame)
            dev.expect = frame.queue_depth
            dev.since_hello = 0
            for cmd in self.commands.get(device, []):
                await self._send(device, proto.Command(self._id(), cmd.command_id, cmd.op, cmd.args, cmd.priority, cmd.ttl_s))
            delta = self.deltas.pop(device, None)
            if delta is not None:
                await self._send(device, delta)
            if dev.expect == 0:
                await self._send(device, proto.SleepNow(self._id(), 0))
        elif isinstance(frame, proto.Burst):
            rows = frame.readings.rows()
            self.bursts.append((device, frame.msg_id, len(rows)))
            store = self.readings.setdefault(device, {})
            for k, row in enumerate(rows):
                i = frame.msg_id + k
                if i not in dev.got:
                    dev.got.add(i)
                    dev.first_seen.append(i)
                store[i] = (row[0], row[1], row[2], row[3])
            dev.since_hello += len(rows)
            if not self.ack:
                return
            cum = 0
            while cum + 1 in dev.got:
                cum += 1
            sel = tuple(sorted(i for i in dev.got if i > cum)[:64])
            await self._send(device, proto.Ack(self._id(), cum, sel))
            if dev.since_hello >= dev.expect:
                await self._send(device, proto.SleepNow(self._id(), 0))
        elif isinstance(frame, proto.CommandResult):
            self.results.append((device, frame))
            if frame.status in (proto.ResultStatus.OK, proto.ResultStatus.DUPLICATE):
                self.commands[device] = [
                    c for c in self.commands.get(device, []) if c.command_id != frame.command_id
                ]
        elif isinstance(frame, proto.ShadowReport):
            self.reports.append((device, frame))


def received_in_order(gw: TestGateway, device: str) -> list[int]:
    return gw.devs[device].first_seen if device in gw.devs else []


# ---- tests -------------------------------------------------------------------------------

def test_readings_arrive_in_order_and_the_queue_empties(tmp_path: Path, broker: RunningBroker) -> None:
    creds = broker.pki.issue_device("node-a")  # type: ignore[union-attr]
    node = make_node(tmp_path, "a", seed=5)
    provision(node, node_config(broker, "node-a", send_every=3), creds)

    async def main() -> None:
        async with TestGateway(broker) as gw:
            summary = await node.run(7, wall_limit_s=120)
            assert summary.kinds["sleep"] == 7, summary.as_dict()
            await asyncio.sleep(0.2)
            log = read_log(node)
            assert sorted(log.readings) == list(range(1, 8))
            # Wakes 3 and 6 sent: readings 1..6 arrived once each, in id order, same values.
            assert received_in_order(gw, "node-a") == list(range(1, 7))
            for i in range(1, 7):
                assert gw.readings["node-a"][i] == log.readings[i]
            # Timestamps sit on the 60 s grid and the bursts were regular.
            ts = [log.readings[i][0] for i in range(1, 8)]
            assert all(t % 60 == 0 for t in ts) and all(b - a == 60 for a, b in zip(ts, ts[1:], strict=False))
            bursts = [f for d, f in gw.frames if isinstance(f, proto.Burst)]
            assert [b.interval for b in bursts] == [60, 60]
            # The queue empties after each ack: depth 0 at the end of sending wakes.
            assert [t["depth"] for t in log.timings] == [1, 2, 0, 1, 2, 0, 1]
            sent = [t for t in log.timings if t["sent"]]
            assert [t["sent"] for t in sent] == [3, 3]
            assert all(t["bytes_out"] > 0 and t["bytes_in"] > 0 for t in sent)
            hellos = gw.devs["node-a"].hellos
            assert [h.queue_depth for h in hellos] == [3, 3]
            assert all(h.next_wake_s > 0 and h.device_class == proto.DeviceClass.SENSOR for h in hellos)
            # The first boot (power-on) reads the flash queue; every wake from deep sleep
            # after a completed wake resumes it from RTC memory, sending wakes included.
            assert resumed(node) == [0, 1, 1, 1, 1, 1, 1]
            # Power lost while asleep: RTC memory is gone, the queue is read from flash
            # again, and nothing is lost or sent twice.
            node.power_cycle()
            summary = await node.run(3, wall_limit_s=60)
            assert summary.kinds["sleep"] == 3, summary.as_dict()
            assert resumed(node)[7:] == [0, 1, 1]
            await asyncio.sleep(0.2)
            assert received_in_order(gw, "node-a") == list(range(1, 10))

    asyncio.run(main())


def resumed(node: SimNode) -> list[int]:
    """Per boot: whether the app resumed its flash queue from RTC memory."""
    text = (node.dir / "node.log").read_text()
    return [int(m) for m in re.findall(r" boot cause=\d+ .* resumed=(\d)", text)]


def test_commands_run_once_results_return_and_shadow_applies(tmp_path: Path, broker: RunningBroker) -> None:
    creds = broker.pki.issue_device("node-c")  # type: ignore[union-attr]
    node = make_node(tmp_path, "c", seed=6)
    provision(node, node_config(broker, "node-c", send_every=1), creds)

    async def main() -> None:
        async with TestGateway(broker) as gw:
            gw.queue_command("node-c", 41, proto.CommandOp.PING)
            gw.queue_command("node-c", 42, proto.CommandOp.SET_INTERVAL, 120)
            gw.queue_command("node-c", 43, proto.CommandOp.SET_THRESHOLDS, -500, 9000)
            gw.queue_command("node-c", 44, proto.CommandOp.SET_INTERVAL, 0)  # out of range
            await node.run(1, wall_limit_s=60)
            ok = {r.command_id: r for d, r in gw.results}
            assert ok[41].status == proto.ResultStatus.OK and len(ok[41].values) == 1
            assert ok[42].status == proto.ResultStatus.OK and ok[42].values == (120,)
            assert ok[43].status == proto.ResultStatus.OK and ok[43].values[:2] == (-500, 9000)
            assert ok[44].status == proto.ResultStatus.BAD_ARGS and "sample_interval_s" in ok[44].detail
            # The gateway re-delivers 42 (as after a lost result): reported duplicate, not rerun.
            gw.queue_command("node-c", 42, proto.CommandOp.SET_INTERVAL, 120)
            gw.deltas["node-c"] = proto.ShadowDelta(
                900, 7, (proto.ConfigEntry(proto.ConfigKey.SEND_EVERY, 2),)
            )
            await node.run(3, wall_limit_s=90)
            again = [r for d, r in gw.results if r.command_id == 42]
            assert [r.status for r in again] == [proto.ResultStatus.OK, proto.ResultStatus.DUPLICATE]
            assert all(r.command_id != 41 or r.status == proto.ResultStatus.OK for d, r in gw.results)
            assert len([r for d, r in gw.results if r.command_id == 41]) == 1
            report = gw.reports[-1][1]
            assert report.config_version == 7
            values = {e.key: e.value for e in report.entries}
            assert values[proto.ConfigKey.SEND_EVERY] == 2
            assert values[proto.ConfigKey.SAMPLE_INTERVAL_S] == 120
            log = read_log(node)
            ts = [log.readings[i][0] for i in sorted(log.readings)]
            # After set_interval 120 the node samples on the 120 s grid.
            assert all(b - a == 120 for a, b in zip(ts[1:], ts[2:], strict=False)), ts

    asyncio.run(main())


@pytest.fixture
def black_hole() -> Iterator[tuple[str, int]]:
    """A TCP port that accepts connections and never answers (a dead broker)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    try:
        yield "127.0.0.1", s.getsockname()[1]
    finally:
        s.close()


def test_dead_broker_costs_at_most_the_budget_and_readings_wait_in_flash(
    tmp_path: Path, broker: RunningBroker, black_hole: tuple[str, int]
) -> None:
    creds = broker.pki.issue_device("node-d")  # type: ignore[union-attr]
    node = make_node(tmp_path, "d", seed=7)
    budget = 2000
    dead = node_config(broker, "node-d", send_every=1, awake_budget_ms=budget, awake_window_ms=1000)
    dead["broker_port"] = black_hole[1]
    provision(node, dead, creds)

    async def main() -> None:
        async with TestGateway(broker) as gw:
            t0 = time.monotonic()
            summary = await node.run(3, wall_limit_s=60)
            log = read_log(node)
            assert sorted(log.readings) == [1, 2, 3]
            assert "send failed" in log.text
            # First wake tries and fails within the budget; the next retries after backoff.
            tried = [t for t in log.timings if t["total"] >= budget * 0.8]
            assert tried, log.timings
            for t in log.timings:
                assert t["total"] <= budget + 600, t
            for r in summary.runs:
                assert r.awake_ms <= budget + 1500, r
            assert time.monotonic() - t0 < 20
            assert log.timings[-1]["depth"] == 3
            # Three failures: the next try waits 120 s (backoff 30, 60, 120), so of the next
            # two wakes the first only samples and the second sends everything kept, in order.
            provision(node, node_config(broker, "node-d", send_every=1), None)
            await node.run(2, wall_limit_s=60)
            await asyncio.sleep(0.2)
            log = read_log(node)
            assert [t["sent"] for t in log.timings[-2:]] == [0, 5]
            assert received_in_order(gw, "node-d") == [1, 2, 3, 4, 5]
            assert log.timings[-1]["depth"] == 0
            for i in range(1, 6):
                assert gw.readings["node-d"][i] == log.readings[i]

    asyncio.run(main())


def test_a_bad_config_is_reported_by_key_and_the_node_sleeps(tmp_path: Path, broker: RunningBroker) -> None:
    node = make_node(tmp_path, "bad", seed=8)
    provision(node, node_config(broker, "node-x", sample_interval_s=0), None)
    summary = node.run_sync(1, wall_limit_s=30)
    assert summary.kinds["sleep"] == 1
    log = read_log(node)
    assert "config key sample_interval_s: must be in 1..86400" in log.text
    assert summary.runs[0].sleep_ms == 3600 * 1000
