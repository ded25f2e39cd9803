"""Multi-turn sessions stored with SQLAlchemy, shared by every process that opens the same URL.

By default one SQLite file, ``~/.datus/sessions/sessions.db`` (``DQ_SESSION_URL`` or the
``url`` argument override it), in WAL mode so readers never wait and writers queue on a busy
timeout; any SQLAlchemy URL (Postgres) serves sessions shared by many workers. Messages are
stored as provider-neutral `ChatMessage` JSON, so a session started on one provider continues
on another. Nothing is cached in memory: any process may clear or delete any session.

Appends are atomic and never lost: each one first updates its session row, which takes the
row lock on Postgres and, through ``BEGIN IMMEDIATE``, the write lock on SQLite; appends to one
session therefore run one after another and each sees the last committed ``seq``.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Connection, Engine

from datus.models.errors import ModelConfigError, ModelError, ModelErrorCode
from datus.models.messages import ChatMessage
from datus.models.sql_engines import create_store_engine, is_in_memory_sqlite, with_driver

__all__ = [
    "SESSION_URL_ENV", "Session", "SessionInfo", "SessionManager", "SessionNotFoundError", "SessionStoreError",
    "default_session_url", "shared_session_manager",
]

SESSION_URL_ENV = "DQ_SESSION_URL"
_WRITE = "dq_session_write"  # execution option: this transaction writes (SQLite: BEGIN IMMEDIATE)
_SCHEMA_ATTEMPTS = 3

_metadata = sa.MetaData()
sessions_table = sa.Table(
    "sessions", _metadata,
    sa.Column("id", sa.String(255), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("metadata", sa.JSON, nullable=False),
)
messages_table = sa.Table(
    "session_messages", _metadata,
    sa.Column("session_id", sa.String(255), sa.ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False, autoincrement=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("message", sa.JSON, nullable=False),
    sa.Column("token_count", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # the unique (session_id, seq): a second writer with a stale seq fails instead of interleaving
    sa.PrimaryKeyConstraint("session_id", "seq", name="pk_session_messages"),
)


class SessionNotFoundError(ModelError, KeyError):
    """No session with this id (never created, or deleted by some process)."""

    error_code = ModelErrorCode.SESSION_NOT_FOUND
    slug = "session_not_found"

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} does not exist")
        self.session_id = session_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.session_id,))


class SessionStoreError(ModelConfigError):
    """The session store cannot be used: a malformed URL, an unknown driver, a path that cannot
    be created, a database that refuses the connection."""


class SessionInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_id: str
    created_at: datetime
    updated_at: datetime
    message_count: int = 0
    total_tokens: int = 0  # the sum of the token counts stored with the messages
    last_user_message: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


def default_session_url() -> str:
    """``DQ_SESSION_URL`` if set, else the SQLite file ``~/.datus/sessions/sessions.db``."""
    return os.environ.get(SESSION_URL_ENV) or f"sqlite:///{Path.home() / '.datus' / 'sessions' / 'sessions.db'}"


class Session:
    """A handle on one stored session; holds only its id, so it never goes stale."""

    __slots__ = ("_manager", "session_id")

    def __init__(self, manager: SessionManager, session_id: str) -> None:
        self._manager = manager
        self.session_id = session_id

    def get_messages(self, limit: int | None = None) -> list[ChatMessage]:
        """The messages oldest first; with ``limit``, only the most recent ``limit`` of them."""
        return self._manager._messages(self.session_id, limit)

    def add_messages(self, messages: Sequence[ChatMessage], token_counts: Sequence[int] | None = None, *,
                     once_after: int | None = None) -> None:
        """Append all of ``messages`` in one transaction, after whatever is stored.
        ``once_after=n``: unless the session already holds exactly these messages right after
        its first ``n`` (a resumed run whose first attempt saved them)."""
        self._manager._append(self.session_id, messages, token_counts, once_after)

    async def aget_messages(self, limit: int | None = None) -> list[ChatMessage]:
        return await asyncio.to_thread(self.get_messages, limit)

    async def aadd_messages(self, messages: Sequence[ChatMessage], token_counts: Sequence[int] | None = None, *,
                            once_after: int | None = None) -> None:
        await asyncio.to_thread(lambda: self.add_messages(messages, token_counts, once_after=once_after))

    def clear(self) -> None:
        self._manager.clear_session(self.session_id)

    def info(self) -> SessionInfo:
        info = self._manager._info(self.session_id)
        if info is None:
            raise SessionNotFoundError(self.session_id)
        return info

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Session) and (other._manager, other.session_id) == (self._manager, self.session_id)

    def __hash__(self) -> int:
        return hash(self.session_id)

    def __repr__(self) -> str:
        return f"Session({self.session_id!r})"


class SessionManager:
    """Creates, finds, lists, clears and deletes sessions in one SQLAlchemy database, with
    upstream Datus's interface (`list_sessions` gives ids, `get_session_info` a dict).

    Thread-safe; one manager may serve many concurrent calls. Tables are created on first use.
    """

    def __init__(self, url: str | None = None, *, busy_timeout: float = 30.0) -> None:
        raw = url or default_session_url()
        try:
            parsed = with_driver(raw)
            if is_in_memory_sqlite(parsed):
                raise ValueError("in-memory SQLite is not shared between threads; use a file")
            self._engine: Engine = create_store_engine(parsed, busy_timeout_s=busy_timeout, write_option=_WRITE)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError, ValueError, OSError) as exc:
            hint = f"(pass another URL or set {SESSION_URL_ENV})"
            raise SessionStoreError(f"cannot use session store {_mask(raw)!r}: {exc} {hint}") from exc
        self._write_engine = self._engine.execution_options(**{_WRITE: True})
        self._schema_lock = threading.Lock()
        self._ready = False
        self._pid = os.getpid()

    @property
    def url(self) -> str:
        return self._engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self._engine.dispose()

    def create_session(self, session_id: str | None = None, metadata: dict[str, Any] | None = None) -> Session:
        """A new session, or the existing one with this id (``metadata`` is then ignored)."""
        session_id = uuid.uuid4().hex if session_id is None else session_id
        if not isinstance(session_id, str) or not 0 < len(session_id) <= 255:
            raise ValueError(f"a session id is a string of 1 to 255 characters, not {session_id!r}")
        now = _now()
        try:
            with self._transaction(write=True) as conn:
                conn.execute(sa.insert(sessions_table).values(
                    id=session_id, created_at=now, updated_at=now, metadata=dict(metadata or {})))
        except sa.exc.IntegrityError:
            pass  # it exists, perhaps created this instant by another process: creating is idempotent
        return Session(self, session_id)

    def get(self, session_id: str) -> Session | None:
        return Session(self, session_id) if self.session_exists(session_id) else None

    get_session = get

    def clear_session(self, session_id: str) -> None:
        """Drop the session's messages and keep the session."""
        with self._transaction(write=True) as conn:
            self._lock(conn, session_id)
            conn.execute(sa.delete(messages_table).where(messages_table.c.session_id == session_id))

    def delete_session(self, session_id: str) -> None:
        with self._transaction(write=True) as conn:
            self._lock(conn, session_id)  # a concurrent append finishes (or fails) first
            conn.execute(sa.delete(messages_table).where(messages_table.c.session_id == session_id))
            conn.execute(sa.delete(sessions_table).where(sessions_table.c.id == session_id))

    def session_exists(self, session_id: str) -> bool:
        query = sa.select(sessions_table.c.id).where(sessions_table.c.id == session_id)
        with self._transaction() as conn:
            return conn.execute(query).first() is not None

    def list_sessions(self) -> list[str]:
        """The ids of every session, the most recently updated first (as upstream Datus:
        ``"user_123" in manager.list_sessions()``)."""
        s = sessions_table
        with self._transaction() as conn:
            return list(conn.execute(sa.select(s.c.id).order_by(s.c.updated_at.desc(), s.c.id)).scalars())

    def get_session_info(self, session_id: str) -> dict[str, Any]:
        """Upstream Datus's dict: ``{"exists": False, "session_id": ...}`` for an unknown id, else
        ``{"exists": True}`` and the `SessionInfo` fields (``Session.info()`` gives the model)."""
        info = self._info(session_id)
        if info is None:
            return {"exists": False, "session_id": session_id}
        return {"exists": True, **info.model_dump()}

    def _messages(self, session_id: str, limit: int | None) -> list[ChatMessage]:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        m = messages_table
        query = sa.select(m.c.message).where(m.c.session_id == session_id)
        query = query.order_by(m.c.seq) if limit is None else query.order_by(m.c.seq.desc()).limit(limit)
        with self._transaction() as conn:
            if conn.execute(sa.select(sessions_table.c.id).where(sessions_table.c.id == session_id)).first() is None:
                raise SessionNotFoundError(session_id)
            stored = list(conn.execute(query).scalars())
        if limit is not None:
            stored.reverse()
        return [ChatMessage.model_validate(item) for item in stored]

    def _append(self, session_id: str, messages: Sequence[ChatMessage], token_counts: Sequence[int] | None,
                once_after: int | None = None) -> None:
        items = [m if isinstance(m, ChatMessage) else ChatMessage.model_validate(m) for m in messages]
        counts = [0] * len(items) if token_counts is None else [int(n) for n in token_counts]
        if len(counts) != len(items):
            raise ValueError(f"{len(items)} messages but {len(counts)} token counts")
        if not items:
            return
        with self._transaction(write=True) as conn:
            now = self._lock(conn, session_id)
            last = conn.execute(
                sa.select(sa.func.max(messages_table.c.seq)).where(messages_table.c.session_id == session_id)
            ).scalar()
            # defaults are left out of the JSON: smaller rows, and model_validate restores them
            rows = [item.model_dump(mode="json", exclude_defaults=True) for item in items]
            if once_after is not None and (last or 0) > once_after:
                stored = list(conn.execute(
                    sa.select(messages_table.c.message).where(messages_table.c.session_id == session_id)
                    .order_by(messages_table.c.seq).offset(once_after).limit(len(rows))).scalars())
                if stored == rows:
                    return
            conn.execute(sa.insert(messages_table), [
                {"session_id": session_id, "seq": (last or 0) + index, "role": item.role, "token_count": count,
                 "message": row, "created_at": now}
                for index, (item, row, count) in enumerate(zip(items, rows, counts, strict=True), start=1)
            ])

    @contextmanager
    def _transaction(self, write: bool = False) -> Iterator[Connection]:
        self._ensure_schema()
        with (self._write_engine if write else self._engine).begin() as conn:
            yield conn

    def _lock(self, conn: Connection, session_id: str) -> datetime:
        # touching the row serialises this session's writers (Postgres row lock, SQLite write lock)
        now = _now()
        touched = conn.execute(
            sa.update(sessions_table).where(sessions_table.c.id == session_id).values(updated_at=now))
        if touched.rowcount == 0:
            raise SessionNotFoundError(session_id)
        return now

    def _info(self, session_id: str) -> SessionInfo | None:
        s, m = sessions_table, messages_table
        totals = (
            sa.select(m.c.session_id, sa.func.count().label("n"), sa.func.sum(m.c.token_count).label("tokens"))
            .where(m.c.session_id == session_id).group_by(m.c.session_id).subquery()
        )
        last_user = (
            sa.select(m.c.message).where(m.c.session_id == s.c.id, m.c.role == "user")
            .order_by(m.c.seq.desc()).limit(1).correlate(s).scalar_subquery()
        )
        query = (
            sa.select(s).where(s.c.id == session_id)
            .add_columns(totals.c.n, totals.c.tokens, last_user.label("last_user"))
            .outerjoin(totals, totals.c.session_id == s.c.id)
        )
        with self._transaction() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        return SessionInfo(
            session_id=row.id, created_at=_utc(row.created_at), updated_at=_utc(row.updated_at),
            message_count=row.n or 0, total_tokens=row.tokens or 0, metadata=row._mapping["metadata"] or {},
            last_user_message=None if row.last_user is None else row.last_user.get("content", ""),
        )

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
                        _metadata.create_all(conn)
                    break
                except (sa.exc.IntegrityError, sa.exc.ProgrammingError) as exc:
                    # another process created the tables between our check and our CREATE
                    # (Postgres: duplicate pg_type / relation); the next check sees them
                    if attempt == _SCHEMA_ATTEMPTS:
                        raise SessionStoreError(f"cannot create the session tables in {self.url}: {exc}") from exc
                except sa.exc.DBAPIError as exc:
                    raise SessionStoreError(f"cannot open the session store {self.url}: {exc.orig}") from exc
            self._ready = True


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime) -> datetime:
    # SQLite hands back the naive UTC we stored; Postgres an aware time in its own zone
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _mask(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


_shared: dict[str, SessionManager] = {}
_shared_lock = threading.Lock()


def shared_session_manager(url: str | None = None) -> SessionManager:
    """One manager per database URL per process (what the model objects use)."""
    key = url or os.environ.get(SESSION_URL_ENV) or default_session_url()
    with _shared_lock:
        manager = _shared.get(key)
        if manager is None:
            manager = _shared[key] = SessionManager(key)
        return manager
