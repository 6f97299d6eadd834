"""What the operator sees of the fleet and of one device."""

from __future__ import annotations

import functools
import math
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway import proto
from gateway.config import BoardModels, EnergyModel
from gateway.store import alerts, deadletter, fleet_rows, groups, readings
from gateway.store import devices as registry
from gateway.store import downlink_queue as q
from gateway.store import rotations as rot
from gateway.store import wake_log as wlog
from gateway.store import wakes as wake_store

SPARK_POINTS = 24  # battery readings behind a fleet row's sparkline
MAX_CHART_POINTS = 600  # a chart's series are averaged down to this many points
GRACE_S = 30.0  # a node later than this past its expected wake is overdue


class NotFound(LookupError):
    """No such device (the message names it)."""


@dataclass(frozen=True, slots=True)
class FleetRow:
    id: str
    device_class: str
    status: str
    status_reason: str
    last_seen: float | None
    next_listen_at: float | None
    overdue_wakes: int
    battery_mv: int | None
    battery: tuple[tuple[int, int], ...]  # (time, mV), oldest first
    queued: int
    fw_version: int | None
    ota_state: str | None
    alerts: int = 0  # open alerts (gateway.pipeline.rules)
    group: str | None = None  # the device's group (gateway.store.groups)
    # Days until the battery's voltage trend reaches readings.FORECAST_EMPTY_MV (the rules
    # engine's forecast, gateway.store.readings.battery_forecast): None without enough
    # readings, inf while the voltage does not fall.
    days_left: float | None = None
    days_left_pending: bool = False  # not fitted yet (the request's fitting budget ran out)
    # What days_left comes from: "ledger" (the energy ledger of its wakes, where the board
    # is known and enough wakes reported energy facts), "trend" (the voltage trend), or None.
    days_left_source: str | None = None
    board: str | None = None  # the device's board (None: not known, [energy] board stands in)

    def as_dict(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in self.__slots__}
        d["battery"] = [list(p) for p in self.battery]
        if self.days_left is not None and not math.isfinite(self.days_left):
            d["days_left"] = None  # JSON has no infinity: see days_left_trend
        d["days_left_trend"] = (
            "pending" if self.days_left_pending else "unknown" if self.days_left is None
            else "falling" if math.isfinite(self.days_left) else "not falling")
        return d


@dataclass(frozen=True, slots=True)
class FleetPage:
    rows: tuple[FleetRow, ...]
    total: int  # devices matching the filter
    offset: int
    limit: int
    counts: dict[str, int]  # every device by status

    def as_dict(self) -> dict[str, Any]:
        return {"devices": [r.as_dict() for r in self.rows], "total": self.total,
                "offset": self.offset, "limit": self.limit, "counts": self.counts}


@functools.lru_cache(maxsize=64)
def _battery_index(schema: int) -> int | None:
    info = proto.SCHEMAS.get(schema)
    if info is None:
        return None
    for i, m in enumerate(info[1]):
        if m.name == "battery":
            return i
    return None


def _battery_points(rows: Sequence[tuple[int, ...]]) -> tuple[tuple[int, int], ...]:
    """(time, mV) of readings (msg_id, ts, schema, v...) that carry a battery value."""
    out = []
    for r in rows:
        i = _battery_index(int(r[2]))
        if i is not None and 3 + i < len(r):
            out.append((int(r[1]), int(r[3 + i])))
    out.sort()
    return tuple(out)


FORECAST_EVERY_S = 3600.0  # a device's battery trend is fitted again at most this often
FORECAST_BUDGET_S = 0.05  # fitting per page request; past it, rows show the last fit or wait
FORECASTS_MAX = 20_000  # devices whose forecast is kept


class Forecasts:
    """Battery forecasts (readings.battery_forecast) by device, each fitted again at most
    once per FORECAST_EVERY_S: a trend over a week moves little in an hour, and one fit
    reads up to a week of the device's readings (10,000 at one a minute). A request fits
    for at most FORECAST_BUDGET_S (`begin` starts the clock); rows past it show their last
    forecast, or none yet (`pending`), and the next view or live update fills them in."""

    def __init__(self, size: int = FORECASTS_MAX, every_s: float = FORECAST_EVERY_S,
                 budget_s: float = FORECAST_BUDGET_S, energy: BoardModels | None = None) -> None:
        # Each device's board's model: the ledger's forecast first, where it has one.
        self.energy = energy
        self.size = size
        self.every_s = every_s
        self.budget_s = budget_s
        # device -> (fitted at, days, source)
        self._fits: dict[str, tuple[float, float | None, str | None]] = {}
        self._deadline = math.inf
        self.fits = 0

    def begin(self) -> None:
        self._deadline = time.monotonic() + self.budget_s

    def days_left(self, conn: sqlite3.Connection, device: str, t_last: float,
                  now: float) -> tuple[float | None, bool, str | None]:
        """(days left, True, source) or, past the request's budget, (the last fit or None,
        whether there was one, its source)."""
        hit = self._fits.get(device)
        if hit is not None and 0 <= now - hit[0] < self.every_s:
            return hit[1], True, hit[2]
        if time.monotonic() > self._deadline:
            return (hit[1], True, hit[2]) if hit is not None else (None, False, None)
        days, source = forecast(conn, device, t_last, now, self.energy)
        self.fits += 1
        if len(self._fits) >= self.size:
            self._fits.clear()
        self._fits[device] = (now, days, source)
        return days, True, source


def device_model(conn: sqlite3.Connection, device: str,
                 energy: BoardModels | None) -> EnergyModel | None:
    """The energy model of the device's own board, else of the default board."""
    return None if energy is None else energy.energy(registry.board_of(conn, device))


def forecast(conn: sqlite3.Connection, device: str, t_last: float, now: float,
             energy: BoardModels | None) -> tuple[float | None, str | None]:
    """(days left, source): the energy ledger's forecast where the device's board is known
    and its wakes reported enough energy facts, else its voltage trend's."""
    model = device_model(conn, device, energy)
    if model is not None:
        led = wlog.ledger_forecast(conn, device, model, now)
        if led is not None:
            return led.days, "ledger"
    days = readings.battery_forecast(conn, device, t_last)
    return days, None if days is None else "trend"


def next_listen(dev: registry.Device, wakes: wake_store.WakeStats | None) -> float | None:
    if wakes is not None and wakes.listen_window is not None:
        return wakes.listen_window[0]
    return dev.next_wake_at


def _row(conn: sqlite3.Connection, dev: registry.Device, now: float,
         open_alerts: dict[str, int] | None = None,
         forecasts: Forecasts | None = None) -> FleetRow:
    """One device's row, read on its own (the device page's summary)."""
    return _summary(
        conn, dev, wake_store.wake_stats(conn, dev.id),
        _battery_points(readings.fetch(conn, dev.id, SPARK_POINTS)),
        queued=len(q.pending(conn, dev.id)),
        open_alerts=(alerts.open_devices(conn) if open_alerts is None
                     else open_alerts).get(dev.id, 0),
        group=groups.group_of(conn, dev.id), now=now, forecasts=forecasts)


def _summary(conn: sqlite3.Connection, dev: registry.Device,
             wakes: wake_store.WakeStats | None, battery: tuple[tuple[int, int], ...], *,
             queued: int, open_alerts: int, group: str | None, now: float,
             forecasts: Forecasts | None) -> FleetRow:
    at = next_listen(dev, wakes)
    days: float | None = None
    source: str | None = None
    known = True
    if battery and forecasts is not None:
        days, known, source = forecasts.days_left(conn, dev.id, battery[-1][0], now)
    elif battery:
        days, source = forecast(conn, dev.id, battery[-1][0], now, None)
    overdue = wake_store.missed_wakes(at, wakes.interval_s if wakes else dev.next_wake_s, now,
                                    GRACE_S)
    return FleetRow(
        id=dev.id, device_class=dev.device_class, status=dev.status,
        status_reason=dev.status_reason, last_seen=dev.last_seen, next_listen_at=at,
        overdue_wakes=overdue, battery_mv=dev.battery_mv,
        battery=battery,
        queued=queued, fw_version=dev.fw_version, ota_state=dev.ota_state,
        alerts=open_alerts, group=group,
        days_left=days, days_left_pending=not known, days_left_source=source,
        board=dev.board,
    )


KEPT_MAX = 5_000  # devices whose sparkline is kept (about 3 kB each)


class Kept:
    """What the fleet page keeps from one view to the next, each part for as long as what
    it was made from is unchanged: a row's battery sparkline while the device stores no
    reading (gateway.store.fleet_rows' readings_key says when it has), and the fleet's
    counts by status while the registry's version stands (it moves whenever a device is
    added, removed or changes status). A page of devices that sent nothing since it was
    last drawn then reads and decodes none of their readings."""

    def __init__(self, size: int = KEPT_MAX) -> None:
        self.size = size
        self._keys: dict[str, fleet_rows.Key] = {}
        self._points: dict[str, tuple[tuple[int, int], ...]] = {}
        self._counts: tuple[int, dict[str, int]] | None = None  # (registry version, counts)
        self.decoded = 0  # sparklines made from readings (not kept ones)
        self.counted = 0  # times the devices were counted by status

    @property
    def keys(self) -> Mapping[str, fleet_rows.Key]:
        """device -> the readings_key its kept sparkline was made under."""
        return self._keys

    def points(self, row: fleet_rows.Row) -> tuple[tuple[int, int], ...]:
        """The row's sparkline: the kept one, or made from the row's readings and kept."""
        device = row.device.id
        if row.newest is None:
            return self._points[device]
        points = _battery_points(row.newest)
        self.decoded += 1
        self._keys[device] = row.readings_key
        self._points[device] = points
        return points

    def make_room(self, rows: int) -> None:
        """Before a page of `rows`: forget every sparkline if the page could pass the bound
        (never during a page, whose rows may be the kept ones)."""
        if len(self._keys) + rows > self.size:
            self._keys.clear()
            self._points.clear()

    def counts(self, conn: sqlite3.Connection) -> dict[str, int]:
        """Devices by status (registry.counts), counted again when the registry moved."""
        # The version is read first: counts read after it are at least as new, and a change
        # between the two reads moves the version again, so the next view counts again.
        version = registry.version(conn)
        if self._counts is None or self._counts[0] != version:
            self._counts = (version, registry.counts(conn))
            self.counted += 1
        return dict(self._counts[1])


def fleet(conn: sqlite3.Connection, *, status: str | None = None, text: str = "",
          offset: int = 0, limit: int = 50, now: float | None = None,
          forecasts: Forecasts | None = None, kept: Kept | None = None) -> FleetPage:
    """One page of the fleet, filtered by status and text (see registry.page), in a few
    queries whatever its size (gateway.store.fleet_rows); `kept` holds what the previous
    views read that is still current."""
    now = time.time() if now is None else now
    kept = Kept() if kept is None else kept
    kept.make_room(limit)
    found, total = fleet_rows.page(conn, status=status, text=text, offset=offset, limit=limit,
                                   newest=SPARK_POINTS, kept=kept.keys)
    counts = kept.counts(conn)
    if total is None:  # no text filter: the status counts say how many match
        total = counts.get(status, 0) if status is not None else sum(counts.values())
    if forecasts is not None:
        forecasts.begin()
    return FleetPage(tuple(_summary(conn, r.device, r.wakes, kept.points(r), queued=r.queued,
                                    open_alerts=r.alerts, group=r.group, now=now,
                                    forecasts=forecasts) for r in found),
                     total, offset, limit, counts)


@dataclass(frozen=True, slots=True)
class DeviceView:
    device: registry.Device
    row: FleetRow
    wakes: wake_store.WakeStats | None
    readings_stored: int
    pending: tuple[q.Item, ...]
    history: tuple[q.Item, ...]
    config: tuple[q.ConfigState, ...]
    dead_letters: int
    wake_log: tuple[wlog.Wake, ...] = ()  # newest first (gateway.store.wake_log)
    rotations: tuple[rot.Rotation, ...] = ()  # key rotations, newest first

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device.as_dict(), "summary": self.row.as_dict(),
            "wakes": self.wakes.as_dict() if self.wakes else None,
            "readings_stored": self.readings_stored,
            "pending": [i.as_dict() for i in self.pending],
            "history": [i.as_dict() for i in self.history],
            "config": [{n: getattr(c, n) for n in c.__slots__} for c in self.config],
            "dead_letters": self.dead_letters,
            "wake_log": [w.as_dict() for w in self.wake_log],
            "rotations": [_rotation_dict(r) for r in self.rotations],
        }


def _rotation_dict(r: rot.Rotation) -> dict[str, Any]:
    d = r.as_dict()
    d.pop("csr", None)  # the request itself is the node's to keep out of listings
    d["pending"] = r.state in rot.OPEN
    return d


# What the web layer names of the store's records (it reads the store only through ops).
WakeLogEntry = wlog.Wake
RotationEntry = rot.Rotation
ROTATION_OPEN = rot.OPEN
WAKE_HISTORY = 200  # wakes listed with a device (the charts read the log by range)
ROTATION_HISTORY = 10


def device(conn: sqlite3.Connection, device_id: str, *, now: float | None = None,
           history: int = 20, wake_history: int = WAKE_HISTORY,
           forecasts: Forecasts | None = None) -> DeviceView:
    now = time.time() if now is None else now
    dev = registry.find(conn, device_id)
    if dev is None:
        raise NotFound(f"no device {device_id!r}")
    if forecasts is not None:
        forecasts.begin()
    return DeviceView(
        device=dev, row=_row(conn, dev, now, forecasts=forecasts), wakes=wake_store.wake_stats(conn, device_id),
        readings_stored=readings.stats(conn, device_id)[2],
        pending=tuple(q.pending(conn, device_id)),
        history=tuple(q.history(conn, device_id, history)),
        config=tuple(q.config_state(conn, device_id)),
        dead_letters=deadletter.count(conn, device_id),
        wake_log=tuple(wlog.of_device(conn, device_id, limit=wake_history)),
        rotations=tuple(rot.of_device(conn, device_id, ROTATION_HISTORY)),
    )


def device_wakes(conn: sqlite3.Connection, device_id: str, since: float,
                 until: float) -> tuple[wlog.Wake, ...]:
    """The device's logged wakes in [since, until], oldest first (for its charts)."""
    if registry.find(conn, device_id) is None:
        raise NotFound(f"no device {device_id!r}")
    return tuple(w for w in reversed(wlog.of_device(conn, device_id, since))
                 if w.at <= until)


LedgerForecast = wlog.LedgerForecast


def device_ledger(conn: sqlite3.Connection, device_id: str, energy: EnergyModel | None,
                  now: float) -> wlog.LedgerForecast | None:
    """The device's battery forecast by the energy ledger of its wakes and its board's
    model (None: no board model, or too few wakes with energy facts)."""
    if energy is None:
        return None
    return wlog.ledger_forecast(conn, device_id, energy, now)


@dataclass(frozen=True, slots=True)
class Series:
    """One measurement over a time range, averaged down to at most MAX_CHART_POINTS."""

    name: str
    unit: str
    points: tuple[tuple[float, float], ...]  # (time, value in unit)


@dataclass(frozen=True, slots=True)
class ReadingsView:
    device: str
    since: float
    until: float
    count: int  # readings in the range (before averaging)
    series: tuple[Series, ...]
    latest_at: float | None  # the device's newest reading, in or out of the range

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "since": self.since, "until": self.until,
                "count": self.count, "latest_at": self.latest_at,
                "series": [{"name": s.name, "unit": s.unit, "points": [list(p) for p in s.points]}
                           for s in self.series]}


def _downsample(ts: Sequence[float], vs: Sequence[float], scale: float,
                n: int) -> tuple[tuple[float, float], ...]:
    """(time, value * scale) points, averaged in `n` buckets of consecutive readings when
    there are more than `n`."""
    if len(ts) <= n:
        return tuple((float(t), v * scale) for t, v in zip(ts, vs, strict=True))
    out = []
    step = len(ts) / n
    for b in range(n):
        lo, hi = int(b * step), max(int((b + 1) * step), int(b * step) + 1)
        k = hi - lo
        out.append((sum(ts[lo:hi]) / k, sum(vs[lo:hi]) / k * scale))
    return tuple(out)


def device_readings(conn: sqlite3.Connection, device_id: str, since: float, until: float,
                    *, points: int = MAX_CHART_POINTS) -> ReadingsView:
    """The device's readings in [since, until], one series per measurement, in the spec's
    units (raw values times the measurement's scale)."""
    if registry.find(conn, device_id) is None:
        raise NotFound(f"no device {device_id!r}")
    by_schema = readings.columns_between(conn, device_id, since, until)
    # name -> (unit, scale, times, raw values)
    by_name: dict[str, tuple[str, float, list[int], list[float]]] = {}
    count = 0
    for schema, cols in by_schema.items():
        info = proto.SCHEMAS.get(schema)
        if info is None:
            continue
        count += len(cols[0])
        for i, m in enumerate(info[1]):
            if 1 + i < len(cols):
                unit, scale, ts, vs = by_name.setdefault(m.name, (m.unit, m.scale, [], []))
                ts.extend(cols[0])
                if m.scale == scale:
                    vs.extend(cols[1 + i])
                else:  # the same measurement at another scale in another schema
                    vs.extend(v * m.scale / scale for v in cols[1 + i])
    if len(by_schema) > 1:  # several schemas: put each measurement back in time order
        for name, (unit, scale, ts, vs) in list(by_name.items()):
            pairs = sorted(zip(ts, vs, strict=True))
            by_name[name] = (unit, scale, [p[0] for p in pairs], [p[1] for p in pairs])
    latest = readings.fetch(conn, device_id, 1)
    return ReadingsView(
        device=device_id, since=since, until=until, count=count,
        series=tuple(Series(name, unit, _downsample(ts, vs, scale, points))
                     for name, (unit, scale, ts, vs) in by_name.items()),
        latest_at=float(latest[0][1]) if latest else None,
    )


@dataclass(frozen=True, slots=True)
class ConfigView:
    """A device's configuration: what the operator wants (desired, per key) against what the
    node reported having applied (its config version, and each key's reported value)."""

    device: str
    reported_version: int
    keys: tuple[q.ConfigState, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device, "reported_version": self.reported_version,
            "desired": {c.key: c.value for c in self.keys},
            "reported": {c.key: c.reported_value for c in self.keys
                         if c.reported_value is not None},
            "pending": [c.key for c in self.keys if not c.applied],
            "keys": [{n: getattr(c, n) for n in c.__slots__} for c in self.keys],
        }


def device_config(conn: sqlite3.Connection, device_id: str) -> ConfigView:
    dev = registry.find(conn, device_id)
    if dev is None:
        raise NotFound(f"no device {device_id!r}")
    return ConfigView(device_id, dev.config_version or 0, tuple(q.config_state(conn, device_id)))
