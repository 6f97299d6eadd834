"""The web page's JSON API and pages through aiohttp's test client, on a real SQLite file
filled through the gateway's own modules."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.config import WebConfig
from gateway.store import db, readings
from gateway.store import devices as registry
from gateway.store import downlink_queue as q
from gateway.web.app import make_app
from gateway.web.auth import hash_password
from tests.gateway.web.fleetdb import burst, fill

TOKEN = "t0ken-for-the-tests-0123456789"


@pytest.fixture
def dbpath(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.db"
    fill(path, devices=30)
    return path


@contextlib.asynccontextmanager
async def web_client(path: Path, cfg: WebConfig | None = None) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    conn = db.connect(path)
    c = TestClient(TestServer(make_app(cfg or WebConfig(enabled=True, page_size=10), conn)))
    await c.start_server()
    try:
        yield c
    finally:
        await c.close()
        conn.close()


def with_client(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test body with a client on `dbpath`, in its own loop, bounded in time."""

    def run(dbpath: Path, **kwargs: Any) -> None:
        async def body() -> None:
            async with web_client(dbpath) as c:
                await fn(c, dbpath=dbpath, **kwargs)

        asyncio.run(asyncio.wait_for(body(), 60))

    sig = inspect.signature(fn)
    run.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])  # type: ignore[attr-defined]
    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def _origin(c: TestClient) -> dict[str, str]:  # type: ignore[type-arg]
    return {"Origin": str(c.make_url("/")).rstrip("/")}


async def _csrf(c: TestClient) -> str:  # type: ignore[type-arg]
    r = await c.get("/")
    text = await r.text()
    return text.split('name="csrf-token" content="')[1].split('"')[0]


@with_client
async def test_devices_list_filters_and_pages(client: TestClient, dbpath: Path) -> None:  # type: ignore[type-arg]
    r = await client.get("/api/v1/devices")
    assert r.status == 200
    doc = await r.json()
    assert doc["total"] == 30 and len(doc["devices"]) == 10
    assert doc["counts"] == {"active": 28, "quarantined": 1, "provisioned": 1}
    first = doc["devices"][0]
    assert first["id"] == "node-000" and first["queued"] == 1 and first["fw_version"] == 7
    assert first["next_listen_at"] is not None and len(first["battery"]) > 0
    r = await client.get("/api/v1/devices", params={"offset": 25})
    assert [d["id"] for d in (await r.json())["devices"]] == [f"node-{i:03d}" for i in range(25, 30)]
    r = await client.get("/api/v1/devices", params={"status": "quarantined"})
    assert [d["id"] for d in (await r.json())["devices"]] == ["node-001"]
    r = await client.get("/api/v1/devices", params={"q": "de-01"})
    assert (await r.json())["total"] == 10  # node-010..node-019


@pytest.mark.parametrize(("query", "field"), [
    ({"status": "sleepy"}, "status"), ({"offset": "x"}, "offset"), ({"limit": "0"}, "limit"),
    ({"limit": "100000"}, "limit"),
])
@with_client
async def test_bad_list_queries_name_the_field(client: TestClient, dbpath: Path,  # type: ignore[type-arg]
                                               query: dict[str, str], field: str) -> None:
    r = await client.get("/api/v1/devices", params=query)
    assert r.status == 400
    doc = await r.json()
    assert doc["field"] == field and field in doc["error"]
    assert "Traceback" not in await r.text()


@with_client
async def test_device_show_and_readings_range(client: TestClient, dbpath: Path) -> None:  # type: ignore[type-arg]
    r = await client.get("/api/v1/devices/node-000")
    doc = await r.json()
    assert doc["device"]["status"] == "active" and doc["readings_stored"] == 120
    assert [i["what"] for i in doc["pending"]] == ["ping"]
    now = time.time()
    r = await client.get("/api/v1/devices/node-000/readings",
                         params={"since": str(now - 1800), "until": str(now)})
    doc = await r.json()
    names = {s["name"]: s for s in doc["series"]}
    assert set(names) == {"temperature", "humidity", "battery"}
    assert 28 <= doc["count"] <= 31  # one reading a minute, the last half hour
    temps = [p[1] for p in names["temperature"]["points"]]
    assert all(20.0 <= t <= 25.0 for t in temps) and names["temperature"]["unit"] == "degC"
    r = await client.get("/api/v1/devices/node-000/readings",
                         params={"since": str(now - 7300), "until": str(now), "points": "20"})
    doc = await r.json()
    assert doc["count"] == 120 and len(doc["series"][0]["points"]) == 20
    r = await client.get("/api/v1/devices/nobody")
    assert r.status == 404 and (await r.json())["field"] == "device"
    # Its wakes (one logged HELLO) and its battery forecast.
    doc = await (await client.get("/api/v1/devices/node-000/wakes")).json()
    assert doc["energy_reported"] is False
    assert [(w["boot_cause"], w["battery_mv"], w["rssi"]) for w in doc["wakes"]] == [
        ("timer", 3300, -61)]
    doc = await (await client.get("/api/v1/devices", params={"q": "node-000"})).json()
    assert doc["devices"][0]["days_left_trend"] == "falling"
    assert 0.5 < doc["devices"][0]["days_left"] < 5
    r = await client.get("/api/v1/devices/node-000/readings", params={"since": "yesterday"})
    assert r.status == 400 and (await r.json())["field"] == "since"


@with_client
async def test_queue_and_cancel_through_the_api(client: TestClient, dbpath: Path) -> None:  # type: ignore[type-arg]
    token = await _csrf(client)
    headers = {**_origin(client), "X-CSRF-Token": token}
    r = await client.post("/api/v1/devices/node-003/commands", headers=headers,
                          json={"op": "set_interval", "args": [600]})
    assert r.status == 201, await r.text()
    cid = (await r.json())["command_id"]
    conn = db.connect(dbpath)
    assert [i.what for i in q.pending(conn, "node-003")] == ["set_interval 600"]
    # The queue's own checks, with the field named.
    for body, field in (({"op": "fly"}, "op"), ({"op": "set_interval", "args": []}, "args"),
                        ({"op": "ping", "args": "x"}, "args"), ({"op": "ping", "colour": 1}, "colour"),
                        ({"op": "ping", "priority": 999}, "priority")):
        r = await client.post("/api/v1/devices/node-003/commands", headers=headers, json=body)
        assert r.status == 400, (body, await r.text())
        assert (await r.json())["field"] == field, body
    r = await client.post("/api/v1/devices/node-003/commands", headers=headers, data=b"{nope")
    assert r.status == 400 and (await r.json())["field"] == "body"
    r = await client.delete(f"/api/v1/devices/node-003/commands/{cid}", headers=headers)
    assert r.status == 200 and (await r.json())["status"] == "cancelled"
    r = await client.delete(f"/api/v1/devices/node-003/commands/{cid}", headers=headers)
    assert r.status == 409
    assert q.pending(conn, "node-003") == []
    conn.close()


@with_client
async def test_release_a_quarantined_device(client: TestClient, dbpath: Path) -> None:  # type: ignore[type-arg]
    headers = {**_origin(client), "X-CSRF-Token": await _csrf(client)}
    r = await client.post("/api/v1/devices/node-001/release", headers=headers)
    assert r.status == 200 and (await r.json())["status"] == "active"
    r = await client.post("/api/v1/devices/node-001/release", headers=headers)
    assert r.status == 400 and "not quarantined" in (await r.json())["error"]
    conn = db.connect(dbpath)
    assert registry.get(conn, "node-001").status == "active"
    conn.close()


@with_client
async def test_csrf_and_origin_are_checked(client: TestClient, dbpath: Path) -> None:  # type: ignore[type-arg]
    token = await _csrf(client)
    url = "/api/v1/devices/node-004/commands"
    r = await client.post(url, json={"op": "ping"}, headers=_origin(client))
    assert r.status == 403 and (await r.json())["field"] == "csrf"
    r = await client.post(url, json={"op": "ping"},
                          headers={"Origin": "http://evil.example", "X-CSRF-Token": token})
    assert r.status == 403 and (await r.json())["field"] == "Origin"
    r = await client.post(url, json={"op": "ping"}, headers={"X-CSRF-Token": token})
    assert r.status == 403  # no Origin, no Referer
    # A page form: the token travels in the form.
    r = await client.post("/devices/node-004/commands", headers=_origin(client),
                          data={"csrf": token, "op": "ping", "args": "", "priority": "4",
                                "ttl_s": "3600"}, allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/devices/node-004"
    text = await (await client.get("/devices/node-004")).text()
    assert "queued ping as item" in text  # said once...
    assert "queued ping as item" not in await (await client.get("/devices/node-004")).text()
    # ...and never taken from the URL.
    assert "evil" not in await (await client.get("/devices/node-004?msg=evil")).text()
    conn = db.connect(dbpath)
    assert [i.what for i in q.pending(conn, "node-004")] == ["ping"]
    conn.close()


@with_client
async def test_dead_letters_health_and_openapi(client: TestClient, dbpath: Path) -> None:  # type: ignore[type-arg]
    doc = await (await client.get("/api/v1/deadletters")).json()
    assert doc["total"] == 1 and doc["letters"][0]["device"] == "node-001"
    doc = await (await client.get("/api/v1/health")).json()
    assert doc["gateway"]["devices"]["active"] == 28 and doc["outbox"]["depth"] == 0
    r = await client.get("/api/v1/nothing-here")
    assert r.status == 404 and "error" in await r.json()
    r = await client.put("/api/v1/devices", headers=_origin(client))
    assert r.status in (403, 405) and "error" in await r.json()
    doc = await (await client.get("/api/v1/openapi.json")).json()
    assert doc["openapi"].startswith("3.") and "/api/v1/devices/{device}/readings" in doc["paths"]


@with_client
async def test_pages_render(client: TestClient, dbpath: Path) -> None:  # type: ignore[type-arg]
    r = await client.get("/")
    csp = r.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'sha256-" in csp
    text = await r.text()
    assert 'id="fleet"' in text and "node-000" in text and "<svg" in text
    assert "http://" not in text.replace("http://www.w3.org", "")  # nothing fetched from elsewhere
    # The battery forecast: 12 mV down over its two hours of readings, a couple of days.
    row = text.split('data-device="node-000"')[1].split("</tr>")[0]
    days = float(row.split('class="days-left late" data-days="')[1].split('"')[0])
    assert 0.5 < days < 5, row
    text = await (await client.get("/devices/node-000?range=6h")).text()
    assert 'class="chart"' in text and 'class="line"' in text and "ping" in text
    # The wake charts and history, from its one logged HELLO; energy said to be unreported.
    for series in ("battery at wake", "rssi", "awake seen by gateway"):
        assert f'data-kind="wake" data-series="{series}" data-points="1"' in text, series
    assert 'id="wakes"' in text and "-61 dBm" in text and "not reported" in text
    assert "No key rotation pending." in text
    text = await (await client.get("/devices/node-001")).text()
    assert "Release from quarantine" in text
    r = await client.get("/devices/node-000?range=1y")
    assert r.status == 400 and "range" in await r.text()
    for path in ("/deadletters", "/health"):
        assert (await client.get(path)).status == 200
    rows = await (await client.get("/?rows=1&status=quarantined")).text()
    assert "node-001" in rows and "<html" not in rows


@with_client
async def test_a_node_clock_ahead_keeps_its_newest_readings_on_the_chart(
        client: TestClient, dbpath: Path) -> None:  # type: ignore[type-arg]
    """A node whose clock runs ahead of the gateway's stamps its newest readings after the
    gateway's now: the device page's chart still ends at them, and says so."""
    conn = db.open_db(dbpath)
    first = readings.stats(conn, "node-003")[0] + 1
    now = int(time.time())
    readings.commit_bursts(conn, [("node-003", burst(first, now + 30, 3, 3300))], now=now)
    conn.close()
    text = await (await client.get("/devices/node-003")).text()
    temperature = text.split('data-series="temperature"')[1].split("</svg>")[0]
    line = temperature.split('class="line" d="')[1].split('"')[0]
    assert line.count(" L") + 1 == 120 + 3, line  # the day's readings and the three ahead
    assert "ahead of the gateway's clock" in text


@with_client
async def test_events_stream_says_the_fleet_changed(client: TestClient, dbpath: Path) -> None:  # type: ignore[type-arg]
    r = await client.get("/api/v1/events")
    assert r.headers["Content-Type"].startswith("text/event-stream")
    line = await r.content.readline()
    assert line == b"event: fleet\n"
    r.close()


def test_login_required_off_loopback(dbpath: Path) -> None:
    asyncio.run(asyncio.wait_for(_login_required(dbpath), 60))


async def _login_required(dbpath: Path) -> None:
    cfg = WebConfig(enabled=True, host="0.0.0.0", token=TOKEN,
                    password_hash=hash_password("correct horse", n=2**10))
    async with web_client(dbpath, cfg) as c:
        r = await c.get("/api/v1/devices")
        assert r.status == 401 and (await r.json())["field"] == "Authorization"
        r = await c.get("/", allow_redirects=False)
        assert r.status == 303 and r.headers["Location"].startswith("/login")
        r = await c.get("/api/v1/devices", headers={"Authorization": "Bearer wrong"})
        assert r.status == 401
        r = await c.get("/api/v1/devices", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status == 200
        # A bearer token needs no CSRF token: it is not sent by a browser on its own.
        r = await c.post("/api/v1/devices/node-005/commands", json={"op": "ping"},
                         headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status == 201
        # The login form, then the session's pages.
        text = await (await c.get("/login")).text()
        csrf = text.split('name="csrf" value="')[1].split('"')[0]
        r = await c.post("/login", data={"csrf": csrf, "secret": "wrong"}, headers=_origin(c))
        assert "wrong password or token" in await r.text()
        r = await c.post("/login", data={"csrf": csrf, "secret": "correct horse"},
                         headers=_origin(c), allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/"
        r = await c.get("/api/v1/devices")
        assert r.status == 200
        # Guessing is cut short: after 10 failures (counted since the last good login) an
        # address is refused for a while, even with the right token.
        for _ in range(10):
            r = await c.get("/api/v1/devices", headers={"Authorization": "Bearer guess"})
            assert r.status == 401
        r = await c.get("/api/v1/devices", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status == 429 and "too many" in (await r.json())["error"]


@with_client
async def test_set_configuration(client: TestClient, dbpath: Path) -> None:  # type: ignore[type-arg]
    headers = {**_origin(client), "X-CSRF-Token": await _csrf(client)}
    url = "/api/v1/devices/node-006/config"
    r = await client.post(url, headers=headers, json={"values": {"sample_interval_s": 120}})
    assert r.status == 201, await r.text()
    assert (await r.json())["config_version"] == 1
    conn = db.connect(dbpath)
    state = q.config_state(conn, "node-006")
    assert [(c.key, c.value, c.applied) for c in state] == [("sample_interval_s", 120, False)]
    assert [i.what for i in q.pending(conn, "node-006")] == ["config v1"]
    conn.close()
    for body, field in (({"values": {"colour": 1}}, "values.colour"),
                        ({"values": {"send_every": "x"}}, "values.send_every"),
                        ({"values": {}}, "values"), ({"values": 3}, "values"),
                        ({"values": {"send_every": 1}, "when": 1}, "when")):
        r = await client.post(url, headers=headers, json=body)
        assert r.status == 400, (body, await r.text())
        assert (await r.json())["field"] == field, body
    # The page's form.
    r = await client.post("/devices/node-006/config", headers=_origin(client),
                          data={"csrf": headers["X-CSRF-Token"], "key": "send_every",
                                "value": "5"}, allow_redirects=False)
    assert r.status == 303
    text = await (await client.get("/devices/node-006")).text()
    assert "configuration v2 queued: send_every = 5" in text
    assert "send_every" in text and "pending" in text
    # Desired against reported, through the API.
    doc = await (await client.get(url)).json()
    assert doc["desired"] == {"sample_interval_s": 120, "send_every": 5}
    assert doc["reported"] == {} and doc["reported_version"] == 0
    assert sorted(doc["pending"]) == ["sample_interval_s", "send_every"]
    assert (await client.get("/api/v1/devices/nobody/config")).status == 404


def test_a_flood_of_anonymous_sessions_does_not_log_the_operator_out() -> None:
    from gateway.web import auth

    sessions = auth.Sessions(3600)
    operator = sessions.new(logged_in=True)
    for _ in range(auth.MAX_SESSIONS * 2):
        sessions.new(logged_in=False)
    assert sessions.get(operator.id) is operator


def test_energy_per_wake_in_the_api_page_and_fleet_with_a_board_model(dbpath: Path) -> None:
    """With [energy] board set: each wake's reported facts and its µAh estimate in
    /wakes, said to be a model; the device page's energy chart; the fleet's days left by
    the energy ledger, and by the voltage trend for a device whose wakes report nothing."""
    from gateway import proto
    from gateway.config import EnergyConfig, EnergyModel, GatewayConfig, board_models
    from gateway.store import wake_log

    models = board_models(GatewayConfig(energy=EnergyConfig(board="esp32")))
    model = models.energy(None)  # no device has a board: the default's model for all
    assert isinstance(model, EnergyModel) and model.cpu_active_ma == 45.0
    now = time.time()
    conn = db.connect(dbpath)
    for i in range(8):  # node-000 runs firmware of protocol 1.5: 8 HELLOs with facts
        h = proto.Hello(1, 4, proto.BootCause.TIMER, 2900 - i, -60, 40_000, 0, 0, 60, 800,
                        int(now), proto.DeviceClass.SENSOR, prev_awake_ms=4000 + 10 * i,
                        prev_radio_ms=3000, prev_sent=True)
        with db.transaction(conn):
            wake_log.record(conn, [("node-000", h)], ["node-000"], [], now - 600 + 60 * i)
    conn.close()

    async def body() -> None:
        conn = db.connect(dbpath)
        c = TestClient(TestServer(make_app(WebConfig(enabled=True, page_size=10), conn,
                                           energy=models)))
        await c.start_server()
        try:
            doc = await (await c.get("/api/v1/devices/node-000/wakes")).json()
            assert doc["energy_reported"] is True
            assert doc["energy_model"]["board"] == "esp32"
            assert doc["energy_model"]["kind"] == "model estimate"
            facts = [w for w in doc["wakes"] if w["prev_awake_ms"] is not None]
            assert len(facts) == 8
            for w in facts:
                want = ((650 + w["prev_awake_ms"]) * 45 + w["prev_radio_ms"] * 100) / 3600
                assert w["energy_uah"] == pytest.approx(want, abs=0.001) and w["prev_sent"] == 1
            assert all(w["energy_uah"] is None for w in doc["wakes"] if w["prev_awake_ms"] is None)
            spec = await (await c.get("/api/v1/openapi.json")).json()
            props = spec["components"]["schemas"]["Wakes"]["properties"]["wakes"]["items"]
            assert "energy_uah" in props["properties"]
            # The fleet: node-000 by the ledger, node-003 (no facts) by its voltage trend.
            doc = await (await c.get("/api/v1/devices", params={"limit": "30"})).json()
            rows = {d["id"]: d for d in doc["devices"]}
            assert rows["node-000"]["days_left_source"] == "ledger", rows["node-000"]
            assert rows["node-000"]["days_left"] > 0
            assert rows["node-003"]["days_left_source"] == "trend", rows["node-003"]
            # The device page: the energy chart with its points, and the model said so.
            text = await (await c.get("/devices/node-000?range=1h")).text()
            assert ('data-kind="wake" data-series="energy per wake (model estimate)" '
                    'data-points="8"') in text
            assert "model estimate, not a measurement" in text and "esp32" in text
            assert "Energy ledger" in text and "µAh est." in text
            fleet = await (await c.get("/")).text()
            assert 'data-source="ledger"' in fleet
        finally:
            await c.close()
            conn.close()

    asyncio.run(asyncio.wait_for(body(), 60))


def _profile(board: str) -> dict[str, Any]:
    """A board's figures, read from the profiles file itself."""
    import tomllib

    from gateway.config import PROFILES_PATH

    with open(PROFILES_PATH, "rb") as f:
        prof: dict[str, Any] = tomllib.load(f)[board]
    return prof


def test_each_device_is_estimated_by_its_own_boards_model(dbpath: Path) -> None:
    """Two devices on two boards report the same facts of their wakes: each wake's µAh,
    the ledger's days left and the device page follow the device's own board (an esp32
    and an esp32c3 draw different currents); a device with no board, on a gateway with no
    [energy] board, gets no estimate and keeps the voltage trend."""
    from gateway import proto
    from gateway.config import GatewayConfig, board_models
    from gateway.store import wake_log

    models = board_models(GatewayConfig())  # no [energy] board: no default
    assert models.energy(None) is None
    now = time.time()
    conn = db.connect(dbpath)
    registry.set_board(conn, "node-000", "esp32")
    registry.set_board(conn, "node-003", "esp32c3")
    for device in ("node-000", "node-003", "node-004"):
        for i in range(8):  # the same facts for every device: 4 s awake, 3 s of radio
            h = proto.Hello(1, 4, proto.BootCause.TIMER, 2900, -60, 40_000, 0, 0, 60, 800,
                            int(now), proto.DeviceClass.SENSOR, prev_awake_ms=4000,
                            prev_radio_ms=3000, prev_sent=True)
            with db.transaction(conn):
                wake_log.record(conn, [(device, h)], [device], [], now - 600 + 60 * i)
    conn.close()

    def want(board: str) -> float:
        p = _profile(board)
        return ((p["boot_ms"] + 4000) * p["cpu_active_ma"] + 3000 * p["radio_listen_ma"]) / 3600

    async def body() -> None:
        conn = db.connect(dbpath)
        c = TestClient(TestServer(make_app(WebConfig(enabled=True, page_size=10), conn,
                                           energy=models)))
        await c.start_server()
        try:
            uah: dict[str, float] = {}
            for device, board in (("node-000", "esp32"), ("node-003", "esp32c3")):
                doc = await (await c.get(f"/api/v1/devices/{device}/wakes")).json()
                assert doc["energy_model"]["board"] == board
                facts = [w for w in doc["wakes"] if w["prev_awake_ms"] is not None]
                assert len(facts) == 8
                for w in facts:
                    assert w["energy_uah"] == pytest.approx(want(board), abs=0.001)
                uah[board] = facts[0]["energy_uah"]
            assert uah["esp32"] == pytest.approx(141.458, abs=0.001)  # (650+4000)×45+3000×100
            assert uah["esp32c3"] == pytest.approx(100.903, abs=0.001)  # (450+4000)×25+3000×84
            doc = await (await c.get("/api/v1/devices/node-004/wakes")).json()
            assert doc["energy_model"] is None
            assert all(w["energy_uah"] is None for w in doc["wakes"])
            # The fleet: the board of each device, days left by its own board's ledger.
            doc = await (await c.get("/api/v1/devices", params={"limit": "30"})).json()
            rows = {d["id"]: d for d in doc["devices"]}
            assert (rows["node-000"]["board"], rows["node-003"]["board"],
                    rows["node-004"]["board"]) == ("esp32", "esp32c3", None)
            assert rows["node-000"]["days_left_source"] == "ledger"
            assert rows["node-003"]["days_left_source"] == "ledger"
            assert rows["node-004"]["days_left_source"] == "trend"
            assert rows["node-000"]["days_left"] < rows["node-003"]["days_left"]
            one = await (await c.get("/api/v1/devices/node-003")).json()
            assert one["device"]["board"] == "esp32c3" and one["summary"]["board"] == "esp32c3"
            spec = await (await c.get("/api/v1/openapi.json")).json()
            row = spec["components"]["schemas"]["DeviceRow"]["properties"]
            assert row["board"]["nullable"] is True
            # The device page: its board among the facts, and its board's currents said.
            text = await (await c.get("/devices/node-003?range=1h")).text()
            assert "<dt>Board</dt><dd>esp32c3</dd>" in text
            assert "the esp32c3 board profile" in text and "CPU 25 mA" in text
            text = await (await c.get("/devices/node-004?range=1h")).text()
            assert "<dt>Board</dt><dd>–</dd>" in text and "no board in the registry" in text
        finally:
            await c.close()
            conn.close()

    asyncio.run(asyncio.wait_for(body(), 60))
