"""The gateway's configuration: one TOML file, defaults for everything, checked at start.

Unknown keys and wrong types are errors naming the key (`[ingest] batch_max_ms: ...`).
Relative paths are relative to the configuration file's folder.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gateway import proto
from gateway.errors import ConfigError

__all__ = [
    "BoardModels", "BrokerConfig", "ConfigError", "DownlinkConfig", "EnergyConfig", "EnergyModel",
    "GatewayConfig", "GatewaySection",
    "HassConfig", "IngestConfig", "MqttConfig", "PkiConfig", "RulesConfig", "UpstreamConfig",
    "WebConfig", "load_config", "parse_config",
]

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class DownlinkConfig:
    """How delivery spends a node's wake."""

    max_attempts: int = 5  # deliveries without a result before an item fails
    frame_cost_ms: int = 150  # awake-window time one item costs the node: receive, run, answer
    window_reserve_ms: int = 100  # kept for the ACK and SLEEP_NOW
    grace_s: float = 30.0  # a HELLO later than the expected wake + this counts missed wakes
    sweep_interval_s: float = 60.0  # how often expired items are marked expired
    awake_poll_s: float = 0.5  # how often items queued for a node under stay_awake are sent


@dataclass(frozen=True, slots=True)
class GatewaySection:
    data_dir: str = "/var/lib/torpor"
    db: str = ""  # default: <data_dir>/gateway.db
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    status_interval_s: float = 5.0
    deadletter_max_rows: int = 100_000

    @property
    def db_path(self) -> Path:
        return Path(self.db) if self.db else Path(self.data_dir) / "gateway.db"


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    mode: Literal["supervised", "external"] = "supervised"
    host: str = "127.0.0.1"
    port: int = 8883
    pki_dir: str = ""  # default: <data_dir>/pki
    mosquitto: str = ""  # default: found on PATH or in /usr/sbin
    config_dir: str = ""  # default: <data_dir>/broker (supervised mode writes mosquitto.conf)
    user: str = ""  # user mosquitto drops to when started as root; default: the current user
    max_queued_messages: int = 100_000
    max_inflight_messages: int = 100
    # Supervised mode: the broker also refuses service to quarantined devices (ACL deny and
    # a cut session; see gateway.transport.broker), so their frames no longer reach the gateway.
    refuse_quarantined: bool = True
    # A second listener for TLS-PSK routine sessions (docs/session-keys.md), supervised
    # mode only; 0: none, every session uses the device certificate.
    psk_port: int = 0


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """The gateway's own MQTT client (defaults: the broker's address, the PKI's gateway
    certificate)."""

    host: str = ""
    port: int = 0
    cert: str = ""
    key: str = ""
    ca: str = ""
    client_id: str = "torpor-gateway"
    keepalive: int = 30
    connect_timeout_s: float = 10.0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0


@dataclass(frozen=True, slots=True)
class IngestConfig:
    batch_max_frames: int = 512
    # 0: commit as soon as the writer is free; under load a batch is what arrived during
    # the previous commit (group commit, gateway.pipeline.ingest), so lingering only adds latency.
    batch_max_ms: float = 0.0
    # A node sends its bursts right after its HELLO: a batch that ends with a HELLO waits
    # up to this long for them, so one commit (one fsync) answers the whole wake.
    hello_linger_ms: float = 2.0
    malformed_threshold: int = 5
    malformed_window_s: float = 60.0
    rate_limit_frames_per_min: int = 600
    # Dead letters (gateway.store.deadletter): each keeps at most this many bytes of its frame...
    deadletter_raw_max_bytes: int = 256
    # ...and the table at most this many bytes in all (oldest letters go first).
    deadletter_max_bytes: int = 32 * 1024 * 1024
    # Frames refused for who sent them (quarantined, revoked, unknown, over its rate) are
    # counted, and one per device and reason is kept as a sample every this many seconds.
    deadletter_sample_s: float = 60.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """Store-and-forward to an upstream broker (see gateway.pipeline.relay)."""

    enabled: bool = False
    host: str = ""
    port: int = 8883
    tls: bool = True
    ca: str = ""
    cert: str = ""
    key: str = ""
    username: str = ""
    password: str = ""
    client_id: str = "torpor-relay"
    topic_readings: str = "torpor/{device}/readings"
    topic_events: str = "torpor/{device}/events"
    format: Literal["json", "json-rows", "senml-json", "senml-cbor"] = "json"
    qos: int = 1
    outbox_max_items: int = 1_000_000
    outbox_max_age_s: float = 7 * 24 * 3600.0
    drop_policy: Literal["oldest"] = "oldest"
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 60.0
    # Run the relay in a process of its own (gateway.pipeline.relay_process), on another
    # core than ingest. Off by default: on a 2-core host with the broker beside it there
    # is no idle core, and the process costs more CPU per frame (docs/gateway-layout.md).
    process: bool = False


@dataclass(frozen=True, slots=True)
class PkiConfig:
    """What the gateway renews on its own and when (gateway.security.lifetimes). Renewal signs with
    the key in the PKI directory: the issuing CA's, or the root's when it is kept there."""

    renew: bool = True
    check_interval_s: float = 3600.0
    # The CRL the gateway issues lives this long and is re-issued once this fraction of
    # its life has passed (Mosquitto refuses every client once nextUpdate has passed).
    crl_days: float = 30.0
    crl_renew_at: float = 0.5
    # Certificates are re-issued this many days before they expire, for this long.
    server_days: float = 825.0
    server_lead_days: float = 30.0
    gateway_days: float = 825.0
    gateway_lead_days: float = 30.0
    # Device keys rotated over the air (gateway.pipeline.rotation): a rotation starts this
    # many days before a device certificate expires (or by `torpor device rotate`), and the
    # certificate it issues lives device_days. rotation_poll_s: how soon an accepted
    # request is issued and a replaced certificate revoked.
    rotate_devices: bool = True
    device_rotate_lead_days: float = 30.0
    device_days: float = 3650.0
    rotation_poll_s: float = 1.0
    # TLS-PSK session keys (docs/session-keys.md; with [broker] psk_port): a key lives
    # session_key_days and is replaced session_key_lead_days before that.
    session_key_days: float = 7.0
    session_key_lead_days: float = 1.0


@dataclass(frozen=True, slots=True)
class WebConfig:
    """The operator's web page and JSON API (gateway.web)."""

    enabled: bool = False
    host: str = "127.0.0.1"  # any non-loopback address needs token or password_hash
    port: int = 8080
    # A bearer token for the API and the login form (at least 16 characters)...
    token: str = ""
    # ...and/or a password, stored as `torpor gateway web --hash-password` prints it.
    password_hash: str = ""
    tls_cert: str = ""  # both or neither: HTTPS when set
    tls_key: str = ""
    page_size: int = 50  # fleet page rows
    session_hours: float = 12.0
    # Serve it from a child process of the gateway's (gateway.web.process), with its own
    # interpreter, so that a page waits for neither ingest's interpreter lock nor its
    # event loop (docs/web.md, "In its own process"; false: a task of the gateway's).
    process: bool = True

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def auth_required(self) -> bool:
        return bool(self.token or self.password_hash) or not self.loopback


@dataclass(frozen=True, slots=True)
class RulesConfig:
    """Edge rules and alerts (gateway.pipeline.rules; the rules themselves are in `file`)."""

    enabled: bool = True
    file: str = ""  # default: rules.toml beside this file (no file: no rules)
    interval_s: float = 1.0  # how often new readings are evaluated (and the file's mtime)
    # How often overdue nodes, quarantines, aborted campaigns and credentials are checked.
    scan_interval_s: float = 10.0


@dataclass(frozen=True, slots=True)
class HassConfig:
    """Home Assistant MQTT discovery on the upstream broker (gateway.pipeline.hass); active
    only when [upstream] is enabled."""

    enabled: bool = True
    prefix: str = "homeassistant"  # Home Assistant's discovery prefix
    state_topic: str = "torpor/{device}/hass"  # the base of each device's state topics
    interval_s: float = 1.0  # how often new readings and wakes are published
    scan_interval_s: float = 5.0  # how often missed wakes and decommissions are looked for
    # Seconds added to a node's own send interval for `expire_after` and missed wakes
    # (-1: [downlink] grace_s).
    grace_s: float = -1.0


# The board profiles of the source tree the gateway runs from (docs/board-profiles.md).
PROFILES_PATH = Path(__file__).resolve().parents[1] / "boards" / "profiles.toml"
# What the energy model takes from a profile: the same currents the sim's ledger charges.
_MODEL_KEYS = ("cpu_active_ma", "radio_listen_ma", "deep_sleep_ua", "boot_ms")


@dataclass(frozen=True, slots=True)
class EnergyConfig:
    """The energy model behind the device page's energy per wake and the battery forecast
    from it (docs/web.md, "Energy per wake"): each device's own board (`torpor device add
    --board`), else this default board."""

    # The board of devices registered without one: a profile in boards/profiles.toml
    # ("": unknown, no energy figures for them).
    board: str = ""
    profiles: str = ""  # default: boards/profiles.toml of the source tree
    capacity_mah: float = 2500.0  # the battery: 2×AA alkaline, usable capacity
    empty_mv: float = 2000.0  # the pack's voltage when the node stops (1.0 V a cell)


@dataclass(frozen=True, slots=True)
class EnergyModel:
    """A board's cited currents (boards/profiles.toml) and the battery: a wake's charge is
    (the profile's boot + the node's awake ticks) × the CPU current + its radio-on ticks ×
    the radio's listening current. A model on cited figures, never a measurement."""

    board: str
    cpu_active_ma: float
    radio_listen_ma: float
    deep_sleep_ua: float
    boot_ms: float
    capacity_mah: float = 2500.0
    empty_mv: float = 2000.0

    def wake_uah(self, awake_ms: float, radio_ms: float) -> float:
        """µAh of one wake: mA × ms / 3600."""
        return ((self.boot_ms + awake_ms) * self.cpu_active_ma
                + radio_ms * self.radio_listen_ma) / 3600.0

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class BoardModels:
    """The board profiles the gateway knows (boards/profiles.toml): each board's readable
    name and energy model. A device's own board (the registry's `board`) picks its model;
    a device with none takes `default` ([energy] board; "": no energy figures)."""

    default: str = ""
    titles: Mapping[str, str] = dataclasses.field(default_factory=dict)
    models: Mapping[str, EnergyModel] = dataclasses.field(default_factory=dict)
    path: str = ""  # the profiles file, for messages

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.titles))

    def energy(self, board: str | None) -> EnergyModel | None:
        """The model of a device with this board (None or "": the default board's)."""
        name = board or self.default
        return self.models.get(name) if name else None

    def title(self, board: str | None) -> str | None:
        """The board's readable name ("ESP32-C3"), None for none or an unknown one."""
        return self.titles.get(board) if board else None

    def check(self, board: str) -> str:
        """`board` if it is a profile, else ConfigError naming the known boards."""
        if board not in self.titles:
            raise ConfigError(f"unknown board {board!r}: one of {', '.join(self.names)} "
                              f"(the profiles in {self.path})")
        return board


def _title(name: str, prof: Mapping[str, Any]) -> str:
    """A profile's readable name: its description up to the first parenthesis
    ("ESP32-C3 (MINI-1), ..." -> "ESP32-C3"), else the profile's name."""
    desc = prof.get("description")
    if isinstance(desc, str) and " (" in desc:
        return desc.split(" (", 1)[0].strip() or name
    return name


def board_models(cfg: GatewayConfig) -> BoardModels:
    """Every board profile's name and model, and [energy] board as the default. Raises
    ConfigError naming the key when the profiles file cannot be read, [energy] board is
    not a profile or its figures are wrong. Another profile without the model's figures
    has a name but no energy model (its devices show no energy figures)."""
    e = cfg.energy
    path = Path(e.profiles) if e.profiles else PROFILES_PATH
    try:
        with open(path, "rb") as f:
            profiles = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"[energy] profiles: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"[energy] profiles: {path}: {exc}") from None
    tables = {k: v for k, v in profiles.items() if isinstance(v, dict)}
    if e.board and e.board not in tables:
        raise ConfigError(f"[energy] board: {e.board!r} is not a profile in {path} "
                          f"(known: {', '.join(sorted(tables))})")
    models: dict[str, EnergyModel] = {}
    for name, prof in tables.items():
        figures: dict[str, float] = {}
        for key in _MODEL_KEYS:
            v = prof.get(key)
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                if name == e.board:
                    raise ConfigError(f"[energy] board: profile {e.board!r} in {path}: {key} "
                                      f"is missing or not a number ({v!r})")
                break
            figures[key] = float(v)
        else:
            models[name] = EnergyModel(board=name, capacity_mah=e.capacity_mah,
                                       empty_mv=e.empty_mv, **figures)
    return BoardModels(default=e.board, titles={k: _title(k, v) for k, v in tables.items()},
                       models=models, path=str(path))


def energy_model(cfg: GatewayConfig) -> EnergyModel | None:
    """The configured default board's model, or None when [energy] board is not set.
    Raises ConfigError as board_models does."""
    return board_models(cfg).energy(None)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# scrypt$<n>$<r>$<p>$<salt hex>$<hash hex> (gateway.web.auth.hash_password)
_PASSWORD_HASH = re.compile(r"scrypt\$\d+\$\d+\$\d+\$[0-9a-f]{16,}\$[0-9a-f]{32,}")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    gateway: GatewaySection = GatewaySection()
    broker: BrokerConfig = BrokerConfig()
    mqtt: MqttConfig = MqttConfig()
    ingest: IngestConfig = IngestConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    downlink: DownlinkConfig = DownlinkConfig()  # delivery to sleeping nodes (gateway.pipeline.downlink)
    pki: PkiConfig = PkiConfig()  # credential renewal and expiry events (gateway.security.lifetimes)
    web: WebConfig = WebConfig()  # the operator's web page and API (gateway.web)
    rules: RulesConfig = RulesConfig()  # edge rules and alerts (gateway.pipeline.rules)
    hass: HassConfig = HassConfig()  # Home Assistant discovery (gateway.pipeline.hass)
    energy: EnergyConfig = EnergyConfig()  # the energy model (docs/web.md)
    source: str = ""  # the file it was read from

    @property
    def rules_path(self) -> Path | None:
        """The rules file: [rules] file, or rules.toml beside the configuration file."""
        if self.rules.file:
            return Path(self.rules.file)
        return Path(self.source).resolve().parent / "rules.toml" if self.source else None

    @property
    def db_path(self) -> Path:
        return self.gateway.db_path

    @property
    def pki_dir(self) -> Path:
        return Path(self.broker.pki_dir) if self.broker.pki_dir else Path(self.gateway.data_dir) / "pki"

    @property
    def broker_config_dir(self) -> Path:
        if self.broker.config_dir:
            return Path(self.broker.config_dir)
        return Path(self.gateway.data_dir) / "broker"

    @property
    def mqtt_host(self) -> str:
        return self.mqtt.host or self.broker.host

    @property
    def mqtt_port(self) -> int:
        return self.mqtt.port or self.broker.port

    def mqtt_files(self) -> tuple[Path, Path, Path]:
        """(cert, key, ca) of the gateway's client."""
        pki = self.pki_dir
        return (
            Path(self.mqtt.cert) if self.mqtt.cert else pki / "gateway.pem",
            Path(self.mqtt.key) if self.mqtt.key else pki / "gateway.key",
            Path(self.mqtt.ca) if self.mqtt.ca else pki / "ca.pem",
        )


_SECTIONS: dict[str, type[Any]] = {
    "gateway": GatewaySection,
    "broker": BrokerConfig,
    "mqtt": MqttConfig,
    "ingest": IngestConfig,
    "upstream": UpstreamConfig,
    "downlink": DownlinkConfig,
    "pki": PkiConfig,
    "web": WebConfig,
    "rules": RulesConfig,
    "hass": HassConfig,
    "energy": EnergyConfig,
}
# Keys holding file or folder paths: resolved against the config file's folder.
_PATH_KEYS = {
    ("gateway", "data_dir"), ("gateway", "db"), ("broker", "pki_dir"), ("broker", "mosquitto"),
    ("broker", "config_dir"), ("mqtt", "cert"), ("mqtt", "key"), ("mqtt", "ca"),
    ("upstream", "ca"), ("upstream", "cert"), ("upstream", "key"),
    ("web", "tls_cert"), ("web", "tls_key"), ("rules", "file"), ("energy", "profiles"),
}
# (section, key) -> smallest allowed value
_MINIMA: dict[tuple[str, str], float] = {
    ("gateway", "status_interval_s"): 0.1,
    ("gateway", "deadletter_max_rows"): 1,
    ("broker", "port"): 1,
    ("broker", "psk_port"): 0,
    ("pki", "session_key_days"): 0.0001,
    ("pki", "session_key_lead_days"): 0.0,
    ("mqtt", "port"): 0,
    ("mqtt", "keepalive"): 5,
    ("mqtt", "connect_timeout_s"): 0.1,
    ("mqtt", "reconnect_min_s"): 0.0,
    ("mqtt", "reconnect_max_s"): 0.0,
    ("ingest", "batch_max_frames"): 1,
    ("ingest", "batch_max_ms"): 0.0,
    ("ingest", "hello_linger_ms"): 0.0,
    ("ingest", "malformed_threshold"): 1,
    ("ingest", "malformed_window_s"): 0.001,
    ("ingest", "rate_limit_frames_per_min"): 1,
    ("ingest", "deadletter_raw_max_bytes"): 0,
    ("ingest", "deadletter_max_bytes"): 4096,
    ("ingest", "deadletter_sample_s"): 0.0,
    ("upstream", "port"): 1,
    ("upstream", "qos"): 0,
    ("upstream", "outbox_max_items"): 1,
    ("upstream", "outbox_max_age_s"): 1.0,
    ("upstream", "reconnect_min_s"): 0.0,
    ("upstream", "reconnect_max_s"): 0.0,
    ("downlink", "max_attempts"): 1,
    ("downlink", "frame_cost_ms"): 1,
    ("downlink", "window_reserve_ms"): 0,
    ("downlink", "grace_s"): 0.0,
    ("downlink", "sweep_interval_s"): 0.05,
    ("pki", "check_interval_s"): 0.1,
    ("pki", "device_rotate_lead_days"): 0.0,
    ("pki", "device_days"): 0.0001,
    ("pki", "rotation_poll_s"): 0.05,
    ("pki", "crl_days"): 0.0001,
    ("pki", "crl_renew_at"): 0.01,
    ("pki", "server_days"): 0.0001,
    ("pki", "server_lead_days"): 0.0,
    ("pki", "gateway_days"): 0.0001,
    ("pki", "gateway_lead_days"): 0.0,
    ("web", "port"): 0,  # 0: any free port (tests)
    ("web", "page_size"): 1,
    ("web", "session_hours"): 0.01,
    ("rules", "interval_s"): 0.05,
    ("rules", "scan_interval_s"): 0.05,
    ("hass", "interval_s"): 0.05,
    ("hass", "scan_interval_s"): 0.05,
    ("hass", "grace_s"): -1.0,
    ("energy", "capacity_mah"): 1.0,
    ("energy", "empty_mv"): 0.0,
}
_MAXIMA: dict[tuple[str, str], float] = {
    ("broker", "port"): 65535,
    ("broker", "psk_port"): 65535,
    ("mqtt", "port"): 65535,
    ("upstream", "port"): 65535,
    ("upstream", "qos"): 1,
    ("web", "port"): 65535,
    ("web", "page_size"): 1000,
    ("ingest", "deadletter_raw_max_bytes"): proto.MAX_FRAME,  # all of any frame
    ("pki", "crl_renew_at"): 0.95,
}


def _check(section: str, key: str, hint: Any, value: Any) -> Any:
    where = f"[{section}] {key}"
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(
                f"{where}: {value!r} is not one of {', '.join(repr(c) for c in choices)}"
            )
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    lo = _MINIMA.get((section, key))
    hi = _MAXIMA.get((section, key))
    if lo is not None and value < lo:
        raise ConfigError(f"{where}: {value!r} is below the minimum {lo:g}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where}: {value!r} is above the maximum {hi:g}")
    return value


def parse_config(data: dict[str, Any], base: Path | None = None, source: str = "") -> GatewayConfig:
    """Validate a parsed TOML document; `base` resolves relative paths."""
    sections: dict[str, Any] = {}
    for name, value in data.items():
        cls = _SECTIONS.get(name)
        if cls is None:
            raise ConfigError(f"[{name}]: unknown section (known: {', '.join(_SECTIONS)})")
        if not isinstance(value, dict):
            raise ConfigError(f"[{name}]: expected a table of keys, got {value!r}")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, item in value.items():
            if key not in known:
                raise ConfigError(f"[{name}] {key}: unknown key (known: {', '.join(sorted(known))})")
            item = _check(name, key, hints[key], item)
            if (name, key) in _PATH_KEYS and item and base is not None:
                item = str((base / Path(item).expanduser()).resolve())
            kwargs[key] = item
        sections[name] = cls(**kwargs)
    cfg = GatewayConfig(**sections, source=source)
    _cross_check(cfg)
    return cfg


def _cross_check(cfg: GatewayConfig) -> None:
    if cfg.broker.psk_port and cfg.broker.psk_port == cfg.broker.port:
        raise ConfigError("[broker] psk_port: must differ from [broker] port")
    ing = cfg.ingest
    if ing.deadletter_max_bytes < 16 * ing.deadletter_raw_max_bytes:
        raise ConfigError(
            f"[ingest] deadletter_max_bytes: {ing.deadletter_max_bytes} holds fewer than 16 "
            f"letters of deadletter_raw_max_bytes = {ing.deadletter_raw_max_bytes}")
    if cfg.mqtt.reconnect_max_s < cfg.mqtt.reconnect_min_s:
        raise ConfigError("[mqtt] reconnect_max_s: smaller than reconnect_min_s")
    for what in ("server", "gateway"):
        days, lead = getattr(cfg.pki, f"{what}_days"), getattr(cfg.pki, f"{what}_lead_days")
        if lead >= days:
            raise ConfigError(f"[pki] {what}_lead_days: {lead:g} is not shorter than "
                              f"{what}_days = {days:g} (a new certificate would be due at once)")
    up = cfg.upstream
    if up.reconnect_max_s < up.reconnect_min_s:
        raise ConfigError("[upstream] reconnect_max_s: smaller than reconnect_min_s")
    if up.enabled and not up.host:
        raise ConfigError("[upstream] host: required when [upstream] enabled = true")
    for key in ("topic_readings", "topic_events"):
        topic = getattr(up, key)
        if "{device}" not in topic:
            raise ConfigError(f"[upstream] {key}: {topic!r} must contain {{device}}")
        if "+" in topic or "#" in topic:
            raise ConfigError(f"[upstream] {key}: {topic!r} must not contain MQTT wildcards")
    _check_web(cfg.web)
    _check_hass(cfg.hass)
    board_models(cfg)  # a board that is not in the profiles is refused at start


_HASS_PREFIX = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*")


def _check_hass(h: HassConfig) -> None:
    if not _HASS_PREFIX.fullmatch(h.prefix):
        raise ConfigError(f"[hass] prefix: {h.prefix!r} is not a topic prefix (letters, digits, "
                          "_ and - in levels separated by /, no trailing /)")
    if "{device}" not in h.state_topic:
        raise ConfigError(f"[hass] state_topic: {h.state_topic!r} must contain {{device}}")
    if "+" in h.state_topic or "#" in h.state_topic:
        raise ConfigError(f"[hass] state_topic: {h.state_topic!r} must not contain MQTT "
                          "wildcards")


def _check_web(web: WebConfig) -> None:
    if web.token and len(web.token) < 16:
        raise ConfigError("[web] token: at least 16 characters (e.g. `openssl rand -hex 16`)")
    if web.password_hash and not _PASSWORD_HASH.fullmatch(web.password_hash):
        raise ConfigError("[web] password_hash: not a hash made by "
                          "`torpor gateway web --hash-password`")
    if bool(web.tls_cert) != bool(web.tls_key):
        raise ConfigError("[web] tls_key: tls_cert and tls_key are set together or not at all")
    if web.enabled and not web.loopback and not (web.token or web.password_hash):
        raise ConfigError(
            f"[web] host: {web.host!r} is not a loopback address; set [web] password_hash or "
            "token so that only the operator can log in (or bind to 127.0.0.1)")


def as_plain(cfg: GatewayConfig) -> dict[str, Any]:
    """The validated configuration as plain JSON data, for a child process of the gateway
    (`from_plain` reads it back there, without validating it again)."""
    plain: dict[str, Any] = {name: dataclasses.asdict(getattr(cfg, name)) for name in _SECTIONS}
    plain["source"] = cfg.source
    return plain


def from_plain(plain: dict[str, Any]) -> GatewayConfig:
    sections = {name: cls(**plain[name]) for name, cls in _SECTIONS.items() if name in plain}
    return GatewayConfig(**sections, source=str(plain.get("source", "")))


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate the TOML file at `path`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration {p}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return parse_config(data, base=p.resolve().parent, source=str(p))


def example() -> str:
    """A commented configuration with every default (`torpor gateway config-example`)."""
    lines = ["# Torpor gateway configuration; every key is optional (defaults shown).", ""]
    for name, cls in _SECTIONS.items():
        lines.append(f"[{name}]")
        for f in dataclasses.fields(cls):
            value = f.default
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            else:
                text = repr(value)
            lines.append(f"# {f.name} = {text}")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- writing the file
# `torpor gateway config show|set` and `torpor gateway restore` (gateway.ops.config_ops,
# gateway.ops.backup) read and write the file through these.

def as_dict(cfg: GatewayConfig) -> dict[str, dict[str, Any]]:
    """The effective configuration, every key of every section (defaults included)."""
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in _SECTIONS}


def toml_value(value: Any) -> str:
    """A TOML literal for a configuration value (bool, int, float or string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, int | float):
        return repr(value)
    raise ConfigError(f"cannot write {value!r} as a configuration value")


def dumps(data: dict[str, dict[str, Any]]) -> str:
    """A TOML document of sections of plain keys (what the configuration holds)."""
    out: list[str] = []
    for name, table in data.items():
        out.append(f"[{name}]")
        out.extend(f"{key} = {toml_value(value)}" for key, value in table.items())
        out.append("")
    return "\n".join(out)


def key_type(section: str, key: str) -> Any:
    """The type hint of `[section] key`; ConfigError naming it when there is no such key."""
    cls = _SECTIONS.get(section)
    if cls is None:
        raise ConfigError(f"[{section}]: unknown section (known: {', '.join(_SECTIONS)})")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    if key not in known:
        raise ConfigError(f"[{section}] {key}: unknown key (known: {', '.join(sorted(known))})")
    return hints[key]


def parse_value(section: str, key: str, text: str) -> Any:
    """The value `text` (as typed on a command line) for `[section] key`, checked like the
    file's: `600`, `0.5`, `true`, `debug`, or a TOML literal such as `"a b"`."""
    hint = key_type(section, key)
    try:
        value: Any = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word: a string
    if hint is str or typing.get_origin(hint) is Literal:
        value = text if not isinstance(value, str) else value
    return _check(section, key, hint, value)


_SECTION_LINE = re.compile(r"^\s*\[\s*([A-Za-z0-9_-]+)\s*\]\s*(#.*)?$")


def set_in_text(text: str, section: str, key: str, value: Any) -> str:
    """`text` (a configuration file) with `[section] key` set to `value`: the key's line is
    replaced where it is, or added at the end of its section (the section at the end of
    the file when it is missing); comments and the other lines are kept as they are."""
    line_re = re.compile(rf"^\s*{re.escape(key)}\s*=")
    new = f"{key} = {toml_value(value)}"
    lines = text.splitlines()
    current = ""
    last_in_section = -1
    for i, line in enumerate(lines):
        m = _SECTION_LINE.match(line)
        if m:
            current = m.group(1)
            continue
        if current == section:
            if line_re.match(line):
                lines[i] = new
                return "\n".join(lines) + "\n"
            if line.strip() and not line.lstrip().startswith("#"):
                last_in_section = i
    if last_in_section >= 0:
        lines.insert(last_in_section + 1, new)
    else:
        header = next((i for i, line in enumerate(lines)
                       if (m := _SECTION_LINE.match(line)) and m.group(1) == section), None)
        if header is not None:
            lines.insert(header + 1, new)
        else:
            if lines and lines[-1].strip():
                lines.append("")
            lines.extend([f"[{section}]", new])
    return "\n".join(lines) + "\n"
