"""`torpor sim ...`: run simulated nodes on the MicroPython unix port.

`torpor sim node` lives here. Further actions (a fleet, a bare board) register themselves by
adding their module to SIM_ACTIONS; each such module exposes `register(actions)` and adds
one parser to the `sim` group's subparsers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

# module path -> registers one `torpor sim <action>` parser
SIM_ACTIONS: tuple[str, ...] = ("tools.sim.board", "tools.sim.fleet", "tools.sim.fieldrun")


def register(sub: Any) -> None:
    sim = sub.add_parser("sim", help="simulated nodes: the real firmware on the MicroPython unix port")
    actions = sim.add_subparsers(dest="sim_command", metavar="ACTION", required=True)
    _register_node(actions)
    for name in SIM_ACTIONS:
        importlib.import_module(name).register(actions)


def _register_node(actions: Any) -> None:
    node = actions.add_parser(
        "node",
        help="run one node wake after wake (deep sleeps, crashes, watchdog, power cuts)",
        description=(
            "Run one simulated node in DIR: each boot is a `micropython` process with the sim "
            "board; deep sleeps are waited out in compressed time. With --gateway-config (or "
            "--gateway and --pki) the node is provisioned first: a certificate from the fleet "
            "PKI, registration in the gateway's database, config.json and DER files on its "
            "flash. A firmware node that was never provisioned is refused at once, with the "
            "command that provisions it. Node output goes to DIR/node.log; progress is shown "
            "while it runs and a summary at the end. Exit code 1 when every wake failed (wakes "
            "failed and none delivered readings; the most frequent error lines are printed), 2 "
            "for a set-up error, 0 otherwise."
        ),
    )
    node.add_argument("--dir", required=True, help="node directory (created on first use)")
    node.add_argument("--seed", type=int, default=None, help="node seed (sensors, identity, cuts)")
    node.add_argument(
        "--time-scale",
        type=float,
        default=60.0,
        help="divide slept time by this in real time; 0 = do not wait (default 60)",
    )
    node.add_argument("--cycles", type=int, default=10,
                      help="boots to run (default 10; 0: only provision the node)")
    node.add_argument("--power-cuts", type=int, default=0, help="power cuts to inject (default 0)")
    node.add_argument(
        "--entry", default="main",
        help="module on the firmware path (main: the app; boot: through the bootloader), or a "
             ".py script (default main)",
    )
    node.add_argument(
        "--wall-limit", type=float, default=600.0, help="stop after this many real seconds (default 600)"
    )
    node.add_argument(
        "--start-ms", type=int, default=None, help="virtual clock of a new node (unix ms; default now)"
    )
    prov = node.add_argument_group("provisioning (before the first wake)")
    prov.add_argument("--gateway-config", default=None, metavar="TOML",
                      help="the gateway's configuration: provision the node against its broker, "
                           "PKI and database")
    prov.add_argument("--gateway", default=None, metavar="HOST:PORT",
                      help="the gateway broker (default: from --gateway-config)")
    prov.add_argument("--pki", default=None, help="fleet PKI folder (default: from --gateway-config)")
    prov.add_argument("--server-hostname", default="",
                      help="name in the broker certificate (default: localhost for a loopback host)")
    prov.add_argument("--device-id", default=None,
                      help="the node's device id (default: the directory's name)")
    prov.add_argument("--send-every", type=int, default=1,
                      help="readings per send (default 1: every wake sends)")
    prov.add_argument("--sample-interval", type=int, default=60,
                      help="seconds between wakes (default 60)")
    node.add_argument("--json", action="store_true", help="print the summary as JSON")
    from tools.sim.field import add_field_args

    add_field_args(node)
    node.set_defaults(func=_node)


def _firmware_entry(entry: str) -> bool:
    return entry.split(".")[0] in ("main", "boot", "app")


def provision_command(args: argparse.Namespace) -> str:
    """The command that provisions this node directory and runs it as asked."""
    config = os.environ.get("TORPOR_CONFIG") or "/etc/torpor/gateway.toml"
    parts = ["torpor", "sim", "node", "--dir", shlex.quote(args.dir),
             "--gateway-config", shlex.quote(config), "--cycles", str(args.cycles)]
    if args.entry != "main":
        parts += ["--entry", shlex.quote(args.entry)]
    return " ".join(parts)


def _provision(args: argparse.Namespace, node: Any) -> str:
    """Provision the node directory against the gateway; returns the device id."""
    from tools.sim.fleet import (
        Fleet,
        FleetError,
        broker_hostname,
        gateway_target,
        issue_credentials,
        register_devices,
        write_node_flash,
    )

    if args.send_every < 1:
        raise FleetError("--send-every must be at least 1")
    target = gateway_target(args.gateway_config, args.gateway, args.pki)
    device_id = args.device_id or Path(args.dir).resolve().name
    serial, files = issue_credentials(target.pki_dir, [device_id])[device_id]
    if target.db_path is not None:
        boards = {device_id: node.field.profile.name} if node.field is not None else None
        register_devices(target.db_path, {device_id: serial}, Fleet.DEVICE_CLASS, boards)
    config = {
        "device_id": device_id,
        "broker_host": target.host,
        "broker_port": target.port,
        "server_hostname": broker_hostname(target.host, args.server_hostname),
        "sample_interval_s": args.sample_interval,
        "send_every": args.send_every,
        "send_max_age_s": 86400,
        "align_s": 0,
    }
    write_node_flash(node.binary, node.dir, [(node, config, files)])
    where = (f"registered in {target.db_path}" if target.db_path
             else "not registered (no --gateway-config)")
    print(f"provisioned {device_id}: broker {target.host}:{target.port}, "
          f"certificate {serial}, {where}", file=sys.stderr)
    return device_id


def _node(args: argparse.Namespace) -> int:
    import time

    from tools.cli import CliError
    from tools.progress import ProgressLine
    from tools.sim.field import fields_from_args
    from tools.sim.node import FIRMWARE_DIR, RunRecord, SimError, SimNode, problem_text
    from tools.sim.profiles import ProfileError

    if not args.entry.endswith(".py"):
        mod = FIRMWARE_DIR / (args.entry.replace(".", "/"))
        if not (mod.with_suffix(".py").exists() or mod.with_suffix(".mpy").exists() or mod.is_dir()):
            raise CliError(
                f"no firmware module {args.entry!r} in firmware/; pass --entry with a module or script"
            )
    try:
        start = args.start_ms if args.start_ms is not None else int(time.time() * 1000)
        node = SimNode(
            args.dir,
            seed=args.seed,
            time_scale=args.time_scale,
            entry=args.entry,
            start_ms=args.start_ms,
            field=fields_from_args(args, start)[0],
        )
        if args.gateway_config or args.gateway:
            _provision(args, node)
        elif _firmware_entry(args.entry) and not node.flash_has("config.json"):
            raise CliError(
                f"{args.dir} is not provisioned (no config.json on its flash): the firmware "
                "would only sleep. Provision it against your gateway and run it with:\n"
                f"  {provision_command(args)}"
            )
        if args.cycles == 0:
            return 0
        log_path = node.dir / "node.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        first = node.runs_done
        with ProgressLine("wakes", args.cycles) as bar:
            failed = 0

            def on_run(r: RunRecord) -> None:
                nonlocal failed
                failed += r.failed
                what = r.kind + (f", sent {r.sent}" if r.sent else "")
                if r.problems:
                    what += f", {problem_text(r.problems[0])}"
                bar.update(r.index + 1 - first, f"last: {what}; failed {failed}")

            summary = node.run_sync(args.cycles, power_cuts=args.power_cuts,
                                    wall_limit_s=args.wall_limit, on_run=on_run)
    except (SimError, ProfileError) as exc:
        raise CliError(str(exc)) from exc
    data = summary.as_dict()
    data.update(_energy(log_path, offset))
    if args.json:
        print(json.dumps(data))
    else:
        for key, value in data.items():
            print(f"{key:22} {value}")
    if summary.all_failed:
        print(f"torpor: error: every wake failed: {summary.failed_runs} of {len(summary.runs)} "
              f"failed, none delivered readings; see {Path(args.dir) / 'node.log'}. "
              "Most frequent:", file=sys.stderr)
        for text, count in summary.top_problems():
            print(f"  {count:4}x  {text}", file=sys.stderr)
        return 1
    return 0


def _energy(log_path: Any, offset: int) -> dict[str, Any]:
    # This run's energy ledgers (L lines of the node log) added up, by phase.
    from tools.sim.field import parse_ledger

    phases: dict[str, float] = {}
    with open(log_path, "rb") as f:
        f.seek(offset)
        for raw in f.read().decode("utf-8", "replace").splitlines():
            book = parse_ledger(raw)
            for ph, (_ms, uah) in (book or {}).items():
                phases[ph] = phases.get(ph, 0.0) + uah
    return {
        "energy_uah": round(sum(phases.values()), 3),
        "energy_phases_uah": {k: round(v, 3) for k, v in phases.items()},
    }
