"""Operator actions on a device's identity: add it, release it from quarantine, revoke it.

Each returns what it did for the caller to show; none prints. Revoking touches the PKI
(its CRL), the registry, the upstream events and the broker (reload, then the live
session cut), in that order, so a failure part way leaves the device revoked in the
registry and says what is left to do.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from gateway import config as gwconfig
from gateway.errors import BrokerError
from gateway.pipeline.events import enqueue_events
from gateway.security.pki import Pki
from gateway.store import db, deadletter, readings, rotations, session_keys
from gateway.store import devices as registry
from gateway.store import status as status_store
from gateway.transport import broker

EXTERNAL_BROKER_UNIT = "torpor-mosquitto.service"
CLASSES = registry.CLASSES
STATUSES = registry.STATUSES
RELOAD_WAIT_S = 5.0


@dataclass(frozen=True, slots=True)
class Added:
    device: registry.Device
    serial: str | None  # the certificate issued with it, when asked for


@dataclass(frozen=True, slots=True)
class Revoked:
    device: registry.Device
    serials: tuple[int, ...]  # certificates newly revoked (empty: none were left)
    # The mosquitto to reload: the supervised one from the gateway's status, or the one
    # the operator named; None with a supervised broker that is not running (it reads the
    # new CRL when it starts) or an external one (reloaded through systemd).
    broker_pid: int | None
    broker_running: bool


@dataclass(frozen=True, slots=True)
class Detail:
    """What `torpor device show` tells of one device (downlink apart)."""

    device: registry.Device
    ack_cumulative: int  # the highest reading id below which all are stored
    committed_above: int  # readings stored above it
    readings: int
    dead_letters: int
    recent_dead_letters: tuple[deadletter.DeadLetter, ...]
    rotation: rotations.Rotation | None = None  # the latest key rotation over the air
    session_key: session_keys.SessionKey | None = None  # TLS-PSK (docs/session-keys.md)


def listing(conn: sqlite3.Connection, status: str | None = None) -> list[registry.Device]:
    """Every device, or those in `status`."""
    return registry.list_devices(conn, status)


def detail(conn: sqlite3.Connection, device_id: str, *, letters: int = 5) -> Detail:
    dev = registry.get(conn, device_id)
    hwm, above, total = readings.stats(conn, dev.id)
    rots = rotations.of_device(conn, dev.id, limit=1)
    return Detail(dev, hwm, above, total, deadletter.count(conn, dev.id),
                  tuple(deadletter.list_recent(conn, dev.id, limit=letters)),
                  rots[0] if rots else None, session_keys.get(conn, dev.id))


def add(conn: sqlite3.Connection, cfg: gwconfig.GatewayConfig, device_id: str,
        device_class: str = "sensor", *, issue_cert: bool = False,
        board: str | None = None) -> Added:
    """Register a device, issuing its certificate first when asked. `board` must be a
    profile of the board profiles file (checked before anything is written)."""
    if board:
        gwconfig.board_models(cfg).check(board)
    serial = None
    if issue_cert:
        creds = Pki(cfg.pki_dir).issue_device(device_id)
        serial = format(creds.serial, "x")
    return Added(registry.add(conn, device_id, device_class, serial, board=board), serial)


def set_board(conn: sqlite3.Connection, cfg: gwconfig.GatewayConfig, device_id: str,
              board: str) -> registry.Device:
    """Set the device's board ("": none, the default [energy] board stands in)."""
    if board:
        gwconfig.board_models(cfg).check(board)
    return registry.set_board(conn, device_id, board or None)


def release(conn: sqlite3.Connection, cfg: gwconfig.GatewayConfig,
            device_id: str) -> registry.Device:
    """Release a quarantined device and tell upstream, in one transaction."""
    with db.transaction(conn):
        dev = registry.release(conn, device_id)
        enqueue_events(conn, cfg.upstream, [(dev.id, "released", {})], time.time())
    return dev


def revoke(conn: sqlite3.Connection, cfg: gwconfig.GatewayConfig, device_id: str, *,
           broker_pid: int | None = None) -> Revoked:
    """Revoke the certificates (CRL rewritten), mark the device revoked and tell upstream
    in one transaction. The broker still accepts the device until `cut_off`.
    `broker_pid`: the mosquitto to signal when the gateway's status does not name one."""
    dev = registry.get(conn, device_id)
    pki = Pki(cfg.pki_dir)
    had_certs = bool(pki.device_records(dev.id))
    serials = pki.revoke(dev.id) if had_certs else []
    if serials or dev.status != registry.REVOKED:
        now = time.time()
        with db.transaction(conn):
            registry.set_status(conn, dev.id, registry.REVOKED, "revoked by the operator",
                                now=now)
            # A rotation under way would certify a new key of a revoked device: cancel it.
            rotations.cancel_open(conn, dev.id, "the device was revoked", now)
            # Its session key opens nothing from the next broker reload on.
            session_keys.remove(conn, dev.id)
            enqueue_events(conn, cfg.upstream, [(dev.id, "revoked", {
                "serials": [format(s, "x") for s in serials]})], now)
    if cfg.broker.psk_port and cfg.broker.mode == "supervised":
        broker.write_psk(cfg.broker_config_dir, pki, session_keys.broker_keys(conn))
    running_pid = _broker_pid(cfg, conn)
    running = not (cfg.broker.mode == "supervised" and running_pid is None)
    return Revoked(registry.get(conn, device_id), tuple(serials), broker_pid or running_pid,
                   running)


def cut_off(cfg: gwconfig.GatewayConfig, revoked: Revoked) -> bool:
    """Make the running broker reload the CRL (and the psk_file without the device's
    session key), wait until it refuses the certificate, then cut the device's live
    sessions, certificate or session key alike. Whether the refusal was seen (False: the device's key
    is not at hand to check with). Raises BrokerError when the broker cannot be reloaded."""
    pki = Pki(cfg.pki_dir)
    _reload_broker(cfg.broker.mode, revoked.broker_pid)
    refused = _wait_refused(cfg, pki, revoked.device.id)
    asyncio.run(broker.kick(cfg.mqtt_host, cfg.mqtt_port, pki, revoked.device.id))
    return refused


def _broker_pid(cfg: gwconfig.GatewayConfig, conn: sqlite3.Connection) -> int | None:
    """The supervised mosquitto's pid, from the running gateway's status."""
    if cfg.broker.mode != "supervised":
        return None
    st = status_store.read_status(conn)
    pid = st.detail.get("broker_pid") if st.running else None
    return int(pid) if pid else None


def _reload_broker(mode: str, pid: int | None) -> None:
    """SIGHUP: mosquitto re-reads the CRL and refuses the revoked certificates from now on."""
    if pid is not None:
        comm = Path(f"/proc/{pid}/comm")
        if comm.exists() and comm.read_text().strip() != "mosquitto":
            raise BrokerError(f"process {pid} is not mosquitto; reload the broker yourself")
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError as exc:
            raise BrokerError(f"could not signal mosquitto (pid {pid}): {exc}; the device is "
                              "revoked, reload the broker yourself") from None
        return
    systemctl = shutil.which("systemctl")
    if mode == "external" and systemctl:
        done = subprocess.run([systemctl, "--no-ask-password", "reload", EXTERNAL_BROKER_UNIT],
                              capture_output=True, text=True, timeout=30)
        if done.returncode == 0:
            return
    raise BrokerError("the device is revoked but the broker was not reloaded: run "
                      f"`systemctl reload {EXTERNAL_BROKER_UNIT}` (or pass --broker-pid), then "
                      "`torpor device revoke` again to cut its live session")


def _wait_refused(cfg: gwconfig.GatewayConfig, pki: Pki, device_id: str) -> bool:
    """Probe with the revoked certificate until the broker refuses it (the reload is
    handled at the top of mosquitto's next loop). False when the key is not at hand."""
    records = pki.device_records(device_id)
    if not records:
        time.sleep(0.5)
        return False
    folder = pki.path / Path(max(records, key=lambda r: r.not_before).path).parent
    cert, key = folder / "cert.pem", folder / "key.pem"
    if not key.exists():
        time.sleep(0.5)
        return False
    ctx = broker.client_ssl_context(pki, cert, key)
    deadline = time.monotonic() + RELOAD_WAIT_S
    while time.monotonic() < deadline:
        try:
            if broker.mqtt_probe(cfg.mqtt_host, cfg.mqtt_port, ctx, timeout=2.0) != 0:
                return True
        except (OSError, ssl.SSLError, ConnectionError):
            return True
        time.sleep(0.1)
    raise BrokerError(f"the broker still accepts {device_id}'s certificate {RELOAD_WAIT_S:.0f}s "
                      "after the reload: check that its crlfile is the PKI's crl.pem")
