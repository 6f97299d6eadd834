"""`torpor sim ...`: run simulated nodes on the MicroPython unix port.

`torpor sim node` lives here. Further actions (a fleet, a bare board) register themselves by
adding their module to SIM_ACTIONS; each such module exposes `register(actions)` and adds
one parser to the `sim` group's subparsers.
"""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

# module path -> registers one `torpor sim <action>` parser
SIM_ACTIONS: tuple[str, ...] = ("tools.sim.board", "tools.sim.fleet")


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
            "board; deep sleeps are waited out in compressed time. Node output goes to "
            "DIR/node.log; a summary is printed at the end."
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
    node.add_argument("--cycles", type=int, default=10, help="boots to run (default 10)")
    node.add_argument("--power-cuts", type=int, default=0, help="power cuts to inject (default 0)")
    node.add_argument(
        "--entry", default="main", help="module on the firmware path, or a .py script (default main)"
    )
    node.add_argument(
        "--wall-limit", type=float, default=600.0, help="stop after this many real seconds (default 600)"
    )
    node.add_argument(
        "--start-ms", type=int, default=None, help="virtual clock of a new node (unix ms; default now)"
    )
    node.add_argument("--json", action="store_true", help="print the summary as JSON")
    from tools.sim.field import add_field_args

    add_field_args(node)
    node.set_defaults(func=_node)


def _node(args: argparse.Namespace) -> int:
    import time

    from tools.cli import CliError
    from tools.sim.field import fields_from_args
    from tools.sim.node import FIRMWARE_DIR, SimError, SimNode
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
        log_path = node.dir / "node.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        summary = node.run_sync(args.cycles, power_cuts=args.power_cuts, wall_limit_s=args.wall_limit)
    except (SimError, ProfileError) as exc:
        raise CliError(str(exc)) from exc
    data = summary.as_dict()
    data.update(_energy(log_path, offset))
    if args.json:
        print(json.dumps(data))
    else:
        for key, value in data.items():
            print(f"{key:22} {value}")
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
