"""Both runtimes agree bit for bit: MicroPython-encoded frames decode in CPython to the same
values and re-encode to the same bytes, and the reverse, for every frame type."""

from __future__ import annotations

import json
import struct
import subprocess
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gateway.proto as p
from tests.mpharness import micropython_binary, mp_env
from tests.protocol.strategies import SPEC, frame_values
from tools.proto.spec import Field, Frame

DRIVER = __file__.replace("test_cross_runtime.py", "mp_codec_driver.py")


def _wire(v: Any) -> Any:
    if isinstance(v, bytes):
        return {"hex": v.hex()}
    if isinstance(v, float):
        return {"f32": struct.pack("<f", v).hex()}
    if isinstance(v, tuple) and hasattr(v, "__dataclass_fields__"):
        return [_wire(getattr(v, k)) for k in v.__dataclass_fields__]
    if hasattr(v, "__dataclass_fields__"):
        return [_wire(getattr(v, k)) for k in v.__dataclass_fields__]
    if isinstance(v, (list, tuple)):
        return [_wire(x) for x in v]
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return int(v)
    return v


def _unwire(v: Any) -> Any:
    if isinstance(v, dict):
        if "hex" in v:
            return bytes.fromhex(v["hex"])
        return struct.unpack("<f", bytes.fromhex(v["f32"]))[0]
    if isinstance(v, list):
        return [_unwire(x) for x in v]
    return v


def encode_case(fr: Frame, frame: Any) -> dict[str, Any]:
    """A frame dataclass as arguments of the firmware's encode_<frame>()."""
    args: list[Any] = [frame.msg_id]
    kwargs: dict[str, Any] = {}
    for f in fr.fields:
        value = getattr(frame, f.name)
        if f.type == "series":
            fmt = p.RECORD_FORMATS[getattr(frame, f.schema_field or "")]
            recs = b"".join(struct.pack(fmt, *row) for row in value.rows())
            args += [{"hex": recs.hex()}, len(value)]
        elif f.optional:
            kwargs[f.name] = _wire(value)
        else:
            args.append(_wire(value))
    return {"op": "encode", "frame": fr.snake, "args": args, "kwargs": kwargs}


def frame_from_mp(fr: Frame, values: list[Any]) -> Any:
    """The firmware's decoded tuple as the CPython dataclass."""
    from tools.proto.gen_python import pascal

    out: dict[str, Any] = {"msg_id": values[0]}
    for f, raw in zip(fr.fields, values[1:], strict=True):
        out[f.name] = _typed(f, _unwire(raw), pascal)
    return getattr(p, fr.camel)(**out)


def _typed(f: Field, v: Any, pascal: Any) -> Any:
    if f.type == "enum":
        return getattr(p, pascal(f.enum))(v)
    if f.type == "series":
        ts, cols = v
        return p.Series(tuple(ts), tuple(tuple(c) for c in cols))
    if f.type == "array":
        if f.of in SPEC.__class__.__dict__ or f.of in ("u8", "i8", "u16", "i16", "u32", "i32"):
            return tuple(v)
        rec = SPEC.record(f.of or "")
        cls = getattr(p, pascal(rec.name))
        return tuple(cls(*[_typed(rf, x, pascal) for rf, x in zip(rec.fields, item, strict=True)])
                     for item in v)
    return v


def run_driver(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    binary = micropython_binary()
    if binary is None:
        pytest.skip("the MicroPython unix port is not installed")
    proc = subprocess.run(
        [binary, DRIVER], input="".join(json.dumps(c) + "\n" for c in cases),
        capture_output=True, text=True, env=mp_env(), timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.parametrize("fr", SPEC.frames, ids=lambda f: f.name)
@settings(max_examples=1, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_both_runtimes_agree(fr: Frame, data: st.DataObject) -> None:
    frames = [data.draw(frame_values(fr)) for _ in range(60)]
    # MicroPython encodes -> CPython decodes to the same values, re-encodes to the same bytes
    results = run_driver([encode_case(fr, f) for f in frames])
    for frame, res in zip(frames, results, strict=True):
        assert "hex" in res, res
        raw = bytes.fromhex(res["hex"])
        assert p.decode(raw) == frame
        assert p.encode(frame) == raw
    # CPython encodes -> MicroPython decodes to the same values -> MicroPython re-encodes
    decoded = run_driver([{"op": "decode", "hex": p.encode(f).hex()} for f in frames])
    again = []
    for frame, res in zip(frames, decoded, strict=True):
        assert res.get("type") == fr.id, res
        assert frame_from_mp(fr, res["values"]) == frame
        again.append(encode_case(fr, frame_from_mp(fr, res["values"])))
    for frame, res in zip(frames, run_driver(again), strict=True):
        assert bytes.fromhex(res["hex"]) == p.encode(frame)
