"""`torpor bench protocol`: bytes on air and codec speed for a 64-reading burst.

The workload is fixed (seeded): a 3-measurement sensor (centi-degC, centi-%RH, mV) sampled
every 60 s, temperature and humidity random-walking by about +-0.05 degC and +-0.2 %RH per
reading, the battery losing 1 mV an hour. Every figure comes with baselines from this run:
the same readings in JSON, CBOR, msgpack, SenML and a fixed struct layout, and JSON's own
decode speed.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gateway.proto as p

ROOT = Path(__file__).resolve().parents[2]
READINGS = 64
T0 = 1_767_225_600


def workload(seed: int = 42, n: int = READINGS) -> p.Burst:
    rng = random.Random(seed)
    temp, hum, batt = 2150, 4800, 3712
    ts, t_col, h_col, b_col = [], [], [], []
    for i in range(n):
        ts.append(T0 + 60 * i)
        t_col.append(temp)
        h_col.append(hum)
        b_col.append(batt - (i * 60) // 3600)
        temp += rng.randint(-5, 5)
        hum = max(0, min(10000, hum + rng.randint(-20, 20)))
    series = p.Series(tuple(ts), (tuple(t_col), tuple(h_col), tuple(b_col)))
    return p.Burst(msg_id=1000, schema=p.SCHEMA_ENV3, interval=60, readings=series)


def baselines(burst: p.Burst) -> dict[str, int]:
    """Bytes of the same readings in other encodings (payload only, no MQTT or TLS)."""
    import cbor2
    import msgpack

    rows = burst.readings.rows()
    objs = [{"t": t, "temperature": a / 100, "humidity": b / 100, "battery": c} for t, a, b, c in rows]
    arrays = [[t, a, b, c] for t, a, b, c in rows]
    senml: list[dict[str, Any]] = []
    for i, (t, a, b, c) in enumerate(rows):
        recs: list[dict[str, Any]] = [
            {"n": "temperature", "u": "Cel", "v": a / 100},
            {"n": "humidity", "u": "%RH", "v": b / 100},
            {"n": "battery", "u": "V", "v": c / 1000},
        ]
        for r in recs:
            r["t"] = t - T0
        if i == 0:
            recs[0] = {"bn": "urn:dev:torpor:node-1:", "bt": T0, **recs[0]}
        senml += recs
    labels = {"bn": -2, "bt": -3, "n": 0, "u": 1, "v": 2, "t": 6}
    senml_cbor = [{labels[k]: v for k, v in r.items()} for r in senml]
    fixed = b"".join(struct.pack("<IhHH", *r) for r in rows)
    sizes = {
        "json": len(json.dumps({"readings": objs}, separators=(",", ":"))),
        "cbor2_map": len(cbor2.dumps({"readings": objs})),
        "cbor2_array": len(cbor2.dumps(arrays)),
        "msgpack": len(msgpack.packb(arrays)),
        "senml_json": len(json.dumps(senml, separators=(",", ":"))),
        "senml_cbor": len(cbor2.dumps(senml_cbor)),
        "struct": len(fixed),
    }
    return {k: v for k, v in sizes.items()}


def _rate(fn: Any, per_call: int, min_s: float = 0.6) -> float:
    calls = 0
    start = time.perf_counter()
    while True:
        for _ in range(50):
            fn()
        calls += 50
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            return calls * per_call / elapsed


MP_SCRIPT = """
import gc, struct, time, proto
recs = bytearray(%d * proto.RECORD_SIZE_ENV3)
rows = %r
for i, r in enumerate(rows):
    struct.pack_into(proto.RECORD_ENV3, recs, i * proto.RECORD_SIZE_ENV3, *r)
buf = bytearray(proto.MAX_BURST)
n = proto.encode_burst(buf, 1000, proto.SCHEMA_ENV3, 60, recs, len(rows))
gc.collect()
a0 = gc.mem_alloc()
proto.encode_burst(buf, 1000, proto.SCHEMA_ENV3, 60, recs, len(rows))
alloc = gc.mem_alloc() - a0
N = 300
t0 = time.ticks_us()
for _ in range(N):
    proto.encode_burst(buf, 1000, proto.SCHEMA_ENV3, 60, recs, len(rows))
enc_ms = time.ticks_diff(time.ticks_us(), t0) / N / 1000
cmd = bytearray(proto.MAX_COMMAND)
m = proto.encode_command(cmd, 5, 77, proto.COMMAND_OP_SET_THRESHOLDS, (3000, -500, 8000), 5, 600)
cmd = bytes(cmd[:m])
t0 = time.ticks_us()
for _ in range(N):
    proto.decode(cmd)
dec_ms = time.ticks_diff(time.ticks_us(), t0) / N / 1000
gc.collect()
a0 = gc.mem_alloc()
proto.decode(cmd)
dec_alloc = gc.mem_alloc() - a0
print(n, alloc, enc_ms, dec_ms, dec_alloc)
"""


def micropython_figures(burst: p.Burst) -> dict[str, Any]:
    import shutil

    binary = shutil.which("micropython") or str(Path(sys.executable).parent / "micropython")
    if not Path(binary).exists():
        return {"error": "micropython (unix port) not installed"}
    code = MP_SCRIPT % (READINGS, burst.readings.rows())
    env = {"MICROPYPATH": f".frozen:{ROOT / 'firmware'}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([binary, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    if out.returncode != 0:
        return {"error": out.stderr.strip()}
    n, alloc, enc_ms, dec_ms, dec_alloc = out.stdout.split()
    return {
        "mp_burst_bytes": int(n),
        "mp_encode_burst_alloc_bytes": int(alloc),
        "mp_encode_burst_ms": round(float(enc_ms), 4),
        "mp_decode_command_ms": round(float(dec_ms), 4),
        "mp_decode_command_alloc_bytes": int(dec_alloc),
    }


def measure() -> dict[str, Any]:
    burst = workload()
    raw = p.encode(burst)
    assert p.decode(raw) == burst
    framing = p.HEADER_SIZE + 1 + 2 + 1  # header, schema, interval, count: all but readings
    base = baselines(burst)
    json_doc = json.dumps([[t, a, b, c] for t, a, b, c in burst.readings.rows()]).encode()
    figures: dict[str, Any] = {
        "readings_per_burst": READINGS,
        "frame_bytes": len(raw),
        "bytes_per_reading": round(len(raw) / READINGS, 3),
        "framing_bytes": framing,
        "framing_overhead_pct": round(100 * framing / len(raw), 2),
        "cpython_decode_readings_per_s": round(_rate(lambda: p.decode_burst(raw), READINGS)),
        "cpython_encode_readings_per_s": round(_rate(lambda: p.encode_burst(burst), READINGS)),
        "baseline_json_decode_readings_per_s": round(_rate(lambda: json.loads(json_doc), READINGS)),
        "baselines": {k: round(v / READINGS, 3) for k, v in base.items()},
    }
    figures["decode_ratio_to_json"] = round(
        figures["cpython_decode_readings_per_s"] / figures["baseline_json_decode_readings_per_s"], 2
    )
    figures.update(micropython_figures(burst))
    figures["targets"] = {
        "bytes_per_reading": "<= 4",
        "framing_overhead_pct": "< 5",
        "cpython_decode_readings_per_s": ">= 1000000",
        "cpython_encode_readings_per_s": ">= 300000",
        "mp_encode_burst_ms": "< 2",
        "mp_encode_burst_alloc_bytes": "< 2048",
        "mp_decode_command_ms": "< 0.5",
    }
    return figures


def _table(fig: dict[str, Any]) -> str:
    lines = [f"{'figure':38} {'value':>14}  target"]
    for key, value in fig.items():
        if key in ("baselines", "targets"):
            continue
        lines.append(f"{key:38} {value!s:>14}  {fig['targets'].get(key, '')}")
    lines.append("")
    lines.append(f"{'bytes per reading, same data':38} {'bytes':>14}  ratio to torpor")
    lines.append(f"{'torpor BURST (frame)':38} {fig['bytes_per_reading']:>14}  1.00")
    for name, bpr in fig["baselines"].items():
        lines.append(f"{name:38} {bpr:>14}  {bpr / fig['bytes_per_reading']:.2f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    fig = measure()
    print(json.dumps(fig) if args.json else _table(fig))
    return 0


def register(sub: Any) -> None:
    parser = sub.add_parser("protocol", help="wire size and codec speed against JSON/CBOR/msgpack/SenML")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(func=run)
