"""`torpor bench ...`: benchmarks that print figures against a baseline from the same run."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    bench = sub.add_parser("bench", help="run a benchmark and print its figures")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    from tools.bench import downlink, energy, fuzz, node, protocol
    from tools.bench import gateway as gateway_bench
    from tools.bench import ota as ota_bench
    from tools.bench import transport as transport_bench

    protocol.register(bsub)
    downlink.register(bsub)
    gateway_bench.register(bsub)
    node.register(bsub)
    ota_bench.register(bsub)
    fuzz.register(bsub)
    transport_bench.register(bsub)
    energy.register(bsub)
