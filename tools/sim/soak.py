"""`torpor soak`: years of a fleet's credentials, time-compressed, with no one touching it.

The field run's stack (tools/sim/fieldrun.py: the real gateway with its own Mosquitto under
mutual TLS, sim nodes running the real firmware on board profiles, one field clock) lives
YEARS of virtual time with short credentials (1-year device certificates, a 90-day CRL)
through scripted disruptions: gateway kill -9 and restarts, broker kills, an upstream
outage, a device revoked halfway, a trusted firmware key rotation with an OTA campaign
signed by the new key. Renewals and device key rotations must happen on their own.

One clock for every part that checks a certificate. The soak owns the field's clock: a file
holding the offset from the host's clock, moved forward at the time scale and never back.
The gateway, the Mosquitto it supervises, the sim nodes' MicroPython processes and every
`torpor` command the soak runs are under libfaketime (LD_PRELOAD; Debian package
`faketime`) reading that file, so OpenSSL in Mosquitto checks client certificates and the
CRL's nextUpdate, Python's ssl in the gateway and mbedTLS in the nodes check the broker's
certificate, all at the field's time. A credential nobody renews really expires:
`--no-renew` (the negative control) shows the refusals.

Verdict (docs/soak.md): no reading lost or duplicated in the gateway's store nor upstream;
no connection refused for an expired credential; every device certificate (but the revoked
device's) rotated at least twice; the CRL renewed at least 10 times; no operator action
after setup; the revoked device stays out; the trusted key rotation done: every served
node holds the new key list and confirmed the image signed by the new key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.demo import Upstream
from tools.sim.field import FieldModel, compile_firmware
from tools.sim.fieldrun import DAY_MS, FieldFleet, FieldRunError, _Events
from tools.sim.fleet import FleetConfig, FleetSummary
from tools.sim.node import FIRMWARE_DIR, SimError

log = logging.getLogger(__name__)

YEAR_DAYS = 365.0
READY_TIMEOUT_S = 60.0
PROFILES = ("esp32", "esp32s3", "esp32c3", "pico_w", "pico2_w")
BATTERY_MAH = 1_000_000
# The trusted key rotation: the served nodes have this share of the span left after the
# step to report the new key list (a send every N wakes); the campaign gets the rest.
KEY_LIST_SHARE = 0.4
# Where Debian and others put libfaketime (the multiarch folder varies).
FAKETIME_GLOBS = (
    "/usr/lib/*/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
    "/usr/local/lib/faketime/libfaketime.so.1",
    "/usr/lib64/faketime/libfaketime.so.1",
)
# What a TLS peer says when a certificate or CRL is out of its validity: Mosquitto's log
# (OpenSSL's verify errors and alerts) and the nodes' (mbedTLS's messages).
EXPIRY_PATTERNS = re.compile(
    r"certificate has expired|CRL has expired|certificate expired|crl expired|"
    r"validity has expired|certificate is not yet valid|CRL is not yet valid|"
    r"validity starts in the future",
    re.IGNORECASE,
)


class SoakError(SimError):
    """The soak could not start (no libfaketime, no mosquitto, the gateway did not come up)."""


class SoakStepError(Exception):
    """A part of a scripted step failed; the verdict names it."""


def find_libfaketime() -> str:
    env = os.environ.get("TORPOR_LIBFAKETIME")
    if env and Path(env).is_file():
        return env
    for pattern in FAKETIME_GLOBS:
        for path in sorted(glob.glob(pattern)):
            return path
    raise SoakError(
        "torpor soak needs libfaketime so that Mosquitto's and the nodes' TLS check "
        "certificates at the field's time: install the Debian package `faketime` "
        "(apt-get install faketime; `make test` does), or set TORPOR_LIBFAKETIME to "
        "libfaketime.so.1")


def faketime_env(lib: str, clock_file: Path) -> dict[str, str]:
    """The environment that puts a process on the field's time: the offset in the clock
    file, read again at every call. Monotonic clocks stay the host's (timeouts, asyncio's
    timers, the sim's pacing), and so do waits on them: libfaketime's fix for condition
    variables on the monotonic clock (FAKETIME_FORCE_MONOTONIC_FIX) re-reads the clock file in
    a loop while a thread waits, and kept an idle gateway at 40-50% of a core (1% without
    it), which was most of the soak's CPU per wake."""
    return {"LD_PRELOAD": lib, "FAKETIME_TIMESTAMP_FILE": str(clock_file),
            "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_FORCE_MONOTONIC_FIX": "0"}


def format_offset(offset_ms: float) -> str:
    """An offset in libfaketime's relative form: seconds with a sign and a fraction."""
    ms = int(offset_ms)
    return f"{'-' if ms < 0 else '+'}{abs(ms) // 1000}.{abs(ms) % 1000:03d}"


class FieldClock:
    """The field's time: the host's clock at the start, then `scale` times faster while
    running, at the host's pace while paused; never more than `cap()` (the fleet's
    progress: a slow host slows the field down instead of letting credentials lapse
    between two looks at them), never moved back. A thread of its own publishes it to the
    file libfaketime reads, so a busy event loop cannot hold it still and then jump."""

    def __init__(self, path: Path, scale: float) -> None:
        self.path = path
        self.scale = scale
        self.running = False
        self.cap: Callable[[], float] | None = None
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._anchor_mono = time.monotonic()
        self._anchor_ms = time.time() * 1000.0
        self._offset_ms = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.publish()

    def _raw(self) -> float:
        rate = self.scale if self.running else 1.0
        return self._anchor_ms + (time.monotonic() - self._anchor_mono) * 1000.0 * rate

    def now_ms(self) -> float:
        with self._lock:
            t = self._raw()
            cap = self.cap() if self.cap is not None and self.running else None
            if cap is not None and t > cap:
                # Held at the cap: run on from there once the fleet catches up.
                t = max(cap, self._anchor_ms)
                self._anchor_ms, self._anchor_mono = t, time.monotonic()
            return t

    def _set_running(self, running: bool) -> None:
        t = self.now_ms()
        with self._lock:
            self._anchor_ms, self._anchor_mono = t, time.monotonic()
            self.running = running

    def run(self) -> None:
        self._set_running(True)

    def pause(self) -> None:
        self._set_running(False)
        self.publish()

    def publish(self) -> None:
        t = self.now_ms()
        with self._write_lock:
            host = time.time() * 1000.0
            self._offset_ms = max(t, host + self._offset_ms) - host
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(format_offset(self._offset_ms) + "\n")
            os.replace(tmp, self.path)

    def start(self, period_s: float = 0.01) -> None:
        def loop() -> None:
            while not self._stop.wait(period_s):
                with contextlib.suppress(OSError):
                    self.publish()

        self._thread = threading.Thread(target=loop, name="field-clock", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class SoakFleet(FieldFleet):
    """A field fleet paced by the field's clock (which pauses while an operator-style
    command runs)."""

    def __init__(self, cfg: FleetConfig, end_ms: int, clock: FieldClock) -> None:
        super().__init__(cfg, end_ms, {d: _Events() for d in cfg.node_ids()})
        self.clock = clock

    def reference_ms(self) -> float:
        return self.clock.now_ms()


@dataclass(frozen=True, slots=True)
class SoakOptions:
    years: float = 3.0
    nodes: int = 10
    sample_interval_s: int = 86400  # the protocol's longest (shared/protocol, config bounds)
    send_every: tuple[int, int] = (7, 7)
    wall_target_s: float = 600.0  # the time scale is chosen so that the span takes this long
    wall_limit_s: float = 840.0  # no wake starts after this
    awake_scale: float = 20.0
    device_days: float = 365.0
    crl_days: float = 90.0
    crl_renew_at: float = 0.5
    rotate_lead_days: float = 60.0
    check_interval_s: float = 0.25  # real seconds between the gateway's lifetime checks
    renew: bool = True  # False: the negative control (no CRL, server or device renewal)
    gateway_kills: int = 2
    broker_kills: int = 2
    # Starts at this share of the span and lasts these days: within the outbox's week.
    upstream_outage: tuple[float, float] | None = (0.40, 3.0)
    revoke_at: float | None = 0.5
    key_rotation_at: float | None = 0.6
    probe_period_s: float = 1.0  # real seconds between checks of every credential's validity
    profiles: tuple[str, ...] = PROFILES  # board profiles dealt round the nodes
    min_rotations: int = 2
    min_crl_renewals: int = 10
    seed: int = 1
    dir: Path | None = None
    keep: bool = False
    live: bool = True

    @property
    def days(self) -> float:
        return self.years * YEAR_DAYS

    @property
    def time_scale(self) -> float:
        return self.days * 86400.0 / self.wall_target_s


@dataclass(slots=True)
class Scripted:
    """One of the soak's own disruptions, as it happened."""

    kind: str
    at_day: float
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "at_day": round(self.at_day, 2), "detail": self.detail}


@dataclass(slots=True)
class SoakVerdict:
    ok: bool
    complete: bool
    days: float
    days_reached: float
    sampled: int
    stored: int
    lost: int
    duplicated: int
    unknown: int
    lost_upstream: int
    duplicated_upstream: int
    # Of lost_upstream: what the outbox dropped by its bounds (age, size), by design, and
    # what it still held when the run ended (relayed late, not lost).
    dropped_upstream: int
    left_in_outbox: int
    held_by_revoked: int
    refused_for_expiry: int
    tls_refused: int
    lapses: int
    probes: int
    refusal_examples: list[str]
    rotations_done: dict[str, int]
    rotations_min: int
    crl_renewals: int
    crl_renewal_events: int
    server_renewals: int
    gateway_renewals: int
    expiring_events: int
    operator_actions: int
    revoked: str | None
    revoked_stays_out: bool | None
    revoked_after: int
    key_rotation: str
    key_rotation_nodes: dict[str, dict[str, Any]]
    campaign_id: int | None
    campaign_confirmed: int
    scripted: list[dict[str, Any]]
    failures: list[str]
    wakes: int
    send_failures: int
    time_scale: float
    sample_interval_s: int
    wall_s: float
    dir: str
    fleet: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


_TLS_REFUSED = re.compile(r"send failed.*TLS")
CRL_WATCH_S = 0.5  # real seconds between looks at the issuing CA's CRL (crl_renewals)


class Soak:
    def __init__(self, opts: SoakOptions) -> None:
        self.opts = opts
        self.dir = Path()
        self.lib = ""
        self.clock: FieldClock | None = None
        self.gateway: asyncio.subprocess.Process | None = None
        self.upstream_proc: asyncio.subprocess.Process | None = None
        self.procs: list[asyncio.subprocess.Process] = []
        self.broker_pid: int | None = None
        self.fleet: SoakFleet | None = None
        self.scripted: list[Scripted] = []
        # Commands run after setup that are not the soak's own scripted events: none are.
        self.operator_actions: list[str] = []
        # Not scheduled is not a failure (the negative control has none); scheduled and not
        # reached is.
        self.key_rotation = ("not run" if opts.key_rotation_at is not None
                             else "skipped: not scheduled")
        self.old_key: Path | None = None  # the signing key baked into every node at setup
        self.key_task: asyncio.Task[None] | None = None
        self.key_rotation_nodes: dict[str, dict[str, Any]] = {}
        self.campaign_id: int | None = None
        self.campaign_confirmed = 0
        self.revoked: str | None = None
        self.revoked_at_ms: int | None = None
        # The revoked device's reading ids in the gateway's store once `torpor device revoke`
        # returned: what the gateway accepted before the revocation. "Stays out" is judged
        # by what it committed after, not by the node's stamps, which run ahead of the
        # field's clock (docs/soak.md, "Limits").
        self.revoked_ids: set[int] | None = None
        self.interrupted = False
        self.start_ms = 0
        self.config = Path()
        self.db_path = Path()
        self.pki_dir = Path()
        self.up_port = 0
        self.upstream: Upstream | None = None
        self.probes = 0
        self.lapses: list[str] = []
        self.crls_seen: set[int] = set()  # the issuing CA's CRLs seen, by CRL number

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    # ---- the field's clock --------------------------------------------------------------

    def now_ms(self) -> float:
        return self.clock.now_ms() if self.clock is not None else time.time() * 1000

    def day(self) -> float:
        return (self.now_ms() - self.start_ms) / DAY_MS if self.start_ms else 0.0

    def field_env(self) -> dict[str, str]:
        assert self.clock is not None
        return {**os.environ, **faketime_env(self.lib, self.clock.path)}

    async def torpor(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """A `torpor` command on the field's clock, which runs at the host's pace meanwhile:
        the command judges the gateway's liveness by its heartbeat (half a real second is
        half a day at full scale), and an operator's command takes seconds, not days."""
        assert self.clock is not None
        argv = [sys.executable, "-m", "tools.sim.fakesleep", *args]
        was_running = self.clock.running
        self.clock.pause()
        try:
            await asyncio.sleep(1.5)  # a heartbeat at the host's pace
            return await asyncio.to_thread(
                subprocess.run, argv, capture_output=True, text=True, timeout=timeout,
                env=self.field_env(), cwd=self.dir)
        finally:
            if was_running:
                self.clock.run()

    # ---- setup ---------------------------------------------------------------------------

    def make_pki(self) -> Path:
        """A root (its key then taken offline), an issuing CA that outlives the soak, the
        broker's and the gateway's certificates."""
        from gateway.security.pki import Pki

        pki = Pki(self.dir / "pki")
        pki.init_ca()
        pki.init_issuing(days=int(self.opts.days + 2 * YEAR_DAYS))
        pki.issue_server(["localhost", "127.0.0.1", "::1"])
        pki.issue_gateway()
        offline = self.dir / "offline-root"
        offline.mkdir()
        shutil.move(str(pki.ca_key), str(offline / pki.ca_key.name))
        return pki.path

    def issue_devices(self, device_ids: list[str]) -> None:
        """Short-lived device certificates and CRL (the fleet's provisioning reuses them)."""
        from gateway.security.pki import Pki

        pki = Pki(self.pki_dir)
        for d in device_ids:
            pki.issue_device(d, days=self.opts.device_days)
        pki.write_crl(days=self.opts.crl_days)

    def install_images(self, fleet: SoakFleet) -> None:
        """The firmware signing key of the fleet ("old", made with `torpor fw keygen`'s
        code) and v1 signed by it, installed into every node as its confirmed image with
        the key baked into its bootloader: the nodes boot through the real bootloader,
        which the trusted key rotation's campaign needs."""
        from tools.fw import image
        from tools.fw import keys as fw_keys

        paths = fw_keys.keygen(self.dir / "fwkeys" / "old")
        self.old_key = paths.private
        v1 = self.dir / "images" / "v1"
        image.build_image("sim", 1, v1, display="1-old-key")
        image.sign_image(v1, fw_keys.load_private(paths.private))
        public = fw_keys.load_public(paths.public)
        for st in fleet.states:
            image.install_sim(st.node.dir, v1, public_key=public)
            st.node.entry = "boot"

    def gateway_config(self, port: int) -> Path:
        o = self.opts
        path = self.dir / "gateway.toml"
        on = "true" if o.renew else "false"
        path.write_text(
            "# Generated by `torpor soak`.\n"
            "[gateway]\n"
            f'data_dir = "{self.dir / "gateway"}"\n'
            'log_level = "info"\n'
            "status_interval_s = 0.5\n"
            "[broker]\n"
            'mode = "supervised"\n'
            'host = "127.0.0.1"\n'
            f"port = {port}\n"
            f'pki_dir = "{self.pki_dir}"\n'
            "[pki]\n"
            f"renew = {on}\n"
            f"check_interval_s = {o.check_interval_s}\n"
            f"crl_days = {o.crl_days}\n"
            f"crl_renew_at = {o.crl_renew_at}\n"
            f"rotate_devices = {on}\n"
            f"device_rotate_lead_days = {o.rotate_lead_days}\n"
            f"device_days = {o.device_days}\n"
            "[upstream]\n"
            "enabled = true\n"
            'host = "127.0.0.1"\n'
            f"port = {self.up_port}\n"
            "tls = false\n"
            'client_id = "torpor-soak-relay"\n'
            'format = "json"\n'
            # The soak's subscriber is back before the relay after an upstream restart.
            "reconnect_min_s = 2.0\n"
            "reconnect_max_s = 5.0\n"
            # The relay's reconnect waits (above) are real seconds: days of field time at
            # full scale (7 field days are about 4 real seconds). The default age limit
            # would drop readings queued at the upstream outage's start for a wait the
            # field never had; the soak's limit is a real month, past the 3-day outage.
            "outbox_max_age_s = 2592000\n"
        )
        return path

    async def _spawn(self, argv: list[str], log_name: str,
                     env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
        with open(self.dir / log_name, "ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, cwd=self.dir,
                start_new_session=True, env=env,
            )
        self.procs.append(proc)
        return proc

    async def start_upstream(self, port: int | None = None) -> int:
        from gateway.errors import BrokerError
        from gateway.transport.broker import find_mosquitto
        from tools.demo import start_loopback_broker

        try:
            mosquitto = find_mosquitto()
        except BrokerError as exc:
            raise SoakError(str(exc)) from exc
        folder = self.dir / "upstream"
        folder.mkdir(exist_ok=True)
        # Persistent, as a cloud broker is: what it acknowledged to the relay and had not
        # yet passed to the soak's subscriber outlives the scripted outage's stop.
        started = await start_loopback_broker(folder, self._spawn, mosquitto,
                                              "The soak's upstream broker", port=port,
                                              attempts=10, persistence=True)
        if started is not None:
            p, self.upstream_proc = started
            return p
        raise SoakError(f"the upstream mosquitto did not start (see {folder / 'mosquitto.log'})")

    async def _subscribe(self, ready: asyncio.Event) -> None:
        """Count what reaches upstream; reconnect through the upstream outage."""
        from gateway.transport.client import ClientOptions, MqttClient
        from tools.demo import UPSTREAM_TOPIC

        assert self.upstream is not None
        while True:
            try:
                # A persistent session: messages published while it is away (or queued for
                # it when the broker stopped) are delivered when it is back.
                client = MqttClient(ClientOptions("127.0.0.1", self.up_port,
                                                  "torpor-soak-upstream", max_packet=16 << 20,
                                                  clean_session=False))
                async with client:
                    await client.subscribe((UPSTREAM_TOPIC, 1))
                    ready.set()
                    async for m in client.messages():
                        self.upstream.add(m.topic, m.payload, "json")
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the upstream broker is down: try again
                await asyncio.sleep(0.1)

    def _status(self) -> tuple[int | None, dict[str, Any]]:
        """(pid, detail) of the gateway's status row. Its heartbeat's freshness is not
        judged: at full scale half a real second is half a day."""
        from gateway.store import db, status

        try:
            conn = db.connect(self.db_path, readonly=True)
            try:
                st = status.read_status(conn, now=self.now_ms() / 1000)
            finally:
                conn.close()
        except Exception:  # noqa: BLE001 - not created yet, or mid-migration
            return None, {}
        return st.pid, st.detail

    async def start_gateway(self) -> None:
        self.gateway = await self._spawn(
            [sys.executable, "-m", "tools.sim.fakesleep", "gateway", "run", "--config", str(self.config)],
            "gateway.log", self.field_env())
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and self.gateway.returncode is None:
            await asyncio.sleep(0.2)
            pid, detail = self._status()
            if pid == self.gateway.pid and detail.get("mqtt_connected"):
                broker = detail.get("broker_pid")
                self.broker_pid = int(broker) if isinstance(broker, int) else None
                return
        tail = (self.dir / "gateway.log").read_text(errors="replace")[-3000:]
        raise SoakError(f"the gateway did not come up within {READY_TIMEOUT_S:.0f} s:\n{tail}")

    def _current_broker_pid(self) -> int | None:
        _pid, detail = self._status()
        broker = detail.get("broker_pid")
        return int(broker) if isinstance(broker, int) else self.broker_pid

    # ---- validity, checked by OpenSSL at the field's time ---------------------------------

    def _probe_once(self) -> None:
        """`openssl verify` (the library Mosquitto checks with, not Torpor's code) of the
        certificate every served device holds (its newest, but one a rotation issued and the
        node has not yet connected with) against the chain and the CRL the broker reads,
        and of the broker's certificate, at the field's time. A failure is a lapse: the
        broker would refuse that device (or every node the broker)."""
        from gateway.security.pki import Pki

        pki = Pki(self.pki_dir)
        try:
            records = pki.list()
        except Exception:  # noqa: BLE001 - the index is being rewritten: next round
            return
        # A certificate a rotation issued is the node's only once it connected with it.
        try:
            conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=5)
            try:
                pending = {str(row[0]).lower() for row in conn.execute(
                    "SELECT new_serial FROM rotations WHERE new_serial IS NOT NULL AND state "
                    "IN ('issued', 'failed', 'cancelled')")}
            finally:
                conn.close()
        except sqlite3.Error:
            return
        newest: dict[str, Any] = {}
        revoked_cns = {self.revoked} if self.revoked else set()
        for r in records:
            if (r.kind != "device" or r.cn in revoked_cns or r.revoked_at is not None
                    or r.serial_hex.lower() in pending):
                continue
            if r.cn not in newest or r.not_before > newest[r.cn].not_before:
                newest[r.cn] = r
        at = str(int(self.now_ms() / 1000))
        base = ["openssl", "verify", "-attime", at, "-CAfile", str(pki.chain_pem)]
        checks = [
            (base + ["-crl_check_all", "-CRLfile", str(pki.crl_path), "-purpose", "sslclient"],
             [str(self.pki_dir / r.path) for r in newest.values()]),
            (base + ["-purpose", "sslserver"], [str(self.pki_dir / "server.pem")]),
        ]
        self.probes += 1
        for argv, certs in checks:
            if not certs:
                continue
            try:
                done = subprocess.run(argv + certs, capture_output=True, text=True, timeout=30)
                if done.returncode != 0 and "not yet valid" in done.stdout + done.stderr:
                    # A CRL or certificate written after `at` was taken (backdated 5 field
                    # minutes, a few real ms at full scale): judged again at the time now,
                    # a lapse only if it still fails.
                    argv = list(argv)
                    argv[argv.index("-attime") + 1] = str(int(self.now_ms() / 1000))
                    done = subprocess.run(argv + certs, capture_output=True, text=True,
                                          timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                continue
            text = done.stdout + done.stderr
            if done.returncode != 0 and EXPIRY_PATTERNS.search(text):
                day = self.day()
                for line in text.splitlines():
                    if EXPIRY_PATTERNS.search(line):
                        self.lapses.append(f"day {day:.1f}: {line.strip()[:200]}")

    async def _probe(self) -> None:
        while True:
            await asyncio.to_thread(self._probe_once)
            await asyncio.sleep(self.opts.probe_period_s)

    def _crl_once(self) -> None:
        from gateway.security.pki import Pki, crl_number

        try:
            crls = Pki(self.pki_dir).crls()
        except Exception:  # noqa: BLE001 - being rewritten: the next look sees it
            return
        if crls:
            self.crls_seen.add(crl_number(crls[0]))

    async def _watch_crls(self) -> None:
        """The issuing CA's CRL, looked at twice a real second: its number counts the
        re-issues, those signed between two looks too."""
        while True:
            await asyncio.to_thread(self._crl_once)
            await asyncio.sleep(CRL_WATCH_S)

    # ---- the scripted disruptions ----------------------------------------------------------

    def schedule(self) -> list[tuple[float, str]]:
        o = self.opts
        plan: list[tuple[float, str]] = []
        for i in range(o.gateway_kills):
            plan.append((((i + 1) / (o.gateway_kills + 1) - 0.07) * o.days, "gateway_kill"))
        for i in range(o.broker_kills):
            plan.append((((i + 1) / (o.broker_kills + 1) + 0.09) * o.days, "broker_kill"))
        if o.upstream_outage is not None:
            share, days = o.upstream_outage
            plan.append((share * o.days, "upstream_down"))
            plan.append((share * o.days + days, "upstream_up"))
        if o.revoke_at is not None:
            plan.append((o.revoke_at * o.days, "revoke"))
        if o.key_rotation_at is not None:
            plan.append((o.key_rotation_at * o.days, "key_rotation"))
        return sorted(plan)

    async def _script(self) -> None:
        plan = self.schedule()
        while plan:
            if plan[0][0] > self.day():
                await asyncio.sleep(0.02)
                continue
            _due, kind = plan.pop(0)
            at = self.day()
            try:
                detail = await getattr(self, f"_do_{kind}")()
            except Exception as exc:  # noqa: BLE001 - recorded; the verdict names it
                detail = f"failed: {exc}"
                log.warning("soak step %s failed: %s", kind, exc)
            self.scripted.append(Scripted(kind, at, detail))
            if self.opts.live:
                self.say(f"torpor soak: day {at:.1f}: {kind}: {detail}")

    async def _do_gateway_kill(self) -> str:
        """A power cut of the gateway host: the gateway and its broker, kill -9."""
        assert self.gateway is not None
        broker = self._current_broker_pid()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.gateway.pid, signal.SIGKILL)
        if broker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(broker, signal.SIGKILL)
        await self.gateway.wait()
        t0 = time.monotonic()
        await self.start_gateway()
        return f"killed; back in {time.monotonic() - t0:.1f} s (real)"

    async def _do_broker_kill(self) -> str:
        pid = self._current_broker_pid()
        if pid is None:
            return "failed: no broker pid"
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(150):
            await asyncio.sleep(0.2)
            new = self._current_broker_pid()
            if new is not None and new != pid:
                self.broker_pid = new
                return f"mosquitto {pid} killed; the gateway restarted it"
        return f"mosquitto {pid} killed; not seen restarted"

    async def _do_upstream_down(self) -> str:
        proc = self.upstream_proc
        if proc is None:
            return "failed: no upstream broker"
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        await proc.wait()
        return "upstream broker stopped"

    async def _do_upstream_up(self) -> str:
        await self.start_upstream(self.up_port)
        return "upstream broker back"

    async def _do_revoke(self) -> str:
        assert self.fleet is not None
        device = self.fleet.states[-1].device_id
        self.revoked = device
        self.revoked_at_ms = int(self.now_ms())
        errors: list[str] = []
        for _attempt in range(3):
            r = await self.torpor("device", "revoke", "--config", str(self.config), device)
            if r.returncode == 0:
                # The command returns once the broker refuses the certificate and the
                # device's sessions are cut; ingest refuses a revoked device's frames.
                self.revoked_ids = self.stored_ids(device)
                done = "; ".join(r.stdout.strip().splitlines()[1:])
                return f"{device}: {done}" + (f" (after: {' | '.join(errors)})" if errors else "")
            errors.append((r.stderr or r.stdout).strip()[-300:])
        return f"failed: {' | '.join(errors)}"

    def revoked_admitted(self, conn: sqlite3.Connection) -> int:
        """Readings of the revoked device the gateway committed after its revocation: every
        row of an id it did not hold when `torpor device revoke` returned (0 before then)."""
        from gateway.store import readings

        if self.revoked is None or self.revoked_ids is None:
            return 0
        return sum(1 for row in readings.iter_readings(conn, self.revoked)
                   if int(row[1]) not in self.revoked_ids)

    def stored_ids(self, device: str) -> set[int]:
        """The reading ids the gateway's store holds for `device` now."""
        from gateway.store import readings

        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            return {int(row[1]) for row in readings.iter_readings(conn, device)}
        finally:
            conn.close()

    async def _do_key_rotation(self) -> str:
        """A trusted firmware key rotation, scripted: a new signing key, `torpor fw keys add`
        signed by the old key (the one baked into every node at setup) to every served
        device, then, once they all report the new list in their HELLO, an image signed by
        the new key rolled out by `torpor ota campaign create`. It goes on in the
        background (the rest of the script keeps its days); the verdict reads its end."""
        probe = await self.torpor("fw", "keys", "--help", timeout=60)
        if probe.returncode != 0:
            self.key_rotation = "skipped: not available"
            return self.key_rotation
        if self.old_key is None:
            self.key_rotation = "failed: the nodes were not provisioned with a baked key"
            return self.key_rotation
        self.key_rotation = "failed: still running when the span ended"
        self.key_task = asyncio.create_task(self._key_rotation_flow(self.day()))
        return "started: new key, its list to the served devices, then the campaign"

    async def _run_step(self, what: str, *argv: str) -> subprocess.CompletedProcess[str]:
        r = await self.torpor(*argv)
        if r.returncode != 0:
            raise SoakStepError(f"{what} (torpor {' '.join(argv[:3])}) exited {r.returncode}: "
                                f"{(r.stderr or r.stdout).strip()[-300:]}")
        return r

    def _served(self) -> list[str]:
        assert self.fleet is not None
        return [st.device_id for st in self.fleet.states if st.device_id != self.revoked]

    def _key_rotation_state(self, cid: int | None) -> tuple[int, dict[str, dict[str, Any]]]:
        """(the gateway's newest key list seq, per served device: the seq it reports and its
        campaign state), from the gateway's store."""
        from gateway.ops import keylists
        from gateway.ops import ota as ota_ops
        from gateway.store import db

        conn = db.connect(self.db_path, readonly=True)
        try:
            cur = keylists.current(conn)
            rows: dict[str, dict[str, Any]] = {}
            for d in self._served():
                rows[d] = {"keys_seq": keylists.node_status(conn, d).held,
                           "campaign": None, "reason": None}
            if cid is not None:
                for dev in ota_ops.campaign(conn, cid).devices:
                    if dev.device in rows:
                        rows[dev.device]["campaign"] = dev.status
                        rows[dev.device]["reason"] = dev.reason or None
            return (cur.seq if cur is not None else 0), rows
        finally:
            conn.close()

    async def _wait_field(self, done: Callable[[], bool], until_day: float) -> bool:
        """Until done() or the field's day passes until_day (or the fleet stops)."""
        assert self.fleet is not None
        while True:
            try:
                if await asyncio.to_thread(done):
                    return True
            except sqlite3.Error:
                pass  # the store is busy: look again
            if self.day() >= until_day or self.interrupted:
                return False
            await asyncio.sleep(0.2)

    async def _key_rotation_flow(self, at: float) -> None:
        try:
            self.key_rotation = await self._key_rotation_steps(at)
        except SoakStepError as exc:
            self.key_rotation = f"failed: {exc}"
        except Exception as exc:  # noqa: BLE001 - recorded; the verdict names it
            self.key_rotation = f"failed: {type(exc).__name__}: {exc}"
        if self.opts.live:
            self.say(f"torpor soak: day {self.day():.1f}: key_rotation: {self.key_rotation}")

    async def _key_rotation_steps(self, at: float) -> str:
        from gateway.store import ota_store
        from tools.fw import keys as fw_keys

        assert self.old_key is not None
        o = self.opts
        served = self._served()
        if not served:
            raise SoakStepError("no served device")
        devices = ",".join(served)
        fwkeys = self.dir / "fwkeys"
        new = fwkeys / "new"
        await self._run_step("the new key", "fw", "keygen", "--out", str(new))
        await self._run_step(
            "the key list", "fw", "keys", "add", "--key", str(new), "--signing-key",
            str(self.old_key), "--gateway-config", str(self.config), "--devices", devices)
        seq, _rows = await asyncio.to_thread(self._key_rotation_state, None)
        if seq < 1:
            raise SoakStepError("the gateway holds no key list after `fw keys add`")
        # The list goes out with each node's next send (every N wakes): a share of what
        # is left of the span, the campaign gets the rest.
        left = o.days - at
        list_by = at + KEY_LIST_SHARE * left
        self.key_rotation_nodes = {d: {"keys_seq": 0, "campaign": None, "reason": None}
                                   for d in served}

        def all_hold() -> bool:
            _seq, rows = self._key_rotation_state(None)
            self.key_rotation_nodes = rows
            return all(r["keys_seq"] >= seq for r in rows.values())

        if not await self._wait_field(all_hold, list_by):
            late = sorted(d for d, r in self.key_rotation_nodes.items() if r["keys_seq"] < seq)
            raise SoakStepError(f"key list seq {seq} not reported by {', '.join(late)} "
                                f"within {list_by - at:.0f} field days")
        holding = len(self.key_rotation_nodes)
        listed_day = self.day()
        # A device revoked while the list went out is no longer the campaign's.
        served = [d for d in served if d in self._served()]
        devices = ",".join(served)
        v2 = self.dir / "images" / "v2"
        await self._run_step("the image", "fw", "build", "--board", "sim", "--version", "2",
                             "--display", "2-new-key", "--out", str(v2))
        await self._run_step("its signature", "fw", "sign", "--key",
                             str(new / fw_keys.PRIVATE_NAME), str(v2))
        # The gateway's campaign clock is the field's: a device has what is left to confirm.
        timeout_s = max(int((o.days - self.day() - 1.0) * 86400), 3600)
        r = await self._run_step(
            "the campaign", "ota", "campaign", "create", "--config", str(self.config),
            "--image", str(v2), "--devices", devices, "--rate", "100%",
            "--abort-threshold", "100", "--timeout", str(timeout_s), "--json")
        cid = int(json.loads(r.stdout)["id"])
        self.campaign_id = cid

        def over() -> bool:
            _seq, rows = self._key_rotation_state(cid)
            self.key_rotation_nodes = rows
            return all(r["campaign"] in ota_store.TERMINAL for r in rows.values())

        ended = await self._wait_field(over, o.days - 0.5)
        rows = self.key_rotation_nodes
        self.campaign_confirmed = sum(1 for r in rows.values() if r["campaign"] == "confirmed")
        summary = (f"key list seq {seq} held by {holding}/{len(served)} served nodes "
                   f"(day {listed_day:.1f}); campaign {cid} (v2 signed by the new key) "
                   f"confirmed by {self.campaign_confirmed}/{len(served)}")
        if not ended:
            raise SoakStepError(f"{summary}; still running at the span's end")
        if self.campaign_confirmed < len(served):
            bad = ", ".join(f"{d} {r['campaign']}" + (f" ({r['reason']})" if r["reason"] else "")
                            for d, r in sorted(rows.items()) if r["campaign"] != "confirmed")
            raise SoakStepError(f"{summary}: {bad}")
        return f"done: {summary} by day {self.day():.1f}"

    # ---- the run ---------------------------------------------------------------------------

    async def run(self) -> SoakVerdict:
        from tools.demo import free_port, stop_children, work_dir

        o = self.opts
        self.lib = find_libfaketime()
        if shutil.which("openssl") is None:
            raise SoakError("torpor soak needs the `openssl` command (Debian package openssl)")
        self.dir = work_dir(o.dir, "soak")
        self.say(f"torpor soak: working in {self.dir}")
        self.upstream = Upstream()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._interrupt)
        t_wall = time.monotonic()
        tasks: list[asyncio.Task[None]] = []
        try:
            self.clock = clock = FieldClock(self.dir / "clock", o.time_scale)
            clock.start()
            self.pki_dir = await asyncio.to_thread(self.make_pki)
            self.up_port = await self.start_upstream()
            ready = asyncio.Event()
            tasks.append(asyncio.create_task(self._subscribe(ready)))
            await asyncio.wait_for(ready.wait(), 10)
            port = free_port()
            self.config = self.gateway_config(port)
            self.db_path = self.dir / "gateway" / "gateway.db"
            fields = [FieldModel.named(o.profiles[i % len(o.profiles)], awake_scale=o.awake_scale)
                      for i in range(o.nodes)]
            self.start_ms = start = int(clock.now_ms()) + 60_000
            cfg = FleetConfig(
                nodes=o.nodes, dir=self.dir / "nodes", pki_dir=self.pki_dir,
                broker_host="127.0.0.1", broker_port=port, db_path=self.db_path,
                time_scale=o.time_scale, wakes=1 << 30, duration_s=o.wall_limit_s,
                sample_interval_s=o.sample_interval_s, send_every=o.send_every,
                awake_window_ms=3000, awake_budget_ms=15000,
                seed=o.seed, start_ms=start, fields=tuple(fields), max_concurrent=o.nodes,
            )
            end = start + int(o.days * DAY_MS)
            await asyncio.to_thread(self.issue_devices, cfg.node_ids())
            await self.start_gateway()
            self.fleet = fleet = SoakFleet(cfg, end, clock)
            await asyncio.to_thread(fleet.provision)
            # Every node boots through the real bootloader, as a fielded one does (its heap
            # is what the bootloader leaves), whether or not the key rotation is scheduled.
            await asyncio.to_thread(self.install_images, fleet)
            for st in fleet.states:
                st.node.env.update(faketime_env(self.lib, clock.path))
                # A battery that outlasts the span: a low battery stretches the node's sleep
                # (its firmware's policy), and battery life is `torpor sim field`'s and the
                # energy bench's concern, not this one's.
                sim_json = st.node.dir / "sim.json"
                cfg_doc = json.loads(sim_json.read_text())
                cfg_doc["capacity_mah"] = BATTERY_MAH
                sim_json.write_text(json.dumps(cfg_doc))
                # The firmware compiled now, not at the first wake with the clock running.
                await asyncio.to_thread(compile_firmware, FIRMWARE_DIR, st.node.dir / "mpy")
            # The field runs at most one wake interval past the earliest pending wake.
            lead = o.sample_interval_s * 1000.0
            clock.cap = lambda: fleet.virtual_low_ms() + lead
            self.say(f"torpor soak: gateway on 127.0.0.1:{port}, upstream on 127.0.0.1:"
                     f"{self.up_port}, all on the field's clock (libfaketime {self.lib}); "
                     f"{o.nodes} nodes waking every {o.sample_interval_s / 3600:g} h for "
                     f"{o.years:g} years ({o.days:g} days) at time x{o.time_scale:.0f}; device "
                     f"certificates {o.device_days:g} days, CRL {o.crl_days:g} days; renewal "
                     f"{'on' if o.renew else 'OFF (negative control)'}")
            # The field's clock starts a minute before the nodes' first wake.
            while clock.now_ms() < start - 60_000:
                await asyncio.sleep(0.01)
            clock.run()
            tasks.append(asyncio.create_task(self._probe()))
            tasks.append(asyncio.create_task(self._watch_crls()))
            script = asyncio.create_task(self._script())
            tasks.append(script)
            last = [0.0]

            def show(p: Any) -> None:
                if not o.live or time.monotonic() - last[0] < 10:
                    return
                last[0] = time.monotonic()
                self.say(f"  day {self.day():7.1f}  wakes {p.wakes}  sampled {p.sampled}  "
                         f"acked {p.acked}  on nodes {p.queued}  errors {p.errors}  "
                         f"wall {time.monotonic() - t_wall:.0f} s")

            summary = await fleet.run(show)
            clock.pause()
            if self.key_task is not None and not self.key_task.done():
                # The span ended first: what the nodes got so far is in the verdict.
                self.key_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.key_task
                with contextlib.suppress(Exception):
                    _seq, rows = await asyncio.to_thread(self._key_rotation_state,
                                                         self.campaign_id)
                    self.key_rotation_nodes = rows
            await self._settle()
            reached = (min(min(st.node.virtual_ms, end) for st in fleet.states) - start) / DAY_MS
            return await asyncio.to_thread(self.judge, summary, reached,
                                           round(time.monotonic() - t_wall, 1))
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            if self.key_task is not None:
                tasks.append(self.key_task)
            for task in reversed(tasks):
                if not task.done():
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self.db_path.exists():
                self.broker_pid = self._current_broker_pid()
            await stop_children(self.procs, self.broker_pid)
            if self.clock is not None:
                self.clock.stop()
            if not o.keep:
                shutil.rmtree(self.dir, ignore_errors=True)

    def _interrupt(self) -> None:
        self.interrupted = True
        if self.fleet is not None:
            self.fleet.stop(drain=False)

    async def _settle(self) -> None:
        """Bounded: until the outbox is empty and upstream has what the store has."""
        from tools.demo import _db_figures

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stored, depth = _db_figures(self.db_path)
            assert self.upstream is not None
            if depth == 0 and self.upstream.unique >= stored:
                return
            await asyncio.sleep(0.3)

    # ---- the verdict -----------------------------------------------------------------------

    def judge(self, summary: FleetSummary, reached: float, wall_s: float) -> SoakVerdict:
        from gateway.store import readings

        o = self.opts
        assert self.fleet is not None and self.upstream is not None
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        sampled = stored = lost = dups = unknown = held = revoked_after = lost_up = 0
        rotations: dict[str, int] = {}
        try:
            for st in self.fleet.states:
                copies: dict[int, list[int]] = {}
                for row in readings.iter_readings(conn, st.device_id):
                    copies.setdefault(int(row[1]), []).append(int(row[2]))
                ids = set(st.sampled)
                sampled += len(ids)
                stored += sum(len(v) for v in copies.values())
                dups += sum(len(v) - 1 for v in copies.values())
                unknown += len(copies.keys() - ids)
                missing = ids - copies.keys()
                if st.device_id == self.revoked:
                    # What the node still held when it was revoked, and all it sampled
                    # after, stays on it: that is the revocation working. A reading the
                    # gateway committed after the revocation got in, whatever its stamp.
                    held += len(missing)
                    revoked_after = self.revoked_admitted(conn)
                else:
                    lost += len(missing)
                    seen = self.upstream.seen.get(st.device_id)
                    lost_up += len(set(copies) - set(seen or ()))
            for dev, n in conn.execute(
                    "SELECT device, count(*) FROM rotations WHERE state='done' GROUP BY device"):
                rotations[str(dev)] = int(n)
            dropped_up, left_up = _outbox_figures(conn)
            operator_rot = int(conn.execute(
                "SELECT count(*) FROM rotations WHERE reason != 'expiry'").fetchone()[0])
            ev = {(str(k), str(n)): int(c) for k, n, c in conn.execute(
                "SELECT kind, name, count(*) FROM credential_events GROUP BY kind, name")}
        finally:
            conn.close()
        expired, refused = self._node_refusals()
        refusals = expired + self.lapses
        devices = [st.device_id for st in self.fleet.states if st.device_id != self.revoked]
        rot_min = min((rotations.get(d, 0) for d in devices), default=0)
        # Every CRL the issuing CA signed after setup renews it: the gateway's scheduled
        # renewals (its `renewed` events) and the CRLs a rotation's revocation writes.
        # Numbered one up each time: a re-issue between two looks still counts.
        crl = max(self.crls_seen) - min(self.crls_seen) if self.crls_seen else 0
        operator = len(self.operator_actions) + operator_rot
        stays_out: bool | None = (None if self.revoked is None
                                  else self.revoked_ids is not None and revoked_after == 0)
        failures: list[str] = []
        complete = reached >= o.days - 1e-6
        if not complete:
            failures.append(f"only {reached:g} of {o.days:g} days ran")
        if lost or lost_up:
            why = (f" ({dropped_up} items dropped by the outbox's bounds, {left_up} still "
                   "queued at the end)" if dropped_up or left_up else "")
            failures.append(f"{lost} readings lost in the store, {lost_up} upstream{why}")
        if dups or unknown:
            failures.append(f"{dups} duplicated, {unknown} unknown readings in the store")
        if refusals:
            failures.append(f"{len(expired)} node connections refused for an expired "
                            f"credential, {len(self.lapses)} lapses seen by openssl verify")
        if refused:
            failures.append(f"{len(refused)} TLS refusals of served nodes")
        if rot_min < o.min_rotations:
            failures.append(f"a device certificate rotated {rot_min} times "
                            f"(at least {o.min_rotations} asked)")
        if crl < o.min_crl_renewals:
            failures.append(f"the CRL renewed {crl} times (at least {o.min_crl_renewals} asked)")
        if operator:
            failures.append(f"{operator} operator actions after setup")
        if stays_out is False:
            failures.append(f"the revoked device {self.revoked} got {revoked_after} readings in"
                            if self.revoked_ids is not None else
                            f"the revocation of {self.revoked} did not complete")
        failures += [f"scripted {s.kind}: {s.detail}" for s in self.scripted
                     if s.detail.startswith("failed")]
        if not self.key_rotation.startswith(("done", "skipped")):
            failures.append(f"trusted key rotation: {self.key_rotation}")
        return SoakVerdict(
            ok=not failures, complete=complete, days=o.days, days_reached=round(reached, 2),
            sampled=sampled, stored=stored, lost=lost, duplicated=dups, unknown=unknown,
            lost_upstream=lost_up, duplicated_upstream=self.upstream.duplicates,
            dropped_upstream=dropped_up, left_in_outbox=left_up,
            held_by_revoked=held, refused_for_expiry=len(refusals), tls_refused=len(refused),
            lapses=len(self.lapses), probes=self.probes,
            refusal_examples=(refusals + refused)[:6], rotations_done=rotations,
            rotations_min=rot_min, crl_renewals=crl,
            crl_renewal_events=ev.get(("renewed", "crl"), 0),
            server_renewals=ev.get(("renewed", "server"), 0),
            gateway_renewals=ev.get(("renewed", "gateway"), 0),
            expiring_events=sum(c for (k, _n), c in ev.items() if k == "expiring"),
            operator_actions=operator, revoked=self.revoked, revoked_stays_out=stays_out,
            revoked_after=revoked_after, key_rotation=self.key_rotation,
            key_rotation_nodes=self.key_rotation_nodes, campaign_id=self.campaign_id,
            campaign_confirmed=self.campaign_confirmed,
            scripted=[s.as_dict() for s in self.scripted], failures=failures,
            wakes=summary.wakes, send_failures=summary.send_failures,
            time_scale=round(o.time_scale), sample_interval_s=o.sample_interval_s,
            wall_s=wall_s, dir=str(self.dir), fleet=summary.as_dict(),
        )

    def _node_refusals(self) -> tuple[list[str], list[str]]:
        """From the logs of every node but the revoked one: (connections the node's TLS
        refused for the broker's certificate out of its validity, connections the broker
        refused in the TLS handshake). On this stack the broker refuses a served node's
        certificate only when it or the CRL is out of validity; mbedTLS does not tell
        the alert's kind, so the openssl probe says which."""
        assert self.fleet is not None
        expired: list[str] = []
        refused: list[str] = []
        for st in self.fleet.states:
            if st.device_id == self.revoked:
                continue
            path = st.node.dir / "node.log"
            with contextlib.suppress(OSError), open(path, errors="replace") as f:
                for line in f:
                    if EXPIRY_PATTERNS.search(line):
                        expired.append(f"{st.device_id}: {line.strip()[:200]}")
                    elif _TLS_REFUSED.search(line):
                        refused.append(f"{st.device_id}: {line.strip()[:200]}")
        return expired, refused


def _outbox_figures(conn: sqlite3.Connection) -> tuple[int, int]:
    """(items the outbox dropped by its bounds, items still in it) from the gateway's store."""
    from gateway.store import outbox

    try:
        box = outbox.Outbox(conn)
        c = box.counters()
        return c.dropped_age + c.dropped_full, box.depth()
    except sqlite3.Error:
        return 0, 0


def format_verdict(v: SoakVerdict) -> list[str]:
    rot = ", ".join(f"{d} {n}" for d, n in sorted(v.rotations_done.items())) or "none"
    lines = [
        "",
        f"soak                  {v.days:g} days asked, {v.days_reached:g} reached; time "
        f"x{v.time_scale}; a wake every {v.sample_interval_s / 3600:g} h; wall {v.wall_s:g} s",
        f"readings              sampled {v.sampled}, stored {v.stored}: lost {v.lost}, "
        f"duplicated {v.duplicated}, unknown {v.unknown}; upstream lost {v.lost_upstream}, "
        f"duplicated {v.duplicated_upstream} (at-least-once), outbox drops {v.dropped_upstream}, "
        f"left {v.left_in_outbox}; held by the revoked device "
        f"{v.held_by_revoked}",
        f"wakes                 {v.wakes}, {v.send_failures} failed sends (retried)",
        f"refused for expiry    {v.refused_for_expiry} ({v.lapses} lapses in {v.probes} openssl "
        f"verify rounds at the field's time); TLS refusals of served nodes {v.tls_refused}",
        *(f"    {e}" for e in v.refusal_examples),
        f"rotations done        min {v.rotations_min}: {rot}",
        f"renewals              CRL {v.crl_renewals} seen re-issued ({v.crl_renewal_events} "
        f"scheduled), server {v.server_renewals}, gateway "
        f"{v.gateway_renewals}; {v.expiring_events} expiry warnings",
        f"operator actions      {v.operator_actions}",
        f"revoked device        {v.revoked or 'none'}: "
        + ("stays out" if v.revoked_stays_out else
           "not revoked" if v.revoked_stays_out is None else f"{v.revoked_after} readings got in"),
        f"trusted key rotation  {v.key_rotation}",
        *(f"    {d}: key list seq {r['keys_seq']}, campaign {r['campaign'] or 'not started'}"
          + (f" ({r['reason']})" if r["reason"] else "")
          for d, r in sorted(v.key_rotation_nodes.items())),
        "scripted              " + "; ".join(f"day {s['at_day']:g} {s['kind']}" for s in v.scripted),
    ]
    lines += [f"  FAILED: {f}" for f in v.failures]
    lines.append("VERDICT: OK" if v.ok else "VERDICT: FAILED")
    return lines


HELP = """\
Run a fleet of sim nodes on board profiles (the real firmware in the MicroPython unix
port) against the real gateway and its Mosquitto (mutual TLS) for YEARS of virtual time,
with 1-year device certificates and a 90-day CRL, and judge whether credentials lived on
their own: 0 readings lost and 0 duplicated (store and upstream); no connection refused
for an expired credential; every device certificate rotated at least twice; the CRL
renewed at least 10 times; no operator action after setup; a device revoked halfway
stays out. Scripted (not operator) events: gateway kill -9 and restarts, broker kills,
an upstream outage, the revocation, a trusted firmware key rotation (recorded as
"skipped: not available" where `torpor fw keys` does not exist).

Time: the gateway, its Mosquitto, the nodes' MicroPython and the soak's `torpor`
commands all run under libfaketime (package `faketime`) following one clock file that
the soak moves forward. OpenSSL and mbedTLS check validity at the field's time, so a credential nobody renews
expires for real (`--no-renew` shows it). The clock never moves back, never runs more
than a wake interval past the earliest pending wake, and runs at the host's pace while a
command runs. Time budget: the protocol bounds a node's sleep to a day, so 3 years is
1,095 wakes a node, 10,950 for 10 nodes: about 75 ms of CPU each for the node's
MicroPython alone, so the 15 minutes hold 10 nodes only on a host with its 2 cores free
(docs/soak.md, "The time budget"). Nodes send every 7th wake; rotation starts 60 days
ahead to span several sends. Limits: docs/soak.md.
Exit 0 when the verdict holds, 1 when it does not, 2 on a set-up error (e.g. no
libfaketime)."""


def register(sub: Any) -> None:
    p = sub.add_parser("soak", help="years of credentials, time-compressed, with a verdict",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--years", type=float, default=3.0, help="virtual years (default 3)")
    p.add_argument("--nodes", type=int, default=10, help="sim nodes (default 10)")
    p.add_argument("--wake-interval", type=float, default=24.0,
                   help="hours between a node's wakes, at most 24: the protocol's bound on "
                        "sample_interval_s (default 24)")
    p.add_argument("--send-every", type=int, default=7,
                   help="readings per send: a node connects every N wakes (default 7)")
    p.add_argument("--profiles", default=",".join(PROFILES),
                   help="board profiles dealt round the nodes, comma-separated "
                        f"(default {','.join(PROFILES)})")
    p.add_argument("--wall-target", type=float, default=600.0,
                   help="real seconds the span should take; sets the time scale (default 600)")
    p.add_argument("--wall-limit", type=float, default=840.0,
                   help="no wake starts after this many real seconds (default 840)")
    p.add_argument("--device-days", type=float, default=365.0,
                   help="device certificate lifetime (default 365)")
    p.add_argument("--crl-days", type=float, default=90.0, help="CRL lifetime (default 90)")
    p.add_argument("--rotate-lead-days", type=float, default=60.0,
                   help="[pki] device_rotate_lead_days (default 60: several weekly wakes)")
    p.add_argument("--no-renew", action="store_true",
                   help="negative control: the gateway renews and rotates nothing")
    p.add_argument("--gateway-kills", type=int, default=2,
                   help="gateway kill -9 and restarts, spread over the span (default 2)")
    p.add_argument("--broker-kills", type=int, default=2,
                   help="broker kill -9 (the gateway restarts it), spread over the span "
                        "(default 2)")
    p.add_argument("--upstream-outage", default="0.40:3", metavar="SHARE:DAYS|none",
                   help="the upstream broker stopped at this share of the span for DAYS "
                        "field days (default 0.40:3)")
    p.add_argument("--revoke-at", default="0.5", metavar="SHARE|none",
                   help="revoke the last node at this share of the span (default 0.5)")
    p.add_argument("--key-rotation-at", default="0.6", metavar="SHARE|none",
                   help="trusted firmware key rotation and its campaign at this share of "
                        "the span (default 0.6)")
    p.add_argument("--seed", type=int, default=1, help="seed (default 1)")
    p.add_argument("--dir", default=None, help="work in this new or empty directory")
    p.add_argument("--keep", action="store_true", help="keep the directory (logs, DB, flash)")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_soak)


def _share(option: str, text: str) -> float | None:
    """A share of the span (0..1) or None for `none`: the options that place an event."""
    from tools.cli import CliError

    if text.strip().lower() == "none":
        return None
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0.0 <= v < 1.0:
        raise CliError(f"{option}: {text!r} is not a share of the span in [0, 1) or none")
    return v


def _outage(text: str) -> tuple[float, float] | None:
    from tools.cli import CliError

    if text.strip().lower() == "none":
        return None
    share, sep, days = text.partition(":")
    start = _share("--upstream-outage", share)
    try:
        length = float(days) if sep else -1.0
    except ValueError:
        length = -1.0
    if start is None or length <= 0:
        raise CliError(f"--upstream-outage: {text!r} is not SHARE:DAYS (e.g. 0.40:3) or none")
    return start, length


def options_from(args: argparse.Namespace) -> SoakOptions:
    """The soak's options from its command line, checked (CliError names the option)."""
    from tools.cli import CliError

    if args.gateway_kills < 0 or args.broker_kills < 0:
        raise CliError("--gateway-kills and --broker-kills must be 0 or more")

    opts = SoakOptions(
        years=args.years, nodes=args.nodes, sample_interval_s=int(args.wake_interval * 3600),
        send_every=(args.send_every, args.send_every),
        profiles=tuple(p.strip() for p in args.profiles.split(",") if p.strip()),
        wall_target_s=args.wall_target, wall_limit_s=args.wall_limit,
        device_days=args.device_days, crl_days=args.crl_days,
        rotate_lead_days=args.rotate_lead_days, renew=not args.no_renew, seed=args.seed,
        gateway_kills=args.gateway_kills, broker_kills=args.broker_kills,
        upstream_outage=_outage(args.upstream_outage),
        revoke_at=_share("--revoke-at", args.revoke_at),
        key_rotation_at=_share("--key-rotation-at", args.key_rotation_at),
        dir=Path(args.dir) if args.dir else None, keep=args.keep, live=not args.quiet,
    )
    if opts.nodes < 2 or opts.years <= 0 or not 0 < opts.sample_interval_s <= 86400:
        raise CliError("--nodes must be at least 2, --years positive and --wake-interval "
                       "between 0 and 24 hours")
    if opts.send_every[0] < 1 or not opts.profiles:
        raise CliError("--send-every must be at least 1 and --profiles name one at least")
    return opts


def _soak(args: argparse.Namespace) -> int:
    from tools.cli import CliError

    opts = options_from(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The soak's own upstream subscriber: the outage is scripted, its reconnects are not news.
    logging.getLogger("gateway.transport.client").setLevel(logging.ERROR)
    soak = Soak(opts)
    try:
        verdict = asyncio.run(soak.run())
    except (SimError, FieldRunError) as exc:
        raise CliError(str(exc)) from exc
    if args.json:
        print(json.dumps(verdict.as_dict()))
    else:
        print("\n".join(format_verdict(verdict)))
    if soak.interrupted:
        return 130
    return 0 if verdict.ok else 1
