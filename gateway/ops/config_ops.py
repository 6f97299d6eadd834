"""The configuration file at run time: what a reload (SIGHUP) may change live, what needs a
restart, and `torpor gateway config show|set` (set validates the new file before writing
it and keeps the previous one as gateway.toml.YYYYMMDD-HHMMSS).

Nothing here prints; callers log or print the results.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import config as gwconfig
from gateway.errors import ConfigError

# Which keys a reload applies to the running gateway, per section ("*": all its keys);
# every other changed key is reported as needing a restart. The ingest limits, dead-letter
# bounds and downlink delivery are read by their owners on each use, so a new value takes
# effect with the next frame; addresses, files, the broker, the relay and the web server
# are bound at start.
LIVE_KEYS: dict[str, frozenset[str] | str] = {
    "gateway": frozenset({"log_level", "deadletter_max_rows"}),
    "ingest": "*",
    "downlink": "*",
}


def is_live(section: str, key: str) -> bool:
    keys = LIVE_KEYS.get(section)
    return keys == "*" or (isinstance(keys, frozenset) and key in keys)


@dataclass(frozen=True, slots=True)
class Change:
    section: str
    key: str
    old: Any
    new: Any

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    live: tuple[Change, ...]
    restart: tuple[Change, ...]
    applied: gwconfig.GatewayConfig  # the running one with the live changes made


def plan_reload(running: gwconfig.GatewayConfig, new: gwconfig.GatewayConfig) -> ReloadPlan:
    old_d, new_d = gwconfig.as_dict(running), gwconfig.as_dict(new)
    live: list[Change] = []
    restart: list[Change] = []
    sections: dict[str, dict[str, Any]] = {}
    for section, values in new_d.items():
        for key, value in values.items():
            before = old_d[section][key]
            if before == value:
                continue
            change = Change(section, key, before, value)
            if is_live(section, key):
                live.append(change)
                sections.setdefault(section, {})[key] = value
            else:
                restart.append(change)
    applied = running
    for section, values in sections.items():
        applied = dataclasses.replace(
            applied, **{section: dataclasses.replace(getattr(applied, section), **values)})
    return ReloadPlan(tuple(live), tuple(restart), applied)


# Shown as REDACTED by `config show` when set: they are credentials.
SECRET_KEYS = frozenset({("web", "token"), ("web", "password_hash"), ("upstream", "password")})
REDACTED = "(set, not shown)"


def show(cfg: gwconfig.GatewayConfig, *, secrets: bool = False) -> dict[str, Any]:
    """The effective configuration (defaults filled in), and the file it came from.
    Credentials that are set read REDACTED unless `secrets`."""
    doc = gwconfig.as_dict(cfg)
    if not secrets:
        for section, key in SECRET_KEYS:
            if doc[section][key]:
                doc[section][key] = REDACTED
    return {"source": cfg.source, **doc}


@dataclass(frozen=True, slots=True)
class SetResult:
    path: Path
    backup: Path
    section: str
    key: str
    old: Any
    new: Any
    live: bool  # a running gateway applies it on SIGHUP; else it needs a restart


def split_assignment(text: str) -> tuple[str, str, str]:
    """`ingest.rate_limit_frames_per_min=600` -> ("ingest", "rate_limit_frames_per_min", "600")."""
    name, sep, value = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError(f"{text!r}: expected SECTION.KEY=VALUE "
                          "(e.g. ingest.rate_limit_frames_per_min=600)")
    return section, key.strip(), value.strip()


def set_key(path: Path, assignment: str, *, now: float | None = None) -> SetResult:
    """Set one key in the file at `path`: the new file is validated as a whole before it
    replaces the old, which is kept beside it as `<name>.YYYYMMDD-HHMMSS`."""
    path = Path(path)
    section, key, text = split_assignment(assignment)
    value = gwconfig.parse_value(section, key, text)
    try:
        original = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration {path}: {exc.strerror or exc}") from None
    current = gwconfig.load_config(path)
    updated = gwconfig.set_in_text(original, section, key, value)
    try:
        data = tomllib.loads(updated)
    except tomllib.TOMLDecodeError as exc:  # pragma: no cover - set_in_text writes TOML
        raise ConfigError(f"{path}: the new file would not be valid TOML: {exc}") from None
    gwconfig.parse_config(data, base=path.resolve().parent, source=str(path))
    stamp = dt.datetime.fromtimestamp(dt.datetime.now().timestamp() if now is None else now)
    backup = path.with_name(f"{path.name}.{stamp:%Y%m%d-%H%M%S}")
    n = 1
    while backup.exists():
        backup = path.with_name(f"{path.name}.{stamp:%Y%m%d-%H%M%S}.{n}")
        n += 1
    mode = path.stat().st_mode & 0o777
    _write_new(backup, original.encode(), mode)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _write_new(tmp, updated.encode(), mode)
    os.replace(tmp, path)
    old = getattr(getattr(current, section), key)
    return SetResult(path, backup, section, key, old, value, is_live(section, key))


def _write_new(dest: Path, data: bytes, mode: int) -> None:
    fd = os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
