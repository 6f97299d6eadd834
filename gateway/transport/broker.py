"""The gateway's Mosquitto: its configuration, a supervisor that runs it, and revocation.

Mosquitto is the only door nodes knock on: one mutual-TLS listener, the certificate's CN
is the MQTT username and the client id, and the ACL confines every node to
`torpor/<its id>/#`.

Client ids are bound to identities by `use_username_as_clientid`: whatever id a client
asks for, the broker gives it its certificate's CN. Mosquitto disconnects the holder of an
id when another client connects with it, so without this one valid certificate could keep
the gateway (or any node) off the broker and replace its persistent session. The dynamic-
security plugin's `clientid` binding does not help here: Mosquitto 2.0 skips the plugins'
password check, where that binding lives, when `use_identity_as_username` is set. As every
connection of one certificate shares one id, the gateway's short control connections
(probes, the control API) present their own certificate (`Pki.control`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import getpass
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from gateway import proto
from gateway.errors import BrokerError
from gateway.security.pki import DEVICE_ID_MAX, Pki, validate_device_id
from gateway.transport import codec
from gateway.transport.errors import MalformedPacket

log = logging.getLogger(__name__)

TOPIC_ROOT = "torpor"
CONFIG_NAME = "mosquitto.conf"
ACL_NAME = "acl"
PSK_NAME = "psk_keys"  # identity:hex-key lines for the PSK listener (docs/session-keys.md)
PSK_HINT = "torpor"
CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
DYNSEC_NAME = "dynsec.json"
PERSISTENCE_NAME = "mosquitto.db"

# The largest packet any client needs to send, from the spec's largest frame. A PUBLISH is
# 1 byte of packet type, at most 4 of remaining length, 2 of topic length, the topic, 2 of
# packet id and the frame: frame + topic + 9. A node's CONNECT carries a Will
# (`torpor/<id>/status`, at most a frame): 1 + 4 + 10 of variable header + 2 + client id
# + 2 + topic + 2 + frame = frame + topic + client id + 21. Client ids are device ids
# (the broker replaces any other), so MAX_CLIENT_ID bounds them with room for the tools'
# longer ids, and MQTT 5 properties get the rest of MQTT_OVERHEAD.
MAX_TOPIC = len(f"{TOPIC_ROOT}/") + DEVICE_ID_MAX + len("/status")
MAX_CLIENT_ID = 64
MQTT_OVERHEAD = 128
assert 21 + MAX_CLIENT_ID <= MQTT_OVERHEAD
MAX_PACKET_SIZE = proto.MAX_FRAME + MAX_TOPIC + MQTT_OVERHEAD


def find_mosquitto() -> str:
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise BrokerError("mosquitto is not installed: `apt-get install mosquitto` (2.0 or newer)")
    return found


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """What the rendered mosquitto.conf depends on."""

    host: str = "127.0.0.1"
    port: int = 8883
    # Mosquitto queues QoS 1 messages per client beyond the in-flight window and silently
    # drops them past this bound (default 1000). The gateway's subscriber receives every
    # node's bursts: a burst of wakes while it is busy committing to SQLite or restarting
    # must not cost readings, so the bound is high and memory is capped by bytes instead.
    max_queued_messages: int = 100_000
    max_queued_bytes: int = 64 * 1024 * 1024
    # Unacknowledged QoS 1 messages per client in flight at once.
    max_inflight_messages: int = 100
    # On, for the gateway's session: its subscription survives a broker restart, so frames
    # that nodes publish after the restart and before the gateway is back wait for it. No
    # reading relies on the snapshot's messages: a node deletes a reading only after the
    # gateway acknowledged it (after the SQLite commit), so what a crash loses is sent
    # again. Mosquitto writes the file at a clean stop and every `autosave_interval_s`.
    persistence: bool = True
    autosave_interval_s: int = 1800
    # Every packet bigger than this is refused and its connection closed, before Mosquitto
    # reserves memory for it (see MAX_PACKET_SIZE).
    max_packet_size: int = MAX_PACKET_SIZE
    # The user mosquitto drops to when started as root; it must be able to read the key
    # files (0600, owned by whoever ran `torpor pki`). None: the current user.
    user: str | None = None
    # Loaded only to cut a revoked node's live session (see `kick`): SIGHUP makes mosquitto
    # refuse new connections with a revoked certificate but leaves live sessions alone.
    dynsec_plugin: str | None = field(default_factory=lambda: default_dynsec_plugin())
    # A second listener for TLS-PSK routine sessions (0: none). Its identities are device
    # ids and become usernames, so the ACL's pattern holds them to their own topics.
    psk_port: int = 0


def default_dynsec_plugin() -> str | None:
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
                   "/usr/lib/arm-linux-gnueabihf", "/usr/lib", "/usr/local/lib"):
        candidate = Path(folder) / "mosquitto_dynamic_security.so"
        if candidate.exists():
            return str(candidate)
    return None


def render_acl(gateway_cn: str, control_cn: str | None = None,
               refused: Iterable[str] = ()) -> str:
    """`#` does not match `$`-topics, so the control identity's access to the dynamic-
    security control API is granted explicitly (and only when that plugin is loaded).

    `refused` (quarantined devices): a `deny` line of their own comes before every pattern,
    so the broker drops what they publish and delivers them nothing. Mosquitto 2.0 offers no
    way to refuse their connection itself: with certificate identities it consults no
    plugin's password check (where the dynamic-security plugin's disableClient acts)."""
    validate_device_id(gateway_cn)
    lines = [
        "# Generated by torpor: the gateway sees everything, a node only its own topics.",
        "# `pattern` lines apply to every client; %u is the certificate CN (device id).",
        f"user {gateway_cn}",
        "topic readwrite #",
        "",
    ]
    if control_cn is not None:
        validate_device_id(control_cn)
        lines += [f"user {control_cn}", f"topic readwrite {CONTROL_TOPIC}/#", ""]
    for device in sorted(set(refused)):
        validate_device_id(device)
        if device in (gateway_cn, control_cn):
            raise BrokerError(f"refusing to refuse the gateway's own identity {device!r}")
        lines += [f"user {device}", "topic deny #", ""]
    lines.append(f"pattern readwrite {TOPIC_ROOT}/%u/#")
    return "\n".join(lines) + "\n"


def render_config(settings: BrokerSettings, pki: Pki, acl_path: Path, *, extra: str = "") -> str:
    """mosquitto.conf for one TLS listener with client certificates and the fleet CRL."""
    server = pki.server
    user = settings.user or getpass.getuser()
    lines = [
        "# Generated by torpor; edit the settings, not this file.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {acl_path}",
        f"user {user}",
        f"persistence {'true' if settings.persistence else 'false'}",
        f"persistence_location {acl_path.parent}/",
        f"persistence_file {PERSISTENCE_NAME}",
        f"autosave_interval {settings.autosave_interval_s}",
        f"max_packet_size {settings.max_packet_size}",
        f"max_queued_messages {settings.max_queued_messages}",
        f"max_queued_bytes {settings.max_queued_bytes}",
        f"max_inflight_messages {settings.max_inflight_messages}",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        "",
    ]
    if settings.dynsec_plugin:
        lines += [
            f"plugin {settings.dynsec_plugin}",
            f"plugin_opt_config_file {acl_path.parent / DYNSEC_NAME}",
            "",
        ]
    lines += [
        # The only listener: no plaintext port exists.
        f"listener {settings.port} {settings.host}",
        "protocol mqtt",
        # Root and issuing CA once there is one (nodes send their certificate alone). Read
        # at start only: Mosquitto 2.0 reloads certfile, keyfile and crlfile on SIGHUP.
        f"cafile {pki.chain_pem}",
        f"certfile {server.cert_pem}",
        f"keyfile {server.key_pem}",
        f"crlfile {pki.crl_path}",
        "require_certificate true",
        "use_identity_as_username true",
        # A client's id is its certificate's CN, whatever it asked for (see the module).
        "use_username_as_clientid true",
        # Minimum version; TLS 1.3 is negotiated when the client offers it.
        "tls_version tlsv1.2",
        # Without it a TLS 1.3 connect took ~48 ms instead of ~3 ms here (Nagle + delayed
        # ACK on the handshake's small records): seconds of radio time across a fleet.
        "set_tcp_nodelay true",
        "",
    ]
    if settings.psk_port:
        lines += [
            # Session keys the gateway issued over certificate sessions; reloaded on SIGHUP.
            f"psk_file {acl_path.parent / PSK_NAME}",
            f"listener {settings.psk_port} {settings.host}",
            "protocol mqtt",
            f"psk_hint {PSK_HINT}",
            "use_identity_as_username true",
            "use_username_as_clientid true",
            "tls_version tlsv1.2",
            "set_tcp_nodelay true",
            "",
        ]
    return "\n".join(lines) + extra


def render_psk(keys: Mapping[str, bytes], reserved: Iterable[str] = (),
               refused: Iterable[str] = ()) -> str:
    """The psk_file: one `identity:hex key` line per device. `reserved` (the gateway's own
    identities, which the ACL lets see everything) can never hold a key; `refused`
    (quarantined devices) are left out, so their key no longer opens a session."""
    skip = frozenset(refused)
    banned = frozenset(reserved)
    lines = []
    for device in sorted(keys):
        validate_device_id(device)
        if device in banned:
            raise BrokerError(f"refusing a session key for the gateway's own identity {device!r}")
        key = keys[device]
        if len(key) < 16:
            raise BrokerError(f"session key of {device!r} is {len(key)} bytes; at least 16")
        if device not in skip:
            lines.append(f"{device}:{key.hex()}")
    return "".join(line + "\n" for line in lines)


def write_psk(folder: Path, pki: Pki, keys: Mapping[str, bytes],
              refused: Iterable[str] = ()) -> Path:
    """Write the psk_file (0600) that the PSK listener reads at start and on SIGHUP."""
    reserved = [pki.gateway.cn] + ([pki.control.cn] if pki.has_control else [])
    path = private_folder(folder) / PSK_NAME
    write_private_text(path, render_psk(keys, reserved, refused))
    return path


def write_private_text(path: Path, text: str) -> None:
    """Write `path` mode 0600 whatever the umask, replacing it whole (never through a
    file another user could have made readable)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def private_folder(folder: Path) -> Path:
    """The broker's folder, 0700: its files name every key the broker reads."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    return folder


def write_config(
    settings: BrokerSettings, pki: Pki, folder: Path, *, extra: str = "",
    refused: Iterable[str] = (), extra_acl: str = "",
) -> Path:
    """Write mosquitto.conf and its ACL (and the dynsec state file if used) into `folder`,
    every file 0600 in a 0700 folder. `extra_acl` goes at the ACL's end (benchmarks give
    an observer of their own read access there)."""
    private_folder(folder)
    if not pki.has_control:
        raise BrokerError(
            f"no control certificate in {pki.path}: run `torpor pki gateway` again (it issues "
            "the gateway's certificate and the control certificate its probes use)")
    control = pki.control.cn
    acl = folder / ACL_NAME
    write_private_text(acl, render_acl(pki.gateway.cn, control if settings.dynsec_plugin else None,
                                       refused) + extra_acl)
    if settings.dynsec_plugin:
        write_dynsec_state(folder / DYNSEC_NAME, control)
    if settings.psk_port and not (folder / PSK_NAME).exists():
        write_psk(folder, pki, {})
    persisted = folder / PERSISTENCE_NAME
    if persisted.exists():
        os.chmod(persisted, 0o600)
    conf = folder / CONFIG_NAME
    write_private_text(conf, render_config(settings, pki, acl, extra=extra))
    return conf


def write_dynsec_state(path: Path, control_cn: str) -> None:
    """The dynamic-security plugin only serves to cut sessions here; authorisation stays with
    the ACL file, which mosquitto consults first. Only the gateway's control identity may use
    its control API."""
    import json

    state = {
        "defaultACLAccess": {
            "publishClientSend": True, "publishClientReceive": True,
            "subscribe": True, "unsubscribe": True,
        },
        "clients": [{"username": control_cn, "roles": [{"rolename": "admin"}]}],
        "groups": [],
        "roles": [{
            "rolename": "admin",
            "acls": [
                {"acltype": "publishClientSend", "topic": "$CONTROL/dynamic-security/#", "allow": True},
                {"acltype": "publishClientReceive", "topic": "$CONTROL/dynamic-security/#", "allow": True},
                {"acltype": "subscribePattern", "topic": "$CONTROL/dynamic-security/#", "allow": True},
            ],
        }],
    }
    write_private_text(path, json.dumps(state, indent=1))


# --- health checks: one CONNECT through the transport's codec -----------------------------

def probe_connect(client_id: str | None = None, keepalive: int = 10) -> bytes:
    """The CONNECT a health check sends (a clean session under a unique client id)."""
    cid = client_id or f"torpor-probe-{os.getpid()}-{time.monotonic_ns()}"
    return codec.encode_connect(codec.Connect(cid, keepalive, clean_session=True))


def _connack(data: bytes) -> int | None:
    """The CONNACK return code once `data` holds the whole packet, else None."""
    if len(data) < 4:
        return None
    try:
        packet = codec.decode_packet(data[:4])
    except MalformedPacket as exc:
        raise ConnectionError(f"unexpected reply {data[:8]!r} to CONNECT: {exc}") from None
    if not isinstance(packet, codec.ConnAck):
        raise ConnectionError(f"unexpected reply {type(packet).__name__} to CONNECT")
    return packet.return_code


def client_ssl_context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """Client context trusting the fleet CA, presenting `cert` (default: the gateway's
    control certificate, which probes and the control API use: see the module)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_pem))
    creds = pki.control
    ctx.load_cert_chain(str(cert or creds.cert_pem), str(key or creds.key_pem))
    return ctx


def mqtt_probe(host: str, port: int, ctx: ssl.SSLContext | None, timeout: float = 3.0,
               server_hostname: str | None = None) -> int:
    """Blocking (m)TLS + MQTT CONNECT; returns the CONNACK code (0 = accepted). `ctx`
    None: plain TCP (a test broker without TLS). Raises OSError/ssl.SSLError when the
    broker is down or refuses the handshake, ConnectionError when it answers badly."""
    with socket.create_connection((host, port), timeout=timeout) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.ExitStack() as stack:
            sock: socket.socket = raw
            if ctx is not None:
                sock = stack.enter_context(
                    ctx.wrap_socket(raw, server_hostname=server_hostname or host))
            sock.settimeout(timeout)
            sock.sendall(probe_connect())
            ack = b""
            code = None
            while code is None:
                chunk = sock.recv(4 - len(ack))
                if not chunk:
                    raise ConnectionError("broker closed the connection before CONNACK")
                ack += chunk
                code = _connack(ack)
            with contextlib.suppress(OSError):
                sock.sendall(codec.DISCONNECT_BYTES)
            return code


async def async_mqtt_probe(host: str, port: int, ctx: ssl.SSLContext, timeout: float = 3.0) -> int:
    """The asyncio twin of mqtt_probe."""
    async def probe() -> int:
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host)
        try:
            writer.write(probe_connect())
            await writer.drain()
            code = _connack(await reader.readexactly(4))
            assert code is not None  # four bytes are a whole CONNACK or an error
            writer.write(codec.DISCONNECT_BYTES)
            await writer.drain()
            return code
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    return await asyncio.wait_for(probe(), timeout)


# --- the broker's complaints -----------------------------------------------------------

# Mosquitto's stderr carries no level: these are the words of its errors and warnings
# ("Error: ...", "OpenSSL Error[0]: ...", "Warning: ...", "Unable to ...", "... failed: ...",
# "Client x already connected, closing old connection.", "... disconnected due to ...").
_PROBLEM = re.compile(r"\b(error|warning|unable|failed|denied|refused|already connected|"
                      r"due to|out of memory|oversize)\b", re.IGNORECASE)
_NOISE = re.compile(r"^\S+: |\d+(\.\d+){3}(:\d+)?|\[[0-9a-f:]+\](:\d+)?")


def is_broker_problem(line: str) -> bool:
    """A Mosquitto log line that an operator must see (logged at warning level)."""
    return bool(_PROBLEM.search(line))


class _Repeats:
    """The same complaint (addresses and time aside) is logged once per `every_s`, with a
    count of what was held back: a device retrying with a bad certificate must not drown
    the log, nor hide everything else."""

    def __init__(self, every_s: float = 30.0) -> None:
        self.every_s = every_s
        self._seen: dict[str, tuple[float, int]] = {}

    def admit(self, line: str) -> int | None:
        key = _NOISE.sub("", line)
        now = time.monotonic()
        last, held = self._seen.get(key, (-1e9, 0))
        if now - last < self.every_s:
            self._seen[key] = (last, held + 1)
            return None
        if len(self._seen) > 1000:
            self._seen.clear()
        self._seen[key] = (now, 0)
        return held


def credential_problems(pki: Pki, now: dt.datetime | None = None) -> list[str]:
    """What makes the broker refuse every client although it runs: an expired CRL (OpenSSL
    then fails every handshake with only "certificate verify failed"), an expired or not
    yet valid CA, server or gateway certificate."""
    now = now or dt.datetime.now(dt.UTC)
    found: list[str] = []
    try:
        crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    except (OSError, ValueError) as exc:
        found.append(f"the CRL {pki.crl_path} cannot be read ({exc})")
    else:
        nxt = crl.next_update_utc
        if nxt is not None and nxt <= now:
            found.append(
                f"the CRL {pki.crl_path} expired on {nxt:%Y-%m-%d %H:%M} UTC, so the broker "
                f"refuses every certificate: run `torpor pki crl --dir {pki.path}` "
                "(with the CA key) and start again")
    for label, path in (("CA", pki.ca_pem), ("server", pki.path / "server.pem"),
                        ("gateway", pki.path / "gateway.pem"),
                        ("control", pki.path / "control.pem")):
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            found.append(f"the {label} certificate {path} is missing or unreadable")
            continue
        if cert.not_valid_after_utc <= now:
            found.append(f"the {label} certificate {path} expired on "
                         f"{cert.not_valid_after_utc:%Y-%m-%d} UTC")
        elif cert.not_valid_before_utc > now:
            found.append(f"the {label} certificate {path} is valid only from "
                         f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (is the clock right?)")
    return found


# --- the supervisor ---------------------------------------------------------------------

@dataclass(slots=True)
class _Backoff:
    first: float = 0.5
    limit: float = 30.0
    current: float = field(default=0.0)

    def next(self) -> float:
        self.current = self.first if self.current == 0 else min(self.current * 2, self.limit)
        return self.current

    def reset(self) -> None:
        self.current = 0.0


class BrokerSupervisor:
    """Runs mosquitto as a child (or watches a systemd-managed one with `external=True`):
    start, health check by a real mTLS CONNECT with the gateway's certificate, restart
    with backoff when it dies, stop. Also reloads the CRL and cuts revoked nodes."""

    def __init__(
        self,
        pki: Pki,
        config_dir: Path,
        settings: BrokerSettings = BrokerSettings(),
        *,
        external: bool = False,
        on_log: Callable[[str], None] | None = None,
    ) -> None:
        self.pki = pki
        self.settings = settings
        self.config_dir = Path(config_dir)
        self.external = external
        self.config_path = self.config_dir / CONFIG_NAME
        self.logs: deque[str] = deque(maxlen=2000)
        self._on_log = on_log
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        self._backoff = _Backoff()
        self.restarts = 0
        self.last_probe_error = ""
        self.refused: frozenset[str] = frozenset()  # quarantined devices (see set_refused)
        self.session_keys: dict[str, bytes] = {}  # the psk_file's keys (see set_session_keys)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    async def start(self, timeout: float = 10.0) -> None:
        self._stopping = False
        if not self.external:
            write_config(self.settings, self.pki, self.config_dir, refused=self.refused)
            if self.settings.psk_port:
                write_psk(self.config_dir, self.pki, self.session_keys, self.refused)
            await self._spawn()
        await self.wait_healthy(timeout)
        if not self.external:
            self._watch = asyncio.create_task(self._watchdog(), name="broker-watchdog")

    async def _spawn(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            find_mosquitto(), "-c", str(self.config_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read_logs(self._proc), name="broker-logs")
        log.info("mosquitto started (pid %d) on %s:%d", self._proc.pid, self.settings.host, self.settings.port)

    async def _read_logs(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        limiter = _Repeats()
        while line := await proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            self.logs.append(text)
            if self._on_log:
                self._on_log(text)
            if is_broker_problem(text):
                repeated = limiter.admit(text)
                if repeated is not None:
                    log.warning("mosquitto: %s%s", text,
                                f" (and {repeated} more like it)" if repeated else "")
            else:
                log.debug("mosquitto: %s", text)

    async def healthy(self, timeout: float = 3.0) -> bool:
        try:
            ctx = client_ssl_context(self.pki)
            return await async_mqtt_probe(self.settings.host, self.settings.port, ctx, timeout) == 0
        except (TimeoutError, OSError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            self.last_probe_error = f"{type(exc).__name__}: {exc}"
            return False

    async def wait_healthy(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.returncode is not None:
                await asyncio.sleep(0.05)  # let the log reader catch the reason
                raise BrokerError(
                    f"mosquitto exited with code {self._proc.returncode}: "
                    + " | ".join(list(self.logs)[-5:])
                )
            if await self.healthy(timeout=2.0):
                return
            await asyncio.sleep(0.1)
        causes = credential_problems(self.pki)
        seen = [line for line in self.logs if is_broker_problem(line)][-3:]
        raise BrokerError(
            f"broker at {self.settings.host}:{self.settings.port} did not accept an mTLS "
            f"connection within {timeout:.0f}s: "
            + ("; ".join(causes) if causes else "no expired credential found")
            + (f"; last probe: {self.last_probe_error}" if self.last_probe_error else "")
            + (f"; mosquitto said: {' | '.join(seen)}" if seen else "")
        )

    async def _watchdog(self) -> None:
        while not self._stopping:
            proc = self._proc
            assert proc is not None
            code = await proc.wait()
            if self._stopping:
                return
            delay = self._backoff.next()
            log.warning("mosquitto exited with code %s; restarting in %.1fs", code, delay)
            await asyncio.sleep(delay)
            try:
                await self._spawn()
                await self.wait_healthy()
                self.restarts += 1
                self._backoff.reset()
            except BrokerError as exc:
                log.error("broker restart failed: %s", exc)

    async def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        if self._watch:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 2)
            self._reader = None

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads its configuration, ACL, certificates and CRL."""
        if self.external:
            raise BrokerError("the broker is managed by systemd: run `systemctl reload mosquitto`")
        if self.pid is None:
            raise BrokerError("mosquitto is not running")
        os.kill(self.pid, signal.SIGHUP)

    def save(self) -> bool:
        """SIGUSR1: mosquitto writes its persistence file now (the gateway's session and
        subscription), so that even a crash of the broker restores them. False when there
        is no child to signal."""
        if self.external or self.pid is None or not self.settings.persistence:
            return False
        os.kill(self.pid, signal.SIGUSR1)
        return True

    async def set_refused(self, devices: Iterable[str]) -> frozenset[str]:
        """Make the broker refuse service to exactly `devices` (the quarantined ones):
        rewrite the ACL, reload it, and cut the live sessions of the newly refused so they
        come back under the new rules. Returns the newly refused. Supervised mode only: a
        broker that systemd runs is reloaded by `systemctl reload`."""
        wanted = frozenset(devices)
        if wanted == self.refused:
            return frozenset()
        if self.external:
            raise BrokerError("the broker is managed by systemd: it cannot be told to refuse "
                              "quarantined devices from here")
        added = wanted - self.refused
        settings = self.settings
        acl = render_acl(self.pki.gateway.cn,
                         self.pki.control.cn if settings.dynsec_plugin else None, wanted)
        write_private_text(self.config_dir / ACL_NAME, acl)
        self.refused = wanted
        if settings.psk_port:  # a quarantined device's session key opens nothing either
            write_psk(self.config_dir, self.pki, self.session_keys, wanted)
        self.reload()
        await asyncio.sleep(0.2)  # mosquitto reloads at the top of its next loop
        for device in sorted(added):
            await kick(settings.host, settings.port, self.pki, device)
        log.info("broker refuses %d quarantined device(s)%s", len(wanted),
                 f"; newly: {', '.join(sorted(added))}" if added else "")
        return added

    async def set_session_keys(self, keys: Mapping[str, bytes]) -> list[str]:
        """Make the PSK listener accept exactly `keys` (device -> key): rewrite the psk_file,
        reload, and cut the live sessions of every device whose key went away or changed,
        so none stays in on a key it no longer holds. Returns those devices; raises
        BrokerError when one could not be cut (the caller retries)."""
        if self.external or not self.settings.psk_port:
            raise BrokerError("session keys need the supervised broker with [broker] psk_port")
        new = dict(keys)
        gone = sorted(d for d, k in self.session_keys.items() if new.get(d) != k)
        write_psk(self.config_dir, self.pki, new, self.refused)
        self.reload()
        await asyncio.sleep(0.2)  # mosquitto reloads at the top of its next loop
        for device in gone:
            await kick(self.settings.host, self.settings.port, self.pki, device)
        # Only now: a failed cut leaves the old set here, so the next call cuts again.
        self.session_keys = new
        return gone

    async def revoke_and_kick(self, device_id: str) -> list[int]:
        """Revoke the device's certificates, make the broker refuse new connections with
        them, and cut its live session now."""
        serials = self.pki.revoke(device_id)
        if not self.external:
            self.reload()
            # mosquitto handles the signal at the top of its next loop; give it that loop
            # before the kick so the node cannot slip back in between.
            await asyncio.sleep(0.2)
        await kick(self.settings.host, self.settings.port, self.pki, device_id)
        return serials


async def kick(host: str, port: int, pki: Pki, device_id: str, timeout: float = 5.0) -> None:
    """Disconnect every live session of `device_id` through the dynamic-security plugin.

    Mosquitto 2.0.11 has no `kickClient`; creating and deleting a dynsec client with the
    device's username disconnects its sessions on every 2.x release. Devices are never
    dynsec clients otherwise (the ACL file authorises them), so nothing else changes.
    """
    import json

    from gateway.transport.client import ClientOptions, MqttClient
    from gateway.transport.errors import TransportError

    validate_device_id(device_id)
    if device_id in (pki.gateway.cn, pki.control.cn):
        raise BrokerError("refusing to kick the gateway's own identity")
    request = {"commands": [
        {"command": "createClient", "username": device_id, "correlationData": "create"},
        {"command": "deleteClient", "username": device_id, "correlationData": "delete"},
    ]}
    options = ClientOptions(host, port, f"torpor-kick-{os.getpid()}",
                            ssl=client_ssl_context(pki), connect_timeout=timeout)
    try:
        async with asyncio.timeout(timeout):
            async with MqttClient(options) as client:
                await client.subscribe((CONTROL_TOPIC + "/response", 1), timeout=timeout)
                await client.publish(CONTROL_TOPIC, json.dumps(request).encode(), qos=1)
                async for message in client.messages():
                    reply = json.loads(message.payload)
                    errors = [r["error"] for r in reply.get("responses", []) if r.get("error")]
                    if errors:
                        raise BrokerError(f"broker refused to disconnect {device_id}: {errors}")
                    log.info("disconnected live sessions of %s", device_id,
                             extra={"device_id": device_id})
                    return
                raise BrokerError(f"the broker closed the control session before answering "
                                  f"the request to disconnect {device_id}")
    except TransportError as exc:
        raise BrokerError(f"could not reach the broker at {host}:{port} to disconnect {device_id}: {exc}") from exc
    except TimeoutError:
        raise BrokerError(
            f"no reply from the broker's dynamic-security plugin within {timeout:.0f}s: is it "
            "loaded (BrokerSettings.dynsec_plugin)? Otherwise restart mosquitto to cut the session"
        ) from None
