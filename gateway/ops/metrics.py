"""Prometheus metrics for `/metrics`: counters and the commit-latency histogram the running
gateway keeps in memory, and gauges read from the store at scrape time (a handful of
indexed or one-table queries, so a scrape costs milliseconds at 10,000 devices).

Names follow Prometheus conventions: the `torpor_` prefix, `_total` on counters, base
units (seconds, volts)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gateway.store import alerts, deadletter, wakes
from gateway.store import devices as registry
from gateway.store import downlink_queue as q
from gateway.store import ota_store as ota
from gateway.store.outbox import Outbox
from gateway.store.status import read_status

CONTENT_TYPE = CONTENT_TYPE_LATEST
# A commit is one fsync and a few statements: a millisecond on a fast disk, tens of them on
# an SD card, seconds only when something is wrong.
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                  5.0)
COMMIT_METRIC = "torpor_ingest_commit_seconds"
COMMIT_HELP = "Time to write and commit one ingest batch"
GRACE_S = 30.0  # as the fleet page (gateway.ops.fleet.GRACE_S): past this a node is overdue

# The running gateway's ingest counters (gateway.pipeline.ingest.Metrics) exported as counters:
# (its field, metric name without _total, help).
INGEST_COUNTERS = (
    ("frames", "torpor_ingest_frames", "Frames received from nodes"),
    ("readings_stored", "torpor_ingest_readings",
     "Readings committed to the store (duplicates not counted)"),
    ("readings_duplicate", "torpor_ingest_duplicate_readings",
     "Readings received again and dropped as duplicates"),
    ("bursts", "torpor_ingest_bursts", "Burst frames committed"),
    ("hellos", "torpor_ingest_hellos", "HELLO frames committed"),
    ("batches", "torpor_ingest_commits", "Ingest commits (one transaction per batch)"),
    ("commit_errors", "torpor_ingest_commit_errors",
     "Ingest commits that failed (nothing acknowledged; nodes resend)"),
    ("refused", "torpor_ingest_refused_frames", "Frames dead-lettered or refused"),
    ("quarantined", "torpor_ingest_quarantines", "Devices quarantined by ingest"),
    ("acks_sent", "torpor_ingest_acks", "ACKs published"),
)
DOWNLINK_COUNTERS = (
    ("frames", "torpor_downlink_frames", "Downlink frames delivered in nodes' wakes"),
    ("results", "torpor_downlink_results", "Command results received"),
    ("expired", "torpor_downlink_expired", "Downlink items expired at their TTL"),
    ("failed", "torpor_downlink_failed", "Downlink items failed"),
)
CREDENTIALS = ("root_ca", "issuing_ca", "server", "gateway", "control", "crl", "crl_root")


def _bool(value: object) -> float | None:
    return None if value is None else (1.0 if value else 0.0)


@dataclass
class Live:
    """What only the running gateway process knows. The service makes one, has ingest
    observe every commit into it, and points its callables at its own state; the web page
    served inside the service then exports it with the store's gauges. A page served alone
    (`torpor gateway web`) has none: it exports the store's gauges and what the gateway's
    status row says."""

    commit_seconds: Histogram = field(default_factory=lambda: Histogram(
        COMMIT_METRIC, COMMIT_HELP, buckets=COMMIT_BUCKETS, registry=None))
    ingest: Callable[[], Mapping[str, Any] | None] = lambda: None
    downlink: Callable[[], Mapping[str, Any] | None] = lambda: None
    broker_connected: Callable[[], bool | None] = lambda: None
    upstream_connected: Callable[[], bool | None] = lambda: None
    credentials: Callable[[], Mapping[str, Any] | None] = lambda: None

    # Set in a copy made from another process's `snapshot()`: the histogram's samples as
    # that process had them (then `commit_seconds` is unused).
    commit_samples: list[tuple[str, dict[str, str], float]] | None = None

    def observe_commit(self, seconds: float) -> None:
        self.commit_seconds.observe(seconds)

    def histograms(self) -> Iterable[Metric]:
        if self.commit_samples is None:
            yield from self.commit_seconds.collect()
            return
        m = Metric(COMMIT_METRIC, COMMIT_HELP, "histogram")
        for name, labels, value in self.commit_samples:
            m.add_sample(name, labels, value)
        yield m

    def snapshot(self) -> dict[str, Any]:
        """What this process knows, as JSON: for the web page served by a child process
        (gateway.web.process), which asks for it at each scrape."""
        return {
            "ingest": _plain(self.ingest()), "downlink": _plain(self.downlink()),
            "broker_connected": self.broker_connected(),
            "upstream_connected": self.upstream_connected(),
            "credentials": _plain(self.credentials()),
            "commit_samples": [[s.name, s.labels, s.value]
                               for m in self.histograms() for s in m.samples],
        }

    @classmethod
    def from_snapshot(cls, snap: Mapping[str, Any]) -> Live:
        return cls(
            ingest=lambda: snap.get("ingest"), downlink=lambda: snap.get("downlink"),
            broker_connected=lambda: snap.get("broker_connected"),
            upstream_connected=lambda: snap.get("upstream_connected"),
            credentials=lambda: snap.get("credentials"),
            commit_samples=[(str(n), dict(lab), float(v))
                            for n, lab, v in snap.get("commit_samples", ())],
        )


def _plain(m: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if m is None else dict(m)


def _gauge(name: str, doc: str, value: float | None) -> Iterable[Metric]:
    if value is not None:
        yield GaugeMetricFamily(name, doc, value=value)


def _by(name: str, doc: str, label: str, values: Mapping[str, float],
        every: Iterable[str] = ()) -> Metric:
    g = GaugeMetricFamily(name, doc, labels=[label])
    for key in sorted({*every, *values}):
        g.add_metric([key], float(values.get(key, 0)))
    return g


class Scrape(Collector):
    """One scrape: the store's gauges read on `conn` at `now`, and `live` when given."""

    def __init__(self, conn: sqlite3.Connection, live: Live | None = None,
                 now: float | None = None) -> None:
        self.conn = conn
        self.live = live
        self.now = time.time() if now is None else now

    def collect(self) -> Iterable[Metric]:
        conn, live, now = self.conn, self.live, self.now
        st = read_status(conn, now)
        detail = st.detail if st.running else {}
        yield from self._counters(live)
        if live is not None:
            yield from live.histograms()
        yield GaugeMetricFamily("torpor_gateway_running", "1 while the gateway service runs",
                                value=1.0 if (live is not None or st.running) else 0.0)

        yield _by("torpor_devices", "Devices by registry status", "status",
                  registry.counts(conn), registry.STATUSES)
        yield _by("torpor_downlink_items", "Downlink items by state", "state",
                  q.status_counts(conn), ("queued", "sent"))
        overdue, missed = wakes.overdue(conn, now, GRACE_S)
        yield GaugeMetricFamily("torpor_devices_overdue",
                                "Active devices past their expected wake", value=overdue)
        yield GaugeMetricFamily("torpor_missed_wakes",
                                "Wakes the overdue devices have missed so far", value=missed)
        low = registry.lowest_battery(conn)
        yield from _gauge("torpor_battery_lowest_volts",
                          "Lowest battery voltage among served devices (last HELLO)",
                          None if low is None else low / 1000.0)
        yield GaugeMetricFamily("torpor_alerts_open", "Alerts open", value=alerts.count_open(conn))
        camps, devs = ota.state_counts(conn)
        yield _by("torpor_ota_campaigns", "OTA campaigns by state", "state", camps,
                  (ota.RUNNING, ota.COMPLETED, ota.ABORTED, ota.CANCELLED))
        yield _by("torpor_ota_campaign_devices", "Devices of running OTA campaigns by state",
                  "state", devs)

        box = Outbox(conn)
        oldest = box.oldest()
        yield GaugeMetricFamily("torpor_outbox_items", "Items waiting for the upstream broker",
                                value=box.depth())
        yield GaugeMetricFamily("torpor_outbox_oldest_age_seconds",
                                "Age of the oldest item waiting upstream (0 when empty)",
                                value=0.0 if oldest is None else max(0.0, now - oldest))
        yield GaugeMetricFamily("torpor_dead_letters", "Dead letters stored",
                                value=deadletter.totals(conn)[0])

        broker = live.broker_connected() if live is not None else None
        if broker is None:
            broker = detail.get("mqtt_connected")
        yield GaugeMetricFamily("torpor_broker_up",
                                "1 while the gateway is connected to its MQTT broker",
                                value=_bool(broker) or 0.0)
        upstream = live.upstream_connected() if live is not None else None
        if upstream is None:
            upstream = detail.get("relay_connected")
        yield from _gauge("torpor_upstream_connected",
                          "1 while the relay is connected upstream (absent: no upstream)",
                          _bool(upstream))
        creds = live.credentials() if live is not None else None
        if not creds:
            creds = detail.get("credentials_days_left") or {}
        left = GaugeMetricFamily(
            "torpor_credential_expiry_seconds",
            "Time left before a credential lapses (a CRL: its next update); "
            "`device_soonest` is the device certificate that lapses first",
            labels=["credential"])
        for name in (*CREDENTIALS, "device_soonest"):
            days = creds.get(name)
            if isinstance(days, int | float):
                left.add_metric([name], float(days) * 86400.0)
        if left.samples:
            yield left

    def _counters(self, live: Live | None) -> Iterable[Metric]:
        if live is None:
            return
        for source, table in ((live.ingest(), INGEST_COUNTERS),
                              (live.downlink(), DOWNLINK_COUNTERS)):
            if source is None:
                continue
            for key, name, doc in table:
                yield CounterMetricFamily(name, doc, value=float(source.get(key, 0)))


def render(conn: sqlite3.Connection, live: Live | None = None, now: float | None = None) -> bytes:
    """The Prometheus text exposition of one scrape."""
    return generate_latest(Scrape(conn, live, now))
