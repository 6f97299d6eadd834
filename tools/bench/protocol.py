"""`torpor bench protocol`: bytes on air and codec speed for a 64-reading burst."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("protocol", help="wire size and codec speed against JSON/CBOR/msgpack/SenML")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=lambda args: 0)
