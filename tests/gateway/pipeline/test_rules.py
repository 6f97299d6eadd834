"""Edge rules and alerts: the rules file's validation, and the engine fed with real readings
through the stack (a real Mosquitto with device certificates, the gateway service, real
frames from each node, a real SQLite file, an upstream broker read by mosquitto_sub)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import sqlite3
import subprocess
import textwrap
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import proto
from gateway.config import parse_config
from gateway.pipeline.rules import RulesError, forecast_days, load_rules, parse_rules
from gateway.store import alerts, db, readings
from gateway.store import devices as registry
from gateway.store import downlink_queue as q
from tests.fixtures.broker import RunningBroker
from tests.gateway.pipeline.test_ingest import Node, aio, provision, running

ROOT = Path(__file__).resolve().parents[3]
T0 = 1_700_000_000
DAY = 86_400


# ---------------------------------------------------------------- the file

def _err(text: str) -> str:
    with pytest.raises(RulesError) as info:
        parse_rules(tomllib.loads(textwrap.dedent(text)), "rules.toml")
    return str(info.value)


def test_bad_rules_are_refused_naming_the_file_and_key() -> None:
    assert _err("""
        [[rule]]
        name = "hot"
        condition = "threshold"
        measurement = "temperature"
        abovee = 35
    """).startswith("rules.toml: rule[1] (hot).abovee: unknown key")
    assert "rule[1] (hot).above: expected a number, got 'hot'" in _err("""
        [[rule]]
        name = "hot"
        condition = "threshold"
        measurement = "temperature"
        above = "hot"
    """)
    assert "rule[1] (x).clear_below: 36 is above the raise level 35" in _err("""
        [[rule]]
        name = "x"
        condition = "threshold"
        measurement = "temperature"
        above = 35
        clear_below = 36
    """)
    assert "rule[1] (x).measurement: 'temp' is not a measurement" in _err("""
        [[rule]]
        name = "x"
        condition = "threshold"
        measurement = "temp"
        above = 35
    """)
    assert "rule[1] (x).group: no group 'gh'" in _err("""
        [[rule]]
        name = "x"
        condition = "overdue"
        group = "gh"
    """)
    assert "rule[1] (x).action.target: 'group' needs the rule's group key" in _err("""
        [[rule]]
        name = "x"
        condition = "overdue"
        action = { command = "ping", target = "group" }
    """)
    assert "rule[1] (x).action.args" in _err("""
        [[rule]]
        name = "x"
        condition = "overdue"
        action = { command = "set_interval", args = [] }
    """)
    assert "rule[1] (x).action.config.colour" in _err("""
        [[rule]]
        name = "x"
        condition = "overdue"
        action = { config = { colour = 3 } }
    """)
    assert "rule[2].name: 'x' is used by another rule" in _err("""
        [[rule]]
        name = "x"
        condition = "quarantined"
        [[rule]]
        name = "x"
        condition = "quarantined"
    """)
    assert "rule[1] (x).condition: 'hot' is not one of threshold" in _err("""
        [[rule]]
        name = "x"
        condition = "hot"
    """)
    assert "rule[1] (c).device: condition 'credential_expiry' is not about a device" in _err("""
        [[rule]]
        name = "c"
        condition = "credential_expiry"
        days = 10
        device = "n1"
    """)
    assert "groups.gh: expected a device id glob" in _err("[groups]\ngh = 3\n")


def test_the_documented_example_validates(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "rules.md").read_text()
    block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "rules.toml"
    path.write_text(block)
    rs = load_rules(path)
    assert {r.condition for r in rs.rules} == {
        "threshold", "overdue", "battery", "quarantined", "campaign_aborted", "credential_expiry"}
    hot = rs.rule("greenhouse-hot")
    assert hot is not None and hot.action is not None and hot.action.target == "group"
    assert load_rules(tmp_path / "missing.toml").rules == ()


def test_forecast_is_the_linear_trend() -> None:
    times = [T0 + i * DAY for i in range(10)]
    mv = [3600 - 20 * i for i in range(10)]  # 20 mV a day, 3420 now, empty at 3000
    assert forecast_days(times, mv, 3000) == pytest.approx(21.0)
    assert forecast_days(times, [3500] * 10, 3000) == math.inf
    assert forecast_days(times[:1], mv[:1], 3000) is None


# ---------------------------------------------------------------- through the stack

RULES = """
[groups]
greenhouse = ["gh-*"]

[[rule]]
name = "greenhouse-hot"
condition = "threshold"
group = "greenhouse"
measurement = "temperature"
above = 35.0
clear_below = 33.0
for_readings = 3
severity = "critical"
action = { command = "set_interval", args = [60], target = "group" }

[[rule]]
name = "battery-low"
condition = "battery"
device = "bat-*"
below_mv = 3300
clear_above_mv = 3400

[[rule]]
name = "battery-forecast"
condition = "battery"
device = "fc-*"
forecast_days = 30
min_points = 5

[[rule]]
name = "late"
condition = "overdue"
intervals = 2

[[rule]]
name = "quarantine"
condition = "quarantined"
"""


def config(broker: RunningBroker, tmp: Path, rules: str = RULES, upstream: RunningBroker | None = None,
           **sections: dict[str, Any]) -> Any:
    assert broker.pki is not None
    (tmp / "rules.toml").write_text(rules)
    doc: dict[str, Any] = {
        "gateway": {"data_dir": str(tmp / "data"), "status_interval_s": 0.2},
        "broker": {"mode": "external", "host": broker.host, "port": broker.port,
                   "pki_dir": str(broker.pki.path)},
        "ingest": {"batch_max_ms": 2},
        "rules": {"file": str(tmp / "rules.toml"), "interval_s": 0.05, "scan_interval_s": 0.1},
        "downlink": {"grace_s": 0.3},
        **sections,
    }
    if upstream is not None:
        doc["upstream"] = {"enabled": True, "host": upstream.host, "port": upstream.port,
                           "tls": False, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5}
        doc["hass"] = {"enabled": False}
    return parse_config(doc, source=str(tmp / "gateway.toml"))


def hello(next_wake_s: int = 900, battery_mv: int = 3300) -> bytes:
    return proto.encode_hello(proto.Hello(
        1, 3, proto.BootCause.TIMER, battery_mv, -61, 40_000, 0, 0, next_wake_s, 800, T0,
        proto.DeviceClass.SENSOR))


class Sender:
    """A node publishing real BURST frames of env3 readings, one id after another."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.next_id = 1
        self.t = T0

    async def hello(self, next_wake_s: int = 900) -> None:
        await self.node.send(hello(next_wake_s))
        assert isinstance(await self.node.recv(), proto.Ack)
        while not isinstance(await self.node.recv(), proto.SleepNow):
            pass

    async def burst(self, temps: list[float] | None = None, mv: list[int] | None = None,
                    step_s: int = 60) -> None:
        n = len(temps if temps is not None else mv or [])
        temps = temps if temps is not None else [20.0] * n
        mv = mv if mv is not None else [3500] * n
        stamps = tuple(self.t + step_s * i for i in range(n))
        self.t += step_s * n
        series = proto.Series(stamps, (tuple(round(t * 100) for t in temps), (5000,) * n,
                                       tuple(mv)))
        frame = proto.encode_burst(proto.Burst(self.next_id, proto.SCHEMA_ENV3, step_s if step_s < 65536 else 0, series))
        self.next_id += n
        await self.node.send(frame)
        ack = await self.node.recv()
        assert isinstance(ack, proto.Ack) and ack.cumulative == self.next_id - 1


@contextlib.contextmanager
def opened(path: Path) -> Iterator[sqlite3.Connection]:
    conn = db.connect(path, readonly=True)
    try:
        yield conn
    finally:
        conn.close()


async def until(what: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def evaluated(svc: Any) -> None:
    """The rules engine has evaluated every reading stored so far."""
    path = svc.cfg.db_path

    def done() -> bool:
        with opened(path) as conn:
            return bool(svc.rules.evaluated == readings.last_run_id(conn))
    await until(done)


def history(path: Path, rule: str | None = None) -> list[alerts.Alert]:
    with opened(path) as conn:
        rows, _ = alerts.page(conn, rule=rule, limit=1000)
    return sorted(rows, key=lambda a: a.id)


def items(path: Path, device: str) -> list[q.Item]:
    with opened(path) as conn:
        return q.pending(conn, device)


@pytest.fixture
def upstream(broker_factory: Callable[..., RunningBroker]) -> RunningBroker:
    return broker_factory(tls=False)


def mosquitto_sub(up: RunningBroker, topic: str) -> subprocess.Popen[str]:
    exe = shutil.which("mosquitto_sub")
    if exe is None:
        pytest.skip("mosquitto_sub is not installed")
    proc = subprocess.Popen([exe, "-h", up.host, "-p", str(up.port), "-t", topic, "-v", "-q", "1",
                             "-W", "60"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)  # subscribed
    return proc


def lines_of(proc: subprocess.Popen[str]) -> list[tuple[str, str]]:
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    return [tuple(line.split(" ", 1)) for line in out.splitlines() if " " in line]  # type: ignore[misc]


@aio
async def test_threshold_with_for_n_and_hysteresis_raises_once_and_acts_on_the_group_once(
        broker: RunningBroker, upstream: RunningBroker, tmp_path: Path) -> None:
    pki = provision(broker, tmp_path, "gh-1", "gh-2", "gh-3", "out-1")
    cfg = config(broker, tmp_path, upstream=upstream)
    path = cfg.db_path
    sub = mosquitto_sub(upstream, "torpor/+/events")
    async with running(cfg) as svc, Node(broker, pki, "gh-1") as n1, \
            Node(broker, pki, "gh-2") as n2, \
            Node(broker, pki, "out-1") as n3:
        s1, s2, s3 = Sender(n1), Sender(n2), Sender(n3)
        for s in (s1, s2, s3):
            await s.hello()
        # Over 35 twice, then under: "for 3 readings" counts readings in a row.
        await s1.burst([36.0, 36.5, 30.0, 36.0, 36.0])
        await s3.burst([40.0, 40.0, 40.0, 40.0])  # not in the greenhouse group
        await evaluated(svc)
        assert history(path) == []
        await s1.burst([35.5])  # the third in a row
        await evaluated(svc)
        [a] = history(path)
        assert (a.rule, a.device, a.severity, a.open) == ("greenhouse-hot", "gh-1", "critical", True)
        assert a.message == "temperature 35.5 above 35 for 3 readings"
        # The group's action: set_interval 60 queued for every member, once.
        for dev in ("gh-1", "gh-2", "gh-3"):
            [item] = items(path, dev)
            assert (item.op, item.args) == (proto.CommandOp.SET_INTERVAL, (60,))
        assert items(path, "out-1") == []
        # Still hot, and a second member hot too: no second alert for gh-1, and the group
        # action is not queued again while the group's episode lasts.
        await s1.burst([37.0, 38.0])
        await s2.burst([36.0, 36.0, 36.0])
        await evaluated(svc)
        assert [(a.device, a.open) for a in history(path)] == [("gh-1", True), ("gh-2", True)]
        assert all(len(items(path, d)) == 1 for d in ("gh-1", "gh-2", "gh-3"))
        # Hysteresis: between 33 and 35 clears nothing and raises nothing...
        await s1.burst([34.0, 34.9, 33.5, 34.0])
        await evaluated(svc)
        assert history(path)[0].open
        # ...under 33 clears, once; back between the levels does not raise it again.
        await s1.burst([32.9, 32.0, 34.0, 34.5])
        await evaluated(svc)
        first = history(path)[0]
        assert not first.open and first.clear_message == "temperature 32.9 back below 33"
        assert [a.open for a in history(path)] == [False, True]
    events = [json.loads(p) for t, p in lines_of(sub) if t.startswith("torpor/")]
    got = [(e["device"], e["fields"]["rule"], e["fields"]["state"]) for e in events
           if e["event"] == "alert"]
    assert got == [("gh-1", "greenhouse-hot", "raised"), ("gh-2", "greenhouse-hot", "raised"),
                   ("gh-1", "greenhouse-hot", "cleared")]


@aio
async def test_battery_level_and_forecast(broker: RunningBroker, tmp_path: Path) -> None:
    pki = provision(broker, tmp_path, "bat-1", "fc-1", "fc-2")
    cfg = config(broker, tmp_path)
    path = cfg.db_path
    async with running(cfg) as svc, Node(broker, pki, "bat-1") as nb, Node(broker, pki, "fc-1") as nf, \
            Node(broker, pki, "fc-2") as nflat:
        b, f, flat = Sender(nb), Sender(nf), Sender(nflat)
        await b.burst(mv=[3350, 3310])
        await evaluated(svc)
        assert history(path) == []
        await b.burst(mv=[3290])
        await evaluated(svc)
        [low] = history(path)
        assert low.message == "battery 3290 mV below 3300 mV" and low.open
        await b.burst(mv=[3350, 3390])  # above the level, under the clear level: still open
        await evaluated(svc)
        assert history(path)[0].open
        await b.burst(mv=[3410])
        await evaluated(svc)
        assert not history(path)[0].open
        # A day apart, 20 mV a day: 3420 mV now, 3000 mV in 21 days, under the 30 asked.
        await f.burst(mv=[3600 - 20 * i for i in range(4)], step_s=DAY)
        await flat.burst(mv=[3500, 3501, 3499, 3500, 3500, 3500], step_s=DAY)
        await evaluated(svc)
        assert len(history(path)) == 1  # fewer than min_points: no forecast yet
        await f.burst(mv=[3600 - 20 * i for i in range(4, 10)], step_s=DAY)
        await evaluated(svc)
        fc = history(path, "battery-forecast")
        assert [(a.device, a.open) for a in fc] == [("fc-1", True)]
        assert fc[0].message == "battery forecast to reach 3000 mV in 21.0 days (under 30)"
        assert fc[0].value == pytest.approx(21.0)


LEDGER_RULES = """
[[rule]]
name = "battery-forecast"
condition = "battery"
forecast_days = 30
min_points = 5
empty_mv = 2400
"""


@pytest.mark.parametrize("board_of", ["gateway", "device"])
@aio
async def test_battery_forecast_by_the_energy_ledger_where_the_wakes_report_it(
        broker: RunningBroker, tmp_path: Path, board_of: str) -> None:
    """With the board known ([energy] board for the whole gateway, or the device's own
    in the registry), a node whose HELLOs report their wakes' energy facts is
    forecast by the ledger: its voltage does not fall (the trend says "not falling"), but
    eight 4-second wakes within seconds of each other drain a 2×AA pack at 2,450 mV in
    well under 30 days. A node whose HELLOs report nothing keeps the voltage trend."""
    pki = provision(broker, tmp_path, "led-1", "flat-1")
    if board_of == "device":
        conn = db.open_db(tmp_path / "data" / "gateway.db")
        registry.set_board(conn, "led-1", "esp32")
        conn.close()
    cfg = config(broker, tmp_path, rules=LEDGER_RULES,
                 energy={"board": "esp32"} if board_of == "gateway" else {})
    path = cfg.db_path
    async with running(cfg) as svc, Node(broker, pki, "led-1") as nl, \
            Node(broker, pki, "flat-1") as nf:
        led, flat = Sender(nl), Sender(nf)
        for _ in range(8):
            await nl.send(proto.encode_hello(proto.Hello(
                1, 3, proto.BootCause.TIMER, 2450, -61, 40_000, 0, 0, 60, 800, T0,
                proto.DeviceClass.SENSOR, prev_awake_ms=4000, prev_radio_ms=3000,
                prev_sent=True)))
            assert isinstance(await nl.recv(), proto.Ack)
            while not isinstance(await nl.recv(), proto.SleepNow):
                pass
            await asyncio.sleep(0.05)
            await flat.hello()
        await led.burst(mv=[2450] * 6, step_s=DAY)
        await flat.burst(mv=[2450] * 6, step_s=DAY)
        await evaluated(svc)
        fc = history(path, "battery-forecast")
        assert [(a.device, a.open) for a in fc] == [("led-1", True)], fc
        assert "battery forecast to reach 2400 mV in" in fc[0].message
        with opened(path) as conn:
            from gateway.config import board_models
            from gateway.store import wake_log

            model = board_models(cfg).energy(registry.board_of(conn, "led-1"))
            assert model is not None and model.board == "esp32"
            assert model is not None
            led_fc = wake_log.ledger_forecast(conn, "led-1", model, time.time(),
                                              empty_mv=2400)
        assert led_fc is not None and fc[0].value == pytest.approx(led_fc.days, rel=0.05)


@aio
async def test_overdue_by_its_own_intervals_and_quarantine(broker: RunningBroker, tmp_path: Path) -> None:
    pki = provision(broker, tmp_path, "n1", "n2")
    cfg = config(broker, tmp_path)
    path = cfg.db_path
    async with running(cfg), Node(broker, pki, "n1") as n1, Node(broker, pki, "n2") as n2:
        fast, slow = Sender(n1), Sender(n2)
        await fast.hello(next_wake_s=1)
        await slow.hello(next_wake_s=900)
        t_hello = time.time()
        # 2 intervals of 1 s missed (plus the 0.3 s grace): overdue; the 900 s node is not.
        late = await until(lambda: history(path, "late"))
        assert time.time() - t_hello >= 2.0
        assert [(a.device, a.open, a.value) for a in late] == [("n1", True, 2.0)]
        await asyncio.sleep(1.2)  # more wakes missed: still one alert
        assert len(history(path, "late")) == 1
        await fast.hello(next_wake_s=900)
        await until(lambda: not history(path, "late")[0].open)
        assert history(path, "late")[0].clear_message == "heard again"
        conn = db.open_db(path)
        registry.quarantine(conn, "n2", "test")
        [qa] = await until(lambda: history(path, "quarantine"))
        assert qa.device == "n2" and qa.message == "quarantined: test"
        registry.release(conn, "n2")
        conn.close()
        await until(lambda: not history(path, "quarantine")[0].open)
        assert len(history(path)) == 2


@aio
async def test_a_bad_rules_file_keeps_the_rules_in_force_until_a_good_one(
        broker: RunningBroker, tmp_path: Path) -> None:
    pki = provision(broker, tmp_path, "gh-1")
    cfg = config(broker, tmp_path)
    path = cfg.db_path
    rules_file = tmp_path / "rules.toml"
    async with running(cfg) as svc, Node(broker, pki, "gh-1") as n1:
        s = Sender(n1)
        rules_file.write_text(RULES.replace("above = 35.0", "above = 'hot'"))
        svc.reload()  # SIGHUP (the file's new mtime alone would do too)
        assert svc.rules is not None
        await until(lambda: svc.rules.last_error)
        assert "rule[1] (greenhouse-hot).above: expected a number, got 'hot'" in svc.rules.last_error
        # The old rules still hold: 36 is over 35.
        await s.burst([36.0, 36.0, 36.0])
        await evaluated(svc)
        assert [a.rule for a in history(path)] == ["greenhouse-hot"]
        # A good file, with the rule's level moved up, is taken on its mtime alone.
        time.sleep(0.01)
        rules_file.write_text(RULES.replace("above = 35.0", "above = 45.0").replace(
            "clear_below = 33.0", "clear_below = 40.0"))
        await until(lambda: svc.rules.last_error is None and svc.rules.engine.ruleset.rule(
            "greenhouse-hot").above == 45.0)
        await s.burst([39.0])  # under the new clear level
        await evaluated(svc)
        assert not history(path)[0].open
        # A rule removed from the file clears its open alerts.
        await s.burst([50.0, 50.0, 50.0])
        await evaluated(svc)
        assert history(path)[-1].open
        rules_file.write_text("")
        await until(lambda: not history(path)[-1].open)
        assert history(path)[-1].clear_message == "the rule was removed"


# ---------------------------------------------------------------- the page and the API

def test_alerts_in_the_api_and_on_the_fleet_page(tmp_path: Path) -> None:
    from tests.gateway.web.fleetdb import fill
    from tests.gateway.web.test_api import _csrf, _origin, web_client

    path = tmp_path / "gateway.db"
    fill(path, devices=3)
    conn = db.open_db(path)
    dev = registry.list_devices(conn)[0].id
    with db.transaction(conn):
        first = alerts.raise_alert(conn, rule="hot", kind="threshold", subject=dev, device=dev,
                                   severity="warning", message="too hot", value=36.0, now=T0)
        assert alerts.raise_alert(conn, rule="hot", kind="threshold", subject=dev, device=dev,
                                  severity="warning", message="again", value=37.0, now=T0) is None
        alerts.raise_alert(conn, rule="ota", kind="campaign_aborted", subject="campaign:1",
                           device=None, severity="warning", message="aborted", value=1.0, now=T0)
    conn.close()
    assert first is not None

    async def body() -> None:
        async with web_client(path) as c:
            r = await c.get("/api/v1/alerts", params={"state": "open", "device": dev})
            doc = await r.json()
            assert r.status == 200 and doc["total"] == 1 and doc["open"] == 2
            assert doc["alerts"][0]["message"] == "too hot" and doc["alerts"][0]["state"] == "open"
            r = await c.get("/api/v1/alerts", params={"state": "shut"})
            assert r.status == 400 and (await r.json())["field"] == "state"
            page = await (await c.get("/")).text()
            assert f'data-device="{dev}"' in page and "1 open" in page
            headers = {**_origin(c), "X-CSRF-Token": await _csrf(c)}
            r = await c.post(f"/api/v1/alerts/{first.id}/clear", headers=headers)
            assert r.status == 200 and (await r.json())["state"] == "cleared"
            r = await c.post(f"/api/v1/alerts/{first.id}/clear", headers=headers)
            assert r.status == 404 and (await r.json())["field"] == "alert_id"
            doc = await (await c.get("/api/v1/alerts")).json()
            assert doc["open"] == 1 and doc["total"] == 2
            spec = await (await c.get("/api/v1/openapi.json")).json()
            assert "/api/v1/alerts" in spec["paths"]
            r = await c.put(f"/api/v1/devices/{dev}/group", json={"group": "cellar"},
                            headers=headers)
            assert r.status == 200 and await r.json() == {"device": dev, "group": "cellar"}
            r = await c.put(f"/api/v1/devices/{dev}/group", json={"group": "a b"},
                            headers=headers)
            assert r.status == 400 and (await r.json())["field"] == "group"
            row = (await (await c.get(f"/api/v1/devices/{dev}")).json())["summary"]
            assert row["group"] == "cellar" and row["alerts"] == 0

    asyncio.run(asyncio.wait_for(body(), 60))


@aio
async def test_an_open_alert_survives_a_restart_and_is_not_raised_again(
        broker: RunningBroker, tmp_path: Path) -> None:
    pki = provision(broker, tmp_path, "gh-1", "gh-2")
    cfg = config(broker, tmp_path)
    path = cfg.db_path
    async with Node(broker, pki, "gh-1") as n1:
        s = Sender(n1)
        async with running(cfg) as svc:
            await s.burst([36.0, 36.0, 36.0])
            await evaluated(svc)
            assert [a.open for a in history(path)] == [True]
        # A new process: the readings after the stored cursor are evaluated again, the
        # open alert is known, nothing is raised or queued twice.
        async with running(cfg) as svc:
            await s.burst([37.0, 37.0, 37.0, 37.0])
            await evaluated(svc)
            assert [a.open for a in history(path)] == [True]
            assert len(items(path, "gh-1")) == 1 and len(items(path, "gh-2")) == 1
            await s.burst([30.0])
            await evaluated(svc)
            assert [a.open for a in history(path)] == [False]


# ---------------------------------------------------------------- fleet conditions

@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, bytes]:
    """A real sim firmware image, signed (as tests.gateway.test_ota_campaign makes it)."""
    from tools.fw import image, keys

    root = tmp_path_factory.mktemp("img")
    kp = keys.keygen(root / "keys")
    img = root / "v2"
    image.build_image("sim", 2, img)
    image.sign_image(img, keys.load_private(kp.private))
    return img, kp.public, keys.load_public(kp.public)


def test_campaign_abort_is_told_once_and_credential_expiry_clears_on_renewal(
        tmp_path: Path, signed: tuple[Path, Path, bytes]) -> None:
    from gateway.pipeline.rules import Engine
    from gateway.store import ota_store as ota
    from tests.gateway.test_ota_campaign import T0 as OTA_T0
    from tests.gateway.test_ota_campaign import campaign, status

    conn = db.open_db(tmp_path / "gateway.db")
    for i in range(4):
        registry.add(conn, f"s{i}", "sensor", now=OTA_T0)
    days = {"server": 400.0, "crl": 20.0, "devices_expiring": 3}
    rs = parse_rules(tomllib.loads(textwrap.dedent("""
        [[rule]]
        name = "ota"
        condition = "campaign_aborted"
        [[rule]]
        name = "certs"
        condition = "credential_expiry"
        days = 14
    """)))
    eng = Engine(rs, credentials=lambda: days)
    now = OTA_T0 + 20
    assert eng.tick(conn, now, scan=True).raised == []
    cid = campaign(conn, signed, ["s0", "s1", "s2", "s3"], rate=3, abort_threshold=30)
    status(conn, "s1", 2, proto.OtaState.TRIAL, 60)
    status(conn, "s0", 2, proto.OtaState.REFUSED, reason=proto.OtaReason.DOWNGRADE)
    assert ota.get_campaign(conn, cid).status == ota.ABORTED
    [a] = eng.tick(conn, now, scan=True).raised
    assert (a.subject, a.device) == (f"campaign:{cid}", None)
    assert a.message.startswith(f"OTA campaign {cid} (version 2) aborted: ")
    assert eng.tick(conn, now, scan=True).raised == []
    with db.transaction(conn):
        assert alerts.operator_clear(conn, a.id, now=now) is not None
    assert eng.tick(conn, now + 1, scan=True).raised == []  # an abort is told once
    # The CRL has 13.5 days left: raised; renewed to 30: cleared.
    days["crl"] = 13.5
    [c] = eng.tick(conn, now, scan=True).raised
    assert (c.subject, c.value) == ("credential:crl", 13.5)
    assert eng.tick(conn, now, scan=True).raised == []
    days["crl"] = 30.0
    [done] = eng.tick(conn, now, scan=True).cleared
    assert done.subject == "credential:crl" and done.clear_message == "30 days left"
    conn.close()


def test_the_rules_file_is_backed_up_and_restored_beside_the_configuration(
        tmp_path: Path) -> None:
    from gateway import config as gwconfig
    from gateway.ops import backup
    from tests.fixtures.broker import make_pki

    site = tmp_path / "site"
    site.mkdir()
    make_pki(site / "pki")
    (site / "my-rules.toml").write_text(RULES)
    (site / "gateway.toml").write_text('[gateway]\ndata_dir = "data"\n\n[broker]\n'
                                       'pki_dir = "pki"\n\n[rules]\nfile = "my-rules.toml"\n')
    cfg = gwconfig.load_config(site / "gateway.toml")
    db.open_db(cfg.db_path).close()
    archive = backup.backup(cfg, tmp_path / "b.tar.gz").path
    restored = backup.restore(archive, tmp_path / "restored")
    new = gwconfig.load_config(restored.config)
    assert new.rules_path == tmp_path / "restored" / "rules.toml"
    assert new.rules_path.read_text() == RULES
    assert len(load_rules(new.rules_path).rules) == 5


# ---------------------------------------------------------------- groups and the CLI

def _torpor(*args: str) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


def test_a_group_holds_its_globs_and_the_devices_given_its_name(tmp_path: Path) -> None:
    from gateway.pipeline.rules import Engine

    cfg_path = tmp_path / "gateway.toml"
    cfg_path.write_text('[gateway]\ndata_dir = "data"\n')
    (tmp_path / "rules.toml").write_text(textwrap.dedent("""
        [groups]
        greenhouse = ["gh-*"]
        cellar = []

        [[rule]]
        name = "cellar-damp"
        condition = "threshold"
        group = "cellar"
        measurement = "humidity"
        above = 80
        action = { config = { sample_interval_s = 120 }, target = "group" }
    """))
    conn = db.open_db(tmp_path / "data" / "gateway.db")
    for d in ("gh-1", "c-1", "c-2", "other"):
        registry.add(conn, d)
    conn.close()
    cfg = ["--config", str(cfg_path)]
    assert _torpor("device", "group", "c-1", "cellar", *cfg).stdout == "c-1: cellar\n"
    bad = _torpor("device", "group", "c-2", "no good", *cfg)
    assert bad.returncode == 2 and "invalid group name 'no good'" in bad.stderr
    check = _torpor("gateway", "rules", "check", *cfg)
    assert check.returncode == 0 and "1 rules valid; groups: greenhouse, cellar" in check.stdout
    conn = db.open_db(tmp_path / "data" / "gateway.db")
    from gateway.ops.groups import set_group

    set_group(conn, "c-2", "cellar")  # what the API's PUT .../group does
    rs = load_rules(tmp_path / "rules.toml")
    eng = Engine(rs)
    eng.tick(conn, T0, scan=True)  # the cursor starts here
    humid = proto.Series((T0,), ((2000,), (9000,), (3300,)))  # 90 %RH
    readings.commit_bursts(conn, [(d, proto.Burst(1, proto.SCHEMA_ENV3, 0, humid))
                                  for d in ("c-1", "gh-1", "other")], now=T0)
    res = eng.tick(conn, T0 + 1, scan=False)
    assert [a.device for a in res.raised] == ["c-1"] and res.commands == 2
    assert [i.what for i in q.pending(conn, "c-2")] == [i.what for i in q.pending(conn, "c-1")]
    assert q.pending(conn, "other") == [] and q.pending(conn, "gh-1") == []
    conn.close()
    out = _torpor("gateway", "alerts", *cfg)
    assert out.returncode == 0 and "cellar-damp c-1: humidity 90 above 80" in out.stdout
