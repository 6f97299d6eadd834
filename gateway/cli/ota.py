"""`torpor ota campaign create|status|cancel`: firmware campaigns from the gateway host.

Exit codes: 0 success, 2 an error the operator can act on (bad image, unknown device,
device already updating, campaign not running).
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

from gateway.cli.common import CONFIG_ENV, DEFAULT_CONFIG, run_with_db
from gateway.ops import ota as ota_ops

_RATE = re.compile(r"^(\d+)(%?)$")
_SPAN = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_rate(text: str) -> tuple[int, bool]:
    m = _RATE.match(text.strip())
    if m is None or int(m.group(1)) < 1 or (m.group(2) and int(m.group(1)) > 100):
        raise ota_ops.OtaError(f"bad rate {text!r}: a device count (5) or a percentage (10%)")
    return int(m.group(1)), bool(m.group(2))


def parse_span(text: str) -> float:
    m = _SPAN.match(text.strip().lower())
    if m is None or float(m.group(1)) <= 0:
        raise ota_ops.OtaError(f"bad timeout {text!r}: seconds, or 30m, 12h, 7d")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_percent(text: str) -> float:
    try:
        v = float(text.strip().rstrip("%"))
    except ValueError:
        raise ota_ops.OtaError(f"bad abort threshold {text!r}: a percentage 0..100") from None
    if not 0 <= v <= 100:
        raise ota_ops.OtaError(f"abort threshold {text!r} is out of range 0..100")
    return v


def register(sub: Any) -> Any:
    """`torpor ota ...`; returns the `ota` subparsers, where tools add their own actions
    (`torpor ota demo`)."""
    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", default=None,
                       help=f"gateway TOML file (default: ${CONFIG_ENV} or {DEFAULT_CONFIG})")

    top = sub.add_parser("ota", help="firmware updates: staged campaigns to sleeping nodes")
    osub = top.add_subparsers(dest="ota_command", metavar="ACTION", required=True)
    camp = osub.add_parser("campaign", help="create a campaign")
    csub = camp.add_subparsers(dest="campaign_command", metavar="ACTION", required=True)
    p = csub.add_parser("create", help="roll a signed image out to devices, in stages")
    config_arg(p)
    p.add_argument("--image", required=True, type=Path,
                   help="signed image directory (`torpor fw build` + `torpor fw sign`)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--group", help="`all`, a device class, or a device id pattern ('site1-*')")
    who.add_argument("--devices", help="comma-separated device ids")
    p.add_argument("--rate", default="1",
                   help="first wave: N devices or N%%; each confirmation starts one more "
                   "(default 1)")
    p.add_argument("--abort-threshold", default="10",
                   help="abort when failed + reverted devices exceed this %% of the started "
                   "ones (default 10)")
    p.add_argument("--timeout", default="7d",
                   help="a device not confirmed this long after its start has timed out "
                   "(seconds, or 30m, 12h, 7d; default 7d)")
    p.add_argument("--pubkey", type=Path, default=None,
                   help="fleet public key file: also check the signature here")
    p.add_argument("--override", action="append", default=[], metavar="DEVICE=DIR",
                   help="another image for one device (e.g. another hardware revision)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_create)
    p = osub.add_parser("status", help="campaigns, or one campaign per device")
    config_arg(p)
    p.add_argument("campaign", nargs="?", type=int,
                   help="a campaign's number: its devices one by one (default: every campaign)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--watch", action="store_true",
                   help="with CAMPAIGN: show its progress until it is no longer running "
                        "(a bar on a terminal, a line per change otherwise)")
    p.add_argument("--interval", type=float, default=2.0,
                   help="with --watch: seconds between two looks (default 2)")
    p.set_defaults(func=_status)
    p = osub.add_parser("cancel", help="stop a campaign; its queued OTA items leave the queues")
    config_arg(p)
    p.add_argument("campaign", type=int, help="the campaign's number (see `torpor ota status`)")
    p.set_defaults(func=_cancel)
    return osub


def _run(args: argparse.Namespace, body: Any) -> int:
    return run_with_db(args, body)


def _create(args: argparse.Namespace) -> int:
    def body(conn: sqlite3.Connection) -> int:
        rate, pct = parse_rate(args.rate)
        threshold = parse_percent(args.abort_threshold)
        timeout = parse_span(args.timeout)
        overrides: dict[str, Path] = {}
        for spec in args.override:
            dev, sep, path = spec.partition("=")
            if not sep or not dev or not path:
                raise ota_ops.OtaError(f"bad --override {spec!r}: DEVICE=IMAGE_DIR")
            overrides[dev] = Path(path)
        c = ota_ops.create_campaign(
            conn, args.image, group=args.group, devices=args.devices, rate=rate,
            rate_percent=pct, abort_threshold=threshold, timeout_s=timeout,
            pubkey=args.pubkey, overrides=overrides)
        if args.json:
            print(json.dumps(c.as_dict(), indent=2))
        else:
            img = c.image
            print(f"campaign {c.id}: v{img.version} ({img.display}) to {len(c.devices)} "
                  f"device(s); started {len(c.devices) - c.counts().get(ota_ops.PENDING, 0)}")
        return 0

    return _run(args, body)


def _status(args: argparse.Namespace) -> int:
    def body(conn: sqlite3.Connection) -> int:
        if args.campaign is None:
            cs = ota_ops.campaigns(conn)
            if args.json:
                print(json.dumps([c.as_dict() for c in cs], indent=2))
                return 0
            if not cs:
                print("no campaigns")
            for c in cs:
                print(summary_line(c))
            return 0
        if args.watch:
            watch_campaign(conn, args.campaign, args.interval)
        c = ota_ops.campaign(conn, args.campaign)
        if args.json:
            print(json.dumps(c.as_dict(), indent=2))
        else:
            print_campaign(c)
        return 0

    return _run(args, body)


def watch_campaign(conn: sqlite3.Connection, campaign: int, interval_s: float) -> None:
    """Show a campaign's progress (devices settled of all) until it stops running: a rich
    bar on a terminal, one plain line per change otherwise, on stderr."""
    import sys
    import time

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(file=sys.stderr, highlight=False, soft_wrap=True)
    c = ota_ops.campaign(conn, campaign)
    total = len(c.devices)
    live = console.is_terminal
    bar = Progress(TextColumn(f"[bold]campaign {campaign}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console)
    task = bar.add_task("", total=total, status="")
    last = ""
    if live:
        bar.start()
    try:
        while True:
            c = ota_ops.campaign(conn, campaign)
            counts = c.counts()
            done = sum(counts.get(k, 0) for k in ota_ops.TERMINAL)
            text = f"{c.status}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            if live:
                bar.update(task, completed=done, status=text)
            elif text != last:
                console.print(f"[campaign {campaign}] {done}/{total} settled, {text}", markup=False)
            last = text
            if c.status != ota_ops.RUNNING:
                return
            time.sleep(interval_s)
    finally:
        if live:
            bar.stop()


def summary_line(c: ota_ops.Campaign) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(c.counts().items()))
    return f"campaign {c.id}: v{c.version} {c.status} ({counts}){' - ' + c.note if c.note else ''}"


def print_campaign(c: ota_ops.Campaign) -> None:
    print(summary_line(c))
    rate = f"{c.rate}{'%' if c.rate_percent else ''}"
    print(f"  rate {rate}, abort above {c.abort_threshold:g}%, timeout {c.timeout_s:g}s")
    print(f"  {'device':<20} {'ver':>5} {'status':<12} {'chunks':>11}  reason")
    for d in c.devices:
        prog = f"{d.progress}/{d.chunks}" if d.chunks else "-"
        why = d.reason + (f": {d.detail}" if d.detail else "")
        print(f"  {d.device:<20} {d.version:>5} {d.status:<12} {prog:>11}  {why}")


def _cancel(args: argparse.Namespace) -> int:
    def body(conn: sqlite3.Connection) -> int:
        c = ota_ops.cancel_campaign(conn, args.campaign)
        print(summary_line(c))
        return 0

    return _run(args, body)

