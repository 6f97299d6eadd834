"""`torpor bench web`: the status page and /metrics under ingest load, and what polling
the page costs ingest, against a baseline from the same run.

Everything runs on loopback in a temporary folder, with the parts `torpor bench gateway`
uses (tools.bench.gateway, tools.bench.loadgen): a fleet PKI, Mosquitto with the gateway's
mutual-TLS configuration, a plain upstream Mosquitto, and `torpor gateway run` with its
relay and its web page on. Before the gateway starts, its database is filled through the
gateway's own modules with 10,000 devices (each with a HELLO, a wake plan and a day of
readings behind its battery sparkline) and a month of one-a-minute readings for two.

1. Ingest rate, in rounds alternating "no page" and "page open and polled once a
   second" (the fleet page fetched every second, its event stream held open): bursts from
   the load generator as fast as the gateway commits them and relays them upstream.
   `ingest_ratio_with_web` is the median "polled" rate over the median "no page" rate.
2. Page latency: first with no ingest at all (the baseline, for a third of the time),
   then while the load generator paces bursts at half the "no page" rate of step 1 (the
   gateway's benchmark rate in this run; `--page-fps` fixes it instead, so that runs on
   one machine compare; printed with the rate the gateway stored), one client
   fetches fleet pages (first page, a deep page, a filtered one), the month-holding
   devices' pages (30-day and 1-day range; one of them sending bursts all along, so that
   its charts are drawn again for nearly every view) and /metrics, one after the other,
   for a fixed time.

Both steps run once per web mode (`--web-mode`, by default both, on the same database and
machine, one after the other): the page served by the gateway's own process
(`in-process`, `[web] process = false`) and by its child process (`process`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.bench.gateway import (
    READINGS_PER_BURST,
    BenchError,
    Gateway,
    Mosquitto,
    Progress,
    _free_port,
    _gateway_round,
    _pct,
    _run_workers,
    _split,
    stop_run,
)
from tools.bench.gateway import Scale as GatewayScale
from tools.bench.loadgen import Identity, WorkerSpec

TARGETS = {
    "fleet_page_p99_ms": "< 200",
    "device_page_p99_ms": "< 300",
    "ingest_ratio_with_web": ">= 0.9",
}
DAY_S = 86400
# The page phase's ingest, in bursts of READINGS_PER_BURST a second (64,000 readings/s):
# about half of what the gateway ingests without the page on the shared 2-core reference
# machine (70,000-227,000 readings/s in eight runs), which every run sustained.
PAGE_FPS = 1000.0
WEB_MODES = {"in-process": False, "process": True}  # --web-mode -> [web] process


@dataclass(frozen=True, slots=True)
class Scale:
    devices: int = 10_000  # in the registry
    month_days: int = 30  # of one-a-minute readings for two devices
    sparkline_readings: int = 24  # per other device (a day at one an hour)
    load_devices: int = 200  # of them, sending through the load generator
    frames_per_device: int = 40  # per ingest round
    workers: int = 2
    rounds: int = 4  # "no page" / "polled" pairs
    latency_s: float = 60.0  # the latency phase
    request_gap_s: float = 0.05  # between one page request and the next
    phase_deadline_s: float = 120.0
    warmup: bool = True  # one ingest round first, not counted
    redraw_views: int = 10  # views timed for the redraw CPU figures, each way
    # Bursts a second offered during the page phase; None: half the run's "no page" rate.
    page_fps: float | None = None


QUICK = Scale(devices=500, month_days=3, sparkline_readings=4, load_devices=8,
              frames_per_device=6, workers=1, rounds=1, latency_s=3.0, phase_deadline_s=30.0,
              warmup=False, redraw_views=3, page_fps=20.0)
PAGE_SHARE = 0.5  # of the measured ingest rate, while the page latency is measured


# --- the database -------------------------------------------------------------------------

def fill(db_path: Path, names: list[str], load: set[str], months: list[str], scale: Scale,
         now: float) -> int:
    """Devices, HELLOs, wake plans and readings through the gateway's own modules; returns
    the readings stored. The load generator's devices get no readings here (their message
    ids start at 1 in the benchmark)."""
    import gateway.proto as p
    from gateway.pipeline import downlink
    from gateway.store import db, readings
    from gateway.store import devices as registry

    def hello(k: int) -> p.Hello:
        return p.Hello(1, 7, p.BootCause.TIMER, 3300 - k % 700, -55 - k % 30, 40_000, 0, 0, 300,
                       2000, int(now), p.DeviceClass.SENSOR)

    def burst(first: int, t0: int, n: int, step: int, k: int) -> p.Burst:
        ts = tuple(t0 + step * i for i in range(n))
        temp = tuple(2000 + (i * 37 + k) % 500 for i in range(n))
        hum = tuple(4000 + (i * 13 + k) % 1000 for i in range(n))
        batt = tuple(3300 - k % 700 - i // 100 for i in range(n))
        return p.Burst(first, p.SCHEMA_ENV3, step, p.Series(ts, (temp, hum, batt)))

    conn = db.open_db(db_path)
    stored = 0
    try:
        dl = downlink.Downlink()
        with db.transaction(conn):
            for name in names:
                registry.add(conn, name, "sensor", now=now - 2 * DAY_S)
            hellos = [(name, hello(k)) for k, name in enumerate(names)]
            registry.record_hellos(
                conn, [registry.hello_row(d, h, now - 60 - k % 240)
                       for k, (d, h) in enumerate(hellos)], now - 60)
            dl.plan(conn, hellos, now - 60)
        n = scale.sparkline_readings
        step = DAY_S // max(1, n)
        quiet = [name for name in names if name not in load and name not in months]
        for i in range(0, len(quiet), 1000):
            r = readings.commit_bursts(
                conn, [(d, burst(1, int(now) - DAY_S, n, step, k))
                       for k, d in enumerate(quiet[i:i + 1000], start=i)], now=now)
            stored += sum(a.stored for a in r.acks)
        per_burst = 60
        total = scale.month_days * 1440
        t0 = int(now) - scale.month_days * DAY_S
        for month_device in months:
            for i in range(0, total, 100 * per_burst):
                r = readings.commit_bursts(
                    conn, [(month_device, burst(1 + j, t0 + 60 * j, per_burst, 60, 0))
                           for j in range(i, min(total, i + 100 * per_burst), per_burst)],
                    now=now)
                stored += sum(a.stored for a in r.acks)
    finally:
        conn.close()
    return stored


def redraw_cpu(db_path: Path, device: str, views: int = 10) -> dict[str, float]:
    """CPU (this thread's time, so other jobs on the machine weigh little) of drawing the
    30-day charts of `device` right after it stored a burst of 60 readings: the way the page
    drew them before its charts were kept (every reading of the range averaged again,
    gateway.ops.fleet.device_readings, the baseline) and with the kept chart
    (gateway.ops.charts.ChartCache). Runs on a copy of the database."""
    import gateway.proto as p
    from gateway.ops import fleet as ofleet
    from gateway.ops.charts import ChartCache
    from gateway.store import db, readings

    copy = db_path.with_name("redraw-cpu.db")
    db.backup_to(db_path, copy)
    conn = db.open_db(copy)
    try:
        next_id = readings.stats(conn, device)[0] + 1
        kept = ChartCache()
        out: dict[str, float] = {}
        span = 30 * DAY_S
        def baseline(now: float) -> ofleet.ReadingsView:
            return ofleet.device_readings(conn, device, now - span, now)

        def kept_view(now: float) -> ofleet.ReadingsView:
            return kept.view(conn, device, now - span, now)

        draws: tuple[tuple[str, Callable[[float], ofleet.ReadingsView]], ...] = (
            ("device_30d_redraw_cpu_ms_baseline", baseline),
            ("device_30d_redraw_cpu_ms", kept_view))
        for name, draw in draws:
            draw(time.time())  # the kept chart reads the month once, on its first view
            took = []
            for _ in range(views):
                now = time.time()
                ts = tuple(int(now) - 60 + i for i in range(60))
                readings.commit_bursts(conn, [(device, p.Burst(
                    next_id, p.SCHEMA_ENV3, 1, p.Series(ts, ((2000,) * 60, (4000,) * 60,
                                                             (3300,) * 60))))], now=now)
                next_id += 60
                t = time.thread_time()
                draw(now)
                took.append(time.thread_time() - t)
            out[name] = round(statistics.median(took) * 1000, 2)
        return out
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            copy.with_name(copy.name + suffix).unlink(missing_ok=True)


# --- the page client ----------------------------------------------------------------------

class Poller:
    """'The page open': the fleet page fetched once a second and its event stream held
    open, from a thread of its own with its own event loop."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.stop = threading.Event()
        self.fetches = 0
        self.events = 0
        self.errors: list[str] = []
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> Poller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    async def _main(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as http:
            stream = asyncio.create_task(self._events(http))
            try:
                while not self.stop.is_set():
                    t = time.monotonic()
                    try:
                        async with http.get(self.base + "/") as r:
                            await r.read()
                            self.fetches += r.status == 200
                    except aiohttp.ClientError as exc:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t)))
            finally:
                stream.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await stream

    async def _events(self, http: Any) -> None:
        async with http.get(self.base + "/api/v1/events") as r:
            async for line in r.content:
                if line.startswith(b"event:"):
                    self.events += 1


PAGES = {
    "fleet": ("/", "/?offset=5000", "/?status=active&q=bench-07"),
    "device_30d": ("/devices/{month}?range=30d",),
    "device_30d_live": ("/devices/{live}?range=30d",),
    "device_1d": ("/devices/{month}",),
    "metrics": ("/metrics",),
}


async def sample_pages(base: str, month: str, live: str, duration_s: float, gap_s: float
                       ) -> dict[str, list[float]]:
    """Each page in turn, one request at a time, for `duration_s`: seconds per request."""
    import aiohttp

    out: dict[str, list[float]] = {k: [] for k in PAGES}
    turn = [(k, path.format(month=month, live=live)) for k, paths in PAGES.items()
            for path in paths]
    deadline = time.monotonic() + duration_s
    i = 0
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            kind, path = turn[i % len(turn)]
            i += 1
            t = time.perf_counter()
            async with http.get(base + path) as r:
                await r.read()
                if r.status != 200:
                    raise BenchError(f"GET {path}: HTTP {r.status}")
            out[kind].append(time.perf_counter() - t)
            await asyncio.sleep(gap_s)
    return out


# --- the benchmark ------------------------------------------------------------------------

def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 1)


def measure(scale: Scale = Scale(), workdir: Path | None = None,
            modes: tuple[str, ...] = tuple(WEB_MODES)) -> dict[str, Any]:
    """The figures common to the run, and under "modes" each web mode's, in `modes` order."""
    from gateway.security.pki import Pki

    owned = workdir is None
    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-web-")) if workdir is None else workdir
    fig: dict[str, Any] = {}
    broker: Mosquitto | None = None
    upstream: Mosquitto | None = None
    gw: Gateway | None = None
    try:
        t_setup = time.monotonic()
        pki = Pki(tmp / "pki")
        pki.init_ca()
        pki.issue_server(["localhost", "127.0.0.1"])
        pki.issue_gateway()
        width = max(4, len(str(scale.devices - 1)))
        names = [f"bench-{i:0{width}d}" for i in range(scale.devices)]
        load = names[:scale.load_devices]
        # Two devices hold a month: `month` sends nothing during the run (its page's charts
        # are drawn once, then served as drawn until it stores a reading); `live` is one of
        # the paced senders in the latency phase (a few bursts a second), so nearly every
        # view of its page averages its month again.
        month, live = names[-1], names[-2]
        idents = []
        for name in [*load, live]:
            creds = pki.issue_device(name)
            idents.append(Identity(name, str(creds.cert_pem), str(creds.key_pem)))
        broker = Mosquitto(tmp / "broker", pki)
        broker.start()
        upstream = Mosquitto(tmp / "upstream", None)
        upstream.start()
        gw = Gateway(tmp / "gateway", broker, upstream)
        gateway_toml = gw.config.read_text()
        web_port = _free_port()
        base_url = f"http://127.0.0.1:{web_port}"
        t_fill = time.monotonic()
        fig["readings_prefilled"] = fill(gw.db_path, names, set(load), [month, live], scale,
                                         time.time())
        live_ident = idents.pop()
        fig["fill_s"] = round(time.monotonic() - t_fill, 2)
        fig.update(redraw_cpu(gw.db_path, live, scale.redraw_views))
        fig["setup_s"] = round(time.monotonic() - t_setup, 2)
        fig["devices"] = scale.devices
        fig["month_device_readings"] = scale.month_days * 1440
        fig["load_devices"] = scale.load_devices
        fig["page_phase_rate"] = ("fixed" if scale.page_fps is not None
                                  else f"{PAGE_SHARE:g} of the no-page ingest rate")
        fig["modes"] = {}
        run = _Run(scale, tmp, pki, broker, base_url, month, live, idents, live_ident)
        for mode in modes:
            gw.config.write_text(
                gateway_toml + f'[web]\nenabled = true\nhost = "127.0.0.1"\nport = {web_port}\n'
                f'process = {"true" if WEB_MODES[mode] else "false"}\n')
            load_before = os.getloadavg()[0]
            gw.start()
            try:
                _wait_http(base_url + "/api/v1/health", 20.0)
                got = run.phases(gw)
            finally:
                gw.stop()
            got["load_average"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
            fig["modes"][mode] = got
    finally:
        stop_run(gw, (broker, upstream), tmp, owned)
    fig["cpus"] = os.cpu_count()
    fig["targets"] = TARGETS
    return fig


@dataclass
class _Run:
    """What the phases of every mode share; `next_id` carries each node's next message id
    from one round, phase and mode to the next (a resent id would be a duplicate)."""

    scale: Scale
    tmp: Path
    pki: Any
    broker: Mosquitto
    base_url: str
    month: str
    live: str
    idents: list[Identity]
    live_ident: Identity
    next_id: dict[str, int] = field(default_factory=dict)

    def phases(self, gw: Gateway) -> dict[str, Any]:
        scale, base_url, month, live, idents = (self.scale, self.base_url, self.month,
                                                self.live, self.idents)
        fig: dict[str, Any] = {}
        progress = Progress(gw.db_path)
        try:
            base = {"host": "127.0.0.1", "port": self.broker.port, "ca": str(self.pki.ca_pem),
                    "deadline_s": scale.phase_deadline_s}
            shares = _split(idents, scale.workers)
            gscale = GatewayScale(devices=scale.load_devices,
                                  frames_per_device=scale.frames_per_device,
                                  workers=scale.workers, phase_deadline_s=scale.phase_deadline_s)
            expected = scale.load_devices * scale.frames_per_device
            next_id = self.next_id
            # 1. ingest with and without the page polled, in alternating rounds.
            bare: list[float] = []
            polled: list[float] = []
            fetches = events = 0
            if scale.warmup:  # the first round pays for connections and cold caches
                _gateway_round(gscale, shares, base, progress, next_id, expected)
            for k in range(scale.rounds):
                # ABBA: which of the pair goes first alternates, so that whatever one round
                # leaves to the next (a checkpoint, a warm cache) weighs on both alike.
                for with_page in ((False, True) if k % 2 == 0 else (True, False)):
                    if not with_page:
                        r = _gateway_round(gscale, shares, base, progress, next_id, expected)
                        bare.append(r["ingest_fps"] * READINGS_PER_BURST)
                        continue
                    with Poller(base_url) as poller:
                        r = _gateway_round(gscale, shares, base, progress, next_id, expected)
                    polled.append(r["ingest_fps"] * READINGS_PER_BURST)
                    fetches += poller.fetches
                    events += poller.events
                    if poller.errors:
                        raise BenchError(f"the page poller failed: {poller.errors[0]}")
            rate = statistics.median(bare)
            fig["ingest_readings_per_s"] = round(rate)
            fig["ingest_readings_per_s_polled"] = round(statistics.median(polled))
            fig["ingest_ratio_with_web"] = round(statistics.median(polled) / rate, 3)
            fig["ingest_ratio_rounds"] = [round(p / b, 3) for b, p in zip(bare, polled, strict=True)]
            fig["poller_fetches"] = fetches
            fig["poller_events"] = events

            # The baseline: the same requests with no ingest at all, for a third as long.
            # (The month-holding devices store nothing here: their 30-day charts are drawn
            # once, so only the fleet page and /metrics are compared.)
            idle = asyncio.run(sample_pages(base_url, month, live, scale.latency_s / 3,
                                            scale.request_gap_s))
            for kind in ("fleet", "metrics"):
                fig[f"{kind}_idle_p50_ms"] = _ms(_pct(idle[kind], 0.5))
                fig[f"{kind}_idle_p99_ms"] = _ms(_pct(idle[kind], 0.99))
            fig["fleet_page_idle_p99_ms"] = fig.pop("fleet_idle_p99_ms")
            fig["fleet_page_idle_p50_ms"] = fig.pop("fleet_idle_p50_ms")

            # 2. page latency while ingest is offered at the run's fixed rate.
            paced_ids = (*idents, self.live_ident)
            next_id.setdefault(live, scale.month_days * 1440 + 1)
            page_fps = scale.page_fps if scale.page_fps is not None else max(
                1.0, PAGE_SHARE * rate / READINGS_PER_BURST)
            fig["page_phase_offered_frames_per_s"] = round(page_fps, 1)
            spec = WorkerSpec("paced", devices=paced_ids, rate=page_fps,
                              duration_s=scale.latency_s,
                              next_id={d.device: next_id.get(d.device, 1) for d in paced_ids},
                              **base)  # type: ignore[arg-type]
            before, _ = progress.read()
            (paced,), samples = _run_workers(
                [spec], scale.phase_deadline_s + scale.latency_s + 10,
                on_go=lambda: asyncio.run(sample_pages(base_url, month, live, scale.latency_s,
                                                       scale.request_gap_s)))
            after, _ = progress.read()
            next_id.update(paced["next_id"])
            # Over the load generator's sending window (its clock is this one's: monotonic),
            # not its connection set-up; `after` was read once its last answers came in.
            stored_per_s = (after - before) / max(1e-6, paced["t_end"] - paced["t_start"])
            fig["latency_stored_fraction"] = round(
                (after - before) / max(1, paced["frames"] * READINGS_PER_BURST), 3)
            fig["latency_offered_readings_per_s"] = round(page_fps * READINGS_PER_BURST)
            fig["latency_ingested_readings_per_s"] = round(stored_per_s)
            fig["latency_ingested_frames_per_s"] = round(stored_per_s / READINGS_PER_BURST, 1)
            fig["latency_sent_frames_per_s"] = round(
                paced["frames"] / max(1e-6, paced["t_end"] - paced["t_start"]), 1)
            fig["ack_p99_ms_during_pages"] = _ms(_pct(paced["ack_latency_s"], 0.99))
            for kind, values in samples.items():
                fig[f"{kind}_samples"] = len(values)
                fig[f"{kind}_p50_ms"] = _ms(_pct(values, 0.5))
                fig[f"{kind}_p99_ms"] = _ms(_pct(values, 0.99))
            fig["fleet_page_p99_ms"] = fig.pop("fleet_p99_ms")
            fig["fleet_page_p50_ms"] = fig.pop("fleet_p50_ms")
            # The device page's figure is its worst view: 30 days of a device that keeps
            # storing readings, so that its charts are drawn again for nearly every view.
            fig["device_page_p99_ms"] = fig["device_30d_live_p99_ms"]
            fig["device_page_p50_ms"] = fig["device_30d_live_p50_ms"]
        finally:
            progress.close()
        return fig


def _wait_http(url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"the web page did not answer at {url}")
        time.sleep(0.1)


# --- output -------------------------------------------------------------------------------

SECTIONS = (
    ("pages while ingest is offered at the fixed rate", (
        "fleet_page_p99_ms", "fleet_page_p50_ms", "fleet_samples", "device_page_p99_ms",
        "device_page_p50_ms", "device_30d_live_samples", "device_30d_p99_ms",
        "device_30d_p50_ms", "device_1d_p99_ms", "device_1d_p50_ms",
        "metrics_p99_ms", "metrics_p50_ms", "metrics_samples", "fleet_page_idle_p99_ms",
        "fleet_page_idle_p50_ms", "metrics_idle_p99_ms", "metrics_idle_p50_ms",
        "page_phase_offered_frames_per_s", "latency_offered_readings_per_s",
        "latency_sent_frames_per_s",
        "latency_ingested_frames_per_s", "latency_ingested_readings_per_s",
        "latency_stored_fraction",
        "ack_p99_ms_during_pages")),
    ("ingest with the page polled once a second", (
        "ingest_ratio_with_web", "ingest_ratio_rounds", "ingest_readings_per_s",
        "ingest_readings_per_s_polled", "poller_fetches", "poller_events")),
    ("run", ("load_average",)),
)
COMMON = ("page_phase_rate", "device_30d_redraw_cpu_ms",
          "device_30d_redraw_cpu_ms_baseline", "devices", "month_device_readings",
          "readings_prefilled", "load_devices", "cpus", "fill_s", "setup_s")


def table(fig: dict[str, Any]) -> str:
    modes = fig["modes"]
    lines = [f"  {'web mode':34}" + "".join(f"{m:>16}" for m in modes)]
    for title, keys in SECTIONS:
        lines.append(title)
        for key in keys:
            if any(key in got for got in modes.values()):
                lines.append(f"  {key:34}" + "".join(f"{got.get(key, '')!s:>16}"
                                                     for got in modes.values())
                             + f"  {fig['targets'].get(key, '')}")
    lines.append("the run")
    lines += [f"  {key:34} {fig[key]!s:>14}" for key in COMMON if key in fig]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    scale = QUICK if args.quick else Scale()
    if args.page_fps is not None:
        scale = dataclasses.replace(scale, page_fps=args.page_fps)
    modes = tuple(WEB_MODES) if args.web_mode == "both" else (args.web_mode,)
    if args.process_first:
        modes = tuple(reversed(modes))
    try:
        fig = measure(scale, modes=modes)
    except BenchError as exc:
        print(f"torpor: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(fig) if args.json else table(fig))
    return 0


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "web", help="status page and /metrics latency under ingest, and what the page costs ingest")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--quick", action="store_true",
                        help="a small fleet and short phases (seconds), for smoke tests")
    parser.add_argument("--web-mode", choices=[*WEB_MODES, "both"], default="both",
                        help="serve the page from the gateway's process, from its child "
                             "process ([web] process = true), or both in turn (default)")
    parser.add_argument("--process-first", action="store_true",
                        help="with both modes: the child process first")
    parser.add_argument("--page-fps", type=float, default=None,
                        help="bursts a second offered during the page phase, the same in every "
                             f"run (default: {PAGE_SHARE:g} of the run's ingest rate with no "
                             f"page; --quick {QUICK.page_fps:g}; {PAGE_FPS:g} is about half of "
                             "what the reference 2-core machine stores)")
    parser.set_defaults(func=run)
