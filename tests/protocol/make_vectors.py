"""Write tests/protocol/vectors/v<major>_<minor>.json: frames of this protocol version, frozen.

Run deliberately (`python -m tests.protocol.make_vectors`) only when a new protocol version is
released; the file of an earlier version is never rewritten, so its frames must keep decoding.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path
from typing import Any

import gateway.proto as p
from tools.bench.protocol import workload

OUT = Path(__file__).parent / "vectors" / f"v{p.MAJOR}_{p.MINOR}.json"


def plain(v: Any) -> Any:
    if isinstance(v, enum.IntEnum):
        return int(v)
    if isinstance(v, bytes):
        return {"hex": v.hex()}
    if dataclasses.is_dataclass(v):
        return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


def frames() -> list[Any]:
    hello = p.Hello(1, 12, p.BootCause.TIMER, 3650, -72, 81234, 64, 3, 300, 1500, 1_767_225_600,
                    p.DeviceClass.SENSOR, config_version=4, ota_state=p.OtaState.CONFIRMED,
                    mcu_temp=31.5, first_id=1001, next_listen_s=3000)
    irregular = p.Series((1_767_225_600, 1_767_225_661, 1_767_225_719),
                         ((-1250, -1249, -1300), (9990, 10000, 9800), (2900, 2899, 2899)))
    return [
        hello,
        p.Hello(2, 1, p.BootCause.POWER_ON, 4100, 0, 200000, 0, 0, 60, 1000, 0,
                p.DeviceClass.MONITOR, safe_mode=True, boots_without_send=5, clock_unset=True),
        # 1.5: the previous wake's awake and radio-on times, and whether it sent.
        p.Hello(3, 12, p.BootCause.TIMER, 2950, -80, 60000, 1, 0, 300, 1500, 1_767_225_900,
                p.DeviceClass.SENSOR, prev_awake_ms=4321, prev_radio_ms=3170, prev_sent=True),
        workload(),
        p.Burst(70000, p.SCHEMA_ENV3, 0, irregular),
        p.Burst(70003, p.SCHEMA_ENV3, 0, irregular, node_clock=True),
        p.Ack(9, 1064, (1066, 1070), time=1_767_229_000, pending=2),
        p.Command(10, 501, p.CommandOp.SET_THRESHOLDS, (3000, -500, 8000), 7, 3600,
                  expires_at=1_767_232_600),
        p.Command(11, 502, p.CommandOp.PING, (), 0, 60, data=b"\x00\x01hello"),
        p.CommandResult(5, 501, p.ResultStatus.OK, code=0, detail="applied", values=(3000,)),
        p.CommandResult(6, 502, p.ResultStatus.DUPLICATE),
        p.ShadowReport(7, 3, (p.ConfigEntry(p.ConfigKey.SAMPLE_INTERVAL_S, 300),)),
        p.ShadowDelta(12, 4, (p.ConfigEntry(p.ConfigKey.TEMP_HIGH, 3500),
                              p.ConfigEntry(p.ConfigKey.SEND_EVERY, 64))),
        p.OtaManifest(13, 7, 104_857, 512, b'{"version": 7}', bytes(range(64))),
        p.OtaChunk(14, 7, 3, bytes(range(200))),
        p.OtaStatus(8, 7, p.OtaState.REVERTED, 205, reason=p.OtaReason.HEALTH_CHECK, detail="no gateway"),
        p.SleepNow(15, 0, pending=1),
        p.Error(16, p.ErrorCode.MALFORMED, 77, detail="BURST at byte 9: truncated"),
    ]


def main() -> None:
    if OUT.exists():
        raise SystemExit(f"{OUT.name} exists: frozen vectors of a released version are never rewritten")
    vectors = [{"frame": type(f).__name__, "hex": p.encode(f).hex(), "fields": plain(f)} for f in frames()]
    OUT.write_text(json.dumps(vectors, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
