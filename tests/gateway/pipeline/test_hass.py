"""Home Assistant MQTT discovery against a real Mosquitto standing in for Home Assistant's
broker: the gateway service ingests real frames from a node (its own TLS broker, device
certificates) and relays upstream; mosquitto_sub, which shares no code with Torpor, reads
what Home Assistant would, and every discovery payload is checked against Home
Assistant's documented MQTT discovery schema (sensor and binary_sensor configuration
variables, their abbreviations, the device block)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway import proto
from gateway.config import parse_config
from gateway.store import db
from gateway.store import devices as registry
from tests.fixtures.broker import RunningBroker
from tests.gateway.pipeline.test_ingest import Node, aio, provision, running
from tests.gateway.pipeline.test_rules import Sender, until

# ---------------------------------------------------------------- Home Assistant's schema
# From Home Assistant's MQTT documentation: the discovery topic, the abbreviations it
# accepts, the configuration variables of MQTT sensors and binary sensors, the device
# block, and the units each sensor device class takes.

TOPIC = re.compile(r"(?P<prefix>.+)/(?P<component>sensor|binary_sensor)/"
                   r"(?:(?P<node>[A-Za-z0-9_-]+)/)?(?P<object>[A-Za-z0-9_-]+)/config")
ABBREVIATIONS = {
    "stat_t": "state_topic", "uniq_id": "unique_id", "dev": "device", "o": "origin",
    "val_tpl": "value_template", "dev_cla": "device_class", "unit_of_meas":
    "unit_of_measurement", "stat_cla": "state_class", "exp_aft": "expire_after",
    "avty_t": "availability_topic", "pl_avail": "payload_available",
    "pl_not_avail": "payload_not_available", "ent_cat": "entity_category", "ic": "icon",
    "pl_on": "payload_on", "pl_off": "payload_off", "frc_upd": "force_update",
    "sug_dsp_prc": "suggested_display_precision", "json_attr_t": "json_attributes_topic",
}
DEVICE_ABBREVIATIONS = {
    "ids": "identifiers", "cns": "connections", "mf": "manufacturer", "mdl": "model",
    "mdl_id": "model_id", "sw": "sw_version", "hw": "hw_version", "sa": "suggested_area",
    "cu": "configuration_url", "sn": "serial_number",
}
COMMON = {"state_topic", "name", "unique_id", "device", "origin", "value_template",
          "availability_topic", "payload_available", "payload_not_available",
          "entity_category", "icon", "expire_after", "force_update", "qos", "object_id",
          "default_entity_id", "json_attributes_topic", "enabled_by_default", "encoding",
          "availability_mode", "availability_template", "platform", "entity_picture"}
ALLOWED = {
    "sensor": COMMON | {"device_class", "unit_of_measurement", "state_class",
                        "suggested_display_precision", "last_reset_value_template", "options"},
    "binary_sensor": COMMON | {"device_class", "payload_on", "payload_off", "off_delay"},
}
DEVICE_KEYS = {"identifiers", "connections", "manufacturer", "model", "model_id", "name",
               "sw_version", "hw_version", "suggested_area", "configuration_url",
               "serial_number", "via_device"}
SENSOR_UNITS = {  # sensor device class -> units Home Assistant accepts for it
    "temperature": {"°C", "°F", "K"}, "humidity": {"%"}, "voltage": {"V", "mV", "µV", "kV", "MV"},
    "signal_strength": {"dB", "dBm"}, "timestamp": {None}, "battery": {"%"},
    "pressure": {"Pa", "hPa", "kPa", "bar", "mbar", "psi", "inHg", "mmHg"}, "illuminance": {"lx"},
}
BINARY_CLASSES = {"problem", "connectivity", "battery", "safety"}
STATE_CLASSES = {"measurement", "total", "total_increasing"}


def expand(doc: dict[str, Any], table: dict[str, str]) -> dict[str, Any]:
    return {table.get(k, k): v for k, v in doc.items()}


def check_discovery(topic: str, payload: str, prefix: str = "homeassistant") -> dict[str, Any]:
    """The config as Home Assistant reads it (abbreviations expanded); fails the test on
    anything Home Assistant's schema refuses."""
    m = TOPIC.fullmatch(topic)
    assert m and m["prefix"] == prefix, f"{topic}: not <prefix>/<component>/[<node_id>/]<object_id>/config"
    component = m["component"]
    doc = expand(json.loads(payload), ABBREVIATIONS)
    assert "state_topic" in doc, f"{topic}: state_topic is required"
    unknown = set(doc) - ALLOWED[component]
    assert not unknown, f"{topic}: keys Home Assistant does not know: {unknown}"
    assert isinstance(doc.get("unique_id"), str) and doc["unique_id"]
    for key in ("state_topic", "availability_topic"):
        if key in doc:
            assert isinstance(doc[key], str) and doc[key] and not set("+#") & set(doc[key])
    dev = expand(doc["device"], DEVICE_ABBREVIATIONS)
    assert not set(dev) - DEVICE_KEYS, f"{topic}: device keys {set(dev) - DEVICE_KEYS}"
    assert isinstance(dev.get("identifiers"), list) and dev["identifiers"], \
        "a device block needs identifiers (or connections)"
    for key in ("name", "manufacturer", "model", "sw_version", "via_device"):
        assert key not in dev or isinstance(dev[key], str)
    if "origin" in doc:
        assert isinstance(doc["origin"].get("name"), str)
    if "expire_after" in doc:
        assert isinstance(doc["expire_after"], int) and doc["expire_after"] > 0
    if "entity_category" in doc:
        assert doc["entity_category"] in ("diagnostic", "config")
    if component == "sensor":
        cls = doc.get("device_class")
        if cls is not None:
            assert cls in SENSOR_UNITS, f"{topic}: device_class {cls}"
            assert doc.get("unit_of_measurement") in SENSOR_UNITS[cls], \
                f"{topic}: unit {doc.get('unit_of_measurement')} for {cls}"
        if cls == "timestamp":
            assert "state_class" not in doc, "a timestamp sensor has no state_class"
        if "state_class" in doc:
            assert doc["state_class"] in STATE_CLASSES
    else:
        assert doc.get("device_class") in BINARY_CLASSES | {None}
    return doc


def template_key(doc: dict[str, Any]) -> str:
    m = re.fullmatch(r"\{\{ value_json\.(\w+) \}\}", doc["value_template"])
    assert m, doc["value_template"]
    return m[1]


# ---------------------------------------------------------------- the stack

def config(broker: RunningBroker, up: RunningBroker, tmp: Path, rules: str = "") -> Any:
    assert broker.pki is not None
    (tmp / "rules.toml").write_text(rules)
    return parse_config({
        "gateway": {"data_dir": str(tmp / "data"), "status_interval_s": 0.2},
        "broker": {"mode": "external", "host": broker.host, "port": broker.port,
                   "pki_dir": str(broker.pki.path)},
        "ingest": {"batch_max_ms": 2},
        "downlink": {"grace_s": 0.3},
        "upstream": {"enabled": True, "host": up.host, "port": up.port, "tls": False,
                     "reconnect_min_s": 0.1, "reconnect_max_s": 0.3},
        "hass": {"interval_s": 0.05, "scan_interval_s": 0.1},
        "rules": {"file": str(tmp / "rules.toml"), "interval_s": 0.05, "scan_interval_s": 0.1},
    }, source=str(tmp / "gateway.toml"))


@pytest.fixture
def upstream(broker_factory: Callable[..., RunningBroker]) -> RunningBroker:
    return broker_factory(tls=False)


def _exe() -> str:
    exe = shutil.which("mosquitto_sub")
    if exe is None:
        pytest.skip("mosquitto_sub is not installed")
    return exe


class Sub:
    """mosquitto_sub on the upstream broker, live: every message as (topic, retained, payload)."""

    def __init__(self, up: RunningBroker, *topics: str) -> None:
        args = [_exe(), "-h", up.host, "-p", str(up.port), "-q", "1", "-F", "%t\t%r\t%p",
                "-W", "60"]
        for t in topics:
            args += ["-t", t]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        self.lines: list[tuple[str, bool, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        time.sleep(0.3)  # subscribed

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            topic, retained, payload = (line.rstrip("\n").split("\t", 2) + ["", ""])[:3]
            self.lines.append((topic, retained == "1", payload))

    def latest(self) -> dict[str, str]:
        return {t: p for t, _r, p in list(self.lines)}

    def stop(self) -> list[tuple[str, bool, str]]:
        self.proc.terminate()
        self.proc.wait(10)
        self._reader.join(10)
        return self.lines


def retained(up: RunningBroker, topic: str) -> dict[str, str]:
    """What a subscriber arriving now gets: the retained messages under `topic`."""
    proc = subprocess.run([_exe(), "-h", up.host, "-p", str(up.port), "-t", topic,
                           "-F", "%t\t%p", "--retained-only", "-W", "1"],
                          capture_output=True, text=True, timeout=10)
    return dict((line.split("\t", 1) + [""])[:2] for line in proc.stdout.splitlines() if line)


async def settled(sub: Sub, ok: Callable[[dict[str, str]], bool]) -> dict[str, str]:
    """Wait until the newest payload per topic seen by `sub` satisfies `ok`."""
    await until(lambda: ok(sub.latest()), timeout=15)
    return sub.latest()


@aio
async def test_discovery_states_and_removal_follow_the_node(
        broker: RunningBroker, upstream: RunningBroker, tmp_path: Path) -> None:
    pki = provision(broker, tmp_path, "n1")
    cfg = config(broker, upstream, tmp_path, rules='[[rule]]\nname = "q"\ncondition = "quarantined"\n')
    # Home Assistant's broker is away while the node first wakes: everything waits in the
    # outbox and arrives, in order, once it is back.
    upstream.stop()
    async with running(cfg), Node(broker, pki, "n1") as node:
        s = Sender(node)
        await s.hello(next_wake_s=900)
        await s.burst([21.5, 22.25], mv=[3400, 3390])
        await asyncio.sleep(0.5)
        upstream.start()
        live = Sub(upstream, "homeassistant/#", "torpor/+/hass/#")
        await settled(live, lambda r: sum("torpor_n1" in t for t in r) >= 7)
        configs = retained(upstream, "homeassistant/#")  # what Home Assistant reads at start
        # Every entity of the node, each valid by Home Assistant's schema.
        docs = {t: check_discovery(t, p) for t, p in configs.items() if "torpor_n1/" in t}
        by_object = {t.split("/")[-2]: d for t, d in docs.items()}
        assert set(by_object) == {"temperature", "humidity", "battery", "rssi", "last_seen",
                                  "next_wake", "problem"}
        assert len({d["unique_id"] for d in docs.values()}) == 7
        assert by_object["temperature"]["unique_id"] == "torpor_n1_temperature"
        assert (by_object["temperature"]["device_class"],
                by_object["temperature"]["unit_of_measurement"]) == ("temperature", "°C")
        assert by_object["last_seen"]["device_class"] == "timestamp"
        assert by_object["next_wake"]["device_class"] == "timestamp"
        assert by_object["problem"]["device_class"] == "problem"
        dev = by_object["humidity"]["device"]
        assert dev["identifiers"] == ["torpor_n1"] and dev["sw_version"] == "3"
        assert dev["via_device"] == "torpor_gateway_torpor-gateway"
        assert dev["model"] == "Torpor sensor node"
        # The gateway the nodes come through is a device too (via_device names it).
        gw = [check_discovery(t, p) for t, p in configs.items() if "torpor_gateway_" in t]
        assert gw and gw[0]["device"]["identifiers"] == ["torpor_gateway_torpor-gateway"]
        # expire_after from the node's own schedule: a 900 s sleep never expires, one
        # missed wake does.
        expire = by_object["temperature"]["expire_after"]
        assert 900 < expire < 1800 and by_object["rssi"]["expire_after"] == expire
        assert "expire_after" not in by_object["last_seen"]  # the times stay visible
        # States.
        state_topic = by_object["temperature"]["state_topic"]
        seen_topic = by_object["last_seen"]["state_topic"]
        avail = by_object["temperature"]["availability_topic"]
        assert retained(upstream, avail) == {avail: "online"}
        seen = json.loads(retained(upstream, seen_topic)[seen_topic])
        last = dt.datetime.fromisoformat(seen["last_seen"])
        nxt = dt.datetime.fromisoformat(seen["next_wake"])
        assert last.tzinfo is not None and 899 <= (nxt - last).total_seconds() <= 901
        assert retained(upstream, by_object["problem"]["state_topic"]) == {
            by_object["problem"]["state_topic"]: "OFF"}
        # Home Assistant's broker restarts and has lost what it retained (no persistence):
        # the relay's new connection gets every config and availability again.
        live.stop()
        upstream.stop()
        upstream.start()
        live = Sub(upstream, "homeassistant/#", "torpor/+/hass/#")
        await settled(live, lambda r: sum("torpor_n1/" in t for t in r) >= 7
                      and r.get(avail) == "online" and seen_topic in r)
        # A second wake: a new state, in the order it was stored.
        await s.hello(next_wake_s=900)
        await s.burst([23.0], mv=[3380])
        def states() -> list[dict[str, Any]]:
            return [json.loads(p) for t, _r, p in list(live.lines) if t == state_topic]

        await until(lambda: any(st.get("temperature") == 23.0 for st in states()), timeout=10)
        # The HELLO's state (the values so far, when a tick fell between the HELLO and the
        # burst) and then the new reading's, in that order.
        temps = [st.get("temperature") for st in states()]
        assert temps[-1] == 23.0 and set(temps) <= {22.25, 23.0} and temps == sorted(temps)
        assert states()[-1]["battery"] == 3380 and states()[-1]["rssi"] == -61
        for doc in by_object.values():
            if doc["state_topic"] == state_topic:
                assert template_key(doc) in states()[-1]
        # An alert open for the device turns its Problem sensor on; cleared, off.
        conn = db.open_db(cfg.db_path)
        registry.quarantine(conn, "n1", "test")
        problem = by_object["problem"]["state_topic"]
        await settled(live, lambda r: r.get(problem) == "ON")
        registry.release(conn, "n1")
        await settled(live, lambda r: r.get(problem) == "OFF")
        # Decommissioned: every config removed (empty retained payloads).
        registry.set_status(conn, "n1", registry.DECOMMISSIONED)
        conn.close()
        await settled(live, lambda r: not any("torpor_n1/" in t and p for t, p in r.items()
                                               if t.startswith("homeassistant/")))
        assert not any("torpor_n1/" in t for t in retained(upstream, "homeassistant/#"))
        assert retained(upstream, avail) == {}
    lines = live.stop()
    removals = [t for t, _r, p in lines if p == "" and t.startswith("homeassistant/")]
    assert len(removals) == 7


@aio
async def test_a_missed_wake_makes_the_node_unavailable_until_it_is_heard(
        broker: RunningBroker, upstream: RunningBroker, tmp_path: Path) -> None:
    pki = provision(broker, tmp_path, "n2")
    cfg = config(broker, upstream, tmp_path)
    avail = "torpor/n2/hass/availability"
    live = Sub(upstream, "#")
    async with running(cfg), Node(broker, pki, "n2") as node:
        s = Sender(node)
        await s.hello(next_wake_s=3)
        await s.burst([20.0])
        temp = "homeassistant/sensor/torpor_n2/temperature/config"
        cfgs = await settled(live, lambda r: r.get(avail) == "online" and temp in r)
        doc = check_discovery(temp, cfgs[temp])
        assert doc["expire_after"] == 5  # ceil(3 s × 1.1 + 0.3 s grace + 0.8 s awake)
        # Waking as announced (within every 3 s, a reading each time): never offline, a
        # state at every wake.
        for _ in range(3):
            await asyncio.sleep(0.8)
            await s.hello(next_wake_s=3)
            await s.burst([20.5])
        await asyncio.sleep(0.3)
        assert [p for t, _r, p in list(live.lines) if t == avail] == ["online"]
        assert sum(t == "torpor/n2/hass/state" for t, _r, _p in list(live.lines)) >= 4
        t0 = time.monotonic()
        await settled(live, lambda r: r.get(avail) == "offline")
        assert time.monotonic() - t0 >= 2.0  # not before the wake was due (3.3 s after)
        await s.hello(next_wake_s=900)
        await settled(live, lambda r: r.get(avail) == "online")
        # The longer sleep is announced before its state: the config's expire_after grew.
        cfgs = await settled(live, lambda r: json.loads(r[temp])["expire_after"] > 900)
        check_discovery(temp, cfgs[temp])
        assert retained(upstream, avail) == {avail: "online"}
    live.stop()


def test_wire_facts_come_from_the_spec() -> None:
    from gateway.pipeline.hass import Discovery

    d = Discovery("homeassistant", "torpor/{device}/hass", "gw")
    objects = {o for _, o in d.objects((proto.SCHEMA_ENV3,))}
    assert {m.name for m in proto.SCHEMAS[proto.SCHEMA_ENV3][1]} <= objects


@aio
async def test_the_device_blocks_model_is_the_devices_board(
        broker: RunningBroker, upstream: RunningBroker, tmp_path: Path) -> None:
    """A device registered with its board shows the board's name as its model in Home
    Assistant (its other device fields as before); one without a board shows its class;
    a board set later republishes the configs with the new model."""
    pki = provision(broker, tmp_path, "b1", "b2")
    conn = db.open_db(tmp_path / "data" / "gateway.db")
    registry.set_board(conn, "b1", "esp32c3")
    conn.close()
    cfg = config(broker, upstream, tmp_path)
    live = Sub(upstream, "homeassistant/#")
    temp = "homeassistant/sensor/torpor_{}/temperature/config"

    def model(r: dict[str, str], device: str) -> str | None:
        payload = r.get(temp.format(device))
        return None if not payload else str(json.loads(payload)["device"]["model"])

    async with running(cfg), Node(broker, pki, "b1") as n1, Node(broker, pki, "b2") as n2:
        s1, s2 = Sender(n1), Sender(n2)
        await s1.hello(next_wake_s=900)
        await s1.burst([21.5])
        await s2.hello(next_wake_s=900)
        await s2.burst([19.0])
        r = await settled(live, lambda r: model(r, "b1") is not None
                          and model(r, "b2") is not None)
        configs = retained(upstream, "homeassistant/#")
        b1 = [check_discovery(t, p) for t, p in configs.items() if "torpor_b1/" in t]
        assert len(b1) == 7 and {d["device"]["model"] for d in b1} == {"ESP32-C3"}
        dev = b1[0]["device"]
        assert (dev["identifiers"], dev["name"], dev["manufacturer"], dev["sw_version"],
                dev["via_device"]) == (["torpor_b1"], "b1", "Torpor", "3",
                                       "torpor_gateway_torpor-gateway")
        assert model(r, "b2") == "Torpor sensor node"
        # The operator names b2's board: its next wake announces the new model.
        conn = db.open_db(cfg.db_path)
        registry.set_board(conn, "b2", "pico2_w")
        conn.close()
        await s2.hello(next_wake_s=900)
        r = await settled(live, lambda r: model(r, "b2") == "Raspberry Pi Pico 2 W")
        configs = retained(upstream, "homeassistant/#")
        b2 = [check_discovery(t, p) for t, p in configs.items() if "torpor_b2/" in t]
        assert {d["device"]["model"] for d in b2} == {"Raspberry Pi Pico 2 W"}
        assert model(r, "b1") == "ESP32-C3"
    live.stop()
