"""The fleet simulator against the real gateway (supervised Mosquitto with mutual TLS,
SQLite): every reading a node logged as durable is stored exactly once, with power cuts,
and at 200 nodes. Figures (RSS, CPU per wake, bytes per reading) are printed with -s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway import config as gwconfig
from gateway import service
from gateway.security.pki import Pki
from gateway.store import db
from gateway.store import status as status_store
from tests.fixtures.broker import RunningBroker
from tests.mpharness import micropython_binary
from tools.sim.fleet import Fleet, FleetConfig, FleetSummary, format_summary

ROOT = Path(__file__).resolve().parents[2]
TORPOR = "import sys; from tools.cli import main; sys.exit(main(sys.argv[1:]))"

pytestmark = [
    pytest.mark.skipif(micropython_binary() is None, reason="no MicroPython unix port"),
    pytest.mark.skipif(
        shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
        reason="mosquitto is not installed (`make mosquitto`)",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class Gateway:
    port: int
    pki_dir: Path
    db_path: Path
    config: Path


def _gateway_files(tmp: Path) -> Gateway:
    pki = Pki(tmp / "pki")
    pki.init_ca()
    pki.issue_server(["localhost", "127.0.0.1", "::1"])
    pki.issue_gateway()
    port = _free_port()
    conf = tmp / "gateway.toml"
    conf.write_text(
        f'[gateway]\ndata_dir = "{tmp / "gw"}"\nstatus_interval_s = 0.5\nlog_level = "warning"\n'
        f'[broker]\nport = {port}\npki_dir = "{tmp / "pki"}"\n'
    )
    return Gateway(port, tmp / "pki", tmp / "gw" / "gateway.db", conf)


@contextlib.asynccontextmanager
async def running_gateway(gw: Gateway) -> AsyncIterator[service.Service]:
    svc = service.Service(gwconfig.load_config(gw.config))
    task = asyncio.create_task(svc.run())
    try:
        for _ in range(200):
            if svc.mqtt_connected:
                break
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
        assert svc.mqtt_connected, "the gateway did not connect to its broker"
        yield svc
    finally:
        svc.stop()
        await asyncio.wait_for(task, 30)


def _check(summary: FleetSummary) -> None:
    print("\n" + "\n".join(format_summary(summary)))
    assert summary.sampled > 0
    assert summary.missing_in_store == 0, summary.as_dict()
    assert summary.duplicates_in_store == 0, summary.as_dict()
    assert summary.stored == summary.sampled, summary.as_dict()
    assert summary.left_on_nodes == 0 and summary.acked == summary.sampled, summary.as_dict()
    assert summary.ok


def test_fleet_with_power_cuts_stores_every_reading_once(tmp_path: Path) -> None:
    gw = _gateway_files(tmp_path)
    cfg = FleetConfig(
        nodes=4, dir=tmp_path / "fleet", pki_dir=gw.pki_dir, broker_port=gw.port,
        db_path=gw.db_path, time_scale=60, wakes=8, send_every=(2, 3), power_cuts=4,
        duration_s=90,
    )
    fleet = Fleet(cfg)
    fleet.provision()
    fleet.provision()  # idempotent: same certificates, registry rows kept, config rewritten

    seen: list[int] = []

    async def main() -> FleetSummary:
        async with running_gateway(gw):
            return await fleet.run(lambda p: seen.append(p.wakes))

    summary = asyncio.run(main())
    _check(summary)
    assert summary.nodes == 4 and summary.wakes >= 4 * 8
    assert set(summary.kinds) <= {"sleep", "power_cut"}, summary.kinds
    assert summary.power_cuts <= 4
    assert summary.sent >= summary.sampled  # resent after a cut in a session counts again
    assert summary.rss_kb_max is not None and summary.child_cpu_ms_per_wake is not None
    assert seen and seen[-1] == summary.wakes
    for device_id in cfg.node_ids():
        log = (cfg.dir / device_id / "node.log").read_text()
        assert "R id=1 " in log and "--- run 0" in log
    # Certificates were issued once per device, whatever the number of provisionings.
    assert len([r for r in Pki(gw.pki_dir).list() if r.kind == "device"]) == 4


def test_fleet_cli_reports_and_errors(tmp_path: Path) -> None:
    def torpor(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", TORPOR, *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    r = torpor("sim", "fleet", "--dir", str(tmp_path / "f"), "--nodes", "2")
    assert r.returncode == 2 and "--gateway host:port or --gateway-config" in r.stderr
    r = torpor("sim", "fleet", "--dir", str(tmp_path / "f"), "--gateway", "nohost", "--pki", "x")
    assert r.returncode == 2 and "expected host:port" in r.stderr
    r = torpor("sim", "fleet", "--dir", str(tmp_path / "f"), "--gateway", "127.0.0.1:1",
               "--pki", str(tmp_path / "none"))
    assert r.returncode == 2 and "no fleet CA" in r.stderr

    gw = _gateway_files(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", TORPOR, "gateway", "run", "--config", str(gw.config)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(150):
            time.sleep(0.1)
            if gw.db_path.exists():
                with contextlib.suppress(Exception):
                    conn = db.connect(gw.db_path, readonly=True)
                    try:
                        if status_store.read_status(conn).detail.get("mqtt_connected"):
                            break
                    finally:
                        conn.close()
        r = torpor("sim", "fleet", "--dir", str(tmp_path / "fleet"), "--nodes", "3",
                   "--gateway-config", str(gw.config), "--time-scale", "60", "--wakes", "3",
                   "--send-every", "2", "--json")
    finally:
        proc.terminate()
        proc.wait(30)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["ok"] and doc["sampled"] == doc["stored"] >= 9 and doc["duplicates_in_store"] == 0


@pytest.mark.slow
def test_200_nodes_deliver_every_reading(tmp_path: Path) -> None:
    """200 nodes, each waking every 10 s real (60 s sampling, time x6): a bounded run in
    which every sampled reading is stored once."""
    gw = _gateway_files(tmp_path)
    cfg = FleetConfig(
        nodes=200, dir=tmp_path / "fleet", pki_dir=gw.pki_dir, broker_port=gw.port,
        db_path=gw.db_path, time_scale=6, wakes=3, send_every=(2, 4), duration_s=100,
    )
    fleet = Fleet(cfg)
    fleet.provision()

    async def main() -> FleetSummary:
        async with running_gateway(gw):
            return await fleet.run()

    summary = asyncio.run(main())
    _check(summary)
    assert summary.sampled >= 200
    assert summary.errors == 0, summary.kinds


def test_failed_fleet_says_why_from_the_node_logs(
    broker: RunningBroker, pki: Pki, tmp_path: Path
) -> None:
    """The broker's certificate does not carry the name the nodes check: every send fails,
    and the run's output names that cause (from the node logs), not just a count."""
    port = broker.port
    exe = str(Path(sys.executable).parent / "torpor")
    p = subprocess.run(
        [exe, "sim", "fleet", "--nodes", "3", "--wakes", "2", "--dir", str(tmp_path / "fleet"),
         "--gateway", f"127.0.0.1:{port}", "--pki", str(pki.path),
         "--server-hostname", "gateway.example", "--send-every", "1", "--time-scale", "60"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert p.returncode == 1, p.stdout + p.stderr
    assert "the fleet run failed" in p.stderr
    assert "most frequent errors in the node logs:" in p.stderr
    reasons = p.stderr.split("most frequent errors in the node logs:", 1)[1]
    assert "send failed" in reasons and "does not match" in reasons, p.stderr
    print(reasons)
    # progress in plain lines, stderr not being a terminal
    assert "[fleet] " in p.stderr and "/6 wakes" in p.stderr
