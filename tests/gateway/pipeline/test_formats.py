"""Upstream payloads decoded with json and cbor2: names, units, scaling and times."""

from __future__ import annotations

import json

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import ConfigError
from gateway.pipeline.formats import (
    FormatError,
    event_item,
    event_payload,
    readings_item,
    readings_payload,
    topic,
)
from gateway.proto import SCHEMA_ENV3, Series

T0 = 1_700_000_000
SERIES = Series(
    timestamps=(T0, T0 + 60, T0 + 120),
    columns=((2157, -1005, 0), (4520, 10000, 1), (3300, 2999, 4095)),
)


def test_json_readings_columns_in_physical_units() -> None:
    doc = json.loads(readings_payload("node-1", SCHEMA_ENV3, SERIES, "json", msg_id=77))
    assert doc == {
        "version": 2, "device": "node-1", "schema": "env3", "id": 77,
        "units": {"temperature": "degC", "humidity": "%RH", "battery": "mV"},
        "t": [T0, T0 + 60, T0 + 120],
        "values": {"temperature": [21.57, -10.05, 0.0], "humidity": [45.2, 100.0, 0.01],
                   "battery": [3300, 2999, 4095]},
    }


def test_json_rows_is_version_1_one_object_per_reading() -> None:
    doc = json.loads(readings_payload("node-1", SCHEMA_ENV3, SERIES, "json-rows", msg_id=77))
    assert "version" not in doc
    assert doc["device"] == "node-1"
    assert doc["schema"] == "env3"
    assert doc["id"] == 77
    assert doc["units"] == {"temperature": "degC", "humidity": "%RH", "battery": "mV"}
    assert doc["readings"] == [
        {"t": T0, "temperature": 21.57, "humidity": 45.2, "battery": 3300},
        {"t": T0 + 60, "temperature": -10.05, "humidity": 100.0, "battery": 2999},
        {"t": T0 + 120, "temperature": 0.0, "humidity": 0.01, "battery": 4095},
    ]


def test_json_is_compact() -> None:
    for fmt in ("json", "json-rows"):
        raw = readings_payload("node-1", SCHEMA_ENV3, SERIES, fmt)
        assert b" " not in raw and b"\n" not in raw
        assert "id" not in json.loads(raw)
    # The columns name each measurement once, not once per reading.
    assert len(readings_payload("node-1", SCHEMA_ENV3, SERIES, "json")) < len(
        readings_payload("node-1", SCHEMA_ENV3, SERIES, "json-rows"))


def _resolve(pack: list[dict[str, object]]) -> list[tuple[str, str | None, object, float]]:
    """RFC 8428 resolution: base name + name, base time + time."""
    bn, bt = "", 0.0
    out = []
    for rec in pack:
        bn = str(rec.get("bn", bn))
        bt = float(rec.get("bt", bt))  # type: ignore[arg-type]
        out.append((bn + str(rec["n"]), rec.get("u"), rec["v"], bt + float(rec.get("t", 0))))  # type: ignore[arg-type]
    return out


def test_senml_json_names_units_values_times() -> None:
    pack = json.loads(readings_payload("node-1", SCHEMA_ENV3, SERIES, "senml-json"))
    assert pack[0]["bn"] == "urn:dev:torpor:node-1:"
    assert pack[0]["bt"] == T0
    assert sum("bn" in r for r in pack) == 1
    got = _resolve(pack)
    assert len(got) == 9
    assert got[:3] == [
        ("urn:dev:torpor:node-1:temperature", "Cel", 21.57, T0),
        ("urn:dev:torpor:node-1:humidity", "%RH", 45.2, T0),
        ("urn:dev:torpor:node-1:battery", "V", 3.3, T0),  # mV converted to the SenML unit
    ]
    assert got[3:6] == [
        ("urn:dev:torpor:node-1:temperature", "Cel", -10.05, T0 + 60),
        ("urn:dev:torpor:node-1:humidity", "%RH", 100.0, T0 + 60),
        ("urn:dev:torpor:node-1:battery", "V", 2.999, T0 + 60),
    ]
    assert got[8] == ("urn:dev:torpor:node-1:battery", "V", 4.095, T0 + 120)


def test_senml_cbor_uses_integer_labels_and_matches_json() -> None:
    raw = readings_payload("node-1", SCHEMA_ENV3, SERIES, "senml-cbor")
    pack = cbor2.loads(raw)
    assert isinstance(pack, list)
    first = pack[0]
    assert first[-2] == "urn:dev:torpor:node-1:"  # bn
    assert first[-3] == T0  # bt
    assert first[0] == "temperature" and first[1] == "Cel" and first[2] == 21.57  # n, u, v
    assert pack[3][6] == 60  # t, relative to bt
    assert all(isinstance(k, int) for rec in pack for k in rec)
    names = {-2: "bn", -3: "bt", 0: "n", 1: "u", 2: "v", 6: "t"}
    as_json = [{names[k]: v for k, v in rec.items()} for rec in pack]
    assert as_json == json.loads(readings_payload("node-1", SCHEMA_ENV3, SERIES, "senml-json"))
    assert len(raw) < len(readings_payload("node-1", SCHEMA_ENV3, SERIES, "senml-json"))


def test_event_payloads() -> None:
    fields = {"fw_version": 7, "reason": "bad cert", "safe_mode": True, "digest": b"\x01\xff"}
    doc = json.loads(event_payload("node-2", "quarantined", fields, "json", t=T0 + 0.5))
    assert doc == {
        "device": "node-2", "event": "quarantined", "t": T0 + 0.5,
        "fields": {"fw_version": 7, "reason": "bad cert", "safe_mode": True, "digest": "Af8"},
    }
    pack = json.loads(event_payload("node-2", "quarantined", fields, "senml-json", t=T0))
    assert pack[0] == {"bn": "urn:dev:torpor:node-2:", "bt": T0, "n": "event", "vs": "quarantined"}
    assert pack[1:] == [
        {"n": "quarantined:fw_version", "v": 7},
        {"n": "quarantined:reason", "vs": "bad cert"},
        {"n": "quarantined:safe_mode", "vb": True},
        {"n": "quarantined:digest", "vd": "Af8"},
    ]
    cpack = cbor2.loads(event_payload("node-2", "quarantined", fields, "senml-cbor", t=T0))
    assert cpack[0] == {-2: "urn:dev:torpor:node-2:", -3: T0, 0: "event", 3: "quarantined"}
    assert cpack[4] == {0: "quarantined:digest", 8: b"\x01\xff"}  # vd is a byte string in CBOR


def test_bad_inputs_are_refused_with_a_reason() -> None:
    with pytest.raises(ConfigError, match="upstream.format"):
        readings_payload("n", SCHEMA_ENV3, SERIES, "xml")
    with pytest.raises(FormatError, match="unknown sensor schema 99"):
        readings_payload("n", 99, SERIES, "json")
    with pytest.raises(FormatError, match="cannot send a object"):
        event_payload("n", "hello", {"x": object()}, "json")


def test_topics_and_items() -> None:
    assert topic("up/{device}/{kind}", "node-1", "env3") == "up/node-1/env3"
    with pytest.raises(FormatError, match="device id"):
        topic("up/{device}", "a/b", "env3")
    with pytest.raises(FormatError):
        topic("up/{device}", "a+", "env3")
    with pytest.raises(ConfigError, match="placeholders"):
        topic("up/{site}/{device}", "node-1", "env3")
    item = readings_item("node-1", SCHEMA_ENV3, SERIES, topic_template="t/{device}/{kind}",
                         fmt="json", created=5.0, msg_id=1)
    assert (item.topic, item.created, item.device, item.kind) == ("t/node-1/env3", 5.0, "node-1",
                                                                  "readings")
    assert json.loads(item.payload)["id"] == 1
    ev = event_item("node-1", "revoked", {}, topic_template="e/{device}/{kind}", fmt="senml-cbor",
                    created=9.0)
    assert ev.topic == "e/node-1/revoked" and ev.kind == "revoked"
    assert cbor2.loads(ev.payload) == [{-2: "urn:dev:torpor:node-1:", -3: 9.0, 0: "event", 3: "revoked"}]


@given(
    st.lists(
        st.tuples(st.integers(-32768, 32767), st.integers(0, 65535), st.integers(0, 65535)),
        min_size=1, max_size=64,
    )
)
def test_scaled_values_are_exact_decimals(rows: list[tuple[int, int, int]]) -> None:
    series = Series(tuple(T0 + 10 * i for i in range(len(rows))),
                    tuple(tuple(col) for col in zip(*rows, strict=True)))
    doc = json.loads(readings_payload("n", SCHEMA_ENV3, series, "json-rows"))
    for (temp, hum, bat), rec in zip(rows, doc["readings"], strict=True):
        assert round(rec["temperature"] * 100) == temp and len(repr(rec["temperature"])) <= 8
        assert round(rec["humidity"] * 100) == hum
        assert rec["battery"] == bat
    cols = json.loads(readings_payload("n", SCHEMA_ENV3, series, "json"))["values"]
    assert [{"temperature": t, "humidity": h, "battery": b} for t, h, b in zip(
        cols["temperature"], cols["humidity"], cols["battery"], strict=True)] == [
        {k: v for k, v in rec.items() if k != "t"} for rec in doc["readings"]]
    pack = cbor2.loads(readings_payload("n", SCHEMA_ENV3, series, "senml-cbor"))
    volts = [rec[2] for rec in pack if rec[0] == "battery"]
    assert [round(v * 1000) for v in volts] == [r[2] for r in rows]
