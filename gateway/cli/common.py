"""What every gateway command shares: the configuration file, the database and how
times are shown."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway import config as gwconfig
from gateway.errors import GatewayError
from gateway.ops import database

DEFAULT_CONFIG = "/etc/torpor/gateway.toml"
CONFIG_ENV = "TORPOR_CONFIG"


def fail(message: str) -> int:
    print(f"torpor: error: {message}", file=sys.stderr)
    return 2


def load_config(args: argparse.Namespace) -> gwconfig.GatewayConfig:
    path = args.config or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG
    return gwconfig.load_config(path)


def open_db(args: argparse.Namespace) -> Any:
    cfg = load_config(args)
    return cfg, database.open_database(cfg)


def run_with_db(args: argparse.Namespace, body: Callable[[sqlite3.Connection], int]) -> int:
    """body(conn) on the configured gateway database; a GatewayError becomes exit code 2."""
    try:
        _cfg, conn = open_db(args)
        try:
            return int(body(conn))
        finally:
            conn.close()
    except GatewayError as exc:
        return fail(str(exc))


def when(t: float | None) -> str:
    if t is None:
        return "-"
    ago = time.time() - t
    stamp = dt.datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds")
    if ago >= 0:
        return f"{stamp} ({span(ago)} ago)"
    return f"{stamp} (in {span(-ago)})"


def span(s: float) -> str:
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}min"
    if s < 172800:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"


def default_config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
