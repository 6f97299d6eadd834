"""The gateway service: one supervisor, one task per concern.

Concerns: the broker (when supervised), ingest, the upstream relay, and status. A task that
fails is restarted with backoff; SIGTERM/SIGINT stop taking frames, finish the commit in
flight, publish its answers, then stop the rest and close the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sqlite3
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.config import DownlinkConfig, GatewayConfig
from gateway.errors import ConfigError, GatewayError
from gateway.pipeline.downlink import Downlink
from gateway.pipeline.ingest import HelloHook, Ingest, no_downlink
from gateway.pipeline.ota_delivery import OtaHandler
from gateway.security import lifetimes
from gateway.store import db, deadletter
from gateway.store import devices as registry
from gateway.store import status as status_store
from gateway.store.outbox import Queued
from gateway.transport import codec
from gateway.transport.broker import MAX_PACKET_SIZE
from gateway.transport.client import ClientOptions, MqttClient
from gateway.transport.errors import TransportError

if TYPE_CHECKING:
    from gateway.ops.metrics import Live

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
HEALTHY_RUN_S = 30.0  # a task that ran this long starts its backoff afresh


class Service:
    """`Service(cfg).run()` runs the gateway until `stop()` or SIGTERM/SIGINT."""

    def __init__(self, cfg: GatewayConfig, *, on_hello: HelloHook = no_downlink,
                 downlink: DownlinkConfig | None = None) -> None:
        self.cfg = cfg
        self.on_hello = on_hello
        # Queued commands and configuration for sleeping nodes (gateway.pipeline.downlink); an
        # explicit `downlink` overrides the configuration file's [downlink] section.
        self.downlink = Downlink(downlink or cfg.downlink)
        self.conn: sqlite3.Connection | None = None
        # Every database write of the process runs on this one thread (gateway.store.db.Writer).
        self.writer: db.Writer | None = None
        self.ingest: Ingest | None = None
        self.broker: Any = None
        self.relay: Any = None
        self.web: Any = None  # gateway.web.process.WebProcess, with [web] process = true
        self.rules: Any = None  # gateway.pipeline.rules.Rules
        self.mqtt_connected = False
        self._session_saved = False
        self.restarts: dict[str, int] = {}
        self._stop = asyncio.Event()
        self._started = time.time()
        self._last_total = 0
        self._last_t = time.monotonic()
        self._rate = 0.0
        self.credentials: dict[str, Any] = {}  # days left per credential (gateway.security.lifetimes)
        self._boot_renewals: lifetimes.RenewalReport | None = None  # made before the broker started
        self.live = self._live_metrics()  # what /metrics exports of this process
        self.rotation: Any = None  # gateway.pipeline.rotation.RotationHandler
        self.session_keys: Any = None  # gateway.pipeline.session_keys.SessionKeys
        # The PKI folder has one writer at a time in this process (renewals, rotations).
        self._pki_lock = asyncio.Lock()

    def stop(self) -> None:
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: read the configuration file again. A file that does not validate is
        refused with the error naming the key, and the running configuration is kept; of
        a valid one, the keys that can change live are applied and the others are logged
        as waiting for a restart (gateway.ops.config_ops.LIVE_KEYS)."""
        from gateway.config import load_config
        from gateway.ops import config_ops

        if self.rules is not None:  # the rules file is read again by its own task
            self.rules.request_reload()
        if not self.cfg.source:
            log.warning("SIGHUP: the configuration was not read from a file; nothing to reload")
            return
        try:
            new = load_config(self.cfg.source)
        except ConfigError as exc:
            log.error("configuration reload refused, the running configuration is kept: %s", exc)
            return
        plan = config_ops.plan_reload(self.cfg, new)
        self.cfg = plan.applied
        if self.ingest is not None:
            self.ingest.cfg = plan.applied.ingest
        self.downlink.cfg = plan.applied.downlink
        logging.getLogger().setLevel(plan.applied.gateway.log_level.upper())
        for c in plan.live:
            log.info("configuration reloaded: %s = %r (was %r)", c.name, c.new, c.old)
        for c in plan.restart:
            log.warning("configuration: %s = %r (was %r) takes effect only after a restart",
                        c.name, c.new, c.old)
        if not plan.live and not plan.restart:
            log.info("configuration reloaded from %s: no change", self.cfg.source)

    def _live_metrics(self) -> Live:
        from gateway.ops.metrics import Live

        return Live(
            ingest=lambda: None if self.ingest is None else self.ingest.metrics.as_dict(),
            downlink=lambda: self.downlink.metrics.as_dict(),
            broker_connected=lambda: self.mqtt_connected,
            upstream_connected=lambda: None if self.relay is None else bool(self.relay.connected),
            credentials=lambda: self.credentials,
        )

    # ------------------------------------------------------------ supervisor
    async def run(self) -> None:
        cfg = self.cfg
        if cfg.web.enabled:  # before anything starts: a bad certificate stops it, named
            from gateway.web import server as web_server

            web_server.preflight(cfg.web)
        self.conn = db.open_db(cfg.db_path)
        # Once the tasks run, self.conn is used on the writer thread only: by ingest, the
        # status and the downlink sweeps, one after the other. One connection, so that
        # ingest's own writes do not look like another process's changes to it (it
        # reloads the registry when PRAGMA data_version moves). No commit of this process
        # checkpoints: the "checkpoint" task does, off the writer thread.
        db.no_autocheckpoint(self.conn)
        self.writer = writer = db.Writer()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        tasks: dict[str, asyncio.Task[None]] = {}
        try:
            if cfg.broker.mode == "supervised":
                await self._start_broker()
            has_pki = (cfg.pki_dir / "ca.pem").exists()
            if has_pki:  # device keys rotated over the air (gateway.pipeline.rotation)
                from gateway.pipeline.rotation import RotationHandler
                from gateway.security.pki import Pki

                self.rotation = RotationHandler(Pki(cfg.pki_dir), cfg.pki, cfg.upstream)
            if has_pki and self.broker is not None and cfg.broker.psk_port:
                from gateway.pipeline.session_keys import SessionKeys

                self.session_keys = SessionKeys(cfg.broker.psk_port, cfg.pki)
            self.ingest = Ingest(
                self.conn, cfg.ingest, upstream=cfg.upstream, on_hello=self.on_hello,
                downlink=self.downlink, ota=OtaHandler(), on_committed=self._notify_relay,
                writer=writer, on_commit=self.live.observe_commit, rotation=self.rotation,
                session_keys=self.session_keys,
            )
            self._write_status("running")
            tasks["ingest"] = asyncio.create_task(self._supervise("ingest", self._ingest))
            if cfg.upstream.enabled and cfg.upstream.process:
                # Its own process, so that it runs on another core than ingest; the
                # outbox is the only hand-over (gateway.pipeline.relay_process).
                from gateway.pipeline.relay_process import RelayProcess

                self.relay = RelayProcess(cfg.db_path, cfg.upstream)
                tasks["relay"] = asyncio.create_task(self._supervise("relay", self.relay.run))
            elif cfg.upstream.enabled:
                from gateway.pipeline.relay import Relay

                self.relay = Relay(cfg.db_path, cfg.upstream, writer=writer)
                tasks["relay"] = asyncio.create_task(self._supervise("relay", self.relay.run))
            tasks["status"] = asyncio.create_task(self._supervise("status", self._status_loop))
            tasks["checkpoint"] = asyncio.create_task(
                self._supervise("checkpoint", lambda: db.checkpoint_loop(cfg.db_path)))
            tasks["downlink"] = asyncio.create_task(
                self._supervise("downlink", self._sweep_loop))
            if cfg.rules.enabled:  # edge rules and alerts (gateway.pipeline.rules)
                from gateway.pipeline.rules import Rules

                self.rules = Rules(cfg, self.conn, writer, notify=self._notify_relay,
                                   credentials=lambda: self.credentials)
                tasks["rules"] = asyncio.create_task(self._supervise("rules", self.rules.run))
            if cfg.upstream.enabled and cfg.hass.enabled:  # gateway.pipeline.hass
                from gateway.pipeline.hass import HassPublisher

                hass = HassPublisher(cfg, self.conn, writer, notify=self._notify_relay,
                                     connects=lambda: self.relay.connects if self.relay else 0)
                tasks["hass"] = asyncio.create_task(self._supervise("hass", hass.run))
            if has_pki:
                tasks["lifetimes"] = asyncio.create_task(
                    self._supervise("lifetimes", self._lifetimes_loop))
                tasks["rotation"] = asyncio.create_task(
                    self._supervise("rotation", self._rotation_loop))
            if self.session_keys is not None:
                tasks["session_keys"] = asyncio.create_task(
                    self._supervise("session_keys", self._session_keys_loop))
            if cfg.web.enabled and cfg.web.process:
                # Its own process, so that a page waits neither for ingest's interpreter
                # lock nor for its event loop (gateway.web.process).
                from gateway.web.process import WebProcess

                self.web = WebProcess(cfg, self.live)
                tasks["web"] = asyncio.create_task(self._supervise("web", self.web.run))
            elif cfg.web.enabled:  # the operator's page and API (gateway.web)
                from gateway.web import server as web_server

                tasks["web"] = asyncio.create_task(
                    self._supervise("web", lambda: web_server.serve(cfg, live=self.live)))
            log.info("gateway running (database %s, pid %d)", cfg.db_path, os.getpid())
            await self._stop.wait()
            log.info("shutting down")
        finally:
            # Ingest first: it stops taking frames, commits and answers what it holds.
            for name in ("ingest", "web", "rules", "hass", "relay", "status", "downlink",
                         "lifetimes", "rotation", "session_keys", "checkpoint"):
                task = tasks.get(name)
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
            if self.broker is not None:
                await self.broker.stop()
            writer.close()
            with contextlib.suppress(sqlite3.Error):
                self._write_status("stopped")
            self.conn.close()
            log.info("gateway stopped")

    async def _supervise(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        delay = BACKOFF_FIRST_S
        while True:
            started = time.monotonic()
            try:
                await body()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure of a concern is logged and retried
                if time.monotonic() - started > HEALTHY_RUN_S:
                    delay = BACKOFF_FIRST_S
                self.restarts[name] = self.restarts.get(name, 0) + 1
                if isinstance(exc, GatewayError | TransportError | OSError):
                    log.warning("%s failed: %s; restarting in %.1fs", name, exc, delay)
                else:
                    log.exception("%s crashed; restarting in %.1fs", name, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)

    # ------------------------------------------------------------ concerns
    async def _start_broker(self) -> None:
        from gateway.security.pki import Pki
        from gateway.transport import broker as gwbroker

        b = self.cfg.broker
        settings = gwbroker.BrokerSettings(
            host=b.host, port=b.port, user=b.user or None,
            max_queued_messages=b.max_queued_messages,
            max_inflight_messages=b.max_inflight_messages, psk_port=b.psk_port,
        )
        if b.mosquitto:
            os.environ["PATH"] = f"{Path(b.mosquitto).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        if self.cfg.pki.renew and (self.cfg.pki_dir / "ca.pem").exists():
            # What lapsed while the gateway was off is renewed before the broker starts: a
            # CRL past its nextUpdate makes Mosquitto refuse every client, this gateway too.
            self._boot_renewals = await asyncio.to_thread(
                lifetimes.renew_due, Pki(self.cfg.pki_dir), self.cfg.pki)
        self.broker = gwbroker.BrokerSupervisor(
            Pki(self.cfg.pki_dir), self.cfg.broker_config_dir, settings)
        if self.conn is not None and b.refuse_quarantined:  # refused from the start
            self.broker.refused = frozenset(
                d.id for d in registry.list_devices(self.conn, registry.QUARANTINED))
        if self.conn is not None and b.psk_port:  # the session keys in force (docs/session-keys.md)
            from gateway.store import session_keys

            self.broker.session_keys = session_keys.broker_keys(self.conn)
        await self.broker.start()

    def _tls(self) -> ssl.SSLContext:
        cert, key, ca = self.cfg.mqtt_files()
        for label, path in (("cert", cert), ("key", key), ("ca", ca)):
            if not path.exists():
                raise ConfigError(
                    f"[mqtt] {label}: {path} does not exist (issue it with `torpor pki gateway`)")
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        ctx.load_cert_chain(str(cert), str(key))
        return ctx

    async def _ingest(self) -> None:
        assert self.ingest is not None
        m = self.cfg.mqtt
        client = MqttClient(ClientOptions(
            self.cfg.mqtt_host, self.cfg.mqtt_port, m.client_id, ssl=self._tls(),
            keepalive=m.keepalive, connect_timeout=m.connect_timeout_s,
            # A persistent session: frames published while the gateway restarts wait in
            # the broker instead of waiting for the nodes' next wake.
            clean_session=False,
            # The broker's own bound, plus the fixed header it does not count; a bigger
            # packet is let go unread and acknowledged (Ingest.on_oversized).
            max_packet=MAX_PACKET_SIZE + codec.MAX_FIXED_HEADER, drop_oversized=True,
            # Nothing limits the answers in flight but the batches that produce them.
            max_inflight=65_000,
            # Frames the broker sends with the CONNACK (the persistent session's) wait in
            # the client's queue until Ingest.run() takes them and installs on_message.
        ), on_oversized=self.ingest.on_oversized)
        async with client:
            self.mqtt_connected = True
            log.info("connected to the broker at %s:%d", self.cfg.mqtt_host, self.cfg.mqtt_port)
            # `torpor gateway status` reads the status row: say so now, not at the next tick
            # (it said "disconnected" for up to status_interval_s after the log said connected).
            self._status_now()
            try:
                await self.ingest.run(client)
            finally:
                self.mqtt_connected = False
                self._status_now()

    def _status_now(self) -> None:
        """Write the status row on the writer thread without waiting for it."""
        if self.writer is not None and not self._stop.is_set():
            future = self.writer.submit(self._write_status, "running")
            future.add_done_callback(_log_status_failure)

    def _notify_relay(self, items: list[Queued]) -> None:
        if self.relay is not None:
            self.relay.notify(items)

    async def _status_loop(self) -> None:
        interval = self.cfg.gateway.status_interval_s
        assert self.writer is not None
        while True:
            await asyncio.sleep(interval)
            await self.writer.run(self._status_tick)
            await self._refuse_quarantined()
            self._save_session()

    def _save_session(self) -> None:
        """Once per connection, a status interval after it (its subscription is made by
        then), the supervised broker writes the gateway's session to its persistence file:
        a broker crash then restores it, and frames sent before the gateway is back wait."""
        if not self.mqtt_connected:
            self._session_saved = False
        elif not self._session_saved and self.broker is not None:
            self._session_saved = True
            self.broker.save()

    async def _refuse_quarantined(self) -> None:
        """The supervised broker refuses service to quarantined devices (gateway.transport.broker):
        whoever quarantined or released one (ingest, `torpor device release`), the registry
        says so and this follows within a status interval."""
        broker = self.broker
        if (broker is None or broker.external or self.writer is None or self.conn is None
                or not self.cfg.broker.refuse_quarantined):
            return
        conn = self.conn
        wanted = await self.writer.run(
            lambda: {d.id for d in registry.list_devices(conn, registry.QUARANTINED)})
        try:
            await broker.set_refused(wanted)
        except (GatewayError, OSError) as exc:
            log.warning("could not make the broker refuse quarantined devices: %s", exc)

    def _status_tick(self) -> None:
        assert self.conn is not None
        self._write_status("running")
        with db.transaction(self.conn):
            deadletter.prune(self.conn, self.cfg.gateway.deadletter_max_rows)

    async def _sweep_loop(self) -> None:
        """Expire downlink items past their TTL (gateway.pipeline.downlink) on the writer thread."""
        assert self.writer is not None and self.conn is not None
        conn = self.conn
        while True:
            await self.writer.run(self.downlink.sweep, conn)
            await asyncio.sleep(self.downlink.cfg.sweep_interval_s)

    async def _lifetimes_loop(self) -> None:
        """Renew what is due (CRL, server, gateway and control certificates), reload the
        broker when its files changed, and raise expiry events (gateway.security.lifetimes)."""
        from gateway.security.pki import Pki

        assert self.writer is not None and self.conn is not None
        conn, cfg = self.conn, self.cfg
        pki = Pki(cfg.pki_dir)
        while True:
            report = None
            if cfg.pki.renew:
                async with self._pki_lock:
                    report = await asyncio.to_thread(lifetimes.renew_due, pki, cfg.pki)
                boot, self._boot_renewals = self._boot_renewals, None
                if boot is not None:  # recorded with the first check's
                    report = lifetimes.RenewalReport(boot.renewed + report.renewed,
                                                     boot.failed + report.failed)
                if report.broker_files_changed:
                    self._reload_broker()
            status = await asyncio.to_thread(pki.status)
            now = time.time()
            record = functools.partial(
                lifetimes.record, conn, status, report, upstream=cfg.upstream,
                gateway_id=cfg.mqtt.client_id, now=now)
            _, queued = await self.writer.run(record)
            self._notify_relay(queued)
            self.credentials = lifetimes.summary(status)
            await asyncio.sleep(cfg.pki.check_interval_s)

    async def _rotation_loop(self) -> None:
        """Issue certificates for accepted requests, revoke replaced certificates (then
        reload the broker), and start rotations before device certificates expire."""
        assert self.writer is not None and self.conn is not None and self.rotation is not None
        conn, rotation = self.conn, self.rotation
        due_at = 0.0
        while True:
            async with self._pki_lock:
                changed, queued = await self.writer.run(rotation.work, conn)
                if time.monotonic() >= due_at:
                    due_at = time.monotonic() + self.cfg.pki.check_interval_s
                    started = await self.writer.run(self._start_due, conn)
                    if started:
                        log.info("%d device key rotation(s) started before expiry", len(started))
            self._notify_relay(queued)
            if changed:
                self._reload_broker()
            await asyncio.sleep(self.cfg.pki.rotation_poll_s)

    async def _session_keys_loop(self) -> None:
        """TLS-PSK session keys (gateway.pipeline.session_keys): bookkeeping, then the
        broker's psk_file (reload, sessions of withdrawn keys cut), then new keys queued
        for devices the broker holds none for."""
        assert self.writer is not None and self.conn is not None and self.broker is not None
        assert self.session_keys is not None
        conn, broker, keys = self.conn, self.broker, self.session_keys
        while True:
            want = await self.writer.run(keys.plan, conn)
            if want != broker.session_keys:
                gone = await broker.set_session_keys(want)
                log.info("broker holds %d session key(s)%s", len(want),
                         f"; withdrawn and cut: {', '.join(gone)}" if gone else "")
            keys.broker_applied(broker.session_keys)
            await self.writer.run(keys.issue, conn)
            await asyncio.sleep(self.cfg.pki.rotation_poll_s)

    def _start_due(self, conn: sqlite3.Connection) -> list[int]:
        with db.transaction(conn):
            self.rotation.sweep(conn)  # what the queue gave up on ends first
            return list(self.rotation.start_due(conn))

    def _reload_broker(self) -> None:
        """SIGHUP: Mosquitto reloads its certificate, key and CRL and keeps live sessions."""
        broker = self.broker
        if broker is None or broker.external:
            log.warning("renewed the broker's certificate or CRL: reload the broker "
                        "(`systemctl reload mosquitto`) so that it uses them")
            return
        try:
            broker.reload()
        except GatewayError as exc:
            log.warning("could not reload the broker after a renewal: %s", exc)

    def _write_status(self, state: str) -> None:
        assert self.conn is not None
        now = time.time()
        detail: dict[str, Any] = {"mqtt_connected": self.mqtt_connected,
                                  "restarts": self.restarts, "config": self.cfg.source}
        if self.ingest is not None:
            stored = self.ingest.metrics.readings_stored
            mono = time.monotonic()
            span = mono - self._last_t
            if span > 0.5:
                self._rate = (stored - self._last_total) * 60.0 / span
                self._last_total, self._last_t = stored, mono
            detail["readings_per_min"] = round(self._rate, 1)
            detail["ingest"] = self.ingest.metrics.as_dict()
            detail["downlink"] = self.downlink.metrics.as_dict()
        if self.broker is not None:
            detail["broker_pid"] = self.broker.pid
            detail["broker_restarts"] = self.broker.restarts
        if self.relay is not None:
            detail["relay_connected"] = bool(self.relay.connected)
            if getattr(self.relay, "pid", None) is not None:
                detail["relay_pid"] = self.relay.pid
        if self.web is not None and self.web.pid is not None:
            detail["web_pid"] = self.web.pid
        if self.credentials:
            detail["credentials_days_left"] = self.credentials
        with db.transaction(self.conn):
            status_store.write(self.conn, pid=os.getpid(), started_at=self._started,
                               updated_at=now, state=state,
                               interval_s=self.cfg.gateway.status_interval_s, detail=detail)


def _log_status_failure(future: Any) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("could not write the gateway status: %s", future.exception())


def check_rules(path: Path) -> Any:
    """`torpor gateway rules check`: the rules file validated as the running gateway loads
    it (gateway.pipeline.rules.RuleSet; RulesError, a ConfigError, naming the key)."""
    from gateway.pipeline.rules import load_rules

    return load_rules(path)


def run(cfg: GatewayConfig, *, on_hello: HelloHook = no_downlink) -> None:
    """Blocking entry point for `torpor gateway run`."""
    asyncio.run(Service(cfg, on_hello=on_hello).run())
