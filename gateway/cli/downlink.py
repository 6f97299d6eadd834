"""`torpor device send|config|cancel`, and the downlink part of `device show` / `list --pending`.

Exit codes as the rest of `torpor device`: 0 success, 2 an error the operator can act on
(unknown device, unknown op or key, bad value, queue full).
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import time
from typing import Any

from gateway import proto
from gateway.cli.common import run_with_db, when
from gateway.ops import downlink as downlink_ops

_TTL = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> float | None:
    """`90`, `90s`, `15m`, `2h`, `7d`, or `none` (never expires)."""
    if text.lower() == "none":
        return None
    m = _TTL.match(text.strip().lower())
    if m is None or float(m.group(1)) <= 0:
        raise downlink_ops.QueueError(f"bad ttl {text!r}: a positive number of seconds, or 15m, 2h, 7d, none")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _int(what: str, text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise downlink_ops.QueueError(f"{what}: {text!r} is not an integer") from None


def ops_help() -> str:
    """Every op with its arguments, units and ranges, from the spec's generated table.
    Indented lines: the CLI's help formatter keeps them as they are."""
    lines = ["ops (arguments are integers, ranges inclusive; those in [ ] may be left out):"]
    for cmd in proto.OP_ARGS.values():
        lines.append(f"  {cmd.usage}")
        lines.append(f"      {cmd.doc}")
        for a in cmd.args:
            lines.append(f"      {a.name.upper()}: {a.span}")
    lines.append("")
    lines.append("A command outside these ranges is refused here, before it is queued.")
    return "\n".join(lines)


def register(dsub: Any, config_arg: Any) -> None:
    """Add send/config/cancel to the `device` group (`config_arg(parser)` adds --config)."""
    p = dsub.add_parser("send", help="queue a command for a device's next wake",
                        epilog=ops_help())
    config_arg(p)
    p.add_argument("device_id", help="the device's id (see `torpor device list`)")
    p.add_argument("op", help=f"one of {', '.join(downlink_ops.OPS)} (see below)")
    p.add_argument("args", nargs="*", help="the op's integer arguments (see below)")
    p.add_argument("--priority", "-p", type=int, default=downlink_ops.DEFAULT_PRIORITY,
                   help=f"0..255, higher first (default {downlink_ops.DEFAULT_PRIORITY})")
    p.add_argument("--ttl", default=str(downlink_ops.DEFAULT_TTL_S),
                   help="seconds (or 15m, 2h, 7d, none) before it expires undelivered "
                   f"(default {downlink_ops.DEFAULT_TTL_S // 3600}h)")
    p.add_argument("--data", default="", help="opaque payload, hex (at most 256 bytes)")
    p.set_defaults(func=_send)
    p = dsub.add_parser("config", help="set desired configuration (key=value ...)")
    config_arg(p)
    p.add_argument("device_id", help="the device's id (see `torpor device list`)")
    p.add_argument("values", nargs="+", metavar="KEY=VALUE",
                   help=f"keys: {', '.join(downlink_ops.CONFIG_KEYS)}")
    p.add_argument("--priority", "-p", type=int, default=downlink_ops.DEFAULT_PRIORITY,
                   help=f"0..255, higher first (default {downlink_ops.DEFAULT_PRIORITY})")
    p.add_argument("--ttl", default="none",
                   help="seconds (or 15m, 2h, 7d) before it expires unapplied "
                   "(default: none, kept until applied)")
    p.set_defaults(func=_config)
    p = dsub.add_parser("cancel", help="withdraw a queued command or configuration")
    config_arg(p)
    p.add_argument("device_id", help="the device's id")
    p.add_argument("command_id", type=int,
                   help="the item's id, as `device send` printed it or `device show` lists it")
    p.set_defaults(func=_cancel)


def _run(args: argparse.Namespace, body: Any) -> int:
    return run_with_db(args, body)


def _send(args: argparse.Namespace) -> int:
    def body(conn: sqlite3.Connection) -> int:
        downlink_ops.refuse_own_op(args.op)
        cmd_args = [_int(f"{args.op}: argument {i + 1}", a) for i, a in enumerate(args.args)]
        try:
            data = bytes.fromhex(args.data)
        except ValueError:
            raise downlink_ops.QueueError(f"--data: {args.data!r} is not hex") from None
        try:
            cid, what = downlink_ops.send(conn, args.device_id, args.op, cmd_args,
                                          args.priority, parse_ttl(args.ttl), data)
        except downlink_ops.BadArguments as exc:
            raise downlink_ops.BadArguments(f"{exc}; nothing queued (`torpor device send --help` "
                                            "lists every op's arguments)") from None
        print(f"{args.device_id}: queued command {cid} ({what}),"
              f" {_next_listen_text(conn, args.device_id)}")
        return 0

    return _run(args, body)


def _config(args: argparse.Namespace) -> int:
    def body(conn: sqlite3.Connection) -> int:
        values: dict[str | int | proto.ConfigKey, int] = {}
        for pair in args.values:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise downlink_ops.QueueError(f"{pair!r}: expected KEY=VALUE")
            downlink_ops.parse_key(key)
            values[key] = _int(f"value of {key}", value)
        version = downlink_ops.configure(conn, args.device_id, values, args.priority,
                                         parse_ttl(args.ttl))
        print(f"{args.device_id}: desired configuration v{version} "
              f"({', '.join(args.values)}), {_next_listen_text(conn, args.device_id)}")
        return 0

    return _run(args, body)


def _cancel(args: argparse.Namespace) -> int:
    def body(conn: sqlite3.Connection) -> int:
        it = downlink_ops.cancel(conn, args.device_id, args.command_id)
        print(f"{args.device_id}: item {it.command_id} ({it.what}) cancelled")
        return 0

    return _run(args, body)


# ---------------------------------------------------------------- show / list
def _next_listen_text(conn: sqlite3.Connection, device: str) -> str:
    w = downlink_ops.next_listen(conn, device)
    if w is None:
        return "delivered at its first HELLO"
    late = " - overdue" if w[0] < time.time() else ""
    return f"next expected to listen at {when(w[0])}{late}"


def print_show(doc: dict[str, Any]) -> None:
    w = doc["wakes"]
    at, until = doc["next_listen_at"], doc["next_listen_until"]
    if at is None:
        print("next listening:  unknown (no HELLO yet): queued items go at its first HELLO")
    else:
        overdue = "  OVERDUE" if at < time.time() else ""
        print(f"next listening:  {when(at)} for {until - at:.1f}s{overdue}")
    if w is not None:
        avg = w["delivered_total"] / w["wakes"] if w["wakes"] else 0.0
        print(f"wakes:           {w['wakes']} seen, {w['missed_wakes']} missed; items per wake "
              f"last {w['last_delivered']}, max {w['max_delivered']}, mean {avg:.2f}")
    print(f"downlink:        {len(doc['pending'])} pending (delivery order)")
    for i in doc["pending"]:
        exp = "never" if i["expires_at"] is None else when(i["expires_at"])
        print(f"  {i['command_id']:>10}  p{i['priority']:<3} {i['status']:<7} "
              f"tries {i['attempts']}  {i['what']:<28} expires {exp}")
    for i in doc["recent"]:
        res = i["result_status"] or "-"
        print(f"  {i['command_id']:>10}  {i['status']:<9} {i['what']:<28} result {res}"
              + (f" {i['result_detail']}" if i["result_detail"] else "")
              + (f" values {','.join(map(str, i['result_values']))}" if i["result_values"] else ""))
    if doc["config"]:
        print("config:          " + ", ".join(
            f"{c['key']}={c['value']}" + ("" if c["applied"] else f" (pending v{c['version']})")
            for c in doc["config"]))


def list_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pending", action="store_true",
                   help="only devices with queued downlink, with counts and next listening time")


def print_pending(conn: sqlite3.Connection, as_json: bool) -> int:
    rows = downlink_ops.pending(conn)
    if as_json:
        print(json.dumps([{"device": d, "pending": n, "next_listen_at": w[0] if w else None}
                          for d, n, w in rows], indent=1))
        return 0
    print(f"{'DEVICE':<24} {'PENDING':>7}  NEXT LISTENING")
    for d, n, w in rows:
        print(f"{d:<24} {n:>7}  {when(w[0]) if w else 'at its first HELLO'}")
    return 0
