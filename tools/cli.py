"""The `torpor` command: every operator and developer action is a subcommand.

Each command group lives with the code it drives and exposes `register(subparsers)`;
this module only assembles them, so adding a group is one line in COMMAND_GROUPS.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# module path -> registers one or more subcommands
COMMAND_GROUPS: tuple[str, ...] = (
    "tools.proto.cli",
    "tools.bench.cli",
    "tools.sim.cli",
    "tools.flash",
    "tools.hil",
    "gateway.pki_cli",
    "gateway.cli",
    "gateway.ota_cli",
    "tools.fw.cli",
    "tools.demo",
)


class CliError(Exception):
    """An error the user can act on; printed without a traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torpor",
        description="Torpor: sensor nodes that sleep, their gateway and their protocol.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_GROUPS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except CliError as exc:
        print(f"torpor: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
