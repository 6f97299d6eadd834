"""Edge rules: conditions on the readings and on the fleet's state that raise and clear
alerts and queue downlink, read from a TOML file that is reloaded without a restart.

The rules file (docs/rules.md) holds `[groups]` (named lists of device-id globs) and
`[[rule]]` tables. Each rule names a `condition` from CONDITIONS, the table below, which
says which keys it takes and when it is evaluated: on every new reading, or on the
periodic scan. An alert is raised once and cleared once (gateway.store.alerts keeps one
open alert per rule and subject); raising and clearing each store the alert, send an
`alert` event upstream through the outbox, and may queue a command or configuration for
the device or its whole group (once per episode of the group). A file that does not
validate is refused with an error naming the file and the key, and the rules in force
are kept.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fnmatch
import functools
import logging
import math
import re
import sqlite3
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from gateway import proto
from gateway.config import BoardModels, GatewayConfig, UpstreamConfig, board_models
from gateway.errors import ConfigError
from gateway.pipeline import formats
from gateway.store import alerts, db, readings, wake_log
from gateway.store import devices as registry
from gateway.store import downlink_queue as q
from gateway.store import groups as device_groups
from gateway.store import ota_store as ota
from gateway.store import outbox as ob
from gateway.store.wakes import missed_wakes

log = logging.getLogger(__name__)

UPSTREAM_KIND: Final = "alert"  # the upstream event kind (formats.event_item)
CURSOR: Final = "rules"
RUNS_PER_TICK: Final = 5000  # reading runs evaluated per tick at most; the rest next tick
CURSOR_EVERY_S: Final = 10.0
FORECAST_EVERY_S: Final = 3600  # of reading time
FORECASTS_MAX: Final = 100_000
SEVERITIES: Final = ("info", "warning", "critical")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class RulesError(ConfigError):
    """The rules file does not validate; the message names the file and the key."""


# ------------------------------------------------------------------ the decision table

@dataclass(frozen=True, slots=True)
class Condition:
    """One kind of condition: the keys a rule of it takes (beyond the common ones), which
    of them it needs, when it is evaluated and what its alerts are about."""

    keys: frozenset[str]
    required: frozenset[str]
    on: str  # "readings": each new reading; "scan": every [rules] scan_interval_s
    subject: str  # "device", "campaign" or "credential"
    summary: str


CONDITIONS: Final[Mapping[str, Condition]] = {
    "threshold": Condition(
        frozenset({"measurement", "above", "below", "clear_below", "clear_above",
                   "for_readings", "clear_for_readings"}),
        frozenset({"measurement"}), "readings", "device",
        "a measurement above or below a value for N readings in a row, cleared past the "
        "hysteresis value"),
    "overdue": Condition(frozenset({"intervals"}), frozenset(), "scan", "device",
                         "a node has missed k of its own send intervals; cleared when it "
                         "is heard again"),
    "battery": Condition(
        frozenset({"measurement", "below_mv", "clear_above_mv", "forecast_days", "clear_days",
                   "window_days", "empty_mv", "min_points"}),
        frozenset(), "readings", "device",
        "the battery below a level, or its voltage trend reaching empty_mv in under N days"),
    "quarantined": Condition(frozenset(), frozenset(), "scan", "device",
                             "the gateway quarantined the device; cleared on release"),
    "campaign_aborted": Condition(frozenset({"within_days"}), frozenset(), "scan", "campaign",
                                  "an OTA campaign aborted (within_days ago at most); "
                                  "cleared by the operator"),
    "credential_expiry": Condition(frozenset({"days"}), frozenset({"days"}), "scan",
                                   "credential",
                                   "a credential of the gateway or the fleet has fewer than N "
                                   "days left; cleared once renewed"),
}
_COMMON: Final = frozenset({"name", "condition", "severity", "device", "group", "message",
                            "action", "clear_action"})
_ACTION_KEYS: Final = frozenset({"command", "args", "config", "target", "priority", "ttl_s"})


@dataclass(frozen=True, slots=True)
class Action:
    """Downlink queued when an alert is raised (or cleared): a command or configuration,
    to the device the alert is about or to every device of the rule's group."""

    command: str | None = None
    args: tuple[int, ...] = ()
    config: tuple[tuple[str, int], ...] = ()
    target: str = "device"  # or "group"
    priority: int = q.DEFAULT_PRIORITY
    ttl_s: float | None = q.DEFAULT_TTL_S

    def describe(self) -> str:
        what = (f"{self.command} {list(self.args)}" if self.command
                else "config " + ", ".join(f"{k}={v}" for k, v in self.config))
        return f"{what} on the {self.target}"


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    condition: str
    severity: str = "warning"
    devices: tuple[str, ...] = ()  # id globs; empty: any
    group: str | None = None
    message: str = ""
    action: Action | None = None
    clear_action: Action | None = None
    measurement: str = ""
    above: float | None = None
    below: float | None = None
    clear_level: float | None = None  # clear_below (with above) or clear_above (with below)
    for_readings: int = 1
    clear_for_readings: int = 1
    intervals: int = 2
    below_mv: float | None = None
    clear_above_mv: float | None = None
    forecast_days: float | None = None
    clear_days: float | None = None
    window_days: float = readings.FORECAST_WINDOW_DAYS
    empty_mv: float = readings.FORECAST_EMPTY_MV
    min_points: int = readings.FORECAST_MIN_POINTS
    within_days: float = 7.0
    days: float = 0.0

    @property
    def cond(self) -> Condition:
        return CONDITIONS[self.condition]


@dataclass(frozen=True, slots=True)
class RuleSet:
    rules: tuple[Rule, ...] = ()
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    source: str = ""

    def rule(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)


# ------------------------------------------------------------------ parsing

class _Where:
    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, path: str, msg: str) -> RulesError:
        return RulesError(f"{self.source}: {path}: {msg}")


def _number(w: _Where, path: str, v: Any, lo: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise w.error(path, f"expected a number, got {v!r}")
    if lo is not None and v < lo:
        raise w.error(path, f"{v!r} is below the minimum {lo:g}")
    return float(v)


def _integer(w: _Where, path: str, v: Any, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise w.error(path, f"expected an integer, got {v!r}")
    if v < lo:
        raise w.error(path, f"{v!r} is below the minimum {lo}")
    return v


def _string(w: _Where, path: str, v: Any) -> str:
    if not isinstance(v, str):
        raise w.error(path, f"expected a string, got {v!r}")
    return v


def _globs(w: _Where, path: str, v: Any, *, empty: bool = False) -> tuple[str, ...]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not (items or empty) or not all(
            isinstance(g, str) and g for g in items):
        raise w.error(path, f"expected a device id glob or a list of them, got {v!r}")
    return tuple(items)


def _action(w: _Where, path: str, v: Any, group: str | None) -> Action:
    if not isinstance(v, dict):
        raise w.error(path, f"expected a table, got {v!r}")
    for key in v:
        if key not in _ACTION_KEYS:
            raise w.error(f"{path}.{key}", f"unknown key (known: {', '.join(sorted(_ACTION_KEYS))})")
    if ("command" in v) == ("config" in v):
        raise w.error(path, "give either command or config")
    target = _string(w, f"{path}.target", v.get("target", "device"))
    if target not in ("device", "group"):
        raise w.error(f"{path}.target", f"{target!r} is not one of 'device', 'group'")
    if target == "group" and group is None:
        raise w.error(f"{path}.target", "'group' needs the rule's group key")
    priority = _integer(w, f"{path}.priority", v.get("priority", q.DEFAULT_PRIORITY), 0)
    ttl: float | None = q.DEFAULT_TTL_S
    if "ttl_s" in v:
        ttl = _number(w, f"{path}.ttl_s", v["ttl_s"], 1.0)
    if "command" in v:
        name = _string(w, f"{path}.command", v["command"])
        try:
            op = q.parse_op(name)
        except q.QueueError as exc:
            raise w.error(f"{path}.command", str(exc)) from None
        raw = v.get("args", [])
        if not isinstance(raw, list):
            raise w.error(f"{path}.args", f"expected a list of integers, got {raw!r}")
        try:
            args = q.check_args(op, raw)
        except q.QueueError as exc:
            raise w.error(f"{path}.args", str(exc)) from None
        return Action(command=op.name.lower(), args=args, target=target, priority=priority,
                      ttl_s=ttl)
    if "args" in v:
        raise w.error(f"{path}.args", "args go with command, not config")
    cfg = v["config"]
    if not isinstance(cfg, dict) or not cfg:
        raise w.error(f"{path}.config", f"expected a table of configuration keys, got {cfg!r}")
    values: list[tuple[str, int]] = []
    for key, value in cfg.items():
        try:
            ck = q.parse_key(key)
        except q.QueueError as exc:
            raise w.error(f"{path}.config.{key}", str(exc)) from None
        values.append((ck.name.lower(), _integer(w, f"{path}.config.{key}", value, -(2**31))))
    return Action(config=tuple(values), target=target, priority=priority,
                  ttl_s=None if "ttl_s" not in v else ttl)


def _measurements() -> set[str]:
    return {m.name for _, ms in proto.SCHEMAS.values() for m in ms}


def parse_rules(data: Mapping[str, Any], source: str = "rules.toml") -> RuleSet:
    """Validate a parsed rules document; RulesError names the file and the key."""
    w = _Where(source)
    for key in data:
        if key not in ("groups", "rule"):
            raise w.error(key, "unknown key (known: groups, rule)")
    groups: dict[str, tuple[str, ...]] = {}
    raw_groups = data.get("groups", {})
    if not isinstance(raw_groups, dict):
        raise w.error("groups", f"expected a table of group = [globs], got {raw_groups!r}")
    for gname, globs in raw_groups.items():
        if not _NAME.fullmatch(gname):
            raise w.error(f"groups.{gname}", "a group name is 1 to 64 of A-Z a-z 0-9 _ . -")
        # [] : the devices given this group's name only (`torpor device group`)
        groups[gname] = _globs(w, f"groups.{gname}", globs, empty=True)
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list):
        raise w.error("rule", "expected [[rule]] tables")
    rules: list[Rule] = []
    names: set[str] = set()
    for i, r in enumerate(raw_rules, start=1):
        rules.append(_rule(w, i, r, groups, names))
    return RuleSet(tuple(rules), groups, source)


def _rule(w: _Where, i: int, r: Any, groups: Mapping[str, tuple[str, ...]],
          names: set[str]) -> Rule:
    path = f"rule[{i}]"
    if not isinstance(r, dict):
        raise w.error(path, "expected a table")
    name = r.get("name")
    if name is None:
        raise w.error(f"{path}.name", "required")
    name = _string(w, f"{path}.name", name)
    if not _NAME.fullmatch(name):
        raise w.error(f"{path}.name", f"{name!r}: use 1 to 64 of A-Z a-z 0-9 _ . -")
    if name in names:
        raise w.error(f"{path}.name", f"{name!r} is used by another rule")
    names.add(name)
    path = f"rule[{i}] ({name})"
    cname = r.get("condition")
    if cname not in CONDITIONS:
        raise w.error(f"{path}.condition",
                      f"{cname!r} is not one of {', '.join(CONDITIONS)}" if cname is not None
                      else f"required: one of {', '.join(CONDITIONS)}")
    cname = str(cname)
    cond = CONDITIONS[cname]
    for key in r:
        if key not in _COMMON and key not in cond.keys:
            raise w.error(f"{path}.{key}", f"unknown key for condition {cname!r} (known: "
                          f"{', '.join(sorted(_COMMON | cond.keys))})")
    for key in cond.required:
        if key not in r:
            raise w.error(f"{path}.{key}", f"required for condition {cname!r}")
    kw: dict[str, Any] = {"name": name, "condition": cname}
    sev = _string(w, f"{path}.severity", r.get("severity", "warning"))
    if sev not in SEVERITIES:
        raise w.error(f"{path}.severity", f"{sev!r} is not one of {', '.join(SEVERITIES)}")
    kw["severity"] = sev
    if cond.subject != "device" and ("device" in r or "group" in r):
        raise w.error(f"{path}.{'device' if 'device' in r else 'group'}",
                      f"condition {cname!r} is not about a device")
    if "device" in r:
        kw["devices"] = _globs(w, f"{path}.device", r["device"])
    group = None
    if "group" in r:
        group = _string(w, f"{path}.group", r["group"])
        if group not in groups:
            raise w.error(f"{path}.group", f"no group {group!r} in [groups] (known: "
                          f"{', '.join(groups) or 'none'})")
        kw["group"] = group
    if "message" in r:
        text = kw["message"] = _string(w, f"{path}.message", r["message"])
        try:
            text.format(device="d", value=1.0, rule=name, detail="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise w.error(f"{path}.message", f"{text!r}: {exc!r}; the placeholders are "
                          "{device}, {value}, {rule} and {detail}") from None
    for key in ("action", "clear_action"):
        if key in r:
            kw[key] = _action(w, f"{path}.{key}", r[key], group)
    if cname == "threshold":
        kw.update(_threshold(w, path, r))
    elif cname == "battery":
        kw.update(_battery(w, path, r))
    elif cname == "overdue":
        kw["intervals"] = _integer(w, f"{path}.intervals", r.get("intervals", 2))
    elif cname == "campaign_aborted":
        kw["within_days"] = _number(w, f"{path}.within_days", r.get("within_days", 7.0), 0.0)
    elif cname == "credential_expiry":
        kw["days"] = _number(w, f"{path}.days", r["days"], 0.0)
    return Rule(**kw)


def _threshold(w: _Where, path: str, r: Mapping[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    m = _string(w, f"{path}.measurement", r["measurement"])
    if m not in _measurements():
        raise w.error(f"{path}.measurement", f"{m!r} is not a measurement of any schema "
                      f"(known: {', '.join(sorted(_measurements()))})")
    kw["measurement"] = m
    if ("above" in r) == ("below" in r):
        raise w.error(f"{path}.above", "give either above or below")
    if "above" in r:
        above = kw["above"] = _number(w, f"{path}.above", r["above"])
        if "clear_above" in r:
            raise w.error(f"{path}.clear_above", "goes with below; with above use clear_below")
        clear = _number(w, f"{path}.clear_below", r.get("clear_below", above))
        if clear > above:
            raise w.error(f"{path}.clear_below", f"{clear:g} is above the raise level {above:g}")
    else:
        below = kw["below"] = _number(w, f"{path}.below", r["below"])
        if "clear_below" in r:
            raise w.error(f"{path}.clear_below", "goes with above; with below use clear_above")
        clear = _number(w, f"{path}.clear_above", r.get("clear_above", below))
        if clear < below:
            raise w.error(f"{path}.clear_above", f"{clear:g} is below the raise level {below:g}")
    kw["clear_level"] = clear
    kw["for_readings"] = _integer(w, f"{path}.for_readings", r.get("for_readings", 1))
    kw["clear_for_readings"] = _integer(w, f"{path}.clear_for_readings",
                                        r.get("clear_for_readings", 1))
    return kw


def _battery(w: _Where, path: str, r: Mapping[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    m = _string(w, f"{path}.measurement", r.get("measurement", "battery"))
    if m not in _measurements():
        raise w.error(f"{path}.measurement", f"{m!r} is not a measurement of any schema")
    kw["measurement"] = m
    if "below_mv" not in r and "forecast_days" not in r:
        raise w.error(f"{path}.below_mv", "give below_mv, forecast_days or both")
    if "below_mv" in r:
        below = kw["below_mv"] = _number(w, f"{path}.below_mv", r["below_mv"], 0.0)
        clear = _number(w, f"{path}.clear_above_mv", r.get("clear_above_mv", below + 100.0), 0.0)
        if clear < below:
            raise w.error(f"{path}.clear_above_mv", f"{clear:g} is below below_mv {below:g}")
        kw["clear_above_mv"] = clear
    elif "clear_above_mv" in r:
        raise w.error(f"{path}.clear_above_mv", "goes with below_mv")
    if "forecast_days" in r:
        days = kw["forecast_days"] = _number(w, f"{path}.forecast_days", r["forecast_days"], 0.0)
        cdays = _number(w, f"{path}.clear_days", r.get("clear_days", days * 1.5), 0.0)
        if cdays < days:
            raise w.error(f"{path}.clear_days", f"{cdays:g} is below forecast_days {days:g}")
        kw["clear_days"] = cdays
    else:
        for key in ("clear_days", "window_days", "empty_mv", "min_points"):
            if key in r:
                raise w.error(f"{path}.{key}", "goes with forecast_days")
    kw["window_days"] = _number(w, f"{path}.window_days",
                                r.get("window_days", readings.FORECAST_WINDOW_DAYS), 0.001)
    kw["empty_mv"] = _number(w, f"{path}.empty_mv",
                             r.get("empty_mv", readings.FORECAST_EMPTY_MV), 0.0)
    kw["min_points"] = _integer(w, f"{path}.min_points",
                                r.get("min_points", readings.FORECAST_MIN_POINTS), 2)
    return kw


def load_rules(path: Path) -> RuleSet:
    """The rules of the file at `path`; no file: no rules."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return RuleSet(source=str(path))
    except OSError as exc:
        raise RulesError(f"cannot read the rules file {path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"{path}: not valid TOML: {exc}") from None
    return parse_rules(data, str(path))


# ------------------------------------------------------------------ battery forecast
# The fit lives with the readings (gateway.store.readings), where the fleet page reads it too.
forecast_days = readings.forecast_days


# ------------------------------------------------------------------ the engine

@dataclass(slots=True)
class _Count:
    beyond: int = 0  # readings in a row past the raise level
    back: int = 0  # readings in a row past the clear level


@dataclass(frozen=True, slots=True)
class Intent:
    """An alert to raise (or clear), found by Engine.evaluate, done by Engine.apply."""

    raise_: bool
    rule: Rule
    subject: str
    device: str | None
    value: float | None
    message: str


@dataclass(frozen=True, slots=True)
class Pending:
    intents: list[Intent]
    cursor: int | None
    scan: bool


@dataclass(slots=True)
class TickResult:
    queued: list[ob.Queued] = field(default_factory=list)
    raised: list[alerts.Alert] = field(default_factory=list)
    cleared: list[alerts.Alert] = field(default_factory=list)
    commands: int = 0


class Engine:
    """The rules in force and their state. Every method runs on the database writer
    thread (gateway.store.db.Writer) with the gateway's connection."""

    def __init__(self, ruleset: RuleSet, *, upstream: UpstreamConfig | None = None,
                 gateway_id: str = "torpor-gateway", grace_s: float = 30.0,
                 credentials: Callable[[], Mapping[str, Any]] | None = None,
                 energy: BoardModels | None = None) -> None:
        self.ruleset = ruleset
        # The boards' energy models: a battery forecast by the energy ledger of a device's
        # wakes and its own board's model (else the default board's) where it has one,
        # else by the voltage trend.
        self.energy = energy
        self.upstream = upstream
        self.gateway_id = gateway_id
        self.grace_s = grace_s
        self.credentials = credentials
        self.counts: dict[tuple[str, str], _Count] = {}
        self.cursor: int | None = None
        self._devices: list[registry.Schedule] | None = None
        self._attr: dict[str, str] | None = None  # device -> its group name
        # (rule, subject) of the open alerts, so that a reading on the quiet side of a
        # threshold costs no query; read again from the table at every scan (the
        # operator may clear alerts from another process).
        self.open: set[tuple[str, str]] | None = None
        self._stored: int | None = None  # the cursor as last stored
        self._stored_at = 0.0
        self._intents: list[Intent] = []
        self._forecasts: dict[tuple[str, str], tuple[int, float | None]] = {}

    # ---- rule sets
    def replace(self, conn: sqlite3.Connection, ruleset: RuleSet, now: float) -> TickResult:
        """Put `ruleset` in force: the counts of changed or removed rules start over, and
        the open alerts of rules that are gone are cleared."""
        old = {r.name: r for r in self.ruleset.rules}
        new = {r.name: r for r in ruleset.rules}
        self.ruleset = ruleset
        self.counts = {k: v for k, v in self.counts.items() if old.get(k[0]) == new.get(k[0])}
        self._forecasts.clear()
        self._intents = []
        for a in alerts.open_alerts(conn):
            if a.rule not in new and a.rule in old:
                self._clear(conn, TickResult(), old[a.rule], a.subject, "the rule was removed",
                            now)
        return self.apply(conn, Pending(self._intents, self.cursor, False), now)

    # ---- one tick
    def tick(self, conn: sqlite3.Connection, now: float, *, scan: bool) -> TickResult:
        """`evaluate` and `apply` on one connection."""
        return self.apply(conn, self.evaluate(conn, now, scan=scan), now)

    def evaluate(self, conn: sqlite3.Connection, now: float, *, scan: bool) -> Pending:
        """Evaluate the readings stored since the last call (and, with `scan`, the
        periodic conditions), reading only: what to raise and clear is returned for
        `apply` on the writer thread. A read-only connection of its own keeps this work
        off the thread that commits ingest."""
        self._devices = None
        self._intents = []
        res = TickResult()
        try:
            with db.transaction(conn, immediate=False):  # one snapshot
                self._attr = device_groups.all_groups(conn)
                self._evaluate(conn, res, now, scan)
        except BaseException:
            self.open = None  # read the open alerts and the cursor again
            self.cursor = None
            raise
        return Pending(self._intents, self.cursor, scan)

    def needs_apply(self, p: Pending) -> bool:
        return bool(p.intents or p.scan or (
            p.cursor != self._stored and time.monotonic() >= self._stored_at + CURSOR_EVERY_S))

    def apply(self, conn: sqlite3.Connection, p: Pending, now: float) -> TickResult:
        """Raise and clear what `evaluate` found, with their events and actions, and store
        the cursor, in one transaction (on the writer thread)."""
        res = TickResult()
        self._devices = None
        try:
            with db.transaction(conn):
                self._attr = device_groups.all_groups(conn) if p.intents else self._attr
                for it in p.intents:
                    if it.raise_:
                        self._do_raise(conn, res, it, now)
                    else:
                        self._do_clear(conn, res, it, now)
                if p.scan:
                    alerts.prune(conn)
                # The cursor is stored with every alert change (a replay after a crash must
                # not raise an episode again) and otherwise at most every CURSOR_EVERY_S:
                # replayed readings only count again from zero.
                mono = time.monotonic()
                if p.cursor is not None and p.cursor != self._stored and (
                        res.raised or res.cleared or mono >= self._stored_at + CURSOR_EVERY_S):
                    alerts.set_cursor(conn, CURSOR, p.cursor)
                    self._stored, self._stored_at = p.cursor, mono
        except BaseException:
            self.open = None
            self.cursor = None
            raise
        return res

    def _evaluate(self, conn: sqlite3.Connection, res: TickResult, now: float,
                  scan: bool) -> None:
        if self.cursor is None:
            stored = self._stored = alerts.get_cursor(conn, CURSOR)
            self.cursor = readings.last_run_id(conn) if stored is None else stored
        if self.open is None or scan:
            self.open = {(a.rule, a.subject) for a in alerts.open_alerts(conn)}
        if self._rules("readings"):
            runs = readings.runs_after(conn, self.cursor, RUNS_PER_TICK)
            if runs:
                self._readings(conn, res, runs, now)
                self.cursor = runs[-1][0]
        else:  # nothing to evaluate them with: skip them
            self.cursor = readings.last_run_id(conn)
        if scan:
            self._scan(conn, res, now)

    def _rules(self, on: str) -> list[Rule]:
        return [r for r in self.ruleset.rules if r.cond.on == on]

    def applies(self, rule: Rule, device: str) -> bool:
        if rule.devices and not any(fnmatch.fnmatchcase(device, g) for g in rule.devices):
            return False
        return rule.group is None or self.in_group(rule.group, device)

    def in_group(self, group: str, device: str) -> bool:
        """Given the group's name (`torpor device group`), or matching one of its globs."""
        if self._attr is not None and self._attr.get(device) == group:
            return True
        return any(fnmatch.fnmatchcase(device, g) for g in self.ruleset.groups.get(group, ()))

    def _readings(self, conn: sqlite3.Connection, res: TickResult,
                  runs: list[tuple[int, str, int, list[tuple[int, ...]]]], now: float) -> None:
        rules = self._rules("readings")
        if not rules:
            return
        battery: dict[tuple[str, str], tuple[int, float]] = {}  # (rule, device) -> last (t, mV)
        for _rowid, device, schema, columns in runs:
            info = proto.SCHEMAS.get(schema)
            if info is None:
                continue
            index = {m.name: (i, m.scale) for i, m in enumerate(info[1])}
            for rule in rules:
                col = index.get(rule.measurement)
                if col is None or not self.applies(rule, device):
                    continue
                values = [v * col[1] for v in columns[col[0] + 1]]
                if rule.condition == "threshold":
                    for t, v in zip(columns[0], values, strict=True):
                        self._threshold(conn, res, rule, device, v, t, now)
                else:
                    k = max(range(len(values)), key=lambda j: columns[0][j])
                    prev = battery.get((rule.name, device))
                    if prev is None or columns[0][k] >= prev[0]:
                        battery[(rule.name, device)] = (columns[0][k], values[k])
        for (name, device), (t, mv) in battery.items():
            brule = self.ruleset.rule(name)
            if brule is not None:
                self._battery(conn, res, brule, device, t, mv, now)

    def _threshold(self, conn: sqlite3.Connection, res: TickResult, rule: Rule, device: str,
                   v: float, t: int, now: float) -> None:
        c = self.counts.setdefault((rule.name, device), _Count())
        level = rule.above if rule.above is not None else rule.below
        assert level is not None and rule.clear_level is not None
        if rule.above is not None:
            beyond, back = v > level, v < rule.clear_level
            word, clear_word = "above", "below"
        else:
            beyond, back = v < level, v > rule.clear_level
            word, clear_word = "below", "above"
        c.beyond = c.beyond + 1 if beyond else 0
        c.back = c.back + 1 if back else 0
        if c.beyond >= rule.for_readings:
            n = rule.for_readings
            self._raise(conn, res, rule, device, device, v, now,
                        f"{rule.measurement} {v:g} {word} {level:g}"
                        + (f" for {n} readings" if n > 1 else ""))
        elif c.back >= rule.clear_for_readings:
            self._clear(conn, res, rule, device,
                        f"{rule.measurement} {v:g} back {clear_word} {rule.clear_level:g}", now)

    def _battery(self, conn: sqlite3.Connection, res: TickResult, rule: Rule, device: str,
                 t: int, mv: float, now: float) -> None:
        problems: list[str] = []
        fine = True
        if rule.below_mv is not None and rule.clear_above_mv is not None:
            if mv < rule.below_mv:
                problems.append(f"battery {mv:g} mV below {rule.below_mv:g} mV")
            if mv < rule.clear_above_mv:
                fine = False
        days: float | None = None
        if rule.forecast_days is not None and rule.clear_days is not None:
            days = self._forecast(conn, rule, device, t)
            if days is not None and days < rule.forecast_days:
                problems.append(f"battery forecast to reach {rule.empty_mv:g} mV in "
                                f"{days:.1f} days (under {rule.forecast_days:g})")
            if days is not None and days < rule.clear_days:
                fine = False
        if problems:
            value = days if rule.below_mv is None and days is not None else mv
            self._raise(conn, res, rule, device, device, value, now, "; ".join(problems))
        elif fine:
            self._clear(conn, res, rule, device, f"battery {mv:g} mV"
                        + (f", forecast {days:.1f} days" if days is not None
                           and math.isfinite(days) else ""), now)

    def _forecast(self, conn: sqlite3.Connection, rule: Rule, device: str,
                  t_last: int) -> float | None:
        # A trend over days moves little in an hour: fitted at most hourly per device.
        key = (rule.name, device)
        cached = self._forecasts.get(key)
        if cached is not None and 0 <= t_last - cached[0] < FORECAST_EVERY_S:
            return cached[1]
        days = self._fit(conn, rule, device, t_last)
        if len(self._forecasts) >= FORECASTS_MAX:
            self._forecasts.clear()
        self._forecasts[key] = (t_last, days)
        return days

    def _fit(self, conn: sqlite3.Connection, rule: Rule, device: str,
             t_last: int) -> float | None:
        model = (None if self.energy is None
                 else self.energy.energy(registry.board_of(conn, device)))
        if model is not None:
            led = wake_log.ledger_forecast(conn, device, model, time.time(),
                                           window_days=rule.window_days, empty_mv=rule.empty_mv)
            if led is not None:
                return led.days
        return readings.battery_forecast(conn, device, t_last, measurement=rule.measurement,
                                         window_days=rule.window_days, empty_mv=rule.empty_mv,
                                         min_points=rule.min_points)

    # ---- periodic conditions
    def devices(self, conn: sqlite3.Connection) -> list[registry.Schedule]:
        if self._devices is None:
            self._devices = registry.schedules(conn)
        return self._devices

    def _scan(self, conn: sqlite3.Connection, res: TickResult, now: float) -> None:
        for rule in self._rules("scan"):
            if rule.condition == "overdue":
                self._overdue(conn, res, rule, now)
            elif rule.condition == "quarantined":
                self._quarantined(conn, res, rule, now)
            elif rule.condition == "campaign_aborted":
                self._campaigns(conn, res, rule, now)
            elif rule.condition == "credential_expiry":
                self._credentials(conn, res, rule, now)

    def _open_subjects(self, rule: Rule) -> list[str]:
        return sorted(s for r, s in self.open or () if r == rule.name)

    def _overdue(self, conn: sqlite3.Connection, res: TickResult, rule: Rule, now: float) -> None:
        # Raised: among the devices whose announced wake has gone by (one query, few rows in
        # a healthy fleet). Cleared: each device with an open alert, looked at again.
        for d in registry.schedules(conn, statuses=(registry.ACTIVE,),
                                    late_at=now - self.grace_s):
            interval = d.next_listen_s or d.next_wake_s
            if not interval or d.last_hello_at is None or not self.applies(rule, d.id):
                continue
            missed = missed_wakes(d.last_hello_at + interval, interval, now, self.grace_s)
            if missed >= rule.intervals:
                self._raise(conn, res, rule, d.id, d.id, float(missed), now,
                            f"missed {missed} wakes (its interval is {interval} s; last "
                            f"heard {now - d.last_hello_at:.0f} s ago)")
        for subject in self._open_subjects(rule):
            dev = registry.find(conn, subject)
            if dev is None or dev.status in (registry.REVOKED, registry.DECOMMISSIONED):
                self._clear(conn, res, rule, subject,
                            f"the device is {dev.status if dev else 'gone'}", now)
                continue
            interval = dev.next_listen_s or dev.next_wake_s
            if dev.last_hello_at is not None and interval and missed_wakes(
                    dev.last_hello_at + interval, interval, now, self.grace_s) == 0:
                self._clear(conn, res, rule, subject, "heard again", now)

    def _quarantined(self, conn: sqlite3.Connection, res: TickResult, rule: Rule,
                     now: float) -> None:
        for d in registry.schedules(conn, statuses=(registry.QUARANTINED,)):
            if self.applies(rule, d.id):
                self._raise(conn, res, rule, d.id, d.id, None, now,
                            f"quarantined: {d.status_reason}")
        for subject in self._open_subjects(rule):
            dev = registry.find(conn, subject)
            if dev is None or dev.status != registry.QUARANTINED:
                self._clear(conn, res, rule, subject, f"now {dev.status if dev else 'gone'}",
                            now)

    def _campaigns(self, conn: sqlite3.Connection, res: TickResult, rule: Rule,
                   now: float) -> None:
        for c in ota.campaigns(conn):
            subject = f"campaign:{c.id}"
            if c.status != ota.ABORTED:
                continue
            if (c.finished_at or c.updated_at) < now - rule.within_days * 86400.0:
                continue
            if alerts.ever_raised(conn, rule.name, subject):
                continue  # the operator clears these; an abort is told once
            counts = ", ".join(f"{k} {v}" for k, v in sorted(c.counts().items()))
            self._raise(conn, res, rule, subject, None, float(c.id), now,
                        f"OTA campaign {c.id} (version {c.version}) aborted: {counts}")

    def _credentials(self, conn: sqlite3.Connection, res: TickResult, rule: Rule,
                     now: float) -> None:
        if self.credentials is None:
            return
        for name, days in self.credentials().items():
            if name == "devices_expiring" or isinstance(days, bool) or not isinstance(
                    days, int | float):
                continue
            subject = f"credential:{name}"
            if days < rule.days:
                self._raise(conn, res, rule, subject, None, float(days), now,
                            f"the {name} credential expires in {days:.1f} days")
            else:
                self._clear(conn, res, rule, subject, f"{days:.0f} days left", now)

    # ---- alerts and actions
    def _raise(self, conn: sqlite3.Connection, res: TickResult, rule: Rule, subject: str,
               device: str | None, value: float | None, now: float, message: str) -> None:
        if self.open is not None and (rule.name, subject) in self.open:
            return
        text = rule.message.format(device=device or "", value=value, rule=rule.name,
                                   detail=message) if rule.message else message
        if self.open is not None:
            self.open.add((rule.name, subject))
        self._intents.append(Intent(True, rule, subject, device,
                                    None if value is None or not math.isfinite(value) else value,
                                    text))

    def _clear(self, conn: sqlite3.Connection, res: TickResult, rule: Rule, subject: str,
               message: str, now: float) -> None:
        if self.open is not None:
            if (rule.name, subject) not in self.open:
                return
            self.open.discard((rule.name, subject))
        self._intents.append(Intent(False, rule, subject, None, None, message))

    def _do_raise(self, conn: sqlite3.Connection, res: TickResult, it: Intent,
                  now: float) -> None:
        rule = it.rule
        a = alerts.raise_alert(conn, rule=rule.name, kind=rule.condition, subject=it.subject,
                               device=it.device, severity=rule.severity, message=it.message,
                               value=it.value, now=now)
        if a is None:
            return
        res.raised.append(a)
        log.warning("alert %s raised for %s: %s", rule.name, it.subject, it.message,
                    extra={"device_id": it.device} if it.device else None)
        self._upstream(conn, res, a, "raised", now)
        if rule.action is not None and it.device is not None:
            self._act(conn, res, rule, rule.action, it.device, now)

    def _do_clear(self, conn: sqlite3.Connection, res: TickResult, it: Intent,
                  now: float) -> None:
        rule = it.rule
        a = alerts.clear_alert(conn, rule.name, it.subject, message=it.message, now=now)
        if a is None:
            return
        res.cleared.append(a)
        log.info("alert %s cleared for %s: %s", rule.name, it.subject, it.message,
                 extra={"device_id": a.device} if a.device else None)
        self._upstream(conn, res, a, "cleared", now)
        if rule.clear_action is not None and a.device is not None:
            self._act(conn, res, rule, rule.clear_action, a.device, now)

    def _upstream(self, conn: sqlite3.Connection, res: TickResult, a: alerts.Alert,
                  state: str, now: float) -> None:
        up = self.upstream
        if up is None or not up.enabled:
            return
        fields = {"alert_id": a.id, "rule": a.rule, "condition": a.kind, "state": state,
                  "subject": a.subject, "severity": a.severity, "message": a.message,
                  "value": a.value, "raised_at": a.raised_at}
        if state == "cleared":
            fields["cleared_at"] = a.cleared_at
            fields["clear_message"] = a.clear_message
        item = formats.event_item(a.device or self.gateway_id, UPSTREAM_KIND, fields,
                                  topic_template=up.topic_events, fmt=up.format, created=now)
        res.queued += ob.enqueue_queued(conn, [item])

    def group_members(self, conn: sqlite3.Connection, group: str) -> list[str]:
        return [d.id for d in self.devices(conn) if d.status in registry.SERVED
                and self.in_group(group, d.id)]

    def _act(self, conn: sqlite3.Connection, res: TickResult, rule: Rule, action: Action,
             device: str, now: float) -> None:
        if action.target == "group":
            assert rule.group is not None
            members = self.group_members(conn, rule.group)
            # Once per episode of the group: only the first alert of the rule in the group
            # to open (or the last to clear) acts.
            others = [a for a in alerts.open_alerts(conn, rule.name)
                      if a.device is not None and a.device != device and a.device in members]
            if others:
                return
            targets = members
        else:
            targets = [device]
        for target in targets:
            try:
                if action.command is not None:
                    q.enqueue_command(conn, target, action.command, action.args,
                                      action.priority, action.ttl_s, now=now)
                else:
                    q.set_config(conn, target, dict(action.config), action.priority,
                                 action.ttl_s, now=now)
            except q.QueueError as exc:  # one device's full queue does not stop the others
                log.warning("rule %s: could not queue %s for %s: %s", rule.name,
                            action.describe(), target, exc, extra={"device_id": target})
                continue
            res.commands += 1
            log.info("rule %s queued %s for %s", rule.name, action.describe(), target,
                     extra={"device_id": target})


# ------------------------------------------------------------------ the supervised task

class Rules:
    """The rules task: loads the file, evaluates every interval on a read-only connection
    of its own (off the writer thread), writes what changed on the writer thread, and
    reloads on `request_reload()` (SIGHUP) or when the file's mtime changes."""

    def __init__(self, cfg: GatewayConfig, conn: sqlite3.Connection, writer: db.Writer, *,
                 notify: Callable[[list[ob.Queued]], None] | None = None,
                 credentials: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self.cfg = cfg
        self.conn = conn
        self.writer = writer
        self.notify = notify
        self.path = cfg.rules_path
        self.engine = Engine(RuleSet(), upstream=cfg.upstream, gateway_id=cfg.mqtt.client_id,
                             grace_s=cfg.downlink.grace_s, credentials=credentials,
                             energy=board_models(cfg))
        self._mtime: float | None = None
        self._reload = True
        self.last_error: str | None = None
        self.evaluated = 0  # the rowid of the last reading run evaluated and committed

    def request_reload(self) -> None:
        self._reload = True

    def _stat(self) -> float | None:
        try:
            return self.path.stat().st_mtime if self.path is not None else None
        except OSError:
            return None

    async def load(self) -> bool:
        """Read the file and put its rules in force; False (old rules kept) when it does
        not validate."""
        self._reload = False
        self._mtime = self._stat()
        if self.path is None:
            return True
        try:
            ruleset = await asyncio.to_thread(load_rules, self.path)
        except RulesError as exc:
            self.last_error = str(exc)
            log.error("rules not reloaded, the rules in force are kept: %s", exc)
            return False
        self.last_error = None
        res = await self.writer.run(self.engine.replace, self.conn, ruleset, time.time())
        self._delivered(res)
        log.info("rules: %d in force from %s", len(ruleset.rules), self.path)
        return True

    def _delivered(self, res: TickResult) -> None:
        if res.queued and self.notify is not None:
            self.notify(res.queued)

    async def run(self) -> None:
        rc = self.cfg.rules
        next_scan = 0.0
        reader = db.connect(self.cfg.db_path, readonly=True)
        # One thread of its own for the reader: a cancelled evaluation runs to its end
        # there, and the connection is closed after it, on the same thread.
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rules")
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self._reload or self._stat() != self._mtime:
                    await self.load()
                mono = time.monotonic()
                scan = mono >= next_scan
                if scan:
                    next_scan = mono + rc.scan_interval_s
                now = time.time()
                pending = await loop.run_in_executor(
                    pool, functools.partial(self.engine.evaluate, reader, now, scan=scan))
                if self.engine.needs_apply(pending):
                    res = await self.writer.run(self.engine.apply, self.conn, pending, now)
                    self._delivered(res)
                self.evaluated = pending.cursor or 0
                await asyncio.sleep(rc.interval_s)
        finally:
            pool.submit(reader.close)
            pool.shutdown(wait=False)
