"""Hypothesis strategies for every frame, built from the spec so new fields are covered."""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import strategies as st

import gateway.proto as p
from tools.proto.gen_python import pascal
from tools.proto.spec import INT_RANGES, Field, Frame, Spec, load

SPEC: Spec = load()


def _f32() -> st.SearchStrategy[float]:
    return st.floats(width=32, allow_nan=False, allow_infinity=False).map(
        lambda x: struct.unpack("<f", struct.pack("<f", x))[0]
    )


def scalar(spec: Spec, ftype: str, enum: str | None = None) -> st.SearchStrategy[Any]:
    if ftype == "enum":
        assert enum
        cls = getattr(p, pascal(enum))
        return st.sampled_from([cls(v) for _, v in spec.enum(enum).values])
    if ftype == "bool":
        return st.booleans()
    if ftype == "f32":
        return _f32()
    lo, hi = INT_RANGES[ftype]
    return st.integers(lo, hi)


@st.composite
def series(draw: st.DrawFn, schema_id: int, interval: int, limit: int) -> p.Series:
    _, measurements = p.SCHEMAS[schema_id]
    n = draw(st.integers(1, min(limit, 80)))
    # room for n steps of the interval, or of up to 600 s each when interval is 0
    t0 = draw(st.integers(0, 0xFFFFFFFF - max(interval, 600) * n))
    if interval:
        ts = tuple(range(t0, t0 + n * interval, interval))
    else:
        steps = draw(st.lists(st.integers(0, 600), min_size=n - 1, max_size=n - 1))
        acc = [t0]
        for s in steps:
            acc.append(acc[-1] + s)
        ts = tuple(acc)
    cols = []
    for m in measurements:
        lo, hi = INT_RANGES[m.type]
        # mostly small steps (real sensors), sometimes a jump anywhere in range
        start = draw(st.integers(lo, hi))
        steps = draw(st.lists(st.integers(-40, 40), min_size=n - 1, max_size=n - 1))
        jumps = draw(st.lists(st.tuples(st.integers(0, max(0, n - 2)), st.integers(lo - hi, hi - lo)),
                              max_size=3))
        for i, jump in jumps:
            if steps:
                steps[i] = jump
        col = [start]
        for step in steps:
            col.append(min(hi, max(lo, col[-1] + step)))
        cols.append(tuple(col))
    return p.Series(ts, tuple(cols))


def field_value(spec: Spec, f: Field) -> st.SearchStrategy[Any]:
    if f.fixed:
        return scalar(spec, f.type, f.enum)
    if f.type == "bytes":
        assert f.max
        return st.binary(max_size=f.max)
    if f.type == "str":
        assert f.max
        return st.text(max_size=f.max // 4)
    if f.type == "array":
        assert f.of and f.max
        if f.of in INT_RANGES:
            return st.lists(scalar(spec, f.of), max_size=f.max).map(tuple)
        rec = spec.record(f.of)
        cls = getattr(p, pascal(f.of))
        item = st.builds(cls, *[scalar(spec, rf.type, rf.enum) for rf in rec.fields])
        return st.lists(item, max_size=f.max).map(tuple)
    raise AssertionError(f.type)


@st.composite
def frame_values(draw: st.DrawFn, fr: Frame) -> Any:
    cls = getattr(p, fr.camel)
    values: dict[str, Any] = {"msg_id": draw(st.integers(0, 0xFFFFFFFF))}
    for f in fr.fields:
        if f.type == "series":
            assert f.schema_field and f.interval_field and f.max
            schema = draw(st.sampled_from(sorted(p.SCHEMAS)))
            interval = draw(st.sampled_from([0, 1, 60, 300, 3600]))
            values[f.schema_field] = schema
            values[f.interval_field] = interval
            values[f.name] = draw(series(schema, interval, f.max))
        elif f.name in values:
            continue
        elif f.optional:
            values[f.name] = draw(st.one_of(st.just(None), field_value(SPEC, f)))
            if values[f.name] is None:
                del values[f.name]
        else:
            values[f.name] = draw(field_value(SPEC, f))
    return cls(**values)


any_frame = st.sampled_from(SPEC.frames).flatmap(frame_values)
