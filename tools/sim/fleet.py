"""A fleet of simulated nodes in one asyncio process: provisioning, wakes, drain, figures.

Each node is a `SimNode` in `<dir>/<device id>/`; every wake is one `micropython` process
running the real firmware. The fleet provisions the nodes (certificates from the fleet PKI,
registration in the gateway's registry, config.json and DER files on each node's flash),
staggers their first wakes so they spread over a sampling period, runs a bounded number of
wakes, then lets every node that still holds readings wake once more with `send_every = 1`
("drain"). Figures come from the node logs (`R` and `T` lines, see docs/firmware.md), from
the process table (RSS of the running `micropython` processes) and from getrusage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.progress import ProgressLine
from tools.sim.field import (
    FieldModel,
    add_field_args,
    fields_from_args,
    parse_ledger,
    with_outage_share,
)
from tools.sim.node import (
    BOARDS_DIR,
    RunSummary,
    SimError,
    SimNode,
    micropython_binary,
    problem_text,
)

log = logging.getLogger(__name__)

R_LINE = re.compile(r"^R id=(\d+) ")
T_LINE = re.compile(r"^T (.*)$")
# A wake that ended in none of these is counted as an error (crash, hang, watchdog...).
CLEAN_KINDS = frozenset({"sleep", "power_cut"})
DRAIN_ROUNDS = 5
# Real seconds a node stays off after a power cut or waits after a crash before it boots.
OFF_AFTER_CUT_S = 0.5
RESTART_AFTER_ERROR_S = 1.0
# A wake in progress when the duration runs out is let finish, within this bound.
WAKE_LIMIT_S = 120.0
RSS_SAMPLE_S = 0.1
# Error lines a failed run lists (the most frequent first).
TOP_PROBLEMS = 5

# Runs inside the unix port: mounts each node's flash image in turn and writes files onto it
# (written new then renamed, as flashing tools do). The job list comes as a JSON file.
_FLASH_WRITER = """
import json, os, vfs, simflash
with open(%r) as f:
    jobs = json.load(f)
for img, bs, bc, files in jobs:
    bdev = simflash.mount(img, '/flash', bs, bc)
    try:
        os.mkdir('/flash/certs')
    except OSError:
        pass
    for name, src in files:
        with open(src, 'rb') as f:
            data = f.read()
        with open('/flash/' + name + '.new', 'wb') as f:
            f.write(data)
        os.rename('/flash/' + name + '.new', '/flash/' + name)
    vfs.umount('/flash')
    bdev.close()
print('OK %%d' %% len(jobs))
"""


class FleetError(SimError):
    """A fleet set-up problem the user can fix (no PKI, bad gateway address...)."""


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """What a fleet run does. `send_every` is a range: each node draws its own value."""

    nodes: int
    dir: Path
    pki_dir: Path
    broker_host: str = "127.0.0.1"
    broker_port: int = 8883
    server_hostname: str = ""  # default: "localhost" for a loopback host, else the host
    db_path: Path | None = None  # the gateway's database: register devices, check the store
    time_scale: float = 6.0
    wakes: int = 10
    duration_s: float = 600.0
    power_cuts: int = 0
    sample_interval_s: int = 60
    send_every: tuple[int, int] = (8, 16)
    awake_window_ms: int = 3000
    awake_budget_ms: int = 15000
    prefix: str = "sim"
    seed: int = 1
    max_concurrent: int = 0  # wakes running at once; 0: 8 per CPU
    start_ms: int | None = None  # virtual clock of the first node (default: now)
    fields: tuple[FieldModel, ...] = ()  # board profiles, dealt round the nodes (default ideal)

    def node_ids(self) -> list[str]:
        width = max(3, len(str(self.nodes)))
        return [f"{self.prefix}-{i:0{width}d}" for i in range(1, self.nodes + 1)]

    def hostname(self) -> str:
        return broker_hostname(self.broker_host, self.server_hostname)


def broker_hostname(host: str, server_hostname: str = "") -> str:
    """The name a node checks in the broker's certificate: localhost for a loopback host."""
    if server_hostname:
        return server_hostname
    if host in ("127.0.0.1", "::1", "localhost"):
        return "localhost"
    return host


@dataclass(slots=True)
class NodeState:
    """Bookkeeping of one node, updated from its log after every wake."""

    device_id: str
    node: SimNode
    send_every: int
    stagger_s: float
    awake: bool = False
    wakes: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    power_cuts: int = 0
    pending_cuts: int = 0
    sampled: set[int] = field(default_factory=set)
    sent: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    burst_bytes: int = 0
    heap_peak: int = 0
    depth: int = 0
    last_kind: str = ""
    send_failures: int = 0
    error_lines: int = 0
    log_offset: int = 0
    # Error lines and failed-send warnings of its wakes (level and time stripped): counts.
    problems: Counter[str] = field(default_factory=Counter)
    energy: dict[str, list[float]] = field(default_factory=dict)  # phase -> [ms, uAh] (L lines)

    @property
    def acked(self) -> int:
        # Readings leave the flash queue only on the gateway's ACK (no overflow here).
        return max(len(self.sampled) - self.depth, 0)

    @property
    def needs_drain(self) -> bool:
        return self.depth > 0 or self.last_kind not in ("sleep", "")


@dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot for a live display."""

    nodes: int
    awake: int
    wakes: int
    sampled: int
    sent: int
    acked: int
    queued: int
    power_cuts: int
    errors: int
    phase: str


@dataclass(frozen=True, slots=True)
class FleetSummary:
    nodes: int
    wakes: int
    power_cuts: int
    sampled: int
    sent: int
    acked: int
    left_on_nodes: int
    errors: int
    send_failures: int
    error_lines: int
    bytes_out: int
    bytes_in: int
    burst_bytes: int
    heap_alloc_max: int
    rss_kb_median: float | None
    rss_kb_max: float | None
    child_cpu_ms_per_wake: float | None
    self_cpu_ms_per_wake: float | None
    wall_s: float
    stored: int | None
    missing_in_store: int | None
    duplicates_in_store: int | None
    kinds: dict[str, int]
    # The most frequent error lines of the nodes' logs, with counts: why a run failed.
    problems: tuple[tuple[str, int], ...] = ()
    # The nodes' energy ledgers added up: phase -> {"ms": ..., "uah": ...}, and the total.
    energy_phases: dict[str, dict[str, float]] = field(default_factory=dict)
    energy_uah: float = 0.0

    @property
    def bytes_per_reading(self) -> float | None:
        return (self.bytes_out + self.bytes_in) / self.sent if self.sent else None

    @property
    def burst_bytes_per_reading(self) -> float | None:
        return self.burst_bytes / self.sent if self.sent and self.burst_bytes else None

    @property
    def ok(self) -> bool:
        """Every sampled reading left the nodes acknowledged, and (when the store was
        checked) is in the gateway's database exactly once."""
        if self.left_on_nodes or self.acked != self.sampled:
            return False
        return not self.missing_in_store and not self.duplicates_in_store

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {name: getattr(self, name) for name in self.__slots__}
        bpr = self.bytes_per_reading
        d["bytes_per_reading"] = None if bpr is None else round(bpr, 1)
        b = self.burst_bytes_per_reading
        d["burst_bytes_per_reading"] = None if b is None else round(b, 2)
        d["ok"] = self.ok
        return d


class _RssSampler:
    """Peak RSS (VmHWM) of our `micropython` children, sampled from /proc."""

    def __init__(self) -> None:
        self.peaks: dict[int, int] = {}
        self.available = Path("/proc/self/task").is_dir()

    def _children(self) -> list[int]:
        pids: list[int] = []
        try:
            for task in Path("/proc/self/task").iterdir():
                try:
                    pids += [int(p) for p in (task / "children").read_text().split()]
                except OSError:
                    continue
        except OSError:
            pass
        return pids

    def sample(self) -> None:
        for pid in self._children():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() != "micropython":
                    continue
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        kb = int(line.split()[1])
                        self.peaks[pid] = max(self.peaks.get(pid, 0), kb)
                        break
            except (OSError, ValueError):
                continue

    async def loop(self) -> None:
        while self.available:
            self.sample()
            await asyncio.sleep(RSS_SAMPLE_S)


def _cpu_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


class Fleet:
    """`Fleet(cfg)`; `provision()` once, then `await run()` gives a FleetSummary.

    `progress()` may be called at any time (e.g. once a second by a display); `stop()` asks
    the nodes to stop after their current wake (the drain still runs).
    """

    DEVICE_CLASS = "sensor"  # the class its devices are registered with

    def __init__(self, cfg: FleetConfig) -> None:
        if cfg.nodes < 1:
            raise FleetError("--nodes must be at least 1")
        if cfg.time_scale <= 0:
            raise FleetError("--time-scale must be > 0 for a fleet (wakes are spread in time)")
        if cfg.wakes < 1:
            raise FleetError("--wakes must be at least 1")
        lo, hi = cfg.send_every
        if not 1 <= lo <= hi:
            raise FleetError("send_every must be a range 1 <= low <= high")
        self.cfg = cfg
        self.binary = micropython_binary()
        self.rng = random.Random(cfg.seed)
        self.phase = "idle"
        self.states: list[NodeState] = []
        self._stop = asyncio.Event()
        self._drain_on_stop = True
        self._sem: asyncio.Semaphore | None = None
        start = cfg.start_ms if cfg.start_ms is not None else int(time.time() * 1000)
        period_real = cfg.sample_interval_s / cfg.time_scale
        for i, device_id in enumerate(cfg.node_ids()):
            stagger = period_real * i / cfg.nodes
            node = SimNode(
                cfg.dir / device_id,
                seed=cfg.seed * 100_003 + i + 1,
                time_scale=cfg.time_scale,
                # The virtual clocks keep the stagger, so node i starts i/N periods later.
                start_ms=start + int(stagger * cfg.time_scale * 1000),
                awake_limit_s=max(30.0, cfg.awake_budget_ms / 1000 * 4),
                field=cfg.fields[i % len(cfg.fields)] if cfg.fields else None,
            )
            self.states.append(NodeState(device_id, node, self.rng.randint(lo, hi), stagger))
        # Power cuts land on random nodes; each waits for a wake long enough to be cut.
        for _ in range(cfg.power_cuts):
            self.rng.choice(self.states).pending_cuts += 1

    # ---- provisioning -----------------------------------------------------------------

    def node_config(self, st: NodeState, **over: Any) -> dict[str, Any]:
        cfg = self.cfg
        doc: dict[str, Any] = {
            "device_id": st.device_id,
            "broker_host": cfg.broker_host,
            "broker_port": cfg.broker_port,
            "server_hostname": cfg.hostname(),
            "sample_interval_s": cfg.sample_interval_s,
            "send_every": st.send_every,
            "send_max_age_s": 86400,
            "awake_window_ms": cfg.awake_window_ms,
            "awake_budget_ms": cfg.awake_budget_ms,
            "align_s": 0,
        }
        doc.update(over)
        return doc

    def provision(self) -> None:
        """Certificates, registry entries and flash contents for every node (idempotent)."""
        creds = issue_credentials(self.cfg.pki_dir, [st.device_id for st in self.states])
        if self.cfg.db_path is not None:
            # Each node's board profile is its board: the gateway's energy model for it.
            boards = {st.device_id: st.node.field.profile.name for st in self.states
                      if st.node.field is not None}
            register_devices(self.cfg.db_path, {d: serial for d, (serial, _) in creds.items()},
                             self.DEVICE_CLASS, boards)
        self._write_configs([(st, creds[st.device_id][1]) for st in self.states])

    def _write_configs(
        self, jobs: list[tuple[NodeState, list[tuple[str, Path]]]], **over: Any
    ) -> None:
        write_node_flash(self.binary, self.cfg.dir,
                         [(st.node, self.node_config(st, **over), files) for st, files in jobs])

    # ---- running ------------------------------------------------------------------------

    def stop(self, *, drain: bool = True) -> None:
        """Start no new wake; with drain=False also skip the final sends."""
        self._drain_on_stop = drain
        self._stop.set()

    def progress(self) -> Progress:
        s = self.states
        return Progress(
            nodes=len(s),
            awake=sum(st.awake for st in s),
            wakes=sum(st.wakes for st in s),
            sampled=sum(len(st.sampled) for st in s),
            sent=sum(st.sent for st in s),
            acked=sum(st.acked for st in s),
            queued=sum(st.depth for st in s),
            power_cuts=sum(st.power_cuts for st in s),
            errors=sum(v for st in s for k, v in st.kinds.items() if k not in CLEAN_KINDS),
            phase=self.phase,
        )

    def sampled_ids(self) -> dict[str, set[int]]:
        """Per device, the ids of the readings the node logged as durable."""
        return {st.device_id: set(st.sampled) for st in self.states}

    def _read_log(self, st: NodeState) -> None:
        path = st.node.dir / "node.log"
        try:
            with open(path, "rb") as f:
                f.seek(st.log_offset)
                data = f.read()
        except OSError:
            return
        # Only whole lines; a partial last line is read next time.
        end = data.rfind(b"\n") + 1
        st.log_offset += end
        for raw in data[:end].decode("utf-8", "replace").splitlines():
            m = R_LINE.match(raw)
            if m:
                st.sampled.add(int(m.group(1)))
                continue
            m = T_LINE.match(raw)
            if m:
                try:
                    t = {k: int(v) for k, v in (kv.split("=", 1) for kv in m.group(1).split())}
                except ValueError:
                    continue
                st.sent += t.get("sent", 0)
                st.bytes_out += t.get("bytes_out", 0)
                st.bytes_in += t.get("bytes_in", 0)
                st.burst_bytes += t.get("burst_bytes", 0)
                st.depth = t.get("depth", st.depth)
            elif raw.startswith("M alloc="):
                with contextlib.suppress(ValueError):
                    st.heap_peak = max(st.heap_peak, int(raw.split()[1].partition("=")[2]))
            elif raw.startswith("W ") and "send failed" in raw:
                st.send_failures += 1
            elif raw.startswith("E "):
                st.error_lines += 1
            elif (book := parse_ledger(raw)) is not None:
                for ph, (ms, uah) in book.items():
                    e = st.energy.setdefault(ph, [0.0, 0.0])
                    e[0] += ms
                    e[1] += uah

    async def _wake(self, st: NodeState) -> RunSummary:
        assert self._sem is not None
        async with self._sem:
            st.awake = True
            try:
                cut = 1 if st.pending_cuts else 0
                summary = await st.node.run(
                    1, power_cuts=cut, cut_seed=self.rng.randrange(1 << 30),
                    wall_limit_s=WAKE_LIMIT_S,
                )
            finally:
                st.awake = False
        st.wakes += 1
        st.power_cuts += summary.power_cuts
        st.pending_cuts -= summary.power_cuts
        for rec in summary.runs:
            st.kinds[rec.kind] += 1
            st.last_kind = rec.kind
            st.problems.update(problem_text(x) for x in rec.problems)
        self._read_log(st)
        return summary

    async def _node_loop(self, st: NodeState, deadline: float) -> None:
        await self._pause(st.stagger_s, deadline)
        while st.wakes < self.cfg.wakes and not self._stop.is_set() and time.monotonic() < deadline:
            summary = await self._wake(st)
            rec = summary.runs[-1] if summary.runs else None
            if rec is not None and rec.kind == "sleep":
                wait = rec.sleep_ms / 1000.0 / self.cfg.time_scale
            elif rec is not None and rec.kind == "power_cut":
                wait = OFF_AFTER_CUT_S
            else:
                wait = RESTART_AFTER_ERROR_S
            if st.wakes >= self.cfg.wakes:
                break
            await self._pause(wait, deadline)

    async def _pause(self, seconds: float, deadline: float) -> None:
        left = deadline - time.monotonic()
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=max(min(seconds, left), 0.0))
        except TimeoutError:
            pass

    async def _drain(self) -> None:
        """Wake every node that may still hold readings, with send_every = 1, until empty."""
        for _round in range(DRAIN_ROUNDS):
            if self._stop.is_set() and not self._drain_on_stop:
                return
            todo = [st for st in self.states if st.needs_drain]
            if not todo:
                return
            await asyncio.to_thread(self._write_configs, [(st, []) for st in todo], send_every=1)
            # A cut still pending is dropped: the drain is there to empty the queues.
            for st in todo:
                st.pending_cuts = 0
            await asyncio.gather(*(self._wake(st) for st in todo))

    async def run(self, on_progress: Callable[[Progress], None] | None = None) -> FleetSummary:
        """Run the wakes (bounded by `wakes` and `duration_s`), then the drain."""
        cfg = self.cfg
        limit = cfg.max_concurrent or 8 * (os.cpu_count() or 1)
        self._sem = asyncio.Semaphore(limit)
        for st in self.states:
            self._read_log(st)  # skip what earlier runs of these node dirs logged
            st.sampled.clear()
            st.problems.clear()
            st.sent = st.bytes_out = st.bytes_in = st.send_failures = st.error_lines = 0
        sampler = _RssSampler()
        sampler_task = asyncio.create_task(sampler.loop())
        ticker: asyncio.Task[None] | None = None
        if on_progress is not None:
            ticker = asyncio.create_task(self._tick(on_progress))
        child0, self0, t0 = _cpu_s(resource.RUSAGE_CHILDREN), _cpu_s(resource.RUSAGE_SELF), time.monotonic()
        try:
            self.phase = "running"
            deadline = time.monotonic() + cfg.duration_s
            await asyncio.gather(*(self._node_loop(st, deadline) for st in self.states))
            if self._drain_on_stop or not self._stop.is_set():
                self.phase = "draining"
                await self._drain()
            self.phase = "done"
        finally:
            sampler_task.cancel()
            if ticker is not None:
                ticker.cancel()
            for task in (sampler_task, ticker):
                if task is not None:
                    try:
                        await task
                    except asyncio.CancelledError:
                        pass
        child_cpu = _cpu_s(resource.RUSAGE_CHILDREN) - child0
        self_cpu = _cpu_s(resource.RUSAGE_SELF) - self0
        wall = time.monotonic() - t0
        if on_progress is not None:
            on_progress(self.progress())
        return self._summary(sampler, child_cpu, self_cpu, wall)

    async def _tick(self, on_progress: Callable[[Progress], None]) -> None:
        while True:
            await asyncio.sleep(1.0)
            on_progress(self.progress())

    def _summary(self, sampler: _RssSampler, child_cpu: float, self_cpu: float,
                 wall: float) -> FleetSummary:
        s = self.states
        wakes = sum(st.wakes for st in s)
        kinds: Counter[str] = Counter()
        problems: Counter[str] = Counter()
        for st in s:
            kinds.update(st.kinds)
            problems.update(st.problems)
        peaks = list(sampler.peaks.values())
        stored = missing = dups = None
        if self.cfg.db_path is not None:
            stored, missing, dups = check_store(self.cfg.db_path, self.sampled_ids())
        return FleetSummary(
            nodes=len(s),
            wakes=wakes,
            power_cuts=sum(st.power_cuts for st in s),
            sampled=sum(len(st.sampled) for st in s),
            sent=sum(st.sent for st in s),
            acked=sum(st.acked for st in s),
            left_on_nodes=sum(st.depth for st in s),
            errors=sum(v for k, v in kinds.items() if k not in CLEAN_KINDS),
            send_failures=sum(st.send_failures for st in s),
            error_lines=sum(st.error_lines for st in s),
            bytes_out=sum(st.bytes_out for st in s),
            bytes_in=sum(st.bytes_in for st in s),
            burst_bytes=sum(st.burst_bytes for st in s),
            heap_alloc_max=max((st.heap_peak for st in s), default=0),
            rss_kb_median=statistics.median(peaks) if peaks else None,
            rss_kb_max=max(peaks) if peaks else None,
            child_cpu_ms_per_wake=round(child_cpu * 1000 / wakes, 1) if wakes else None,
            self_cpu_ms_per_wake=round(self_cpu * 1000 / wakes, 1) if wakes else None,
            wall_s=round(wall, 1),
            stored=stored,
            missing_in_store=missing,
            duplicates_in_store=dups,
            kinds=dict(kinds),
            problems=tuple(problems.most_common(TOP_PROBLEMS)),
            **_energy(s),
        )


def _energy(states: list[NodeState]) -> dict[str, Any]:
    phases: dict[str, dict[str, float]] = {}
    for st in states:
        for ph, (ms, uah) in st.energy.items():
            e = phases.setdefault(ph, {"ms": 0.0, "uah": 0.0})
            e["ms"] += ms
            e["uah"] += uah
    for e in phases.values():
        e["uah"] = round(e["uah"], 3)
    return {"energy_phases": phases, "energy_uah": round(sum(e["uah"] for e in phases.values()), 3)}


# ---- provisioning of sim nodes (the fleet's, and `torpor sim node`'s) -------------------

def issue_credentials(
    pki_dir: Path, device_ids: list[str]
) -> dict[str, tuple[str, list[tuple[str, Path]]]]:
    """Per device: its certificate serial (hex) and the DER files for its flash, issued by
    the fleet PKI, or reused when the device has a valid certificate already."""
    from gateway.errors import GatewayError
    from gateway.security.pki import Pki

    pki = Pki(pki_dir)
    if not pki.ca_pem.exists():
        raise FleetError(f"no fleet CA in {pki_dir} (create one with `torpor pki init`)")
    out: dict[str, tuple[str, list[tuple[str, Path]]]] = {}
    try:
        known = {r.cn for r in pki.list() if r.kind == "device" and r.revoked_at is None}
        for device_id in device_ids:
            if device_id in known:
                creds = pki.device_credentials(device_id)
            else:
                creds = pki.issue_device(device_id)
            out[device_id] = (format(creds.serial, "x"), [("certs/cert.der", creds.cert_der),
                                                          ("certs/key.der", creds.key_der),
                                                          ("certs/ca.der", creds.ca_der)])
    except GatewayError as exc:
        raise FleetError(str(exc)) from exc
    return out


def register_devices(db_path: Path, serials: dict[str, str], device_class: str,
                     boards: dict[str, str] | None = None) -> None:
    """Register the devices in the gateway's registry (those not there yet), and set the
    board (a profile name) of those `boards` names."""
    from gateway.errors import GatewayError
    from gateway.store import db
    from gateway.store import devices as registry

    try:
        conn = db.open_db(db_path)
    except GatewayError as exc:
        raise FleetError(str(exc)) from exc
    try:
        registry.add_missing(conn, serials, device_class, boards=boards)
    finally:
        conn.close()


def write_node_flash(
    binary: str, work_dir: Path, jobs: list[tuple[SimNode, dict[str, Any], list[tuple[str, Path]]]]
) -> None:
    """Write config.json (from the dict) and the given files onto each node's flash image."""
    with tempfile.TemporaryDirectory(prefix="fleet-", dir=work_dir) as tmp:
        spec = []
        for i, (node, config, files) in enumerate(jobs):
            cfg_path = Path(tmp) / f"{i}.json"
            cfg_path.write_text(json.dumps(config))
            m = node.model
            spec.append([str(node.dir / "flash.img"), m.block_size, m.block_count,
                         [["config.json", str(cfg_path)]] + [[n, str(p)] for n, p in files]])
        jobs_path = Path(tmp) / "jobs.json"
        jobs_path.write_text(json.dumps(spec))
        env = dict(os.environ, MICROPYPATH=f".frozen:{BOARDS_DIR}")
        try:
            proc = subprocess.run(
                [binary, "-c", _FLASH_WRITER % str(jobs_path)],
                capture_output=True, text=True, timeout=60 + len(spec), env=env,
            )
        except subprocess.TimeoutExpired as exc:
            raise FleetError("writing the nodes' flash timed out") from exc
        if proc.returncode != 0 or not proc.stdout.startswith("OK"):
            raise FleetError(f"writing the nodes' flash failed:\n{proc.stdout}{proc.stderr}")


def check_store(db_path: Path, sampled: dict[str, set[int]]) -> tuple[int, int, int]:
    """(readings of these devices in the gateway's store, sampled readings missing from it,
    extra copies of stored readings) — read-only, while the gateway may be running."""
    from gateway.store import readings

    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        stored = missing = dups = 0
        for device, ids in sampled.items():
            copies = Counter(r[1] for r in readings.iter_readings(conn, device))
            have = set(copies)
            stored += sum(copies.values())
            dups += sum(n - 1 for n in copies.values())
            missing += len(ids - have)
        return stored, missing, dups
    finally:
        conn.close()


# ---- `torpor sim fleet` ----------------------------------------------------------------

def register(actions: Any) -> None:
    p = actions.add_parser(
        "fleet",
        help="run N simulated nodes against a gateway, then drain them and report",
        description=(
            "Provision N sim nodes in DIR (certificates from the fleet PKI, config and DER files "
            "on each node's flash; registered in the gateway's registry with --gateway-config), "
            "run them concurrently for WAKES wakes or DURATION seconds, wake every node that "
            "still holds readings once more to send them, and print a summary. Exit code 0 "
            "when every sampled reading was acknowledged (and stored once, with "
            "--gateway-config), 1 otherwise."
        ),
    )
    p.add_argument("--nodes", type=int, default=20, help="number of nodes (default 20)")
    p.add_argument("--dir", required=True, help="fleet directory: one node directory per device")
    p.add_argument("--gateway-config", default=None,
                   help="the gateway's TOML: registers the devices in its database, checks the "
                        "store at the end, and gives defaults for --gateway and --pki")
    p.add_argument("--gateway", default=None,
                   help="the gateway broker as host:port (default: from --gateway-config)")
    p.add_argument("--pki", default=None, help="fleet PKI folder (default: from --gateway-config)")
    p.add_argument("--server-hostname", default="",
                   help="name checked against the broker certificate (default: localhost for "
                        "a loopback host, else the host)")
    p.add_argument("--time-scale", type=float, default=6.0,
                   help="divide slept time by this in real time (default 6)")
    p.add_argument("--wakes", type=int, default=10, help="wakes per node (default 10)")
    p.add_argument("--duration", type=float, default=600.0,
                   help="stop starting wakes after this many real seconds (default 600)")
    p.add_argument("--power-cuts", type=int, default=0,
                   help="power cuts to inject, spread over random nodes (default 0)")
    p.add_argument("--sample-interval", type=int, default=60, help="seconds (default 60)")
    p.add_argument("--send-every", default="8-16",
                   help="readings per send, one value or a range LOW-HIGH per node (default 8-16)")
    p.add_argument("--prefix", default="sim", help="device id prefix (default sim)")
    p.add_argument("--seed", type=int, default=1, help="fleet seed (default 1)")
    p.add_argument("--max-concurrent", type=int, default=0,
                   help="wakes running at once (default 8 per CPU)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_field_args(p, several=True)
    p.set_defaults(func=_fleet)


def _parse_send_every(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        a = int(lo)
        b = int(hi) if hi else a
    except ValueError:
        raise FleetError(f"--send-every {text!r}: expected N or LOW-HIGH") from None
    return a, b


@dataclass(frozen=True, slots=True)
class GatewayTarget:
    """Where sim nodes are provisioned: the broker they connect to, the fleet PKI, and the
    gateway's database (None: the devices are not registered)."""

    host: str
    port: int
    pki_dir: Path
    db_path: Path | None


def gateway_target(gateway_config: str | None, gateway: str | None, pki: str | None) -> GatewayTarget:
    """From --gateway-config, with --gateway host:port and --pki taking precedence."""
    from gateway.errors import GatewayError

    host: str | None = None
    port: int | None = None
    pki_dir: str | None = pki
    db_path: Path | None = None
    if gateway_config:
        from gateway.config import load_config

        try:
            gw = load_config(gateway_config)
        except GatewayError as exc:
            raise FleetError(str(exc)) from exc
        host, port, db_path = gw.broker.host, gw.broker.port, gw.db_path
        pki_dir = pki_dir or str(gw.pki_dir)
    if gateway:
        h, sep, p = gateway.rpartition(":")
        if not sep or not h or not p.isdigit():
            raise FleetError(f"--gateway {gateway!r}: expected host:port")
        host, port = h.strip("[]"), int(p)
    if host is None or port is None:
        raise FleetError("give --gateway host:port or --gateway-config")
    if pki_dir is None:
        raise FleetError("give --pki DIR or --gateway-config")
    return GatewayTarget(host, port, Path(pki_dir), db_path)


def fleet_config_from_args(args: argparse.Namespace) -> FleetConfig:
    target = gateway_target(args.gateway_config, args.gateway, args.pki)
    return FleetConfig(
        nodes=args.nodes, dir=Path(args.dir).resolve(), pki_dir=target.pki_dir,
        broker_host=target.host, broker_port=target.port, server_hostname=args.server_hostname,
        db_path=target.db_path, time_scale=args.time_scale, wakes=args.wakes,
        duration_s=args.duration, power_cuts=args.power_cuts,
        sample_interval_s=args.sample_interval, send_every=_parse_send_every(args.send_every),
        prefix=args.prefix, seed=args.seed, max_concurrent=args.max_concurrent,
        fields=tuple(_fields(args)),
    )


def _fields(args: argparse.Namespace) -> list[FieldModel]:
    from tools.sim.profiles import ProfileError

    try:
        # Outage windows count from the fleet's start (its virtual clock starts now).
        fields = fields_from_args(args, int(time.time() * 1000))
        return with_outage_share(fields, args.nodes, args.outage_share)
    except (ProfileError, ValueError) as exc:
        raise FleetError(str(exc)) from exc


def format_summary(s: FleetSummary) -> list[str]:
    def num(v: float | None, unit: str = "") -> str:
        return "-" if v is None else f"{v:g}{unit}"

    lines = [
        f"nodes                 {s.nodes}",
        f"wakes                 {s.wakes} ({', '.join(f'{k} {v}' for k, v in sorted(s.kinds.items()))})",
        f"power cuts            {s.power_cuts}",
        f"readings sampled      {s.sampled}",
        f"readings acked        {s.acked} (left on nodes: {s.left_on_nodes})",
        f"readings sent         {s.sent} (incl. resent)",
    ]
    if s.stored is not None:
        lines.append(f"stored at gateway     {s.stored} (missing {s.missing_in_store}, "
                     f"duplicated {s.duplicates_in_store})")
    bpr = s.bytes_per_reading
    lines += [
        f"errors                {s.errors} runs, {s.send_failures} failed sends, {s.error_lines} error lines",
        f"bytes on air          {s.bytes_out} out, {s.bytes_in} in"
        + (f" = {bpr:.1f} per reading (TLS included)" if bpr is not None else ""),
        f"burst frames          {num(None if s.burst_bytes_per_reading is None else round(s.burst_bytes_per_reading, 2))}"
        " bytes per reading",
        f"node heap per wake    at most {s.heap_alloc_max} bytes allocated (M lines)",
        f"process RSS (peak)    median {num(s.rss_kb_median, ' kB')}, max {num(s.rss_kb_max, ' kB')}",
        f"CPU per wake          micropython {num(s.child_cpu_ms_per_wake, ' ms')}, "
        f"simulator {num(s.self_cpu_ms_per_wake, ' ms')}",
        f"wall time             {s.wall_s:g} s",
    ]
    if s.energy_phases:
        split = ", ".join(f"{k} {v['uah']:g}" for k, v in s.energy_phases.items())
        lines.append(f"energy (ledgers)      {s.energy_uah:g} uAh: {split}")
    return lines


def format_problems(s: FleetSummary) -> list[str]:
    """Why a run failed: the most frequent error lines of the node logs."""
    if not s.problems:
        return []
    return ["most frequent errors in the node logs:",
            *(f"  {count:5}x  {text}" for text, count in s.problems)]


def failure_lines(s: FleetSummary) -> list[str]:
    """What went wrong, in words, for a run that is not ok."""
    out = []
    if s.acked != s.sampled or s.left_on_nodes:
        out.append(f"{s.sampled - s.acked} of {s.sampled} sampled readings were not acknowledged "
                   f"({s.left_on_nodes} left on the nodes)")
    if s.missing_in_store:
        out.append(f"{s.missing_in_store} readings missing in the gateway's store")
    if s.duplicates_in_store:
        out.append(f"{s.duplicates_in_store} readings stored more than once")
    return out + format_problems(s)


def _fleet(args: argparse.Namespace) -> int:
    from tools.cli import CliError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = fleet_config_from_args(args)
        cfg.dir.mkdir(parents=True, exist_ok=True)
        fleet = Fleet(cfg)
        fleet.provision()
    except SimError as exc:
        raise CliError(str(exc)) from exc
    if cfg.db_path is None:
        print("note: no --gateway-config: the devices must already be registered "
              "(`torpor device add`)", file=sys.stderr)
    total = cfg.nodes * cfg.wakes
    with ProgressLine("fleet", total, unit="wakes") as bar:

        def show(p: Progress) -> None:
            bar.update(min(p.wakes, total),
                       f"{p.phase}: awake {p.awake}/{p.nodes}  sampled {p.sampled}  "
                       f"acked {p.acked}  queued {p.queued}  cuts {p.power_cuts}  errors {p.errors}")

        summary = asyncio.run(fleet.run(show))
    if args.json:
        print(json.dumps(summary.as_dict()))
    else:
        print("\n".join(format_summary(summary)))
    if not summary.ok:
        print("torpor: error: the fleet run failed: " + "\n".join(failure_lines(summary)),
              file=sys.stderr)
    return 0 if summary.ok else 1
