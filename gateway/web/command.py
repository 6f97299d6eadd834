"""`torpor gateway web`: the web page and API alone, on the gateway's database (for a
development machine, or to look at a database copied off a gateway); and
`--hash-password`, which prints the `[web] password_hash` value for a password."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import sys
from collections.abc import Callable
from typing import Any

from gateway.errors import GatewayError


def register(gsub: Any, config_arg: Callable[[argparse.ArgumentParser], None],
             load: Callable[[argparse.Namespace], Any]) -> None:
    p = gsub.add_parser("web", help="serve the web page and API alone, or hash a password for it")
    config_arg(p)
    p.add_argument("--hash-password", action="store_true",
                   help="read a password (twice at a terminal, else one line of stdin) and "
                   "print the [web] password_hash value for it")
    p.set_defaults(func=lambda args: _web(args, load))


def _web(args: argparse.Namespace, load: Callable[[argparse.Namespace], Any]) -> int:
    from gateway.web import auth

    if args.hash_password:
        if sys.stdin.isatty():
            first = getpass.getpass("password: ")
            if getpass.getpass("again: ") != first:
                print("torpor: error: the two passwords differ", file=sys.stderr)
                return 2
        else:
            first = sys.stdin.readline().rstrip("\n")
        if len(first) < 8:
            print("torpor: error: a password of at least 8 characters, please", file=sys.stderr)
            return 2
        print(auth.hash_password(first))
        return 0
    try:
        cfg = load(args)
        logging.basicConfig(level=cfg.gateway.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from gateway.store import db
        from gateway.web import server

        db.open_db(cfg.db_path).close()  # create and migrate, as the gateway would

        async def main() -> None:
            started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(server.serve(cfg, started=started))
            waiters: set[asyncio.Future[Any]] = {task, started}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if started.done():
                print(f"web page at {started.result()}", flush=True)
            await task

        asyncio.run(main())
    except GatewayError as exc:
        print(f"torpor: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"torpor: error: cannot serve the web page: {exc}", file=sys.stderr)
        return 2
    return 0
