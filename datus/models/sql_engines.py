"""SQLAlchemy engines, built one way for every module that opens a database.

``create_store_engine(url, busy_timeout_s=..., write_option=...)``: a store many processes
write to at once. SQLite is a file in WAL mode with a busy timeout, and a transaction begun with
``write_option`` set takes the write lock up front (``BEGIN IMMEDIATE``); Postgres runs at READ
COMMITTED with ``pool_pre_ping``.

``create_read_only_engine(url)``: a database that must refuse writes. SQLite is opened
``mode=ro`` with ``PRAGMA query_only`` and no ATTACH; any other backend (Postgres) gets
``pool_pre_ping`` and is the caller's to make read-only (``SET TRANSACTION READ ONLY``, a
read-only user).

Both take a URL string or `URL`, and pass a bare ``postgresql://`` through `with_driver`. They
raise plain exceptions (SQLAlchemy's for a bad URL or a missing driver, `ValueError`,
`OSError`); callers turn them into their own errors.
"""

from __future__ import annotations

import importlib.util
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import QueuePool

__all__ = [
    "SQLiteFileNotFoundError", "create_read_only_engine", "create_store_engine", "is_in_memory_sqlite", "with_driver",
]


class SQLiteFileNotFoundError(FileNotFoundError):
    """The SQLite file to open read-only is not there; ``path`` is its resolved path."""

    def __init__(self, path: str) -> None:
        # one argument, so str() is the message alone (``filename`` would add "[Errno None] ...")
        super().__init__(f"SQLite database {path!r} does not exist")
        self.path = path


def with_driver(url: str | URL) -> URL:
    """``url`` parsed, with a bare ``postgresql://`` meaning the Postgres driver that is
    installed. SQLAlchemy's default for it changed (2.0: psycopg2, 2.1: psycopg 3) and the
    postgres extra installs psycopg2, so the default is kept only when both are installed."""
    url = make_url(url)
    if url.drivername != "postgresql":
        return url
    installed = [driver for driver in ("psycopg2", "psycopg") if importlib.util.find_spec(driver) is not None]
    return url.set(drivername=f"postgresql+{installed[0]}") if len(installed) == 1 else url


def is_in_memory_sqlite(url: URL) -> bool:
    """An in-memory SQLite URL: a database no other connection can see."""
    return url.get_backend_name() == "sqlite" and (
        url.database in (None, "", ":memory:") or "mode=memory" in str(url))


def create_store_engine(url: str | URL, *, busy_timeout_s: float = 30.0, write_option: str) -> Engine:
    """An engine for a store with many concurrent writers.

    SQLite: the file (``~`` expanded, its directory created) in WAL mode, with ``busy_timeout``,
    ``synchronous=NORMAL`` and foreign keys on; transactions begun on a connection whose
    execution options set ``write_option`` start with ``BEGIN IMMEDIATE``. Postgres: READ
    COMMITTED, whatever the server default (after waiting on another writer's lock, the next
    statement must see what it committed), and ``pool_pre_ping``. Other backends:
    ``pool_pre_ping`` only.

    Raises `ValueError` for an in-memory SQLite database, `OSError` when the file's directory
    cannot be made, and SQLAlchemy's `ArgumentError` / `NoSuchModuleError` or `ImportError` for a
    bad URL or a missing driver.
    """
    parsed = with_driver(url)
    backend = parsed.get_backend_name()
    if backend != "sqlite":
        options: dict[str, Any] = {"isolation_level": "READ COMMITTED"} if backend == "postgresql" else {}
        return create_engine(parsed, pool_pre_ping=True, **options)
    if is_in_memory_sqlite(parsed):
        raise ValueError("an in-memory SQLite database is not shared between connections; use a file")
    # sqlite3 would take "~" literally (DQ_SESSION_URL=sqlite:///~/...)
    parsed = parsed.set(database=str(Path(parsed.database).expanduser()))
    Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed)
    _configure_sqlite_writers(engine, busy_timeout_s, write_option)
    return engine


def _switch_to_wal(cursor: Any, busy_timeout_s: float) -> None:
    """SQLite answers BUSY at once, without the busy timeout, when several processes switch a
    new file to WAL together; wait and try again, within the busy timeout."""
    import sqlite3
    import time

    deadline = time.monotonic() + busy_timeout_s
    delay = 0.01
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.25)


def _configure_sqlite_writers(engine: Engine, busy_timeout_s: float, write_option: str) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # we emit BEGIN ourselves (below): the driver's own would start writers as DEFERRED
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # busy_timeout first, so that switching a fresh file to WAL waits instead of failing
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            _switch_to_wal(cursor, busy_timeout_s)
            cursor.execute("PRAGMA synchronous = NORMAL")  # durable enough in WAL, much faster
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # a writer takes the write lock up front (waiting under busy_timeout): a deferred one
        # that read first could only fail with SQLITE_BUSY when another writer got in between
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(write_option) else "BEGIN")


def create_read_only_engine(url: str | URL) -> Engine:
    """An engine on ``url`` that refuses writes where the database can.

    SQLite: the existing file opened ``mode=ro`` (never created) with ``PRAGMA query_only = ON``
    and ATTACH limited to 0 databases (``mode=ro`` does not cover ATTACH, which would open, even
    create, any other file); the pooled connections are shared across threads. Any other
    backend: ``pool_pre_ping``, and nothing else, so the caller makes it read-only.

    Raises `ValueError` for an in-memory SQLite database (always empty), `SQLiteFileNotFoundError`
    (a `FileNotFoundError`) for a SQLite file that is not there, and
    SQLAlchemy's errors for a bad URL or a missing driver.
    """
    parsed = with_driver(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True)
    if not parsed.database or parsed.database == ":memory:":
        raise ValueError("an in-memory SQLite database is always empty: pass a file, e.g. sqlite:///path/to.db")
    path = Path(parsed.database).expanduser().resolve()
    if not path.is_file():
        raise SQLiteFileNotFoundError(str(path))
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro"

    def connect() -> sqlite3.Connection:
        connection = sqlite3.connect(uri, uri=True, check_same_thread=False)
        connection.execute("PRAGMA query_only = ON")
        connection.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        return connection

    # callers run queries on worker threads; a file database is safe to share across them
    return create_engine("sqlite://", creator=connect, poolclass=QueuePool)
