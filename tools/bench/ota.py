"""`torpor bench ota`: what an update costs a sleeping node.

Measured: the firmware's Ed25519 verify on the unix port (tools/bench/ed25519.py, with its
ESP32 estimate and how it is made) and the image sizes of real sim and ESP32 builds.
Computed from the gateway's own rules (gateway.store.ota_store chunking, gateway.pipeline.downlink budget):
wakes and bytes on air to deliver 100 KB at the sensor class's limits. The per-frame
overhead model: MQTT PUBLISH (fixed header, topic, packet id) and its PUBACK, each in one
TLS 1.3 record (5-byte header, 1-byte content type, 16-byte AEAD tag).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from gateway import proto
from gateway.config import DownlinkConfig
from gateway.store import ota_store

TLS_RECORD = 5 + 1 + 16
PENDING_WAKE_S = 30  # firmware/app.py: a node told "more pending" wakes again after this
AWAKE_WINDOW_MS = 3000  # firmware/config.py default awake window
IMAGE_100KB = 100 * 1024
TOPIC = "torpor/node-0001/down"


def _mqtt_publish_len(payload: int) -> int:
    body = 2 + len(TOPIC) + 2 + payload
    rl = 1 if body < 128 else 2 if body < 16384 else 3
    return 1 + rl + body


def figures(measure_crypto: bool = True) -> dict[str, Any]:
    from tools.fw import image

    out: dict[str, Any] = {}
    if measure_crypto:
        from tools.bench import ed25519

        e = ed25519.measure(rounds=3)
        out["ed25519_verify_ms_unix"] = e["ed25519_verify_ms_unix"]
        out["ed25519_verify_ms_esp32_estimate"] = e["ed25519_verify_ms_esp32_estimate"]
        out["ed25519_esp32_estimate_method"] = (
            f"{e['ed25519_verify_mulmod_equivalents']:.0f} 255-bit multiply-mod equivalents "
            f"(unix verify time / unix mulmod time) x {ed25519.ESP32_MULMOD_US:g} us assumed "
            "per mulmod on a 240 MHz ESP32")
        out["baseline_openssl_verify_ms_cpython"] = e["baseline_openssl_verify_ms_cpython"]
    with tempfile.TemporaryDirectory() as tmp:
        for board in ("sim", "esp32"):
            m = image.build_image(board, 2, Path(tmp) / board)
            out[f"image_bytes_{board}"] = m.total_size
            out[f"manifest_bytes_{board}"] = len(m.to_bytes())
    limits = proto.DEVICE_CLASSES["sensor"]
    cs = ota_store.chunk_size_for(limits)
    chunks = math.ceil(IMAGE_100KB / cs) + math.ceil((2 + out["manifest_bytes_sim"]) / cs)
    frame = len(proto.encode_ota_chunk(proto.OtaChunk(1, 2, 1, bytes(cs))))
    # The planner's rule: room in the window, and bytes within budget_bytes_per_min over
    # the node's next sleep; the first item of a wake always goes.
    dl = DownlinkConfig()
    room = max(1, (AWAKE_WINDOW_MS - dl.window_reserve_ms) // dl.frame_cost_ms)
    budget = limits.budget_bytes_per_min * PENDING_WAKE_S / 60.0
    per_wake = max(1, min(room, int(budget // frame)))
    wakes = math.ceil(chunks / per_wake)
    down = _mqtt_publish_len(frame) + TLS_RECORD
    puback = 4 + TLS_RECORD
    status = _mqtt_publish_len(13) + TLS_RECORD + puback
    out.update({
        "class": "sensor",
        "max_message": limits.max_message,
        "budget_bytes_per_min": limits.budget_bytes_per_min,
        "chunk_size": cs,
        "chunk_frame_bytes": frame,
        "chunk_bytes_on_air": down + puback,
        "chunks_100kb": chunks,
        "chunks_per_wake": per_wake,
        "wakes_to_deliver_100kb": wakes,
        "bytes_on_air_100kb": chunks * (down + puback) + wakes * status,
        "overhead_pct_100kb": 100.0 * (chunks * (down + puback) + wakes * status
                                       - IMAGE_100KB) / IMAGE_100KB,
        "days_at_one_download_wake_per_30s": wakes * PENDING_WAKE_S / 86400.0,
    })
    return out


def register(sub: Any) -> None:
    p = sub.add_parser("ota", help="OTA cost: verify time, image sizes, wakes and bytes for 100 KB")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    f = figures()
    if args.json:
        print(json.dumps(f, indent=2))
        return 0
    width = max(len(k) for k in f)
    for k, v in f.items():
        print(f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return 0
