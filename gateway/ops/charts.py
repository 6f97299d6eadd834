"""A device's readings charts kept up to date a run at a time.

A chart of a range (1 hour .. 30 days) is at most MAX_CHART_POINTS points. With more
readings than that in the range, the range is cut into buckets of range / MAX_CHART_POINTS
seconds, aligned on the clock, and each point is the mean time and value of a bucket's
readings (the first bucket may reach up to one bucket before the range); with fewer, each
reading is a point. The buckets' sums are kept per (device,
range); a later view of the same chart reads only the runs stored since (by rowid), adds
them to their buckets and drops the buckets the range has slid past. Redrawing the 30-day
chart of a device that keeps sending costs its newest bursts, not its month.
"""

from __future__ import annotations

import bisect
import math
import sqlite3
from collections import OrderedDict
from dataclasses import dataclass, field

from gateway import proto
from gateway.ops import fleet
from gateway.store import devices as registry
from gateway.store import readings

CACHE_SIZE = 32  # charts kept, least recently viewed dropped first


@dataclass(slots=True)
class _Series:
    unit: str
    # bucket -> [sum of times, sum of values (in unit), readings]; `keys` in order
    buckets: dict[int, list[float]] = field(default_factory=dict)
    keys: list[int] = field(default_factory=list)

    def new_bucket(self, k: int, acc: list[float]) -> None:
        self.buckets[k] = acc
        if not self.keys or k > self.keys[-1]:
            self.keys.append(k)  # the usual case: readings arrive in time order
        else:
            bisect.insort(self.keys, k)

    def points(self, lo: int, hi: int) -> tuple[list[tuple[float, float]], int]:
        """The mean (time, value) of each bucket in lo..hi, and the readings in them."""
        b = self.buckets
        accs = [b[k] for k in self.keys[bisect.bisect_left(self.keys, lo):
                                        bisect.bisect_right(self.keys, hi)]]
        return [(a[0] / a[2], a[1] / a[2]) for a in accs], int(sum(a[2] for a in accs))


@dataclass(slots=True)
class _Chart:
    width: float  # seconds per bucket
    first: int  # the oldest bucket held: nothing before it was read
    cursor: int  # the device's runs up to this rowid are in the buckets
    series: dict[str, _Series] = field(default_factory=dict)

    def add(self, runs: list[tuple[int, int, list[tuple[int, ...]]]]) -> None:
        for rowid, schema, columns in runs:
            self.cursor = max(self.cursor, rowid)
            info = proto.SCHEMAS.get(schema)
            if info is None:
                continue
            w = self.width
            keys = [math.floor(t / w) for t in columns[0]]
            for i, m in enumerate(info[1]):
                if 1 + i >= len(columns):
                    continue
                s = self.series.get(m.name)
                if s is None:
                    s = self.series[m.name] = _Series(m.unit)
                b = s.buckets
                scale = m.scale
                for k, t, v in zip(keys, columns[0], columns[1 + i], strict=True):
                    if k < self.first:
                        continue
                    acc = b.get(k)
                    if acc is None:
                        s.new_bucket(k, [float(t), v * scale, 1.0])
                    else:
                        acc[0] += t
                        acc[1] += v * scale
                        acc[2] += 1.0

    def slide(self, first: int) -> None:
        """Drop the buckets before `first` (the range moved on)."""
        if first <= self.first:
            return
        self.first = first
        for s in self.series.values():
            cut = bisect.bisect_left(s.keys, first)
            for k in s.keys[:cut]:
                del s.buckets[k]
            del s.keys[:cut]


class ChartCache:
    """Charts by (device, range length); one per operator-visible chart (bounded)."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._charts: OrderedDict[tuple[str, float], _Chart] = OrderedDict()
        self.rebuilds = 0  # charts read from scratch (a first view, a range moved back)

    def view(self, conn: sqlite3.Connection, device: str, since: float,
             until: float) -> fleet.ReadingsView:
        """The device's readings in [since, until] as chart series (see the module)."""
        if registry.find(conn, device) is None:
            raise fleet.NotFound(f"no device {device!r}")
        span = max(1.0, until - since)
        width = span / fleet.MAX_CHART_POINTS
        lo, hi = math.floor(since / width), math.floor(until / width)
        key = (device, span)
        chart = self._charts.get(key)
        if chart is None or lo < chart.first or chart.cursor > readings.last_run_id(conn):
            # First view, a range that moved back, or a database that went back (restored).
            chart = _Chart(width, lo, 0)
            chart.add(readings.device_runs(conn, device, since=since))
            self.rebuilds += 1
        else:
            chart.slide(lo)
            chart.add(readings.device_runs(conn, device, after=chart.cursor))
        self._charts[key] = chart
        self._charts.move_to_end(key)
        while len(self._charts) > self.size:
            self._charts.popitem(last=False)
        count = 0
        out = []
        for name, s in chart.series.items():
            pts, n = s.points(lo, hi)
            count = max(count, n)
            if pts:
                out.append(fleet.Series(name, s.unit, tuple(pts)))
        if count <= fleet.MAX_CHART_POINTS:
            # Few enough to draw every one: the readings themselves, not bucket means.
            return fleet.device_readings(conn, device, since, until)
        latest = readings.fetch(conn, device, 1)
        return fleet.ReadingsView(device=device, since=since, until=until, count=count,
                                  series=tuple(out),
                                  latest_at=float(latest[0][1]) if latest else None)
