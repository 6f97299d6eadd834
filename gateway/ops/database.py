"""The gateway's database, opened for an operator action."""

from __future__ import annotations

import sqlite3

from gateway import config as gwconfig
from gateway.store import db


def open_database(cfg: gwconfig.GatewayConfig) -> sqlite3.Connection:
    """Open (creating and migrating it if needed) the database `cfg` names."""
    return db.open_db(cfg.db_path)
