"""Home Assistant MQTT discovery on the upstream broker: each device's sensors announced
with a retained config, their states published as the node wakes, all through the outbox.

Per device (docs/home-assistant.md): a sensor per measurement of the schemas it has sent
(temperature, humidity, battery...), RSSI, last seen and next wake (timestamps), and a
`problem` binary sensor that is on while an alert is open for it. The measurement sensors
carry `expire_after` computed from the node's own send interval (HELLO's next_listen_s or
next_wake_s, plus a grace), and an availability topic that turns `offline` once the node
misses a wake and `online` when it is heard again; so a node that sleeps as planned never
shows unavailable and one that misses its wakes does. A revoked or decommissioned device's
configs are removed (empty retained payloads).

Every message is an outbox item (gateway.store.outbox), so it waits in the gateway while the
upstream broker is away and goes out in order.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import json
import logging
import math
import re
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from gateway import proto
from gateway.config import GatewayConfig, board_models
from gateway.store import alerts, db, readings
from gateway.store import devices as registry
from gateway.store import hass as store
from gateway.store import outbox as ob
from gateway.store.wakes import missed_wakes

log = logging.getLogger(__name__)

KIND: Final = "hass"  # the outbox kind of these messages
CURSOR_HELLO: Final = "hello"
CURSOR_RUNS: Final = "runs"
# expire_after is the send interval times this plus the grace: a little room for a node
# whose wake drifts late, and a config republished only when the interval really grows.
HEADROOM: Final = 1.1
DEVICES_PER_TICK: Final = 200  # woken devices announced per tick (a fleet's first start)
MANUFACTURER: Final = "Torpor"
ORIGIN: Final = {"name": "Torpor gateway"}


@dataclass(frozen=True, slots=True)
class SensorKind:
    """How a measurement (or a device field) shows in Home Assistant."""

    device_class: str | None
    unit: str | None
    state_class: str | None = "measurement"
    entity_category: str | None = None


# Spec measurement name -> Home Assistant sensor. A measurement not in this table is
# announced without a device class, in the spec's unit.
MEASUREMENTS: Final[Mapping[str, SensorKind]] = {
    "temperature": SensorKind("temperature", "°C"),
    "humidity": SensorKind("humidity", "%"),
    "battery": SensorKind("voltage", "mV"),
    "pressure": SensorKind("pressure", "hPa"),
    "illuminance": SensorKind("illuminance", "lx"),
}
# Spec units as Home Assistant writes them.
UNITS: Final[Mapping[str, str]] = {"degC": "°C", "%RH": "%", "Cel": "°C"}
_SAFE = re.compile(r"[^A-Za-z0-9_-]")


def node_id(device: str) -> str:
    return "torpor_" + _SAFE.sub("_", device)


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, slots=True)
class Topics:
    """The upstream topics of one device."""

    base: str

    @property
    def state(self) -> str:
        return f"{self.base}/state"

    @property
    def seen(self) -> str:
        return f"{self.base}/seen"

    @property
    def problem(self) -> str:
        return f"{self.base}/problem"

    @property
    def availability(self) -> str:
        return f"{self.base}/availability"


class Discovery:
    """Builds discovery configs and topics (pure: no database, no MQTT)."""

    def __init__(self, prefix: str, state_topic: str, gateway_id: str) -> None:
        self.prefix = prefix.rstrip("/")
        self.state_topic = state_topic
        self.gateway_id = gateway_id
        self.gateway_node = "torpor_gateway_" + _SAFE.sub("_", gateway_id)

    def topics(self, device: str) -> Topics:
        return Topics(self.state_topic.format(device=device))

    def config_topic(self, component: str, device: str, object_id: str) -> str:
        return f"{self.prefix}/{component}/{node_id(device)}/{object_id}/config"

    def device_block(self, device: str, device_class: str, fw_version: int | None,
                     model: str | None = None) -> dict[str, Any]:
        block: dict[str, Any] = {
            "identifiers": [node_id(device)],
            "name": device,
            "manufacturer": MANUFACTURER,
            # The wire does not carry the board: the registry's board names the model
            # ("ESP32-C3"); a device registered without one shows its class.
            "model": model or f"Torpor {device_class} node",
            "via_device": self.gateway_node,
        }
        if fw_version is not None:
            block["sw_version"] = str(fw_version)
        return block

    def objects(self, schemas: tuple[int, ...]) -> list[tuple[str, str]]:
        """(component, object id) of every entity of a device with these schemas."""
        out = [("sensor", "rssi"), ("sensor", "last_seen"), ("sensor", "next_wake"),
               ("binary_sensor", "problem")]
        for m in self.measurements(schemas):
            out.append(("sensor", m.name))
        return out

    @staticmethod
    def measurements(schemas: tuple[int, ...]) -> list[proto.Measurement]:
        seen: dict[str, proto.Measurement] = {}
        for s in schemas:
            info = proto.SCHEMAS.get(s)
            for m in info[1] if info else ():
                seen.setdefault(m.name, m)
        return list(seen.values())

    def configs(self, device: str, device_class: str, fw_version: int | None,
                schemas: tuple[int, ...], expire_after: int,
                model: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        t = self.topics(device)
        dev = self.device_block(device, device_class, fw_version, model)
        avail = {"availability_topic": t.availability, "payload_available": "online",
                 "payload_not_available": "offline"}

        def entity(object_id: str, name: str, **extra: Any) -> dict[str, Any]:
            doc = {"name": name, "unique_id": f"{node_id(device)}_{object_id}", "device": dev,
                   "origin": ORIGIN}
            doc.update({k: v for k, v in extra.items() if v is not None})
            return doc

        out: list[tuple[str, dict[str, Any]]] = []
        for m in self.measurements(schemas):
            kind = MEASUREMENTS.get(m.name, SensorKind(None, UNITS.get(m.unit, m.unit)))
            out.append((self.config_topic("sensor", device, m.name), entity(
                m.name, m.name.replace("_", " ").capitalize(), state_topic=t.state,
                value_template=f"{{{{ value_json.{m.name} }}}}",
                device_class=kind.device_class, unit_of_measurement=kind.unit,
                state_class=kind.state_class, expire_after=expire_after, **avail)))
        out.append((self.config_topic("sensor", device, "rssi"), entity(
            "rssi", "RSSI", state_topic=t.state, value_template="{{ value_json.rssi }}",
            device_class="signal_strength", unit_of_measurement="dBm",
            state_class="measurement", entity_category="diagnostic",
            expire_after=expire_after, **avail)))
        # The times stay visible while the node is missing: no expiry, no availability.
        out.append((self.config_topic("sensor", device, "last_seen"), entity(
            "last_seen", "Last seen", state_topic=t.seen,
            value_template="{{ value_json.last_seen }}", device_class="timestamp",
            entity_category="diagnostic")))
        out.append((self.config_topic("sensor", device, "next_wake"), entity(
            "next_wake", "Next wake", state_topic=t.seen,
            value_template="{{ value_json.next_wake }}", device_class="timestamp")))
        out.append((self.config_topic("binary_sensor", device, "problem"), entity(
            "problem", "Problem", state_topic=t.problem, device_class="problem",
            payload_on="ON", payload_off="OFF")))
        return out

    def gateway_config(self) -> tuple[str, dict[str, Any]]:
        node = self.gateway_node
        return (f"{self.prefix}/sensor/{node}/alerts_open/config", {
            "name": "Open alerts", "unique_id": f"{node}_alerts_open",
            "state_topic": self.topics(self.gateway_id).base + "/alerts",
            "state_class": "measurement", "icon": "mdi:alert",
            "device": {"identifiers": [node], "name": f"Torpor gateway {self.gateway_id}",
                       "manufacturer": MANUFACTURER, "model": "Torpor gateway"},
            "origin": ORIGIN,
        })


def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


class HassPublisher:
    """The Home Assistant task: every interval, on the writer thread, turns new wakes,
    readings, missed wakes, alerts and decommissions into outbox items."""

    def __init__(self, cfg: GatewayConfig, conn: sqlite3.Connection, writer: db.Writer, *,
                 notify: Callable[[list[ob.Queued]], None] | None = None,
                 connects: Callable[[], int] | None = None) -> None:
        self.cfg = cfg
        self.conn = conn
        self.writer = writer
        self.notify = notify
        # The relay's connection count: each new connection to the upstream broker gets
        # every config and availability again (a broker without persistence, or one
        # restored from an old state, has lost the retained ones).
        self.connects = connects
        self._connects_seen = 0
        self._again: collections.deque[str] = collections.deque()
        h = cfg.hass
        self.disc = Discovery(h.prefix, h.state_topic, cfg.mqtt.client_id)
        self.boards = board_models(cfg)  # each board's readable name, the devices' model
        self.grace_s = h.grace_s if h.grace_s >= 0 else cfg.downlink.grace_s
        self.known: dict[str, store.Announced] | None = None
        self.values: dict[str, dict[str, float | int]] = {}  # device -> latest values
        # (last_hello_at, id) of the last HELLO published
        self.hello_cursor: tuple[float, str] | None = None
        self.run_cursor: int | None = None
        self.alerts_open: int | None = None
        self._next_scan = 0.0

    async def run(self) -> None:
        while True:
            queued = await self.writer.run(self.tick, time.time())
            if queued and self.notify is not None:
                self.notify(queued)
            await asyncio.sleep(self.cfg.hass.interval_s)

    def expire_after(self, d: registry.Device) -> int | None:
        interval = d.next_listen_s or d.next_wake_s
        if not interval:
            return None
        window = (d.awake_window_ms or 0) / 1000.0
        return max(1, math.ceil(interval * HEADROOM + self.grace_s + window))

    # ---- one tick
    def tick(self, now: float) -> list[ob.Queued]:
        conn = self.conn
        items: list[ob.OutboxItem] = []
        try:
            with db.transaction(conn):
                self._tick(conn, now, items)
                return ob.enqueue_queued(conn, items)
        except BaseException:
            self.known = None  # rolled back: read the announced state again
            self.hello_cursor = self.run_cursor = None
            raise

    def _item(self, out: list[ob.OutboxItem], topic: str, payload: bytes | dict[str, Any] | str,
              device: str, now: float, *, retain: bool) -> None:
        data = payload if isinstance(payload, bytes) else (
            payload.encode() if isinstance(payload, str) else _json(payload))
        out.append(ob.OutboxItem(topic, data, now, device, KIND, retain))

    def _tick(self, conn: sqlite3.Connection, now: float, out: list[ob.OutboxItem]) -> None:
        if self.known is None:
            self.known = store.announced(conn)
            topic, doc = self.disc.gateway_config()
            self._item(out, topic, doc, self.cfg.mqtt.client_id, now, retain=True)
            self.alerts_open = None
        connects = self.connects() if self.connects is not None else 0
        if connects != self._connects_seen:
            self._connects_seen = connects
            self._again = collections.deque(sorted(self.known))
            topic, doc = self.disc.gateway_config()
            self._item(out, topic, doc, self.cfg.mqtt.client_id, now, retain=True)
            self.alerts_open = None
        if self._again:
            self._announce_again(conn, now, out)
        if self.hello_cursor is None:
            self.hello_cursor = store.get_cursor(conn, CURSOR_HELLO) or (0.0, "")
            if self.hello_cursor[0] > now + 3600:  # the clock went back: start over
                self.hello_cursor = (0.0, "")
        if self.run_cursor is None:
            stored = store.get_cursor(conn, CURSOR_RUNS)
            self.run_cursor = (int(stored[0]) if stored is not None
                               else readings.last_run_id(conn))
        touched: dict[str, bool] = {}  # device -> heard (a HELLO) in this tick
        # Ingest stamps HELLOs on its one writer thread, in commit order: a cursor of
        # (time, id) sees each once. A first start announces the fleet a chunk a tick.
        heard = registry.heard_since(conn, *self.hello_cursor, DEVICES_PER_TICK)
        for d in heard:
            touched[d.id] = True
        if heard and heard[-1].last_hello_at is not None:
            self.hello_cursor = (heard[-1].last_hello_at, heard[-1].id)
        new_schemas: dict[str, set[int]] = {}
        # Only each device's newest run: a state shows the newest values.
        hi, runs = readings.latest_runs_after(conn, self.run_cursor)
        for _rowid, device, schema, cols in runs:
            info = proto.SCHEMAS.get(schema)
            if info is None or not cols[0]:
                continue
            k = max(range(len(cols[0])), key=cols[0].__getitem__)
            vals = self.values.setdefault(device, {})
            for i, m in enumerate(info[1]):
                v = cols[i + 1][k] * m.scale
                vals[m.name] = round(v, 6) if isinstance(v, float) else v
            new_schemas.setdefault(device, set()).add(schema)
            touched.setdefault(device, False)
        # Stored only when they move: an unchanged write still costs the commit an fsync.
        if hi != self.run_cursor:
            self.run_cursor = hi
            store.set_cursor(conn, CURSOR_RUNS, self.run_cursor)
        if heard:
            store.set_cursor(conn, CURSOR_HELLO, *self.hello_cursor)
        problems = alerts.open_devices(conn)
        for device, hello in touched.items():
            found = registry.find(conn, device)
            if found is None or found.status not in registry.SERVED:
                continue
            self._device(conn, found, hello, new_schemas.get(device, set()), problems, now, out)
        if time.monotonic() >= self._next_scan:
            self._next_scan = time.monotonic() + self.cfg.hass.scan_interval_s
            self._scan(conn, now, out)
        self._problems(conn, problems, now, out)
        n = alerts.count_open(conn)
        if n != self.alerts_open:
            self.alerts_open = n
            self._item(out, self.disc.topics(self.cfg.mqtt.client_id).base + "/alerts", str(n),
                       self.cfg.mqtt.client_id, now, retain=True)

    def _device(self, conn: sqlite3.Connection, d: registry.Device, heard: bool,
                schemas: set[int], problems: Mapping[str, int], now: float,
                out: list[ob.OutboxItem]) -> None:
        assert self.known is not None
        a = self.known.get(d.id)
        expire = self.expire_after(d)
        if expire is None:
            expire = a.expire_after if a is not None else 0
        all_schemas = tuple(sorted(set(a.schemas if a else ()) | schemas))
        if a is not None and expire and a.expire_after and (
                a.expire_after >= expire >= a.expire_after / 2):
            expire = a.expire_after  # close enough: no new config
        model = self.boards.title(d.board)
        changed = (a is None or a.expire_after != expire or a.fw_version != d.fw_version
                   or a.schemas != all_schemas or a.model != model)
        topics = self.disc.topics(d.id)
        if changed and expire:
            for topic, doc in self.disc.configs(d.id, d.device_class, d.fw_version, all_schemas,
                                                expire, model):
                self._item(out, topic, doc, d.id, now, retain=True)
        if not expire:
            return  # never heard: nothing to say yet
        problem = problems.get(d.id, 0) > 0
        if a is None or changed or not a.online:
            if a is None or not a.online:
                self._item(out, topics.availability, "online", d.id, now, retain=True)
            if a is None:
                self._item(out, topics.problem, "ON" if problem else "OFF", d.id, now,
                           retain=True)
            a = store.Announced(d.id, expire, d.fw_version, all_schemas, True,
                                problem if a is None else a.problem, now, model)
            self.known[d.id] = a
            store.save(conn, a)
        if heard and d.last_hello_at is not None:
            self._seen(d, now, out)
        vals = self.values.get(d.id)
        if vals is None and a.schemas:
            vals = self.values[d.id] = self._latest(conn, d.id)
        state: dict[str, Any] = dict(vals or {})
        state["rssi"] = d.rssi
        self._item(out, topics.state, state, d.id, now, retain=False)

    @staticmethod
    def _latest(conn: sqlite3.Connection, device: str) -> dict[str, float | int]:
        """The newest stored reading's values (after a restart)."""
        rows = readings.fetch(conn, device, 1)
        if not rows:
            return {}
        _msg_id, _ts, schema, *raw = rows[0]
        info = proto.SCHEMAS.get(schema)
        if info is None:
            return {}
        return {m.name: v * m.scale for m, v in zip(info[1], raw, strict=False)}

    def _scan(self, conn: sqlite3.Connection, now: float, out: list[ob.OutboxItem]) -> None:
        """Missed wakes turn a device offline; revoked and decommissioned devices lose
        their discovery."""
        assert self.known is not None
        if not self.known:
            return
        # Only the devices that concern a scan are read: those refused for good, and
        # those whose announced wake (plus the grace) has gone by.
        for d in registry.schedules(conn, statuses=(registry.REVOKED, registry.DECOMMISSIONED)):
            a = self.known.get(d.id)
            if a is not None:
                self._remove(conn, a, now, out)
        for d in registry.schedules(conn, statuses=(*registry.SERVED, registry.QUARANTINED),
                                    late_at=now - self.grace_s):
            device = d.id
            a = self.known.get(device)
            interval = d.next_listen_s or d.next_wake_s
            if a is None or not a.online or not interval or d.last_hello_at is None:
                continue
            if missed_wakes(d.last_hello_at + interval, interval, now, self.grace_s) >= 1:
                log.info("%s missed its wake: offline in Home Assistant", device,
                         extra={"device_id": device})
                self._item(out, self.disc.topics(device).availability, "offline", device, now,
                           retain=True)
                a = dataclasses.replace(a, online=False, updated_at=now)
                self.known[device] = a
                store.save(conn, a)

    def _announce_again(self, conn: sqlite3.Connection, now: float,
                        out: list[ob.OutboxItem]) -> None:
        """Republish what the upstream broker should retain, a chunk of devices a tick."""
        assert self.known is not None
        for _ in range(min(DEVICES_PER_TICK, len(self._again))):
            device = self._again.popleft()
            a = self.known.get(device)
            d = registry.find(conn, device)
            if a is None or d is None or not a.expire_after:
                continue
            for topic, doc in self.disc.configs(device, d.device_class, a.fw_version, a.schemas,
                                                a.expire_after, a.model):
                self._item(out, topic, doc, device, now, retain=True)
            t = self.disc.topics(device)
            self._item(out, t.availability, "online" if a.online else "offline", device, now,
                       retain=True)
            self._item(out, t.problem, "ON" if a.problem else "OFF", device, now, retain=True)
            if d.last_hello_at is not None:
                self._seen(d, now, out)

    def _seen(self, d: registry.Device, now: float, out: list[ob.OutboxItem]) -> None:
        assert d.last_hello_at is not None
        interval = d.next_listen_s or d.next_wake_s
        self._item(out, self.disc.topics(d.id).seen, {
            "last_seen": _iso(d.last_seen or d.last_hello_at),
            "next_wake": _iso(d.last_hello_at + interval if interval else None),
        }, d.id, now, retain=True)

    def _remove(self, conn: sqlite3.Connection, a: store.Announced, now: float,
                out: list[ob.OutboxItem]) -> None:
        assert self.known is not None
        for component, object_id in self.disc.objects(a.schemas):
            self._item(out, self.disc.config_topic(component, a.device, object_id), b"",
                       a.device, now, retain=True)
        t = self.disc.topics(a.device)
        for topic in (t.availability, t.seen, t.problem):
            self._item(out, topic, b"", a.device, now, retain=True)
        del self.known[a.device]
        self.values.pop(a.device, None)
        store.forget(conn, a.device)
        log.info("%s removed from Home Assistant", a.device, extra={"device_id": a.device})

    def _problems(self, conn: sqlite3.Connection, problems: Mapping[str, int], now: float,
                  out: list[ob.OutboxItem]) -> None:
        assert self.known is not None
        for device, a in list(self.known.items()):
            problem = problems.get(device, 0) > 0
            if problem != a.problem:
                self._item(out, self.disc.topics(device).problem, "ON" if problem else "OFF",
                           device, now, retain=True)
                a = dataclasses.replace(a, problem=problem, updated_at=now)
                self.known[device] = a
                store.save(conn, a)
