"""Multi-turn sessions, kept the way Datus-agent keeps them, usable from any process.

Where: by default one SQLite file per session, ``{sessions_dir}/{session_id}.db``, with
``sessions_dir`` Datus's ``get_path_manager().sessions_dir`` (``{agent.home}/sessions``) where
Datus-agent is installed and ``~/.datus/sessions`` where it is not — the files Datus's web UI
lists and reads. ``DQ_SESSION_URL`` (or ``SessionManager(url=...)``) names a SQLAlchemy
database instead, whose same two tables hold every session: Postgres shared by a fleet of
workers. See `datus.models.session_store` for the tables and how concurrent processes stay
safe, and `datus.models.session_items` for the stored form: openai-agents' Responses input
items, which carry each `ChatMessage` whole (reasoning, replay data, tool calls and results).

What: `SessionManager` has Datus's interface (``SessionManager()`` with no arguments,
``list_sessions() -> list[str]``, ``session_exists``, ``get_session_info`` -> dict,
``update_session_tokens``, ``create_session``, ``clear_session``, ``delete_session``);
``create_session`` returns a `Session`, which a tool run takes as ``session=``. Nothing is
cached: any process, through any manager, may clear or delete any session. Appends are atomic
and ordered: each takes the session's write lock (SQLite ``BEGIN IMMEDIATE``, a Postgres row
lock) before it reads where the session ends, and stamps its items with times after the last
one stored, so ``ORDER BY created_at`` (Datus's) and ``ORDER BY id`` agree.

Sessions of the earlier store (tables ``sessions`` / ``session_messages`` in
``~/.datus/sessions/sessions.db`` or ``DQ_SESSION_URL``) are not read by this module; they are
carried over once, on request, by `datus.models.session_import` (``python -m
datus.models.session_import``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.engine import Connection

from datus.models.errors import ModelConfigError, ModelError, ModelErrorCode
from datus.models.messages import ChatMessage
from datus.models.redact import redact
from datus.models.session_items import item_kind, items_to_messages, messages_to_items, user_text
from datus.models.session_store import (
    FileStore,
    NoSuchSession,
    SharedStore,
    agent_messages,
    agent_sessions,
    is_valid_session_id,
)
from datus.utils.exceptions import ErrorCode

__all__ = [
    "SESSION_URL_ENV", "InvalidSessionIdError", "Session", "SessionInfo", "SessionManager", "SessionNotFoundError",
    "SessionStoreError", "default_sessions_dir", "shared_session_manager",
]

logger = logging.getLogger(__name__)

SESSION_URL_ENV = "DQ_SESSION_URL"
_TICK = timedelta(microseconds=1)  # items of a session get strictly increasing times
T = TypeVar("T")


class SessionNotFoundError(ModelError, KeyError):
    """No session with this id (never created, or deleted by some process)."""

    error_code = ModelErrorCode.SESSION_NOT_FOUND
    slug = "session_not_found"

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} does not exist")
        self.session_id = session_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.session_id,))


class InvalidSessionIdError(ModelError, ValueError):
    """A session id that is not 1 to 200 of ``A-Z a-z 0-9 _ . -`` (it names a file)."""

    error_code = ErrorCode.COMMON_FIELD_INVALID
    slug = "invalid_session_id"

    def __init__(self, session_id: object) -> None:
        super().__init__(f"invalid session id {session_id!r}: use 1 to 200 letters, digits, '_', '.' or '-'")
        self.session_id = session_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.session_id,))


class SessionStoreError(ModelConfigError):
    """The session store cannot be used: a malformed URL, an unknown driver, a path that cannot
    be created, a database that refuses the connection."""


class SessionInfo(BaseModel):
    """What `SessionManager.get_session_info` reports (times here are aware UTC datetimes;
    the dict gives them as Datus does, SQLite's UTC text)."""

    model_config = ConfigDict(extra="forbid")

    session_id: str
    db_path: str  # the session's file, or the shared store's URL (password masked)
    file_size: int | None = None  # None in a shared store
    file_modified: float | None = None  # POSIX time; in a shared store, the last update
    created_at: datetime | None = None
    updated_at: datetime | None = None
    total_tokens: int = 0  # appends add their token counts; update_session_tokens sets it
    message_count: int = 0  # conversation messages (Datus counted items here too)
    item_count: int = 0  # stored items: an assistant turn with text and two tool calls is three
    latest_message_at: datetime | None = None
    latest_user_message: str | None = None
    latest_user_message_at: datetime | None = None


def default_sessions_dir() -> Path:
    """Datus-agent's sessions directory where Datus is installed, else ``~/.datus/sessions``."""
    try:
        from datus.utils.path_manager import get_path_manager
    except ImportError:  # the standalone distribution has no path manager
        return Path.home() / ".datus" / "sessions"
    return Path(get_path_manager().sessions_dir)


class Session:
    """A handle on one stored session; holds only its id, so it never goes stale.

    Besides our methods it has openai-agents' session methods (``get_items``, ``add_items``,
    ``pop_item``, ``clear_session``), over the same stored items."""

    __slots__ = ("_manager", "session_id")

    def __init__(self, manager: SessionManager, session_id: str) -> None:
        self._manager = manager
        self.session_id = session_id

    def get_messages(self, limit: int | None = None) -> list[ChatMessage]:
        """The messages oldest first; with ``limit``, only the most recent ``limit`` of them."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        messages = items_to_messages(self._items())
        return messages if limit is None else messages[-limit:] if limit else []

    def add_messages(self, messages: Sequence[ChatMessage | dict[str, Any]], token_counts: Sequence[int] | None = None,
                     *, once_after: int | None = None) -> None:
        """Append all of ``messages`` in one transaction, after whatever is stored, adding
        ``token_counts`` to the session's total. ``once_after=n``: unless the session already
        holds exactly these messages right after its first ``n`` (a resumed run whose first
        attempt saved them)."""
        items = [m if isinstance(m, ChatMessage) else ChatMessage.model_validate(m) for m in messages]
        counts = [0] * len(items) if token_counts is None else [int(n) for n in token_counts]
        if len(counts) != len(items):
            raise ValueError(f"{len(items)} messages but {len(counts)} token counts")
        if items:
            self._manager._run(self.session_id, lambda conn: _append(conn, self.session_id, items, sum(counts),
                                                                     once_after), write=True)

    async def aget_messages(self, limit: int | None = None) -> list[ChatMessage]:
        return await asyncio.to_thread(self.get_messages, limit)

    async def aadd_messages(self, messages: Sequence[ChatMessage | dict[str, Any]],
                            token_counts: Sequence[int] | None = None, *, once_after: int | None = None) -> None:
        await asyncio.to_thread(lambda: self.add_messages(messages, token_counts, once_after=once_after))

    def _items(self) -> list[dict[str, Any]]:
        return self._manager._run(self.session_id, lambda conn: _items(conn, self.session_id, check=True),
                                  write=False)

    def clear(self) -> None:
        """Drop the messages and the token total; the session stays."""
        self._manager._run(self.session_id, lambda conn: _clear(conn, self.session_id), write=True)

    def info(self) -> SessionInfo:
        return self._manager._info(self.session_id)

    # ---- openai-agents' session protocol -------------------------------------------------

    async def get_items(self, limit: int | None = None) -> list[dict[str, Any]]:
        items = await asyncio.to_thread(self._items)
        return items if limit is None else items[-limit:] if limit > 0 else []

    async def add_items(self, items: list[dict[str, Any]]) -> None:
        if not all(isinstance(item, dict) for item in items):
            raise TypeError("session items are dicts (openai-agents Responses input items)")
        if items:
            await asyncio.to_thread(self._manager._run, self.session_id,
                                    lambda conn: _add_items(conn, self.session_id, list(items)), write=True)

    async def pop_item(self) -> dict[str, Any] | None:
        return await asyncio.to_thread(self._manager._run, self.session_id,
                                       lambda conn: _pop(conn, self.session_id), write=True)

    async def clear_session(self) -> None:
        await asyncio.to_thread(self.clear)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Session) and (other._manager, other.session_id) == (self._manager, self.session_id)

    def __hash__(self) -> int:
        return hash(self.session_id)

    def __repr__(self) -> str:
        return f"Session({self.session_id!r})"


class SessionManager:
    """Creates, finds, lists, clears and deletes sessions (see the module docstring for where).

    ``url`` (else ``DQ_SESSION_URL``): a SQLAlchemy database holding every session;
    ``sessions_dir``: the directory of per-session files (default `default_sessions_dir`).
    Thread-safe; one manager may serve many concurrent calls."""

    def __init__(self, url: str | None = None, *, sessions_dir: str | os.PathLike[str] | None = None,
                 busy_timeout: float = 30.0) -> None:
        if url is not None and sessions_dir is not None:
            raise ValueError("pass url or sessions_dir, not both")
        if url is None and sessions_dir is None:
            url = os.environ.get(SESSION_URL_ENV) or None
        self.url: str | None = None
        self.session_dir: str | None = None  # Datus's attribute: the per-session files' directory
        self._store: FileStore | SharedStore
        if url is None:
            directory = Path(sessions_dir).expanduser() if sessions_dir is not None else default_sessions_dir()
            self._store = FileStore(directory, busy_timeout)
            self.session_dir = str(directory)
            return
        try:
            self._store = SharedStore(url, busy_timeout)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError, ValueError, OSError) as exc:
            hint = f"(pass another URL or set {SESSION_URL_ENV})"
            raise SessionStoreError(f"cannot use session store {redact(url)!r}: {exc} {hint}") from exc
        self.url = self._store.location

    def close(self) -> None:
        self._store.close()

    # ---- Datus's interface ---------------------------------------------------------------

    def create_session(self, session_id: str | None = None) -> Session:
        """A new session, or the existing one with this id (a new id when None)."""
        session_id = uuid.uuid4().hex if session_id is None else _checked(session_id)
        try:
            self._run(session_id, lambda conn: _create(conn, session_id), write=True, create=True)
        except SessionStoreError as exc:
            if not isinstance(exc.__cause__, sa.exc.IntegrityError):
                raise  # else another process created it this instant: creating is idempotent
        return Session(self, session_id)

    get_session = create_session  # Datus's name for the same (get or create)

    def get(self, session_id: str) -> Session | None:
        """The session, or None when there is none with this id (nothing is created)."""
        return Session(self, session_id) if self.session_exists(session_id) else None

    def session_exists(self, session_id: str) -> bool:
        if not is_valid_session_id(session_id):
            return False  # Datus's web UI asks with ids from a URL
        try:
            return self._run(session_id, lambda conn: _row(conn, session_id) is not None, write=False)
        except SessionNotFoundError:
            return False

    def list_sessions(self) -> list[str]:
        """The session ids, the most recently updated first (a file store lists its files, as
        Datus does, including any that hold no session yet)."""
        try:
            return self._store.session_ids()
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            raise self._store_error(exc) from exc

    def get_session_info(self, session_id: str) -> dict[str, Any]:
        """``{"exists": False, "session_id": ...}`` for an unknown id; else ``{"exists": True}``
        and the `SessionInfo` fields, times as UTC text like SQLite's ``CURRENT_TIMESTAMP``."""
        if not is_valid_session_id(session_id):
            return {"exists": False, "session_id": session_id}
        try:
            info = self._info(session_id)
        except SessionNotFoundError:
            return {"exists": False, "session_id": session_id}
        return {"exists": True, **{key: _sql_text(value) if isinstance(value, datetime) else value
                                   for key, value in info.model_dump().items()}}

    def update_session_tokens(self, session_id: str, total_tokens: int) -> None:
        """Set the session's token total (Datus's nodes keep their own count and store it here);
        a missing session is only logged, as Datus does."""
        if total_tokens < 0:
            raise ValueError(f"total_tokens must be >= 0, not {total_tokens}")
        try:
            self._run(_checked(session_id), lambda conn: _lock(conn, session_id, set_tokens=int(total_tokens)),
                      write=True)
        except SessionNotFoundError:
            logger.warning("cannot record tokens of session %r: it does not exist", session_id)

    def clear_session(self, session_id: str) -> bool:
        """Drop the session's messages and token total and keep the session; False (and a
        warning, as Datus) when there is no such session."""
        try:
            self._run(_checked(session_id), lambda conn: _clear(conn, session_id), write=True)
        except SessionNotFoundError:
            logger.warning("cannot clear session %r: it does not exist", session_id)
            return False
        return True

    def delete_session(self, session_id: str) -> bool:
        """Delete the session (its file, in a file store); False when there was none."""
        try:
            return self._store.delete(_checked(session_id))
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            raise self._store_error(exc) from exc

    # ---- internals -----------------------------------------------------------------------

    def _run(self, session_id: str, work: Callable[[Connection], T], *, write: bool, create: bool = False) -> T:
        try:
            return self._store.run(session_id, work, write=write, create=create)
        except NoSuchSession:
            raise SessionNotFoundError(session_id) from None
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            raise self._store_error(exc) from exc

    def _store_error(self, exc: Exception) -> SessionStoreError:
        reason = getattr(exc, "orig", None) or exc
        return SessionStoreError(f"the session store {self._store.location} failed: {type(reason).__name__}: {reason}")

    def _info(self, session_id: str) -> SessionInfo:
        row, stored = self._run(session_id, lambda conn: _info_rows(conn, session_id), write=False)
        items = [(item, created_at) for item, created_at in stored if item is not None]
        latest_user = next(((user_text(item), at) for item, at in reversed(items) if item_kind(item) == "user"),
                           (None, None))
        db_path, file_size, file_modified = self._store.file_info(session_id, row.updated_at)
        return SessionInfo(
            session_id=session_id, db_path=db_path, file_size=file_size, file_modified=file_modified,
            created_at=_utc(row.created_at), updated_at=_utc(row.updated_at), total_tokens=row.total_tokens or 0,
            message_count=len(items_to_messages(item for item, _ in items)), item_count=len(stored),
            latest_message_at=_utc(stored[-1][1]) if stored else None,
            latest_user_message=latest_user[0], latest_user_message_at=_utc(latest_user[1]),
        )


# ---- the operations, once for both stores ---------------------------------------------------


def _row(conn: Connection, session_id: str) -> Any:
    s = agent_sessions
    return conn.execute(sa.select(s.c.created_at, s.c.updated_at, s.c.total_tokens)
                        .where(s.c.session_id == session_id)).first()


def _create(conn: Connection, session_id: str) -> None:
    if _row(conn, session_id) is None:
        now = _now()
        conn.execute(sa.insert(agent_sessions).values(session_id=session_id, created_at=now, updated_at=now,
                                                      total_tokens=0))


def _lock(conn: Connection, session_id: str, *, now: datetime | None = None, add_tokens: int = 0,
          set_tokens: int | None = None) -> None:
    """Touch the session's row: the write lock for the rest of the transaction (a Postgres
    row lock; SQLite already holds the file's), or `NoSuchSession`."""
    s = agent_sessions
    tokens = sa.func.coalesce(s.c.total_tokens, 0) + add_tokens if set_tokens is None else set_tokens
    if conn.execute(sa.update(s).where(s.c.session_id == session_id)
                    .values(updated_at=now or _now(), total_tokens=tokens)).rowcount == 0:
        raise NoSuchSession(session_id)


def _items(conn: Connection, session_id: str, check: bool = False) -> list[dict[str, Any]]:
    if check and _row(conn, session_id) is None:
        raise NoSuchSession(session_id)
    return [item for item, _ in _stored(conn, session_id) if item is not None]


def _stored(conn: Connection, session_id: str) -> list[tuple[dict[str, Any] | None, datetime | None]]:
    m = agent_messages
    rows = conn.execute(sa.select(m.c.message_data, m.c.created_at).where(m.c.session_id == session_id)
                        .order_by(m.c.id)).all()
    return [(_load(data), created_at) for data, created_at in rows]


def _append(conn: Connection, session_id: str, messages: list[ChatMessage], tokens: int, once_after: int | None) -> None:
    now = _now()
    _lock(conn, session_id, now=now)  # first: what is read below stays true until the commit
    if once_after is not None:
        held = items_to_messages(_items(conn, session_id))
        if held[once_after:once_after + len(messages)] == messages:
            return  # saved by an earlier attempt of the same run
    last = _last(conn, session_id)
    previous = item_kind(_load(last.message_data)) if last is not None else None
    _insert_rows(conn, session_id, messages_to_items(messages, previous), last, now, tokens)


def _add_items(conn: Connection, session_id: str, items: list[dict[str, Any]]) -> None:
    now = _now()
    _lock(conn, session_id, now=now)
    _insert_rows(conn, session_id, items, _last(conn, session_id), now, 0)


def _last(conn: Connection, session_id: str) -> Any:
    m = agent_messages
    return conn.execute(sa.select(m.c.message_data, m.c.created_at).where(m.c.session_id == session_id)
                        .order_by(m.c.id.desc()).limit(1)).first()


def _insert_rows(conn: Connection, session_id: str, items: list[dict[str, Any]], last: Any, now: datetime,
                 tokens: int) -> None:
    """Insert ``items`` after ``last`` (the session's last stored row, under the lock), each
    with a later time than the one before, whatever the clocks of the processes that wrote
    them; the session is then updated as of its last item, with ``tokens`` more."""
    start = now if last is None or last.created_at is None or now > last.created_at else last.created_at + _TICK
    conn.execute(sa.insert(agent_messages), [
        {"session_id": session_id, "message_data": json.dumps(item, ensure_ascii=False),
         "created_at": start + index * _TICK}
        for index, item in enumerate(items)
    ])
    _lock(conn, session_id, now=start + (len(items) - 1) * _TICK, add_tokens=tokens)


def _pop(conn: Connection, session_id: str) -> dict[str, Any] | None:
    _lock(conn, session_id)
    m = agent_messages
    last = conn.execute(sa.select(m.c.id, m.c.message_data).where(m.c.session_id == session_id)
                        .order_by(m.c.id.desc()).limit(1)).first()
    if last is None:
        return None
    conn.execute(sa.delete(m).where(m.c.id == last.id))
    return _load(last.message_data)


def _clear(conn: Connection, session_id: str) -> None:
    _lock(conn, session_id, set_tokens=0)
    conn.execute(sa.delete(agent_messages).where(agent_messages.c.session_id == session_id))


def _info_rows(conn: Connection, session_id: str) -> tuple[Any, list[tuple[dict[str, Any] | None, datetime | None]]]:
    row = _row(conn, session_id)
    if row is None:
        raise NoSuchSession(session_id)
    return row, _stored(conn, session_id)


def _load(data: str) -> dict[str, Any] | None:
    # a row that is not a JSON object is skipped, as openai-agents skips it
    try:
        item = json.loads(data)
    except (TypeError, ValueError):
        return None
    return item if isinstance(item, dict) else None


def _checked(session_id: str) -> str:
    if not is_valid_session_id(session_id):
        raise InvalidSessionIdError(session_id)
    return session_id


def _now() -> datetime:
    # naive UTC: what SQLite's CURRENT_TIMESTAMP stores, and the same in every backend
    return datetime.now(UTC).replace(tzinfo=None)


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _sql_text(value: datetime) -> str:
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ")


_shared: dict[str, SessionManager] = {}
_shared_lock = threading.Lock()


def shared_session_manager(url: str | None = None) -> SessionManager:
    """One manager per store per process (what the model objects use): ``url``, else
    ``DQ_SESSION_URL``, else the sessions directory as it is now (Datus may move it when it
    loads its configuration)."""
    url = url or os.environ.get(SESSION_URL_ENV) or None
    key = f"url:{url}" if url else f"dir:{default_sessions_dir()}"
    with _shared_lock:
        manager = _shared.get(key)
        if manager is None:
            manager = _shared[key] = SessionManager(url) if url else SessionManager(sessions_dir=key[4:])
        return manager
