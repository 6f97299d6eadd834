"""`torpor ota demo`: a signed, staged firmware campaign end to end on this machine.

In a throwaway directory: a signing key made for the run, two signed images of version 2
(the real app, and one whose app never reaches the gateway, so its trial is never confirmed),
the gateway (`torpor gateway run`, its own Mosquitto with mutual TLS), N sim nodes booting
through the real bootloader with v1 confirmed, and a campaign created with the real CLI
(`torpor ota campaign create`, first wave 25 %, one more device per confirmation). The nodes
are class `controller` (2 KB frames, about 16 KB per wake: an image of about 50 KB arrives
in four wakes; a sensor-class node takes about 50, docs/ota_store.md). Time is compressed to the
limit: a sleeping node is no process, its virtual clock jumps by the time it slept, and only
nodes with an update in flight are woken, round after round, until the campaign ends.
Exit code 0 when N-1 nodes confirmed v2 and the odd one reverted to v1 with reason
`health_check`, all running an image the bootloader verified; 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.demo import DemoError, _is_mosquitto, free_port, work_dir
from tools.progress import ProgressLine
from tools.sim.fleet import Fleet, FleetConfig, NodeState

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
WAKE_LIMIT_S = 60.0
MIN_NODES = 5  # the one revert must stay under the abort threshold once all have started
RATE = "25%"
ABORT_THRESHOLD = 25.0
# The odd image: it starts, never connects and sleeps, so it never confirms; the bootloader
# reverts it at the next boot (the trial's one boot is used up: reason health_check).
SILENT_MAIN = "import board\nprint('silent image up')\nboard.deep_sleep(60000)\n"
BOOT_LINE = re.compile(r"^boot: slot ([ab]) v(\d+) trial=(\d)", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class OtaDemoOptions:
    nodes: int = 20
    max_rounds: int = 80
    duration_s: float = 600.0
    dir: Path | None = None
    keep: bool = False
    live: bool = True


@dataclass(frozen=True, slots=True)
class NodeOutcome:
    device: str
    campaign_state: str
    reason: str
    expected_version: int
    running_version: int  # from the last "boot: slot X vN" line: what the bootloader started
    running_slot: str
    gateway_version: int  # fw_version of its last HELLO, in the registry

    @property
    def ok(self) -> bool:
        return self.running_version == self.expected_version == self.gateway_version


@dataclass(frozen=True, slots=True)
class OtaDemoResult:
    nodes: int
    campaign_status: str
    counts: dict[str, int]
    reverted: tuple[tuple[str, str], ...]  # (device, reason)
    outcomes: tuple[NodeOutcome, ...]
    rounds: int
    wakes: int
    wall_s: float
    interrupted: bool

    @property
    def verified(self) -> int:
        return sum(o.ok for o in self.outcomes)

    @property
    def ok(self) -> bool:
        n = self.nodes
        return (not self.interrupted and self.campaign_status == "completed"
                and self.counts == {"confirmed": n - 1, "reverted": 1}
                and len(self.reverted) == 1 and self.reverted[0][1] == "health_check"
                and self.verified == n)

    def as_dict(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes, "campaign_status": self.campaign_status,
            "counts": self.counts,
            "reverted": [{"device": d, "reason": r} for d, r in self.reverted],
            "verified_images": self.verified, "rounds": self.rounds, "wakes": self.wakes,
            "wall_s": self.wall_s, "interrupted": self.interrupted, "ok": self.ok,
            "devices": [{n: getattr(o, n) for n in o.__slots__} | {"ok": o.ok}
                        for o in self.outcomes],
        }


class _OtaFleet(Fleet):
    """The main demo's fleet, as controller-class nodes that wake for the campaign."""

    DEVICE_CLASS = "controller"

    def node_config(self, st: NodeState, **over: Any) -> dict[str, Any]:
        doc = {"sample_interval_s": 600, "send_every": 1, "align_s": 60, "awake_window_ms": 3000,
               "awake_budget_ms": 8000, "device_class": 3}
        doc.update(over)
        return super().node_config(st, **doc)


class OtaDemo:
    def __init__(self, opts: OtaDemoOptions) -> None:
        if opts.nodes < MIN_NODES:
            raise DemoError(f"--nodes must be at least {MIN_NODES} (one revert in {MIN_NODES} "
                            f"stays under the {ABORT_THRESHOLD:g}% abort threshold)")
        self.opts = opts
        self.dir = Path()
        self.created_dir = False
        self.gateway: subprocess.Popen[bytes] | None = None
        self.broker_pid: int | None = None
        self.interrupted = False
        self.wakes = 0
        self._bar: ProgressLine | None = None

    def say(self, text: str) -> None:
        if self.opts.live:
            print(text, file=sys.stderr, flush=True)

    # ---- parts -------------------------------------------------------------------------

    def _make_dir(self) -> None:
        self.dir = work_dir(self.opts.dir, "ota-demo")
        self.created_dir = self.opts.dir is None

    def _images(self) -> tuple[Path, Path, Path, bytes]:
        """(v1, v2, v2 that never confirms, public key), signed with a throwaway key."""
        from tools.fw import image, keys

        paths = keys.keygen(self.dir / "keys")
        key = keys.load_private(paths.private)
        out = []
        for version, main, tag in ((1, None, ""), (2, None, ""), (2, SILENT_MAIN, "-silent")):
            d = self.dir / "images" / f"v{version}{tag}"
            image.build_image("sim", version, d, display=f"{version}{tag}",
                              overrides={"main": main} if main else None)
            image.sign_image(d, key)
            out.append(d)
        self.pubkey_path = paths.public
        return out[0], out[1], out[2], keys.load_public(paths.public)

    def _config(self, pki_dir: Path, port: int) -> Path:
        path = self.dir / "gateway.toml"
        path.write_text(
            "# Generated by `torpor ota demo`.\n"
            f'[gateway]\ndata_dir = "{self.dir / "gateway"}"\nlog_level = "info"\n'
            "status_interval_s = 0.5\n"
            f'[broker]\nmode = "supervised"\nhost = "127.0.0.1"\nport = {port}\n'
            f'pki_dir = "{pki_dir}"\n'
            # Wakes come back to back in compressed time: no per-minute rate limit in the way.
            "[ingest]\nbatch_max_ms = 2\nrate_limit_frames_per_min = 100000\n"
            "[downlink]\nsweep_interval_s = 0.2\n"
        )
        return path

    def _start_gateway(self, config: Path, db_path: Path) -> None:
        from gateway.store import db
        from gateway.store import status as status_store

        with open(self.dir / "gateway.log", "ab") as out:
            self.gateway = subprocess.Popen(
                [sys.executable, "-m", "tools.cli", "gateway", "run", "--config", str(config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=ROOT)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and self.gateway.poll() is None:
            time.sleep(0.2)
            if not db_path.exists():
                continue
            try:
                conn = db.connect(db_path, readonly=True)
                try:
                    st = status_store.read_status(conn)
                finally:
                    conn.close()
            except Exception:  # the schema may be mid-migration
                continue
            if st.running and st.detail.get("mqtt_connected"):
                pid = st.detail.get("broker_pid")
                self.broker_pid = pid if isinstance(pid, int) else None
                return
        tail = (self.dir / "gateway.log").read_text(errors="replace")[-3000:]
        raise DemoError(f"the gateway did not come up within {READY_TIMEOUT_S:.0f} s:\n{tail}")

    def _stop_gateway(self) -> None:
        proc = self.gateway
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        pid = self.broker_pid
        if pid is not None and _is_mosquitto(pid):  # a killed gateway leaves its broker
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)

    def _cli(self, config: Path, *args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "tools.cli", *args, "--config", str(config)],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
        if proc.returncode != 0:
            raise DemoError(f"torpor {' '.join(args)} exited {proc.returncode}:\n"
                            f"{proc.stdout}{proc.stderr}")
        return proc.stdout

    # ---- the run -------------------------------------------------------------------------

    async def _wake(self, st: NodeState, sem: asyncio.Semaphore) -> None:
        async with sem:
            await st.node.run(1, wall_limit_s=WAKE_LIMIT_S)
        self.wakes += 1

    async def _round(self, states: list[NodeState]) -> None:
        sem = asyncio.Semaphore(2 * (os.cpu_count() or 1))
        await asyncio.gather(*(self._wake(st, sem) for st in states))

    def _campaign(self, db_path: Path, cid: int) -> Any:
        from gateway.store import db, ota_store

        conn = db.connect(db_path, readonly=True)
        try:
            return ota_store.get_campaign(conn, cid)
        finally:
            conn.close()

    def _progress(self, rnd: int, c: Any) -> None:
        from gateway.store import ota_store

        counts = c.counts()
        order = ("pending", "queued", "downloading", "verifying", "trial", "confirmed",
                 "reverted", "failed", "refused", "timed_out", "cancelled")
        text = ", ".join(f"{k} {counts[k]}" for k in order if counts.get(k))
        if self._bar is not None:
            settled = sum(counts.get(k, 0) for k in ota_store.TERMINAL)
            self._bar.update(settled, f"round {rnd}: campaign {c.status}: {text} (wakes {self.wakes})")

    async def run(self) -> OtaDemoResult | None:
        from gateway.security.pki import Pki
        from tools.fw import image

        opts = self.opts
        t0 = time.monotonic()
        self._make_dir()
        self.say(f"torpor ota demo: working in {self.dir}")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._interrupt)
        try:
            v1, v2, silent, public = await asyncio.to_thread(self._images)
            self.say("images: v1, v2 and v2-silent (never reaches the gateway), signed with a "
                     "throwaway key")
            pki = Pki(self.dir / "pki")
            pki.init_ca()
            pki.issue_server(["localhost", "127.0.0.1", "::1"])
            pki.issue_gateway()
            port = free_port()
            db_path = self.dir / "gateway" / "gateway.db"
            config = self._config(pki.path, port)
            await asyncio.to_thread(self._start_gateway, config, db_path)
            self.say(f"gateway up, its broker on 127.0.0.1:{port} (mutual TLS)")
            fleet = _OtaFleet(FleetConfig(
                nodes=opts.nodes, dir=self.dir / "nodes", pki_dir=pki.path, broker_port=port,
                db_path=db_path, time_scale=1.0, prefix="ota"))
            await asyncio.to_thread(fleet.provision)
            states = fleet.states
            for st in states:
                # Compressed to the limit: a sleeping node is no process; its clock jumps.
                st.node.time_scale = 0
                st.node.entry = "boot"
            await asyncio.gather(*(asyncio.to_thread(image.install_sim, st.node.dir, v1,
                                                     public_key=public) for st in states))
            self.say(f"{opts.nodes} sim nodes provisioned, v1 confirmed in slot a; first wake")
            await self._round(states)  # registered, seen on v1
            bad = states[-1].device_id
            out = await asyncio.to_thread(
                self._cli, config, "ota", "campaign", "create", "--image", str(v2),
                "--devices", ",".join(st.device_id for st in states), "--rate", RATE,
                "--abort-threshold", f"{ABORT_THRESHOLD:g}", "--timeout", "1h",
                "--pubkey", str(self.pubkey_path), "--override", f"{bad}={silent}")
            cid = int(out.split()[1].rstrip(":"))
            self.say(out.strip() + f"; {bad} gets v2-silent")
            from gateway.store import ota_store

            by_id = {st.device_id: st for st in states}
            deadline = t0 + opts.duration_s
            rnd = 0
            c = self._campaign(db_path, cid)
            if opts.live:
                # Every round, not once a second: a round is the unit of this demo.
                self._bar = ProgressLine("ota", opts.nodes, unit="devices settled",
                                         interval_s=0).start()
            self._progress(rnd, c)
            while (c.status == ota_store.RUNNING and rnd < opts.max_rounds
                   and time.monotonic() < deadline and not self.interrupted):
                rnd += 1
                # Devices with an update in flight wake; the rest sleep on.
                todo = [by_id[d.device] for d in c.devices if d.status in ota_store.IN_FLIGHT]
                if not todo:
                    todo = states
                await self._round(todo)
                c = self._campaign(db_path, cid)
                self._progress(rnd, c)
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            if not self.interrupted:
                await self._round(states)  # every node says which image it runs
            return self._result(db_path, cid, states, bad, rnd, time.monotonic() - t0)
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await asyncio.to_thread(self._stop_gateway)
            if self.created_dir and not opts.keep:
                shutil.rmtree(self.dir, ignore_errors=True)
            elif self.created_dir:
                self.say(f"kept {self.dir}")

    def _interrupt(self) -> None:
        self.interrupted = True

    def _result(self, db_path: Path, cid: int, states: list[NodeState], bad: str, rounds: int,
                wall: float) -> OtaDemoResult:
        c = self._campaign(db_path, cid)
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
        try:
            fw = {str(d): int(v or 0) for d, v in conn.execute("SELECT id, fw_version FROM devices")}
        finally:
            conn.close()
        status = {d.device: d for d in c.devices}
        outcomes = []
        for st in states:
            text = (st.node.dir / "node.log").read_text(errors="replace") \
                if (st.node.dir / "node.log").exists() else ""
            boots = BOOT_LINE.findall(text)
            slot, ver = (boots[-1][0], int(boots[-1][1])) if boots else ("", 0)
            d = status[st.device_id]
            outcomes.append(NodeOutcome(st.device_id, d.status, d.reason,
                                        1 if st.device_id == bad else 2, ver, slot,
                                        fw.get(st.device_id, 0)))
        return OtaDemoResult(
            nodes=len(states), campaign_status=c.status, counts=c.counts(),
            reverted=tuple((d.device, d.reason) for d in c.devices if d.status == "reverted"),
            outcomes=tuple(outcomes), rounds=rounds, wakes=self.wakes, wall_s=round(wall, 1),
            interrupted=self.interrupted)


def format_result(r: OtaDemoResult) -> list[str]:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(r.counts.items()))
    lines = ["", "summary",
             f"  campaign              {r.campaign_status} ({counts})"]
    for device, reason in r.reverted:
        lines.append(f"  reverted              {device}: {reason}")
    lines += [
        f"  verified images       {r.verified}/{r.nodes} nodes run the image the campaign "
        "says (bootloader-checked, reported to the gateway)",
        f"  rounds, wakes         {r.rounds} rounds, {r.wakes} wakes",
        f"  wall time             {r.wall_s:g} s",
    ]
    for o in r.outcomes:
        if not o.ok:
            lines.append(f"  MISMATCH {o.device}: expected v{o.expected_version}, boots "
                         f"v{o.running_version} (slot {o.running_slot or '-'}), gateway has "
                         f"v{o.gateway_version}")
    if r.ok:
        lines.append(f"OK: {r.nodes - 1} confirmed v2, 1 reverted to v1 (health_check), "
                     f"{r.nodes} of {r.nodes} on a verified image")
    else:
        lines.append("FAILED: the outcome differs from the expected one"
                     + (" (interrupted)" if r.interrupted else ""))
    return lines


# ---- `torpor ota demo` (its arguments are in gateway/cli/ota.py) --------------------------

def main(args: argparse.Namespace) -> int:
    from tools.fw.image import ImageError
    from tools.sim.node import SimError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    opts = OtaDemoOptions(nodes=args.nodes, max_rounds=args.max_rounds,
                          duration_s=args.duration, dir=Path(args.dir) if args.dir else None,
                          keep=args.keep, live=not args.quiet)
    try:
        result = asyncio.run(OtaDemo(opts).run())
    except (DemoError, SimError, ImageError) as exc:
        # Printed here rather than raised as CliError: under `python -m tools.cli` that
        # class exists twice (__main__ and tools.cli).
        print(f"torpor: error: {exc}", file=sys.stderr)
        return 2
    if result is None:
        return 130
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print("\n".join(format_result(result)))
    if result.interrupted:
        return 130
    return 0 if result.ok else 1


def register(ota_sub: Any) -> None:
    """`torpor ota demo`, under the gateway's `torpor ota`."""
    p = ota_sub.add_parser(
        "demo", help="a signed, staged campaign to sim nodes through the real gateway",
        description="Build and sign v1 and v2 images with a throwaway key, start the gateway "
        "with its Mosquitto, provision sim nodes booting through the bootloader on v1, roll v2 "
        "out (first wave 25%, one more per confirmation; the last node gets a v2 that never "
        "reaches the gateway and is reverted) and check the outcome. Exit code 0 when it is "
        "the expected one, 1 when not, 2 when the demo cannot run.")
    p.add_argument("--nodes", type=int, default=20, help="simulated nodes (default 20, at least 5)")
    p.add_argument("--max-rounds", type=int, default=80,
                   help="stop after this many wake rounds (default 80)")
    p.add_argument("--duration", type=float, default=600.0,
                   help="stop after this many seconds (default 600)")
    p.add_argument("--dir", default=None,
                   help="work in this (new or empty) directory instead of ./var/ota-demo/<time>")
    p.add_argument("--keep", action="store_true", help="keep the directory (logs, DB, flash)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=main)
