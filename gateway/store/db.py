"""The gateway's one SQLite database: WAL, durable commits, and each store's migrations.

Every store module owns its tables and exposes `migrate(conn)`, which calls `apply()` with
its ordered list of schema steps; `open_db()` runs every registered store's migration.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from gateway.errors import GatewayError

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5000
# WAL housekeeping: checkpoint every ~4 MB of WAL (SQLite's default is 1000 pages) and cut
# the file back to 64 MB after a checkpoint, so a long burst of ingest does not grow the
# WAL without bound. The gateway service turns the automatic checkpoint off on its own
# connections (a checkpoint fsyncs the database file, inside whichever commit crossed the
# threshold) and runs `checkpoint_loop` on a connection and thread of its own instead.
WAL_AUTOCHECKPOINT_PAGES = 1000
CHECKPOINT_EVERY_S = 2.0
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
CACHE_KIB = 16 * 1024

T = TypeVar("T")

# Store modules, each with `migrate(conn)`. A module that is not installed yet is skipped
# so the stores can grow one at a time; order matters only for readability.
STORE_MODULES: tuple[str, ...] = (
    "gateway.store.devices",
    "gateway.store.readings",
    "gateway.store.deadletter",
    "gateway.store.status",
    "gateway.store.events",
    "gateway.store.outbox",
    "gateway.store.downlink_queue",
    "gateway.store.wakes",
    "gateway.store.ota_store",
    "gateway.store.alerts",
    "gateway.store.groups",
    "gateway.store.hass",
    "gateway.store.rotations",
    "gateway.store.session_keys",
    "gateway.store.keylists",
    "gateway.store.wake_log",
)

_extra_stores: list[Callable[[sqlite3.Connection], None]] = []


class DatabaseError(GatewayError):
    """The database could not be opened or migrated."""


def register_store(migrate: Callable[[sqlite3.Connection], None]) -> None:
    """Add a store's `migrate(conn)` beyond STORE_MODULES (plugins, tests)."""
    if migrate not in _extra_stores:
        _extra_stores.append(migrate)


def _create_private(path: Path) -> None:
    """A new database file is made 0600 (its folder 0700) before SQLite opens it: SQLite
    gives the WAL and SHM files the database file's mode, so all three stay private
    whatever the umask. An existing file and folder are left as the operator set them."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
        os.chmod(path.parent, 0o700)
    if not path.exists():
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


def connect(path: str | Path, *, readonly: bool = False,
            autocheckpoint: bool = True) -> sqlite3.Connection:
    """A connection with the gateway's pragmas and explicit transactions (autocommit mode:
    callers open them with `transaction()`). `autocheckpoint=False`: its commits never
    checkpoint; someone must run `checkpoint_loop`."""
    path = Path(path)
    try:
        if readonly:
            conn = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, isolation_level=None,
                timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False,
            )
        else:
            _create_private(path)
            conn = sqlite3.connect(
                path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000,
                check_same_thread=False,
            )
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if not readonly:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise DatabaseError(f"{path}: the database refused WAL mode ({mode})")
        # FULL: a commit is on disk before it returns, so an ACK sent after it is a promise.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        if not readonly:
            pages = WAL_AUTOCHECKPOINT_PAGES if autocheckpoint else 0
            conn.execute(f"PRAGMA wal_autocheckpoint={pages}")
            conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
    except sqlite3.Error as exc:
        raise DatabaseError(f"cannot open the database {path}: {exc}") from exc
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection, *, immediate: bool = True) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception."""
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextmanager
def atomic(conn: sqlite3.Connection) -> Iterator[None]:
    """A transaction of its own, or a part of the caller's when one is open."""
    if conn.in_transaction:
        yield
    else:
        with transaction(conn):
            yield


@contextmanager
def savepoint(conn: sqlite3.Connection, name: str) -> Iterator[None]:
    """A part of the caller's transaction that an exception undoes alone (then re-raised),
    leaving the rest of the transaction as it was."""
    conn.execute(f"SAVEPOINT {name}")
    try:
        yield
    except BaseException:
        conn.execute(f"ROLLBACK TO {name}")
        conn.execute(f"RELEASE {name}")
        raise
    conn.execute(f"RELEASE {name}")


class Writer:
    """The one thread that writes the database in a gateway process.

    A commit waits for its fsync (synchronous=FULL); on this thread that wait never stalls
    the event loop, which keeps reading MQTT meanwhile. Every writer of the process (ingest,
    the relay's deletes, status, housekeeping) runs its transactions here, one after the
    other, so they never queue on SQLite's write lock (whose busy handler sleeps for
    milliseconds at a time). Each caller keeps its own connection and its own module's
    SQL; only the thread is shared."""

    def __init__(self, name: str = "db-writer") -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on the writer thread; the caller's task waits, the loop does not."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def submit(self, fn: Callable[..., T], *args: object) -> concurrent.futures.Future[T]:
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        """Finish what was submitted, then stop the thread."""
        self._pool.shutdown(wait=True)


def no_autocheckpoint(conn: sqlite3.Connection) -> None:
    """Commits on `conn` never checkpoint: its owner runs `checkpoint_loop` instead, so a
    commit does not stall on a checkpoint's fsync."""
    conn.execute("PRAGMA wal_autocheckpoint=0")


def checkpoint(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """A PASSIVE checkpoint: copies what it can from the WAL without waiting for, or
    blocking, readers and writers. Returns (busy, WAL frames, frames checkpointed)."""
    busy, frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return int(busy), int(frames), int(done)


async def checkpoint_loop(path: str | Path, every_s: float = CHECKPOINT_EVERY_S) -> None:
    """Checkpoint the WAL of `path` every `every_s` from a thread and connection of its
    own, so that no commit waits for a checkpoint's fsync. Runs until cancelled."""
    # One thread of its own: a checkpoint still running when the task is cancelled ends
    # there before the connection is closed, on the same thread (closing it under a
    # running statement from another thread crashes the process).
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
    loop = asyncio.get_running_loop()
    conn: sqlite3.Connection | None = None
    try:
        conn = await loop.run_in_executor(pool, connect, path)
        while True:
            await asyncio.sleep(every_s)
            await loop.run_in_executor(pool, checkpoint, conn)
    finally:
        if conn is not None:
            pool.submit(conn.close)
        pool.shutdown(wait=False)


def _ensure_migrations_table(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " store TEXT PRIMARY KEY, version INTEGER NOT NULL, applied_at REAL NOT NULL)"
    )


def version(conn: sqlite3.Connection, store: str) -> int:
    _ensure_migrations_table(conn)
    row = conn.execute("SELECT version FROM schema_migrations WHERE store=?", (store,)).fetchone()
    return int(row[0]) if row else 0


# A schema step: an SQL script, or a function for what SQL alone cannot do (repacking
# rows); either runs inside the step's transaction and must not commit.
Step = str | Callable[[sqlite3.Connection], None]


def apply(conn: sqlite3.Connection, store: str, steps: Sequence[Step]) -> int:
    """Run the steps of `store` not yet applied (step i brings it to version i+1), each in
    its own transaction with its version bump; returns the store's version."""
    current = version(conn, store)
    if current > len(steps):
        raise DatabaseError(
            f"the database has {store} schema version {current} but this gateway knows only "
            f"{len(steps)}: it was written by a newer Torpor; upgrade the gateway"
        )
    for i in range(current, len(steps)):
        with transaction(conn):
            # Another process (a CLI command beside a starting gateway) may have applied the
            # step since we looked: the version read under the write lock decides.
            if version(conn, store) > i:
                continue
            step = steps[i]
            if callable(step):
                step(conn)
            else:
                for statement in _split(step):
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations(store, version, applied_at) VALUES (?, ?, ?) "
                "ON CONFLICT(store) DO UPDATE SET version=excluded.version, "
                "applied_at=excluded.applied_at",
                (store, i + 1, time.time()),
            )
        log.info("migrated store %s to version %d", store, i + 1)
    return len(steps)


def _split(script: str) -> list[str]:
    """Split a script into statements (executescript would commit our transaction)."""
    out: list[str] = []
    buf = ""
    for piece in script.split(";"):
        buf += piece + ";"
        if sqlite3.complete_statement(buf):
            if buf.strip(" \n\t;"):
                out.append(buf.strip())
            buf = ""
    return out


def migrate_all(conn: sqlite3.Connection) -> None:
    _ensure_migrations_table(conn)
    for name in STORE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        fn = getattr(module, "migrate", None)
        if fn is not None:
            fn(conn)
    for fn in _extra_stores:
        fn(conn)


def open_db(path: str | Path) -> sqlite3.Connection:
    """Open (creating if needed) and migrate the gateway database."""
    conn = connect(path)
    try:
        migrate_all(conn)
    except sqlite3.Error as exc:
        conn.close()
        raise DatabaseError(f"cannot migrate the database {path}: {exc}") from exc
    return conn


def backup_to(source: str | Path, dest: str | Path) -> None:
    """An online copy of the database at `source` into the new file `dest` (0600), with
    SQLite's backup API in one step: one read transaction, so the copy is the database as
    of a single commit, and in WAL mode the gateway's writers keep committing meanwhile.
    The copy is left in rollback-journal mode, one self-contained file."""
    dest = Path(dest)
    fd = os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    try:
        src = sqlite3.connect(f"file:{Path(source)}?mode=ro", uri=True,
                              timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            dst = sqlite3.connect(dest)
            try:
                src.backup(dst, pages=-1)
                dst.execute("PRAGMA journal_mode=DELETE")
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        dest.unlink(missing_ok=True)
        raise DatabaseError(f"cannot back up the database {source}: {exc}") from exc


def integrity_check(path: str | Path) -> list[str]:
    """`PRAGMA integrity_check` of a database file opened read-only: [] when it is sound,
    else SQLite's complaints."""
    try:
        conn = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
        try:
            rows = [str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall()]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return [str(exc)]
    return [] if rows == ["ok"] else rows


def describe(path: str | Path) -> tuple[dict[str, int], dict[str, int]]:
    """(schema version per store, row count per table) of a database file, read-only."""
    conn = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
    try:
        versions: dict[str, int] = {}
        has_migrations = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_migrations'"
        ).fetchone()
        if has_migrations:
            versions = {str(s): int(v) for s, v in
                        conn.execute("SELECT store, version FROM schema_migrations ORDER BY store")}
        tables = [str(r[0]) for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' "
            "ORDER BY name")]
        counts = {t: int(conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0])
                  for t in tables}
    finally:
        conn.close()
    return versions, counts
