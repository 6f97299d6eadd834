"""`torpor demo`: the whole stack end to end on this machine, bounded and self-stopping.

In a throwaway directory: a fleet PKI, an upstream Mosquitto (plain MQTT on loopback, the
stand-in for a site's cloud broker), the gateway (`torpor gateway run`: its own supervised
Mosquitto with mutual TLS, ingest into SQLite, relay upstream), a subscriber counting the
readings that arrive upstream, and a fleet of sim nodes running the real firmware in
compressed time. It ends with a summary and exits 1 if any sampled reading was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2

from gateway.transport.client import ClientOptions, MqttClient
from gateway.transport.errors import TransportError
from tools.progress import ProgressLine
from tools.sim.field import FieldModel, add_field_args, fields_from_args, with_outage_share
from tools.sim.fleet import Fleet, FleetConfig, FleetSummary, Progress, check_store, format_summary
from tools.sim.profiles import ProfileError

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
UPSTREAM_TOPIC = "torpor/+/readings"
FORMATS = ("json", "json-rows", "senml-json", "senml-cbor")


def work_dir(requested: Path | None, kind: str) -> Path:
    """The demo's directory: `requested` (created, and refused unless empty), else a new
    one under ./var/<kind>/ (or the system temp dir when ./var cannot be written)."""
    if requested is not None:
        path = requested.resolve()
        path.mkdir(parents=True, exist_ok=True)
        if any(path.iterdir()):
            raise DemoError(f"{path} is not empty; name a new directory")
        return path
    base = Path.cwd() / "var" / kind
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError:
        base = Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=base))


class DemoError(Exception):
    """The demo could not start (no mosquitto, a child died...)."""


DEMO_PROFILES = "esp32,esp32s3,esp32c3,pico_w,pico2_w"


@dataclass(frozen=True, slots=True)
class DemoOptions:
    nodes: int = 20
    wakes: int = 30
    duration_s: float = 120.0
    time_scale: float = 30.0
    sample_interval_s: int = 60
    send_every: tuple[int, int] = (8, 16)
    power_cuts: int = 0
    upstream_format: str = "json"
    dir: Path | None = None
    keep: bool = False
    live: bool = True
    fields: tuple[FieldModel, ...] = ()  # board profiles dealt round the nodes (() = ideal)


@dataclass(slots=True)
class Upstream:
    """What the upstream subscriber saw: per device, how often each reading arrived.

    JSON payloads carry the burst's first message id, so readings are keyed by id; SenML
    packs carry none, so readings are keyed by their time."""

    seen: dict[str, Counter[int]] = field(default_factory=dict)
    messages: int = 0
    undecodable: int = 0

    @property
    def unique(self) -> int:
        return sum(len(c) for c in self.seen.values())

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for c in self.seen.values() for n in c.values())

    def add(self, topic: str, payload: bytes, fmt: str) -> None:
        self.messages += 1
        try:
            device, keys = _decode(topic, payload, fmt)
        except (ValueError, KeyError, TypeError, IndexError, cbor2.CBORDecodeError):
            self.undecodable += 1
            return
        self.seen.setdefault(device, Counter()).update(keys)


def _decode(topic: str, payload: bytes, fmt: str) -> tuple[str, list[int]]:
    if fmt in ("json", "json-rows"):
        doc = json.loads(payload)
        first = int(doc["id"])
        count = len(doc["t"] if fmt == "json" else doc["readings"])
        return str(doc["device"]), [first + i for i in range(count)]
    pack = json.loads(payload) if fmt == "senml-json" else cbor2.loads(payload)
    bt_key, t_key = ("bt", "t") if fmt == "senml-json" else (-3, 6)
    device = topic.split("/")[1]
    base = 0
    times = set()
    for rec in pack:
        base = int(rec.get(bt_key, base))
        times.add(base + int(rec.get(t_key, 0)))
    return device, sorted(times)


@dataclass(frozen=True, slots=True)
class DemoResult:
    fleet: FleetSummary
    stored: int
    missing_in_store: int
    duplicates_in_store: int
    relayed: int
    lost_upstream: int
    duplicates_upstream: int
    outbox_depth: int
    interrupted: bool
    web_url: str = ""

    @property
    def ok(self) -> bool:
        return (not self.interrupted and self.fleet.sampled > 0
                and self.fleet.sampled == self.stored == self.relayed
                and self.missing_in_store == 0 and self.duplicates_in_store == 0
                and self.lost_upstream == 0)

    def as_dict(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in self.__slots__ if name != "fleet"}
        d["fleet"] = self.fleet.as_dict()
        d["sampled"] = self.fleet.sampled
        d["ok"] = self.ok
        return d


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_loopback_broker(
    folder: Path, spawn: Callable[[list[str], str], Awaitable[asyncio.subprocess.Process]],
    mosquitto: str, label: str, *, port: int | None = None, attempts: int = 5,
    persistence: bool = False,
) -> tuple[int, asyncio.subprocess.Process] | None:
    """A plain MQTT broker on loopback, the cloud broker's stand-in of the demo and the soak:
    its port and process once it accepts connections, or None when no attempt started (its
    log is folder/mosquitto.log). `port`: that port again (after a restart), else a free one.
    `persistence`: sessions and their queued messages survive a stop (in `folder`), as a
    cloud broker's do."""
    for _attempt in range(attempts):
        p = port or free_port()
        conf = folder / "mosquitto.conf"
        conf.write_text(
            f"# {label}: plain MQTT on loopback.\n"
            f"listener {p} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\n"
            + (f"persistence true\npersistence_location {folder}/\n" if persistence
               else "persistence false\n")
            + "max_queued_messages 100000\nlog_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )
        proc = await spawn([mosquitto, "-c", str(conf)], f"{folder.name}/mosquitto.log")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.returncode is None:
            try:
                _r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", p), 1)
                w.close()
                return p, proc
            except (OSError, TimeoutError):
                await asyncio.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if port:
            await asyncio.sleep(0.5)  # the port is still held: try it again
    return None


def _db_figures(db_path: Path) -> tuple[int, int]:
    """(readings stored, outbox depth), read-only while the gateway runs."""
    if not db_path.exists():
        return 0, 0
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        stored = int(conn.execute("SELECT coalesce(sum(total), 0) FROM dedup").fetchone()[0])
        try:
            depth = int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
        except sqlite3.OperationalError:
            depth = 0
        return stored, depth
    except sqlite3.OperationalError:
        return 0, 0
    finally:
        conn.close()


def _is_mosquitto(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "mosquitto"
    except OSError:
        return False


async def stop_children(procs: list[asyncio.subprocess.Process], broker_pid: int | None) -> None:
    """Stop what a run started, newest first (the gateway stops its own Mosquitto before the
    upstream broker goes); one that outlasts STOP_TIMEOUT_S is killed. A gateway that had to
    be killed leaves its broker behind: that one is ended by its pid."""
    for proc in reversed(procs):
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
    if broker_pid is not None and _is_mosquitto(broker_pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(broker_pid, signal.SIGTERM)


class Demo:
    def __init__(self, opts: DemoOptions) -> None:
        self.opts = opts
        self.dir = Path()
        self.created_dir = False
        self.procs: list[asyncio.subprocess.Process] = []
        self.upstream = Upstream()
        self.fleet: Fleet | None = None
        self.interrupted = False
        self.gw_db = Path()
        self.broker_pid: int | None = None
        self.web_url = ""
        self._bar: ProgressLine | None = None

    # ---- output ------------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def _show(self, p: Progress, figures: tuple[int, int] | None = None) -> None:
        if self._bar is None:
            return
        stored, depth = figures if figures is not None else _db_figures(self.gw_db)
        self._bar.update(
            min(p.wakes, self.opts.nodes * self.opts.wakes),
            f"{p.phase:8} | nodes awake {p.awake:3}/{p.nodes} asleep {p.nodes - p.awake:3} | "
            f"readings sampled {p.sampled} acked {p.acked} on nodes {p.queued} | "
            f"stored {stored} outbox {depth} relayed {self.upstream.unique}",
        )

    # ---- parts -------------------------------------------------------------------------

    def _make_dir(self) -> None:
        self.dir = work_dir(self.opts.dir, "demo")
        self.created_dir = True

    def _make_pki(self) -> Path:
        from gateway.security.pki import Pki

        pki = Pki(self.dir / "pki")
        pki.init_ca()
        pki.issue_server(["localhost", "127.0.0.1", "::1"])
        pki.issue_gateway()
        return pki.path

    async def _spawn(self, argv: list[str], log_name: str) -> asyncio.subprocess.Process:
        # Its own session: a Ctrl-C reaches the demo only, which then stops the gateway before
        # the upstream broker (its relay would otherwise see the broker vanish mid-session).
        with open(self.dir / log_name, "ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, cwd=self.dir,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    async def _start_upstream(self) -> int:
        from gateway.errors import BrokerError
        from gateway.transport.broker import find_mosquitto

        try:
            mosquitto = find_mosquitto()
        except BrokerError as exc:
            raise DemoError(str(exc)) from exc
        folder = self.dir / "upstream"
        folder.mkdir()
        started = await start_loopback_broker(folder, self._spawn, mosquitto,
                                              "The demo's upstream broker (a cloud broker stand-in)")
        if started is not None:
            return started[0]
        raise DemoError(f"the upstream mosquitto did not start (see {folder / 'mosquitto.log'})")

    def _gateway_config(self, pki_dir: Path, port: int, up_port: int, web_port: int) -> Path:
        path = self.dir / "gateway.toml"
        path.write_text(
            "# Generated by `torpor demo`.\n"
            "[gateway]\n"
            f'data_dir = "{self.dir / "gateway"}"\n'
            'log_level = "info"\n'
            "status_interval_s = 0.5\n"
            "[broker]\n"
            'mode = "supervised"\n'
            'host = "127.0.0.1"\n'
            f"port = {port}\n"
            f'pki_dir = "{pki_dir}"\n'
            "[upstream]\n"
            "enabled = true\n"
            'host = "127.0.0.1"\n'
            f"port = {up_port}\n"
            "tls = false\n"
            'client_id = "torpor-demo-relay"\n'
            f'format = "{self.opts.upstream_format}"\n'
            "# The status page, on this machine only (no login needed on loopback).\n"
            "[web]\n"
            "enabled = true\n"
            'host = "127.0.0.1"\n'
            f"port = {web_port}\n"
        )
        return path

    async def _start_gateway(self, config: Path) -> None:
        from gateway.store import db
        from gateway.store import status as status_store

        proc = await self._spawn(
            [sys.executable, "-m", "tools.cli", "gateway", "run", "--config", str(config)],
            "gateway.log",
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.2)
            if not self.gw_db.exists():
                continue
            try:
                conn = db.connect(self.gw_db, readonly=True)
                try:
                    st = status_store.read_status(conn)
                finally:
                    conn.close()
            except (sqlite3.Error, Exception):  # the schema may be mid-migration
                continue
            if st.running and st.detail.get("mqtt_connected") and st.detail.get("relay_connected"):
                pid = st.detail.get("broker_pid")
                self.broker_pid = int(pid) if isinstance(pid, int) else None
                return
        tail = (self.dir / "gateway.log").read_text(errors="replace")[-3000:]
        raise DemoError(f"the gateway did not come up within {READY_TIMEOUT_S:.0f} s:\n{tail}")

    async def _wait_web(self, port: int) -> str:
        """The status page's URL once it answers (the gateway starts it last)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                _r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
                w.close()
                return f"http://127.0.0.1:{port}/"
            except (OSError, TimeoutError):
                await asyncio.sleep(0.1)
        tail = (self.dir / "gateway.log").read_text(errors="replace")[-3000:]
        raise DemoError(f"the status page did not come up on port {port}:\n{tail}")

    async def _subscribe(self, port: int, ready: asyncio.Event) -> None:
        client = MqttClient(ClientOptions("127.0.0.1", port, "torpor-demo-upstream",
                                          max_packet=16 << 20))
        async with client:
            await client.subscribe((UPSTREAM_TOPIC, 1))
            ready.set()
            async for m in client.messages():
                self.upstream.add(m.topic, m.payload, self.opts.upstream_format)

    async def _settle(self, sampled: int) -> None:
        """Wait (bounded) until everything sampled is stored and relayed."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        json_ids = self.opts.upstream_format in ("json", "json-rows")
        while time.monotonic() < deadline:
            stored, depth = _db_figures(self.gw_db)
            if stored >= sampled and depth == 0:
                if json_ids and self.upstream.unique >= stored:
                    return
                if not json_ids:
                    # SenML has no ids to count against: an empty outbox means the upstream
                    # broker has acknowledged everything; give its delivery a moment.
                    await asyncio.sleep(1.0)
                    return
            await asyncio.sleep(0.2)

    async def _stop_children(self) -> None:
        await stop_children(self.procs, self.broker_pid)

    def _interrupt(self) -> None:
        self.interrupted = True
        if self.fleet is not None:
            self.fleet.stop(drain=False)

    # ---- the run -------------------------------------------------------------------------

    async def run(self) -> DemoResult | None:
        opts = self.opts
        self._make_dir()
        self.say(f"torpor demo: working in {self.dir}")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._interrupt)
        sub_task: asyncio.Task[None] | None = None
        try:
            pki_dir = self._make_pki()
            up_port = await self._start_upstream()
            ready = asyncio.Event()
            sub_task = asyncio.create_task(self._subscribe(up_port, ready))
            await asyncio.wait_for(ready.wait(), 10)
            gw_port = free_port()
            self.gw_db = self.dir / "gateway" / "gateway.db"
            web_port = free_port()
            await self._start_gateway(self._gateway_config(pki_dir, gw_port, up_port, web_port))
            self.web_url = await self._wait_web(web_port)
            self.say(f"gateway broker on 127.0.0.1:{gw_port} (mutual TLS), upstream broker on "
                     f"127.0.0.1:{up_port} ({opts.upstream_format}); logs in {self.dir}")
            self.say(f"status page: {self.web_url} (the fleet live while the demo runs)")
            if self.interrupted:
                return None
            cfg = FleetConfig(
                nodes=opts.nodes, dir=self.dir / "nodes", pki_dir=pki_dir,
                broker_host="127.0.0.1", broker_port=gw_port, db_path=self.gw_db,
                time_scale=opts.time_scale, wakes=opts.wakes, duration_s=opts.duration_s,
                power_cuts=opts.power_cuts, sample_interval_s=opts.sample_interval_s,
                send_every=opts.send_every, fields=opts.fields,
            )
            self.fleet = Fleet(cfg)
            await asyncio.to_thread(self.fleet.provision)
            self.say(f"{opts.nodes} nodes: sampling every {opts.sample_interval_s} s, sending every "
                     f"{opts.send_every[0]}-{opts.send_every[1]} readings, time x{opts.time_scale:g}, "
                     f"{opts.wakes} wakes each (at most {opts.duration_s:g} s), then a final send")
            if opts.live:
                self._bar = ProgressLine("demo", opts.nodes * opts.wakes, unit="wakes").start()
            try:
                summary = await self.fleet.run(self._show)
                if not self.interrupted:
                    await self._settle(summary.sampled)
                # The last status line shows the state the summary reports: after the settle.
                self.fleet.phase = "settled" if not self.interrupted else "stopped"
                final = _db_figures(self.gw_db)
                self._show(self.fleet.progress(), final)
            finally:
                if self._bar is not None:
                    self._bar.close()
                    self._bar = None
            stored, missing, dups = check_store(self.gw_db, self.fleet.sampled_ids())
            _stored_total, depth = final
            relayed, lost_up = self._upstream_check(self.fleet.sampled_ids())
            return DemoResult(
                fleet=summary, stored=stored, missing_in_store=missing, duplicates_in_store=dups,
                relayed=relayed, lost_upstream=lost_up,
                duplicates_upstream=self.upstream.duplicates, outbox_depth=depth,
                interrupted=self.interrupted, web_url=self.web_url,
            )
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            if sub_task is not None:
                sub_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, TransportError):
                    await sub_task
            await self._stop_children()
            if self.created_dir and not opts.keep:
                shutil.rmtree(self.dir, ignore_errors=True)
            elif self.created_dir:
                self.say(f"kept {self.dir}")

    def _upstream_check(self, sampled: dict[str, set[int]]) -> tuple[int, int]:
        """(readings relayed, readings lost upstream)."""
        if self.opts.upstream_format in ("json", "json-rows"):
            lost = sum(len(ids - set(self.upstream.seen.get(dev, {}))) for dev, ids in sampled.items())
            return self.upstream.unique, lost
        # SenML carries no message ids: every stored reading's (device, time) must have
        # arrived (two readings may share a time after a power cut, so count stored rows).
        from gateway.store import readings

        conn = sqlite3.connect(f"file:{self.gw_db}?mode=ro", uri=True, timeout=10)
        try:
            rows = [(r[0], r[2]) for r in readings.iter_readings(conn)]
        finally:
            conn.close()
        lost = sum(1 for dev, ts in rows if int(ts) not in self.upstream.seen.get(dev, {}))
        return len(rows) - lost, lost


def format_result(r: DemoResult) -> list[str]:
    lines = ["", "summary", *("  " + line for line in format_summary(r.fleet))]
    lines += [
        f"  relayed upstream      {r.relayed} distinct (lost {r.lost_upstream}, "
        f"duplicates {r.duplicates_upstream}), outbox depth {r.outbox_depth}",
    ]
    lost = r.fleet.sampled - min(r.stored, r.relayed)
    if r.ok:
        lines.append(f"OK: readings sampled {r.fleet.sampled} = stored {r.stored} = relayed "
                     f"{r.relayed}; 0 lost, 0 duplicated in the store")
    else:
        lines.append(f"FAILED: sampled {r.fleet.sampled}, stored {r.stored}, relayed {r.relayed} "
                     f"({max(lost, 0)} short)" + (" (interrupted)" if r.interrupted else ""))
    return lines


# ---- `torpor demo` ------------------------------------------------------------------------

def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole stack end to end: gateway, upstream broker and a simulated fleet",
        description=(
            "Start an upstream Mosquitto, the gateway (its own Mosquitto with mutual TLS, "
            "SQLite, relay upstream) and a fleet of sim nodes running the real firmware in "
            "compressed time, in a throwaway directory; show progress, stop after the given "
            "wakes, let the nodes send what they hold, and check that every sampled reading was "
            "stored once and relayed upstream. Exit code 0 on success, 1 if anything was lost."
        ),
    )
    p.add_argument("--nodes", type=int, default=20, help="simulated nodes (default 20)")
    p.add_argument("--wakes", type=int, default=30, help="wakes per node (default 30)")
    p.add_argument("--duration", type=float, default=120.0,
                   help="stop starting wakes after this many seconds (default 120)")
    p.add_argument("--time-scale", type=float, default=30.0,
                   help="simulated seconds per real second (default 30)")
    p.add_argument("--sample-interval", type=int, default=60,
                   help="the nodes' sampling interval in simulated seconds (default 60)")
    p.add_argument("--power-cuts", type=int, default=0,
                   help="power cuts injected at random moments of random wakes (default 0)")
    p.add_argument("--format", choices=FORMATS, default="json",
                   help="the gateway's upstream payload format (default json)")
    p.add_argument("--dir", default=None,
                   help="work in this (new or empty) directory instead of ./var/demo/<time>")
    p.add_argument("--keep", action="store_true", help="keep the directory (logs, DB, node flash)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no live progress")
    add_field_args(p, several=True)
    # The demo's fleet mixes every real board (see docs/board-profiles.md).
    p.set_defaults(func=_demo, board_profile=DEMO_PROFILES)


def _demo(args: argparse.Namespace) -> int:
    from tools.cli import CliError
    from tools.sim.node import SimError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        fields = with_outage_share(fields_from_args(args, int(time.time() * 1000)), args.nodes,
                                   args.outage_share)
    except (ProfileError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    opts = DemoOptions(
        fields=tuple(fields), nodes=args.nodes, wakes=args.wakes, duration_s=args.duration, time_scale=args.time_scale,
        sample_interval_s=args.sample_interval, power_cuts=args.power_cuts,
        upstream_format=args.format, dir=Path(args.dir) if args.dir else None, keep=args.keep,
        live=not args.quiet,
    )
    try:
        result = asyncio.run(Demo(opts).run())
    except (DemoError, SimError) as exc:
        raise CliError(str(exc)) from exc
    if result is None:
        print("torpor demo: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print("\n".join(format_result(result)))
    if result.interrupted:
        return 130
    return 0 if result.ok else 1
