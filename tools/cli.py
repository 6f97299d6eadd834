"""The `torpor` command: every operator and developer action is a subcommand.

Each command group lives with the code it drives and exposes `register(subparsers)`;
this module only assembles them, so adding a group is one line in COMMAND_GROUPS. It is
also the one place that turns what goes wrong into an exit code, so that no command prints
a Python traceback for ordinary trouble:

- 0 success; 1 the command's own "no" (a check failed, the gateway is not running...);
- 2 an error the operator can act on (bad arguments, unknown device, missing file, bad
  configuration), one line on stderr; some commands document further codes (flash: 3-10);
- 130 interrupted (Ctrl-C, SIGINT), as a shell reports a process killed by SIGINT;
- 141 stdout was closed early (`torpor device list | head -1`), as a shell reports a process
  killed by SIGPIPE; nothing is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import select
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any

# module path -> registers one or more subcommands
COMMAND_GROUPS: tuple[str, ...] = (
    "tools.proto.cli",
    "tools.bench.cli",
    "tools.sim.cli",
    "tools.flash",
    "tools.hil",
    "gateway.cli.pki",
    "gateway.cli.main",
    "gateway.cli.ota",
    "tools.fw.cli",
    "tools.demo",
    "tools.sim.soak",
)

EXIT_OPERATOR = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_PIPE_CLOSED = 128 + signal.SIGPIPE


class CliError(Exception):
    """An error the user can act on; printed without a traceback, exit code 2."""


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, plus: an option's default is shown when its help does not
    already say it, and lines that start with spaces in a description or epilog (tables,
    lists) are kept as written instead of being rewrapped."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text, default = action.help, action.default
        if (text is None or "default" in text.lower() or default is None
                or isinstance(default, bool) or default in ("", [], argparse.SUPPRESS)):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + " (default: %(default)s)"
        return text

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out: list[str] = []
        para: list[str] = []
        for line in [*text.splitlines(), ""]:
            if line.strip() and not line.startswith(" "):
                para.append(line)
                continue
            if para:
                out.append(super()._fill_text(" ".join(para), width, indent))
                para = []
            if line.strip():
                out.append(indent + line)
            elif out and out[-1] != "":
                out.append("")
        return "\n".join(out).rstrip("\n")


class TorporParser(argparse.ArgumentParser):
    """Every parser of the tree (subparsers are created with the parent's class) uses the
    formatter above."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str | None, Any]]:
    """(name, help, parser) of each subcommand of `parser`, in the order they were added.

    argparse (the standard library, not a third party) has no public way to list them:
    `_actions` and `_choices_actions` are the attributes its own help output reads,
    unchanged since Python 2.7."""
    for action in parser._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for choice in action._choices_actions:  # noqa: SLF001
                yield choice.dest, choice.help, action.choices[choice.dest]


def options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """Every argument of `parser` itself except --help and the subcommand slot."""
    for action in parser._actions:  # noqa: SLF001  (see subcommands)
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction):  # noqa: SLF001
            yield action


def _describe_groups(parser: argparse.ArgumentParser, help_text: str | None) -> None:
    """A group's description names all of its subcommands, from the parser itself, so the
    list can never leave one out."""
    subs = list(subcommands(parser))
    if subs:
        listing = "Subcommands: " + ", ".join(name for name, _, _ in subs) + "."
        lead = parser.description or (help_text[:1].upper() + help_text[1:].rstrip(".") + "."
                                      if help_text else "")
        parser.description = f"{lead}\n\n{listing}" if lead else listing
    for _name, sub_help, sub in subs:
        _describe_groups(sub, sub_help)


# `torpor proto gen` must run even when the generated code the other groups import is out
# of date or broken (a half-merged gateway/proto.py): it is what repairs it.
STANDALONE_GROUPS: dict[str, tuple[str, ...]] = {"proto": ("tools.proto.cli",)}


def build_parser(groups: Sequence[str] = COMMAND_GROUPS) -> argparse.ArgumentParser:
    parser = TorporParser(
        prog="torpor",
        description="Torpor: sensor nodes that sleep, their gateway and their protocol.",
        epilog="Exit codes: 0 success, 1 the command's check failed, 2 an error you can act "
        "on (message on stderr), 130 interrupted, 141 output closed early; `torpor COMMAND "
        "--help` for more.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in groups:
        added = importlib.import_module(name).register(sub)
        if name == "gateway.cli.ota":
            # The gateway's CLI imports nothing from tools/: the demo joins from here.
            importlib.import_module("tools.ota_demo").register(added)
    _describe_groups(parser, None)
    return parser


def _error(message: str) -> int:
    print(f"torpor: error: {message}", file=sys.stderr)
    return EXIT_OPERATOR


def _os_error(exc: OSError) -> str:
    """`No such file or directory: x.toml`, `Connection refused`, `timed out`."""
    what = exc.strerror or str(exc) or ("timed out" if isinstance(exc, TimeoutError)
                                        else type(exc).__name__)
    return what + (f": {exc.filename}" if exc.filename is not None else "")


def _stdout_closed() -> bool:
    """True when nobody reads our stdout any more (the reader of its pipe is gone), so a
    BrokenPipeError is about our output rather than a socket or a child's pipe."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, 0)  # POLLERR is always reported: the read end of the pipe is closed
    return any(ev & select.POLLERR for _, ev in poller.poll(0))


def _silence_stdout() -> None:
    # The interpreter flushes stdout at exit; pointed at /dev/null that flush cannot fail.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _run(argv: Sequence[str] | None) -> int:
    from gateway.errors import GatewayError

    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(STANDALONE_GROUPS.get(args_list[0], COMMAND_GROUPS)
                          if args_list else COMMAND_GROUPS)
    try:
        args = parser.parse_args(args_list)
    except SystemExit:  # --help, or a usage error argparse already printed: its own code
        sys.stdout.flush()
        if _stdout_closed():  # argparse ignores a failed write of the help text
            raise BrokenPipeError from None
        raise
    try:
        code = int(args.func(args) or 0)
    except (CliError, GatewayError) as exc:
        return _error(str(exc))
    except BrokenPipeError:
        raise  # main() tells our closed stdout from anything else
    except OSError as exc:  # a missing file, a refused connection: the system said no
        return _error(_os_error(exc))
    sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
    return code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(argv)
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        _silence_stdout()
        return EXIT_PIPE_CLOSED
    except KeyboardInterrupt:
        with contextlib.suppress(OSError, KeyboardInterrupt):
            print("torpor: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
