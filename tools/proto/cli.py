"""`torpor proto gen|check`: write the generated codecs and docs, or prove they are current."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    proto = sub.add_parser("proto", help="protocol spec: generate codecs and docs, check drift")
    psub = proto.add_subparsers(dest="proto_command", metavar="ACTION", required=True)
    gen = psub.add_parser("gen", help="regenerate every file made from the spec (firmware/proto.py, "
                          "wire.py, bootwire.py, op_args.py, boards/_boot_cause.py, gateway/proto.py, docs/protocol.md)")
    gen.set_defaults(func=_gen)
    check = psub.add_parser("check", help="exit 1 if any generated file differs from the spec")
    check.set_defaults(func=_check)


def _gen(args: argparse.Namespace) -> int:
    from tools.proto import generate

    for path in generate.write_all():
        print(f"wrote {path}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from tools.proto import generate

    stale = generate.stale_files()
    for path in stale:
        print(f"out of date: {path} (run `torpor proto gen`)")
    if not stale:
        print("generated files match the spec")
    return 1 if stale else 0
