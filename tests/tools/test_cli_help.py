"""Every subcommand and option of `torpor` has help text, and every group's help names all
of its subcommands: walked over the whole parser tree, so a new command cannot slip by."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from tools.cli import build_parser, options, subcommands

Node = tuple[str, argparse.ArgumentParser]


def _walk(path: str, parser: argparse.ArgumentParser) -> Iterator[Node]:
    yield path, parser
    for name, _help, sub in subcommands(parser):
        yield from _walk(f"{path} {name}", sub)


TREE = list(_walk("torpor", build_parser()))
GROUPS = [(path, p) for path, p in TREE if list(subcommands(p))]


def test_the_walk_reaches_every_level() -> None:
    paths = {path for path, _ in TREE}
    assert {"torpor device send", "torpor ota campaign create", "torpor pki device",
            "torpor fw build", "torpor sim fleet"} <= paths
    assert len(TREE) > 40


@pytest.mark.parametrize(("path", "parser"), TREE, ids=[path for path, _ in TREE])
def test_every_subcommand_and_option_has_help(path: str, parser: argparse.ArgumentParser) -> None:
    missing = [name for name, text, _ in subcommands(parser) if not (text or "").strip()]
    assert not missing, f"{path}: subcommands without help: {missing}"
    missing = [a.option_strings[0] if a.option_strings else a.dest for a in options(parser)
               if a.help is not argparse.SUPPRESS and not (a.help or "").strip()]
    assert not missing, f"{path}: arguments without help: {missing}"
    text = parser.format_help()  # the help renders (no stray % or bad format)
    assert "%%" not in text and "%(" not in text


@pytest.mark.parametrize(("path", "parser"), GROUPS, ids=[path for path, _ in GROUPS])
def test_each_group_lists_all_its_subcommands(path: str, parser: argparse.ArgumentParser) -> None:
    names = [name for name, _, _ in subcommands(parser)]
    description = parser.description or ""
    assert f"Subcommands: {', '.join(names)}." in description, path
    assert f"Subcommands: {', '.join(names)}." in " ".join(parser.format_help().split())


def test_defaults_are_shown() -> None:
    helps = {path: p.format_help() for path, p in TREE}
    assert "(default: 3650)" in " ".join(helps["torpor pki device"].split())
    device = " ".join(helps["torpor device"].split())
    for name in ("add", "list", "show", "release", "revoke", "send", "config", "cancel"):
        assert name in device.split("Subcommands:")[1]
