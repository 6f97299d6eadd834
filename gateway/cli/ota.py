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
    register_keys(osub, config_arg)
    return osub


def add_targets(p: argparse.ArgumentParser, required: bool = True) -> None:
    """--all | --group | --devices, as `torpor ota campaign create` takes them."""
    who = p.add_mutually_exclusive_group(required=required)
    who.add_argument("--all", action="store_true", help="every device in service (= --group all)")
    who.add_argument("--group", help="`all`, a device class, or a device id pattern ('site1-*')")
    who.add_argument("--devices", help="comma-separated device ids")


def targets(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(group, devices) from add_targets' options."""
    return ("all" if args.all else args.group), args.devices


def register_keys(osub: Any, config_arg: Any) -> None:
    keys = osub.add_parser("keys", help="firmware key lists: send a signed list, see who holds which")
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    p = ksub.add_parser(
        "push", help="queue a signed key list (`torpor fw keys add|retire --out`) for devices",
        description="Check a signed firmware key list against the newest this gateway sent and "
        "queue it (with any earlier list a device lacks) as set_keys commands.")
    config_arg(p)
    p.add_argument("list", type=Path, metavar="LIST_FILE", help="signed key list file")
    add_targets(p)
    p.add_argument("--baked", action="append", default=[], type=Path, metavar="PUB",
                   help="a public key the nodes were provisioned with (first list only; repeat)")
    p.set_defaults(func=_keys_push)
    p = ksub.add_parser("status", help="the key list (seq, key ids) each device holds")
    config_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_keys_status)


def print_pushed(r: Any) -> None:
    what = (f"; adds {', '.join(r.added)}" if r.added else "") + (
        f"; retires {', '.join(r.retired)}" if r.retired else "")
    print(f"key list seq {r.seq} ({', '.join(r.key_ids)}){what}: queued for {len(r.queued)} "
          f"device(s), {len(r.holding)} hold it already")
    if r.unknown_images:
        print(f"note: {len(r.unknown_images)} device(s) run a version this gateway holds no "
              f"image of ({', '.join(r.unknown_images[:5])}): the node itself refuses a list "
              "without its running image's key")
    for dev, why in r.failed:
        print(f"not queued for {dev}: {why}")


def _keys_push(args: argparse.Namespace) -> int:
    from gateway.ops import keylists

    def body(conn: sqlite3.Connection) -> int:
        try:
            blob = args.list.read_bytes()
        except OSError as exc:
            raise keylists.KeyListRefused(f"cannot read {args.list}: {exc.strerror}") from exc
        baked = keylists.load_keys(args.baked)
        group, devices = targets(args)
        r = keylists.push(conn, blob, group=group, devices=devices, baked=baked)
        print_pushed(r)
        return 2 if r.failed else 0

    return _run(args, body)


def print_keys(rows: list[Any], only_changing: bool = False) -> None:
    by_seq: dict[tuple[int, str], int] = {}
    for n in rows:
        k = (n.held, ",".join(n.held_keys) if n.held_keys is not None else "?")
        by_seq[k] = by_seq.get(k, 0) + 1
    for (seq, keys), count in sorted(by_seq.items()):
        print(f"key list seq {seq} ({'baked: ' if seq == 0 else ''}{keys}): {count} device(s)")
    for n in rows:
        if not only_changing or (n.pushed and n.outcome != "applied"):
            print(f"  {n.device:<20} {n.line}")


def _keys_status(args: argparse.Namespace) -> int:
    from gateway.ops import keylists

    def body(conn: sqlite3.Connection) -> int:
        rows = keylists.fleet_status(conn)
        if args.json:
            print(json.dumps([n.as_dict() for n in rows], indent=2))
        else:
            print_keys(rows)
        return 0

    return _run(args, body)


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
            from gateway.ops import keylists

            cs = ota_ops.campaigns(conn)
            if args.json:
                print(json.dumps([c.as_dict() for c in cs], indent=2))
                return 0
            if not cs:
                print("no campaigns")
            for c in cs:
                print(summary_line(c))
            if keylists.current(conn) is not None:
                # Which firmware key list the nodes hold; those still receiving one by name.
                print_keys(keylists.fleet_status(conn), only_changing=True)
            return 0
        if args.watch:
            watch_campaign(conn, args.campaign, args.interval)
        c = ota_ops.campaign(conn, args.campaign)
        if args.json:
            print(json.dumps(c.as_dict(), indent=2))
        else:
            from gateway.ops import keylists

            print_campaign(c)
            if keylists.current(conn) is not None:
                for d in c.devices:
                    print(f"  {d.device:<20} keys {keylists.node_status(conn, d.device).line}")
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

