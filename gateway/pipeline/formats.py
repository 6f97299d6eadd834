"""Upstream payloads and topics: one message per burst or device event, in JSON or SenML.

Formats (see docs/upstream.md): "json" (version 2: compact, one array of physical values
per measurement in the spec's units), "json-rows" (version 1: one object per reading),
"senml-json" and "senml-cbor" (RFC 8428 packs; names from the spec's measurements, units
mapped to SenML units and values converted to match).
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

import cbor2

from gateway.errors import ConfigError, GatewayError
from gateway.proto import SCHEMAS, Measurement, Series
from gateway.store.outbox import OutboxItem

FORMATS: Final = ("json", "json-rows", "senml-json", "senml-cbor")
JSON_FORMATS: Final = ("json", "json-rows")  # the same events; readings in columns or rows
JSON_VERSION: Final = 2  # the "version" member of a "json" readings message
BASE_NAME: Final = "urn:dev:torpor:{device}:"
READINGS_KIND: Final = "readings"

# RFC 8428 section 6: CBOR integer labels.
_CBOR_LABELS: Final = {
    "bver": -1, "bn": -2, "bt": -3, "bu": -4, "bv": -5, "bs": -6,
    "n": 0, "u": 1, "v": 2, "vs": 3, "vb": 4, "s": 5, "t": 6, "ut": 7, "vd": 8,
}


@dataclass(frozen=True, slots=True)
class SenmlUnit:
    """A spec unit as SenML writes it: the registered symbol and the factor to get there."""

    symbol: str
    factor: float = 1.0


# Spec unit -> SenML unit (RFC 8428 section 12.1 registry). Units with no entry travel
# without "u" in SenML (the name still says what it is) and as-is in "json".
SENML_UNITS: Final[Mapping[str, SenmlUnit]] = {
    "degC": SenmlUnit("Cel"),
    "Cel": SenmlUnit("Cel"),
    "K": SenmlUnit("K"),
    "%RH": SenmlUnit("%RH"),
    "%": SenmlUnit("%"),
    "V": SenmlUnit("V"),
    "mV": SenmlUnit("V", 0.001),
    "A": SenmlUnit("A"),
    "mA": SenmlUnit("A", 0.001),
    "W": SenmlUnit("W"),
    "mW": SenmlUnit("W", 0.001),
    "Pa": SenmlUnit("Pa"),
    "hPa": SenmlUnit("Pa", 100.0),
    "lx": SenmlUnit("lx"),
    "lux": SenmlUnit("lx"),
    "dBm": SenmlUnit("dBm"),
    "m": SenmlUnit("m"),
    "s": SenmlUnit("s"),
    "ms": SenmlUnit("s", 0.001),
    "Hz": SenmlUnit("Hz"),
    "EL": SenmlUnit("EL"),
    "ppm": SenmlUnit("ppm"),
}


class FormatError(GatewayError):
    """A payload could not be built (unknown schema, bad field value)."""


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"upstream.format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return fmt


def _decimals(step: float) -> int:
    # Enough decimals to show one step exactly: 0.01 -> 2, 1 -> 0, 0.001 -> 3.
    return 0 if step >= 1 else min(12, math.ceil(-math.log10(step) - 1e-9))


def _scaled(raw: int, step: float, places: int) -> int | float:
    value = raw * step
    return int(round(value)) if places == 0 else round(value, places)


def _schema(schema_id: int) -> tuple[str, tuple[Measurement, ...]]:
    try:
        return SCHEMAS[schema_id]
    except KeyError:
        raise FormatError(f"unknown sensor schema {schema_id}") from None


class _JsonSchema:
    """The fixed parts of a schema's "json" and "json-rows" payloads, computed once: the
    units object, the member names, a %-template per reading row, and per measurement a
    bounded memo of value texts (sensor values repeat, and formatting a float is most of
    the cost of a payload)."""

    __slots__ = ("head", "names", "row", "steps", "memos")

    def __init__(self, name: str, measurements: tuple[Measurement, ...]) -> None:
        units = _json({m.name: m.unit for m in measurements}).decode("ascii")
        self.head = f',"schema":{_json(name).decode("ascii")}', f',"units":{units}'
        self.names = [_json(m.name).decode("ascii") for m in measurements]
        # "t" is an int; each value is %s of the text json.dumps gives its number.
        self.row = '{"t":%d' + "".join(f",{n}:%s" for n in self.names) + "}"
        self.steps = [(m.scale, _decimals(m.scale)) for m in measurements]
        self.memos: list[dict[int, str]] = [{} for _ in measurements]

    def array(self, index: int, raws: Sequence[int]) -> str:
        """One column as a JSON array (same bytes as json.dumps of the scaled values)."""
        return f"[{','.join(self.texts(index, raws))}]"

    def texts(self, index: int, raws: Sequence[int]) -> list[str]:
        """The JSON text of each scaled value of one column (same bytes as json.dumps)."""
        memo = self.memos[index]
        out = list(map(memo.get, raws))
        if None in out:
            step, places = self.steps[index]
            if len(memo) > _MEMO_MAX:
                memo.clear()
            for i, raw in enumerate(raws):
                if out[i] is None:
                    text = memo[raw] = repr(_scaled(raw, step, places))
                    out[i] = text
        return out  # type: ignore[return-value]


_MEMO_MAX: Final = 4096
_json_schemas: dict[int, _JsonSchema] = {}


@lru_cache(maxsize=512)
def _ints_template(n: int) -> str:
    return "[" + ",".join(["%d"] * n) + "]"


def _int_array(ints: Sequence[int]) -> str:
    # One %-format built in C: half the cost of the list's repr, a third of joining str()s.
    return _ints_template(len(ints)) % tuple(ints)


@lru_cache(maxsize=65536)
def _json_str(text: str) -> str:
    return _json(text).decode("ascii")


def _json_schema(schema_id: int) -> _JsonSchema:
    js = _json_schemas.get(schema_id)
    if js is None:
        js = _json_schemas[schema_id] = _JsonSchema(*_schema(schema_id))
    return js


def _json_readings(device: str, schema_id: int, series: Series, msg_id: int | None) -> bytes:
    """"json" (version 2): the times in one array, each measurement's values in another."""
    js = _json_schema(schema_id)
    values = ",".join(f"{name}:{js.array(i, col)}"
                      for i, (name, col) in enumerate(zip(js.names, series.columns, strict=True)))
    ident = "" if msg_id is None else f',"id":{int(msg_id)}'
    schema, units = js.head
    return (f'{{"version":{JSON_VERSION},"device":{_json_str(device)}{schema}{ident}'
            f'{units},"t":{_int_array(series.timestamps)},"values":{{{values}}}}}'
            ).encode("ascii")


def _json_rows(device: str, schema_id: int, series: Series, msg_id: int | None) -> bytes:
    """"json-rows" (version 1): one object per reading."""
    js = _json_schema(schema_id)
    cols = [js.texts(i, col) for i, col in enumerate(series.columns)]
    rows = ",".join(map(js.row.__mod__, zip(series.timestamps, *cols, strict=True)))
    ident = "" if msg_id is None else f',"id":{int(msg_id)}'
    schema, units = js.head
    return (f'{{"device":{_json(device).decode("ascii")}{schema}{ident}{units},"readings":[{rows}]}}'
            ).encode("ascii")


def readings_payload(
    device: str, schema_id: int, series: Series, fmt: str, *, msg_id: int | None = None
) -> bytes:
    """One upstream message for one BURST: every reading with its time, values scaled to
    physical units. `msg_id` (the burst's first message id) lets consumers drop duplicates."""
    name, measurements = _schema(schema_id)
    if len(series.columns) != len(measurements):
        raise FormatError(f"schema {name} has {len(measurements)} measurements, "
                          f"the series {len(series.columns)} columns")
    if fmt == "json":
        return _json_readings(device, schema_id, series, msg_id)
    if fmt == "json-rows":
        return _json_rows(device, schema_id, series, msg_id)
    check_format(fmt)
    convs = []
    for m in measurements:
        unit = SENML_UNITS.get(m.unit)
        step = m.scale * (unit.factor if unit else 1.0)
        convs.append((m.name, unit.symbol if unit else None, step, _decimals(step)))
    pack: list[dict[str, Any]] = []
    base = series.timestamps[0] if len(series) else 0
    for ri, row in enumerate(series.rows()):
        for ci, ((mname, symbol, step, places), raw) in enumerate(zip(convs, row[1:], strict=True)):
            rec: dict[str, Any] = {}
            if ri == 0 and ci == 0:
                rec["bn"] = BASE_NAME.format(device=device)
                rec["bt"] = base
            rec["n"] = mname
            if symbol is not None:
                rec["u"] = symbol
            rec["v"] = _scaled(raw, step, places)
            if row[0] != base:
                rec["t"] = row[0] - base
            pack.append(rec)
    return _senml(pack, fmt)


def event_payload(
    device: str, kind: str, fields: Mapping[str, Any], fmt: str, *, t: float | None = None
) -> bytes:
    """One upstream message for a device event (hello, quarantined, released, revoked...).
    Field values: numbers, strings, bools, bytes, or None; `t` defaults to now."""
    when = time.time() if t is None else t
    if fmt in JSON_FORMATS:
        doc: dict[str, Any] = {"device": device, "event": kind, "t": when}
        doc["fields"] = {k: _json_value(k, v) for k, v in fields.items()}
        return _json(doc)
    check_format(fmt)
    pack: list[dict[str, Any]] = [
        {"bn": BASE_NAME.format(device=device), "bt": when, "n": "event", "vs": kind}
    ]
    for key, value in fields.items():
        rec: dict[str, Any] = {"n": f"{kind}:{key}"}
        if isinstance(value, bool):
            rec["vb"] = value
        elif isinstance(value, int | float):
            rec["v"] = value
        elif isinstance(value, str):
            rec["vs"] = value
        elif isinstance(value, bytes | bytearray | memoryview):
            rec["vd"] = bytes(value)
        elif value is None:
            continue
        else:
            rec["vs"] = json.dumps(_json_value(key, value), separators=(",", ":"))
        pack.append(rec)
    return _senml(pack, fmt)


def _json_value(key: str, value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.urlsafe_b64encode(bytes(value)).rstrip(b"=").decode("ascii")
    if isinstance(value, Mapping):
        return {str(k): _json_value(key, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(key, v) for v in value]
    raise FormatError(f"event field {key!r}: cannot send a {type(value).__name__} upstream")


def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _senml(pack: list[dict[str, Any]], fmt: str) -> bytes:
    if fmt == "senml-json":
        for rec in pack:
            if "vd" in rec:
                rec["vd"] = base64.urlsafe_b64encode(rec["vd"]).rstrip(b"=").decode("ascii")
        return _json(pack)
    return bytes(cbor2.dumps([{_CBOR_LABELS[k]: v for k, v in rec.items()} for rec in pack]))


# ---------------------------------------------------------------- topics and outbox items

_FORBIDDEN_IN_TOPIC: Final = frozenset("+#/\x00")


def topic(template: str, device: str, kind: str) -> str:
    """The upstream topic from a configured template: `{device}` and `{kind}` are replaced
    (kind is the schema name for readings, the event kind for events)."""
    for label, value in (("device id", device), ("kind", kind)):
        if not value or _FORBIDDEN_IN_TOPIC & set(value):
            raise FormatError(f"{label} {value!r} cannot be part of an MQTT topic")
    try:
        out = template.format(device=device, kind=kind)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"upstream topic template {template!r} is invalid ({exc}); "
            "use the placeholders {device} and {kind}"
        ) from None
    if not out or "+" in out or "#" in out:
        raise ConfigError(f"upstream topic template {template!r} gives the invalid topic {out!r}")
    return out


# One topic per device and schema, built once: ingest asks for it with every burst.
_readings_topic = lru_cache(maxsize=65536)(topic)


def readings_item(
    device: str,
    schema_id: int,
    series: Series,
    *,
    topic_template: str,
    fmt: str,
    created: float,
    msg_id: int | None = None,
) -> OutboxItem:
    """The outbox item for one committed BURST."""
    name, _ = _schema(schema_id)
    return OutboxItem(
        _readings_topic(topic_template, device, name),
        readings_payload(device, schema_id, series, fmt, msg_id=msg_id),
        created,
        device,
        READINGS_KIND,
    )


def event_item(
    device: str,
    kind: str,
    fields: Mapping[str, Any],
    *,
    topic_template: str,
    fmt: str,
    created: float,
) -> OutboxItem:
    """The outbox item for one device event."""
    return OutboxItem(
        topic(topic_template, device, kind),
        event_payload(device, kind, fields, fmt, t=created),
        created,
        device,
        kind,
    )
