"""Where sessions are kept: Datus-agent's two tables, in one SQLite file per session or in
one shared database.

``agent_sessions(session_id TEXT PRIMARY KEY, created_at, updated_at, total_tokens INTEGER
DEFAULT 0)`` and ``agent_messages(id INTEGER PRIMARY KEY AUTOINCREMENT, session_id,
message_data TEXT, created_at)`` with an index on ``(session_id, created_at)`` — the tables
openai-agents' ``SQLiteSession`` (as Datus extends it) creates; times are UTC, as SQLite's
``CURRENT_TIMESTAMP``.

`FileStore` (the default): ``{sessions_dir}/{session_id}.db``, Datus's layout, which its web UI
reads directly. A delete unlinks the file (as Datus does), and the rest follows from making
that safe for other processes using the same session at that moment. SQLite finds a file's
journal (``-journal``, or ``-wal``/``-shm``) by name: a connection still open on an unlinked
file would take the journal of the new file made in its place for its own — roll it back into
the dead file and delete it, under the feet of the new file's writer. So no connection of ours
may outlive its file:

- Every operation holds a shared ``flock`` on ``{sessions_dir}/.sessions.lock`` from before it
  opens the file until it has closed it (connections are never pooled); a delete holds it
  exclusively. A delete therefore never happens while any of our operations has a file open.
- A delete also takes the file's write lock (for writers that do not take our lock: Datus's
  own code), unlinks the file and writes nothing, so it leaves no journal behind.
- The files stay in rollback-journal mode (never WAL, which keeps shared memory by name too).
  A foreign connection that outlives an unlinked file then fails its next write with
  ``SQLITE_READONLY_DBMOVED`` (SQLite checks before it opens a journal); for ours, an
  operation meeting it starts again from the path.

Without ``fcntl`` (Windows) there is no lock, and only the last two points hold.

`SharedStore`: every session in the same two tables of one SQLAlchemy database
(``DQ_SESSION_URL``; Postgres for a fleet of workers, or one SQLite file in WAL mode).

Both run an operation as ``store.run(session_id, work, write=..., create=...)``: ``work``
gets a SQLAlchemy connection inside one transaction; a writer's transaction takes the write
lock first (SQLite ``BEGIN IMMEDIATE``, waiting under a busy timeout). The operations
themselves (`datus.models.session_manager`) are written once, on those tables.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from datus.models.sql_engines import create_store_engine, is_in_memory_sqlite, with_driver

try:  # the directory lock of per-session files (see above; not on Windows)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "SESSION_ID_PATTERN", "FileStore", "NoSuchSession", "SharedStore", "agent_messages", "agent_sessions",
    "is_valid_session_id",
]

T = TypeVar("T")

# Datus's web UI loads only ids of this shape (a file name, never a path); 200 characters keep
# "{id}.db-journal" within the 255 bytes a file name may have.
SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,200}")
_LOCK_FILE = ".sessions.lock"  # not a *.db: never taken for a session

_WRITE = "dq_session_write"  # execution option: this transaction writes (SQLite: BEGIN IMMEDIATE)
_SCHEMA_ATTEMPTS = 3
_MOVED_ATTEMPTS = 5  # each retry follows a delete by a process that does not take our lock
_SQLITE_READONLY_DBMOVED = getattr(sqlite3, "SQLITE_READONLY_DBMOVED", 1032)

_metadata = sa.MetaData()
agent_sessions = sa.Table(
    "agent_sessions", _metadata,
    sa.Column("session_id", sa.Text, primary_key=True),
    sa.Column("created_at", sa.DateTime),
    sa.Column("updated_at", sa.DateTime),
    sa.Column("total_tokens", sa.Integer, server_default="0"),
)
agent_messages = sa.Table(
    "agent_messages", _metadata,
    # an INTEGER rowid on SQLite (AUTOINCREMENT below), a BIGSERIAL elsewhere
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("session_id", sa.Text, sa.ForeignKey("agent_sessions.session_id", ondelete="CASCADE"), nullable=False),
    sa.Column("message_data", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime),
    sa.Index("idx_agent_messages_session_id", "session_id", "created_at"),
)

# On SQLite, exactly openai-agents' statements (with Datus's total_tokens): a file we create is
# the file Datus would have created, and one it created is used as is.
_SQLITE_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS agent_sessions (
        session_id TEXT PRIMARY KEY,
        created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
        updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
        total_tokens INTEGER DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS agent_messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id TEXT NOT NULL,
        message_data TEXT NOT NULL,
        created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
        FOREIGN KEY (session_id) REFERENCES agent_sessions (session_id)
            ON DELETE CASCADE
    )""",
    """CREATE INDEX IF NOT EXISTS idx_agent_messages_session_id
        ON agent_messages (session_id, created_at)""",
)


def is_valid_session_id(session_id: object) -> bool:
    return isinstance(session_id, str) and SESSION_ID_PATTERN.fullmatch(session_id) is not None


class NoSuchSession(Exception):
    """Raised inside the stores for a session that is not there; the manager turns it into
    its public answer (an error, False, or nothing to do)."""


class FileStore:
    """One SQLite file per session in ``sessions_dir``."""

    def __init__(self, sessions_dir: Path, busy_timeout_s: float) -> None:
        self.sessions_dir = sessions_dir
        self.busy_timeout_s = busy_timeout_s

    @property
    def location(self) -> str:
        return str(self.sessions_dir)

    def path(self, session_id: str) -> Path:
        return self.sessions_dir / f"{session_id}.db"

    def run(self, session_id: str, work: Callable[[Connection], T], *, write: bool, create: bool = False) -> T:
        if not create and not self.sessions_dir.is_dir():
            raise NoSuchSession(session_id)
        with self._directory_lock(exclusive=False):
            return self._run(session_id, work, write=write or create, create=create)

    def _run(self, session_id: str, work: Callable[[Connection], T], *, write: bool, create: bool) -> T:
        path = self.path(session_id)
        for attempt in range(1, _MOVED_ATTEMPTS + 1):
            if not create and not path.is_file():
                raise NoSuchSession(session_id)
            engine = self._engine(path, create)
            try:
                with engine.connect() as conn:
                    _add_total_tokens(conn.connection.driver_connection)
                    with conn.execution_options(**{_WRITE: write}).begin():
                        if create:
                            for statement in _SQLITE_SCHEMA:
                                conn.exec_driver_sql(statement)
                        elif not _has_tables(conn):
                            raise NoSuchSession(session_id)  # not a session file
                        return work(conn)
            except (sa.exc.OperationalError, sqlite3.OperationalError) as exc:
                code = _code(exc)
                if code == _SQLITE_READONLY_DBMOVED and attempt < _MOVED_ATTEMPTS:
                    continue  # unlinked by someone not taking our lock: go by the path again
                if code == sqlite3.SQLITE_CANTOPEN and not create and not path.exists():
                    raise NoSuchSession(session_id) from None  # deleted between the check and the open
                raise
            finally:
                engine.dispose()
        raise AssertionError("unreachable")

    def delete(self, session_id: str) -> bool:
        """Unlink the session's file under its write lock; False if there was none."""
        path = self.path(session_id)
        if not path.is_file():
            return False
        with self._directory_lock(exclusive=True):  # no operation of ours has it open
            engine = self._engine(path, create=False)
            try:
                with engine.connect() as conn:
                    wal = _leave_wal(conn.connection.driver_connection)
                    with conn.execution_options(**{_WRITE: True}).begin():
                        if not _has_tables(conn):
                            return False  # not a session file
                        path.unlink()  # nothing was written: no journal outlives the file
            except (sa.exc.OperationalError, sqlite3.OperationalError) as exc:
                if _code(exc) == sqlite3.SQLITE_CANTOPEN and not path.exists():
                    return False
                raise
            finally:
                engine.dispose()
            if wal:  # an old Datus file kept in WAL mode by a foreign connection still open
                for suffix in ("-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
            return True

    def session_ids(self) -> list[str]:
        """Every ``*.db`` stem that is a session id, the most recently written first."""
        try:
            entries = [(entry.stat().st_mtime, entry.name[:-3]) for entry in os.scandir(self.sessions_dir)
                       if entry.name.endswith(".db") and entry.is_file() and is_valid_session_id(entry.name[:-3])]
        except FileNotFoundError:
            return []
        return [session_id for _, session_id in sorted(entries, key=lambda entry: (-entry[0], entry[1]))]

    def file_info(self, session_id: str, updated_at: datetime | None) -> tuple[str, int | None, float | None]:
        """``(db_path, file_size, file_modified)``, as Datus reports them."""
        path = self.path(session_id)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return str(path), None, None
        return str(path), stat.st_size, stat.st_mtime

    def close(self) -> None:
        pass  # nothing is held open between operations

    @contextlib.contextmanager
    def _directory_lock(self, *, exclusive: bool) -> Iterator[None]:
        """Shared by operations, exclusive for a delete (see the module docstring)."""
        self.sessions_dir.mkdir(parents=True, exist_ok=True)
        try:
            # read-only is enough for flock, and lets a reader work in a directory it cannot write
            fd = os.open(self.sessions_dir / _LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o644)
        except PermissionError:
            if exclusive:
                raise
            yield  # a read-only directory: nothing of ours can delete there either
            return
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _engine(self, path: Path, create: bool) -> Engine:
        # mode=rw: using a session never makes its file (a deleted one stays deleted)
        uri = f"file:{urllib.parse.quote(str(path))}?mode={'rwc' if create else 'rw'}"
        timeout = self.busy_timeout_s

        def connect() -> sqlite3.Connection:
            # isolation_level=None: we emit BEGIN ourselves (the driver's own would be DEFERRED)
            return sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False)

        engine = sa.create_engine("sqlite://", creator=connect, poolclass=NullPool)
        sa.event.listen(engine, "begin", _begin)
        return engine


class SharedStore:
    """Every session in one database named by a SQLAlchemy URL."""

    def __init__(self, url: str, busy_timeout_s: float) -> None:
        parsed = with_driver(url)
        if is_in_memory_sqlite(parsed):
            raise ValueError("in-memory SQLite is not shared between connections; use a file")
        self._engine = create_store_engine(parsed, busy_timeout_s=busy_timeout_s, write_option=_WRITE)
        self._write_engine = self._engine.execution_options(**{_WRITE: True})
        self._schema_lock = threading.Lock()
        self._ready = False
        self._pid = os.getpid()

    @property
    def location(self) -> str:
        return self._engine.url.render_as_string(hide_password=True)

    def run(self, session_id: str, work: Callable[[Connection], T], *, write: bool, create: bool = False) -> T:
        self._ensure_schema()
        with (self._write_engine if write else self._engine).begin() as conn:
            return work(conn)

    def delete(self, session_id: str) -> bool:
        def work(conn: Connection) -> bool:
            # the row lock first: a concurrent append finishes (or fails) before the rows go
            if conn.execute(sa.update(agent_sessions).where(agent_sessions.c.session_id == session_id)
                            .values(total_tokens=0)).rowcount == 0:
                return False
            conn.execute(sa.delete(agent_messages).where(agent_messages.c.session_id == session_id))
            conn.execute(sa.delete(agent_sessions).where(agent_sessions.c.session_id == session_id))
            return True

        return self.run(session_id, work, write=True)

    def session_ids(self) -> list[str]:
        s = agent_sessions
        query = sa.select(s.c.session_id).order_by(s.c.updated_at.desc(), s.c.session_id)
        return self.run("", lambda conn: list(conn.execute(query).scalars()), write=False)

    def file_info(self, session_id: str, updated_at: datetime | None) -> tuple[str, int | None, float | None]:
        # no file of its own: the store, no size, and its last update as the modification time
        modified = updated_at.replace(tzinfo=UTC).timestamp() if updated_at is not None else None
        return self.location, None, modified

    def close(self) -> None:
        self._engine.dispose()

    def _ensure_schema(self) -> None:
        if self._pid != os.getpid():
            # forked (a prefork worker): the parent's pooled connections are not ours to use
            self._engine.dispose(close=False)
            self._pid = os.getpid()
        if self._ready:
            return
        with self._schema_lock:
            if self._ready:
                return
            for attempt in range(1, _SCHEMA_ATTEMPTS + 1):
                try:
                    with self._write_engine.begin() as conn:
                        if conn.dialect.name == "sqlite":
                            for statement in _SQLITE_SCHEMA:
                                conn.exec_driver_sql(statement)
                        else:
                            _metadata.create_all(conn)
                    break
                except (sa.exc.IntegrityError, sa.exc.ProgrammingError):
                    # another process created the tables between our check and our CREATE
                    # (Postgres: duplicate pg_type / relation); the next check sees them
                    if attempt == _SCHEMA_ATTEMPTS:
                        raise
            self._ready = True


def _begin(conn: Connection) -> None:
    # a writer takes the write lock up front (waiting under the busy timeout): a deferred one
    # that read first could only fail with SQLITE_BUSY when another writer got in between
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")


def _has_tables(conn: Connection) -> bool:
    return conn.exec_driver_sql(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('agent_sessions', 'agent_messages')"
    ).scalar() == 2


def _add_total_tokens(raw: sqlite3.Connection) -> None:
    """A session file from before Datus added ``total_tokens`` gets the column (as Datus does)."""
    if not _lacks_total_tokens(raw):
        return
    raw.execute("BEGIN IMMEDIATE")
    try:
        if _lacks_total_tokens(raw):  # not added by someone else meanwhile
            raw.execute("ALTER TABLE agent_sessions ADD COLUMN total_tokens INTEGER DEFAULT 0")
        raw.execute("COMMIT")
    except BaseException:
        raw.execute("ROLLBACK")
        raise


def _lacks_total_tokens(raw: sqlite3.Connection) -> bool:
    columns = {row[1] for row in raw.execute("PRAGMA table_info(agent_sessions)")}
    return bool(columns) and "total_tokens" not in columns


def _leave_wal(raw: sqlite3.Connection) -> bool:
    """Switch a WAL file (openai-agents made them so) back to a rollback journal before it is
    unlinked; True if it stays in WAL because another connection holds it."""
    if str(raw.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
        return False
    try:
        mode = raw.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
    except sqlite3.OperationalError:
        return True
    return str(mode).lower() == "wal"


def _code(exc: Exception) -> int | None:
    return getattr(getattr(exc, "orig", exc), "sqlite_errorcode", None)


