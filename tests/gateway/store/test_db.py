"""The database: WAL, durable commits, migrations applied once and in order."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.store import db


def test_open_sets_wal_and_full_sync_and_migrates_every_store(tmp_path: Path) -> None:
    conn = db.open_db(tmp_path / "g.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == db.BUSY_TIMEOUT_MS
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"devices", "reading_runs", "dedup", "dead_letters", "gateway_status",
            "schema_migrations"} <= tables
    versions = dict(conn.execute("SELECT store, version FROM schema_migrations").fetchall())
    assert versions["registry"] == 4 and versions["readings"] == 3
    conn.close()
    # Reopening applies nothing twice.
    conn = db.open_db(tmp_path / "g.db")
    assert dict(conn.execute("SELECT store, version FROM schema_migrations").fetchall()) == versions


def test_apply_runs_missing_steps_only_and_refuses_a_newer_schema(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "x.db")
    assert db.apply(conn, "t", ["CREATE TABLE a(x);"]) == 1
    assert db.apply(conn, "t", ["CREATE TABLE a(x);", "CREATE TABLE b(y); CREATE TABLE c(z);"]) == 2
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert {"a", "b", "c"} <= names
    with pytest.raises(db.DatabaseError, match="newer Torpor"):
        db.apply(conn, "t", ["CREATE TABLE a(x);"])


def test_failed_step_rolls_back_with_its_version(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "x.db")
    with pytest.raises(sqlite3.OperationalError):
        db.apply(conn, "t", ["CREATE TABLE a(x); CREATE TABLE a(x);"])
    assert db.version(conn, "t") == 0
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name='a'").fetchone()[0] == 0


def test_transaction_rolls_back_on_error(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "x.db")
    conn.execute("CREATE TABLE a(x)")
    with pytest.raises(RuntimeError):
        with db.transaction(conn):
            conn.execute("INSERT INTO a VALUES (1)")
            raise RuntimeError("boom")
    assert conn.execute("SELECT count(*) FROM a").fetchone()[0] == 0


def test_processes_opening_a_new_database_at_once_all_succeed(tmp_path: Path) -> None:
    # A CLI command (torpor flash, device add) beside a starting gateway: both migrate.
    import subprocess
    import sys

    path = tmp_path / "g.db"
    code = "import sys; from gateway.store import db; db.open_db(sys.argv[1]).close()"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path)], stderr=subprocess.PIPE,
                              text=True) for _ in range(6)]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, errors
    conn = db.open_db(path)
    assert db.version(conn, "readings") >= 1


def test_a_step_may_be_a_function_run_in_the_step_transaction(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "x.db")

    def fill(c: sqlite3.Connection) -> None:
        c.executemany("INSERT INTO a VALUES (?)", [(1,), (2,)])

    def broken(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO a VALUES (3)")
        raise sqlite3.OperationalError("half done")

    assert db.apply(conn, "t", ["CREATE TABLE a(x);", fill]) == 2
    with pytest.raises(sqlite3.OperationalError):
        db.apply(conn, "t", ["CREATE TABLE a(x);", fill, broken])
    assert db.version(conn, "t") == 2
    assert [r[0] for r in conn.execute("SELECT x FROM a ORDER BY x")] == [1, 2]
