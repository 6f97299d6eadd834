"""The "json" and "json-rows" readings payloads are byte for byte what json.dumps makes of
the documented documents, whatever the values (the fast path memoises value texts per
measurement)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.pipeline import formats
from gateway.pipeline.formats import readings_payload
from gateway.proto import SCHEMA_ENV3, SCHEMAS, Series


def reference(device: str, schema_id: int, series: Series, msg_id: int | None,
              fmt: str = "json") -> bytes:
    name, ms = SCHEMAS[schema_id]
    rows = []
    for row in series.rows():
        rec: dict[str, Any] = {"t": row[0]}
        for m, raw in zip(ms, row[1:], strict=True):
            places = formats._decimals(m.scale)
            value = raw * m.scale
            rec[m.name] = int(round(value)) if places == 0 else round(value, places)
        rows.append(rec)
    doc: dict[str, Any] = {"version": 2} if fmt == "json" else {}
    doc.update({"device": device, "schema": name})
    if msg_id is not None:
        doc["id"] = msg_id
    doc["units"] = {m.name: m.unit for m in ms}
    if fmt == "json":
        doc["t"] = [r["t"] for r in rows]
        doc["values"] = {m.name: [r[m.name] for r in rows] for m in ms}
    else:
        doc["readings"] = rows
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


raw = st.integers(-(2**31), 2**31 - 1)


@settings(max_examples=300, deadline=None)
@given(
    device=st.text(min_size=1, max_size=12),
    msg_id=st.none() | st.integers(0, 2**32 - 1),
    rows=st.lists(st.tuples(st.integers(0, 2**32 - 1), raw, raw, raw), max_size=70),
)
def test_same_bytes_as_json_dumps(device: str, msg_id: int | None,
                                  rows: list[tuple[int, int, int, int]]) -> None:
    series = Series(tuple(r[0] for r in rows), tuple(tuple(r[i] for r in rows) for i in (1, 2, 3)))
    # Twice: the second call is served from the memo.
    for fmt in ("json", "json-rows", "json"):
        got = readings_payload(device, SCHEMA_ENV3, series, fmt, msg_id=msg_id)
        assert got == reference(device, SCHEMA_ENV3, series, msg_id, fmt)


def test_memo_stays_bounded() -> None:
    for start in range(0, 20_000, 1000):
        vals = tuple(range(start, start + 1000))
        series = Series(tuple(range(1000)), (vals, vals, vals))
        readings_payload("n", SCHEMA_ENV3, series, "json")
    assert all(len(m) <= formats._MEMO_MAX + 1000 for m in formats._json_schemas[SCHEMA_ENV3].memos)
