"""`torpor device group`, `torpor gateway rules check` and `torpor gateway alerts`: the
operator's side of the edge rules (gateway.pipeline.rules, docs/rules.md).

Exit codes as the rest of the CLI: 0 success, 2 an error the operator can act on (unknown
device, bad group name, a rules file that does not validate).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway import config as gwconfig
from gateway.cli.common import fail
from gateway.errors import GatewayError

Config = Callable[[argparse.Namespace], gwconfig.GatewayConfig]


def register(gsub: Any, dsub: Any, config_arg: Callable[[argparse.ArgumentParser], None],
             load: Config) -> None:
    p = dsub.add_parser("group", help="put a device in a group of the edge rules (docs/rules.md)")
    config_arg(p)
    p.add_argument("device_id", help="the device's id")
    p.add_argument("group", nargs="?", default=None, help="the group's name; left out: show it")
    p.add_argument("--clear", action="store_true", help="take the device out of its group")
    p.set_defaults(func=lambda a: _group(a, load))
    p = gsub.add_parser("rules", help="the edge rules file")
    rsub = p.add_subparsers(dest="rules_command", metavar="ACTION", required=True)
    q = rsub.add_parser("check", help="validate a rules file (default: the gateway's)")
    config_arg(q)
    q.add_argument("file", nargs="?", default=None, help="the rules file to check")
    q.set_defaults(func=lambda a: _check(a, load))
    p = gsub.add_parser("alerts", help="alerts raised by the edge rules, newest first")
    config_arg(p)
    p.add_argument("--all", action="store_true", help="cleared ones too (default: open only)")
    p.add_argument("--device", default=None, help="only this device's")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=lambda a: _alerts(a, load))


def _group(args: argparse.Namespace, load: Config) -> int:
    from gateway.ops import groups as ogroups

    try:
        cfg = load(args)
        if args.group is None and not args.clear:
            print(ogroups.show(cfg, args.device_id) or "-")
            return 0
        done = ogroups.assign(cfg, args.device_id, None if args.clear else args.group)
    except GatewayError as exc:
        return fail(str(exc))
    print(f"{done.device}: {done.group or 'in no group'}")
    return 0


def _check(args: argparse.Namespace, load: Config) -> int:
    from gateway.service import check_rules  # the commands start the service, or ask it

    try:
        path = Path(args.file) if args.file else load(args).rules_path
        if path is None:
            return fail("no rules file: name one")
        if not path.exists():
            return fail(f"{path}: no such file (the gateway runs with no rules)")
        rs = check_rules(path)
    except GatewayError as exc:
        return fail(str(exc))
    groups = ", ".join(rs.groups) or "none"
    print(f"{path}: {len(rs.rules)} rules valid; groups: {groups}")
    for r in rs.rules:
        print(f"  {r.name}: {r.condition}" + (f" ({r.action.describe()})" if r.action else ""))
    return 0


def _alerts(args: argparse.Namespace, load: Config) -> int:
    from gateway.ops import alerts as oalerts

    try:
        page = oalerts.list_alerts(load(args), state=None if args.all else "open",
                                   device=args.device, limit=max(1, args.limit))
    except GatewayError as exc:
        return fail(str(exc))
    if args.json:
        print(json.dumps(page.as_dict(), indent=1))
        return 0
    for a in page.alerts:
        when = dt.datetime.fromtimestamp(a.raised_at).isoformat(sep=" ", timespec="seconds")
        state = "open" if a.open else "cleared"
        print(f"{a.id:>6} {when} {a.severity:<8} {state:<7} {a.rule} {a.subject}: {a.message}")
    print(f"{len(page.alerts)} of {page.total} shown; {page.open} open in all")
    return 0
