"""Sessions in Datus-agent's layout (one SQLite file per session) and in a shared database (one
SQLite file through a URL always; Postgres when DQ_TEST_POSTGRES_URL is set, each test in a
fresh schema dropped afterwards, since other tests share the database).

Datus's web UI reads session files with SQL of its own; `datus_web_ui_view` below does what it
does (written here from its description, not imported), so a file we write is checked the way
Datus will read it."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import pickle
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

from datus.models.base import LLMBaseModel
from datus.models.errors import ModelErrorCode
from datus.models.messages import ChatMessage, ToolCall
from datus.models.session_import import import_legacy_sessions
from datus.models.session_import import main as import_main
from datus.models.session_items import items_to_messages, messages_to_items
from datus.models.session_manager import (
    SESSION_URL_ENV,
    InvalidSessionIdError,
    Session,
    SessionInfo,
    SessionManager,
    SessionNotFoundError,
    SessionStoreError,
    shared_session_manager,
)
from datus.utils.exceptions import DatusException, ErrorCode

REPO = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get("DQ_TEST_POSTGRES_URL")

DATUS_INFO_KEYS = {
    "exists", "session_id", "db_path", "file_size", "file_modified", "created_at", "updated_at", "total_tokens",
    "message_count", "item_count", "latest_message_at", "latest_user_message", "latest_user_message_at",
}


def _pg(url: str) -> URL:
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+psycopg2") if parsed.drivername == "postgresql" else parsed


@dataclass
class Store:
    """Where a test's sessions live; ``spec`` tells a subprocess the same."""

    kind: str  # "files", "sqlite" or "postgres"
    where: str  # a directory, or a URL

    @property
    def spec(self) -> str:
        return f"{'dir' if self.kind == 'files' else 'url'}:{self.where}"

    def open(self) -> SessionManager:
        return SessionManager(sessions_dir=self.where) if self.kind == "files" else SessionManager(self.where)

    def raw_engine(self) -> Any:
        """A plain engine on the database of session ``s`` (files) or on the store."""
        if self.kind == "files":
            return create_engine(f"sqlite:///{Path(self.where) / 's.db'}")
        return create_engine(_pg(self.where) if self.kind == "postgres" else self.where)


OPEN_MANAGER = """
    def open_manager(spec):
        from datus.models.session_manager import SessionManager
        kind, _, where = spec.partition(":")
        return SessionManager(sessions_dir=where) if kind == "dir" else SessionManager(where)
"""


@pytest.fixture(params=["files", "sqlite", pytest.param("postgres", marks=pytest.mark.skipif(
    not PG_URL, reason="set DQ_TEST_POSTGRES_URL to run on Postgres"))])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "files":
        yield Store("files", str(tmp_path / "sessions"))
        return
    if request.param == "sqlite":
        yield Store("sqlite", f"sqlite:///{tmp_path / 'shared.db'}")
        return
    with _pg_schema() as url:
        yield Store("postgres", url)


@contextlib.contextmanager
def _pg_schema() -> Iterator[str]:
    """The Postgres test database, in a schema of its own dropped afterwards."""
    assert PG_URL is not None
    schema = f"dq_sessions_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(_pg(PG_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        # search_path in the URL, so subprocesses given only the URL land in the same schema
        yield make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture
def open_manager(store: Store) -> Iterator[Callable[[], SessionManager]]:
    managers: list[SessionManager] = []

    def open_() -> SessionManager:
        managers.append(store.open())
        return managers[-1]

    yield open_
    for manager in managers:
        manager.close()


@pytest.fixture
def manager(open_manager: Callable[[], SessionManager]) -> SessionManager:
    return open_manager()


@pytest.fixture
def files(tmp_path: Path) -> SessionManager:
    return SessionManager(sessions_dir=tmp_path / "sessions")


def _user(text_: str) -> ChatMessage:
    return ChatMessage(role="user", content=text_)


def _said(text_: str) -> ChatMessage:
    return ChatMessage(role="assistant", content=text_)


def _run_python(code: str, *args: str, wait: bool = True) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(OPEN_MANAGER) + textwrap.dedent(code), *args],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        _check(proc)
    return proc


def _check(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, f"subprocess failed:\n{out}\n{err}"
    return out


# A conversation with every shape a ChatMessage takes in this layer.
EVERY_SHAPE = [
    ChatMessage(role="system", content="You write SQL."),
    ChatMessage(role="user", content="How many orders? ✓ «ünïcode»", name="ann"),
    ChatMessage(  # Claude: thinking with its signature, a redacted block, text and two tool calls
        role="assistant", content="Let me look at the tables.",
        reasoning="I should look at the tables first.",
        reasoning_details=[{"type": "thinking", "thinking": "look at tables", "signature": "c2lnbmF0dXJl=="},
                           {"type": "redacted_thinking", "data": "ZW5jcnlwdGVk"}],
        tool_calls=[ToolCall(id="call_1", name="list_tables", arguments="{}"),
                    ToolCall(id="call_2", name="read_query", arguments='{"sql": "SELECT count(*) FROM orders"}')],
    ),
    ChatMessage(role="tool", content='{"success": 1, "error": null, "result": ["orders"]}', tool_call_id="call_1",
                name="list_tables"),
    ChatMessage(role="tool", content="query failed: no such table", tool_call_id="call_2", name="read_query"),
    ChatMessage(role="assistant", content="", tool_calls=[  # Gemini: only a call, with its thought signature
        ToolCall(id="call_3", name="read_query", arguments='{"sql": "SELECT count(*) FROM order_items"}')],
        reasoning_details=[{"type": "gemini_thought_signature", "signature": "Z2VtaW5p"}]),
    ChatMessage(role="tool", content="[[42]]", tool_call_id="call_3"),  # no name
    ChatMessage(role="tool", content="orphan", tool_call_id=None),
    ChatMessage(role="assistant", content="", reasoning="DeepSeek thinks, then answers."),  # reasoning only
    _said("There are 42 orders."),  # an assistant right after an assistant
    _said(""),  # and an empty one
    ChatMessage(role="assistant", tool_calls=[ToolCall(id="call_4", name="x")]),  # calls right after calls
    ChatMessage(role="assistant", tool_calls=[ToolCall(id="call_5", name="x")]),
    ChatMessage(role="assistant", reasoning=""),
    ChatMessage(role="assistant", reasoning="again", content="reasoning after reasoning"),
    _user("thanks"),
]


# ---------------------------------------------------------------- the interface


def test_create_list_exists_clear_delete(manager: SessionManager) -> None:
    first = manager.create_session("first")
    second = manager.create_session()
    assert isinstance(first, Session) and first.session_id == "first"
    assert second.session_id and second.session_id != "first"
    assert manager.get("first") == first and manager.get("nope") is None
    assert manager.get_session("first") == first  # Datus's name: get or create

    first.add_messages([_user("hello"), _said("hi")])
    time.sleep(0.01)  # a later modification time (files) / updated_at (shared)
    second.add_messages([_user("later")])
    assert manager.list_sessions() == [second.session_id, "first"]  # the ids, most recently updated first
    assert manager.session_exists("first") and not manager.session_exists("nope")

    assert manager.clear_session("first") is True
    assert first.get_messages() == [] and manager.get_session_info("first")["item_count"] == 0
    assert manager.session_exists("first")  # cleared, not deleted
    first.add_messages([_user("again")])
    assert [m.content for m in first.get_messages()] == ["again"]

    assert manager.delete_session("first") is True
    assert manager.get("first") is None and not manager.session_exists("first")
    assert manager.list_sessions() == [second.session_id]
    assert manager.delete_session("first") is False  # already gone: nothing to do
    second.clear()
    assert second.info().item_count == 0


def test_a_file_per_session_in_datus_layout(files: SessionManager) -> None:
    files.create_session("chat_session_1a2b3c4d").add_messages([_user("hi")])
    directory = Path(files.session_dir or "")
    path = directory / "chat_session_1a2b3c4d.db"
    with sqlite3.connect(path) as raw:
        tables = {name: sql for name, sql in raw.execute("SELECT name, sql FROM sqlite_master")}
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # see session_store: never WAL
        columns = [row[1] for row in raw.execute("PRAGMA table_info(agent_messages)")]
        assert columns == ["id", "session_id", "message_data", "created_at"]
        columns = [row[1] for row in raw.execute("PRAGMA table_info(agent_sessions)")]
        assert columns == ["session_id", "created_at", "updated_at", "total_tokens"]
    assert "idx_agent_messages_session_id" in tables and "AUTOINCREMENT" in tables["agent_messages"]
    files.delete_session("chat_session_1a2b3c4d")
    assert not path.exists() and sorted(p.name for p in directory.iterdir()) == [".sessions.lock"]


def test_create_is_idempotent(manager: SessionManager) -> None:
    manager.create_session("s").add_messages([_user("kept")])
    again = manager.create_session("s")
    assert again.get_messages() == [_user("kept")]
    assert manager.list_sessions() == ["s"]


def test_session_info_has_datus_keys(manager: SessionManager, store: Store) -> None:
    session = manager.create_session("s")
    empty = manager.get_session_info("s")
    assert set(empty) == DATUS_INFO_KEYS and empty["exists"] is True
    assert (empty["item_count"], empty["message_count"], empty["total_tokens"]) == (0, 0, 0)
    assert empty["latest_message_at"] is None and empty["latest_user_message"] is None
    time.sleep(0.01)
    session.add_messages([_user("first question"), _said("a1")], [12, 30])
    session.add_messages([_user("second question"), EVERY_SHAPE[2], EVERY_SHAPE[3], EVERY_SHAPE[4]], [15, 40, 5, 5])
    info = manager.get_session_info("s")
    assert set(info) == DATUS_INFO_KEYS
    # items as Datus counts them (the tool-calling turn is four: reasoning, text, two calls); messages as we do
    assert (info["item_count"], info["message_count"]) == (2 + 1 + 4 + 2, 6)
    assert info["total_tokens"] == 107 and info["latest_user_message"] == "second question"
    # times are SQLite's UTC text, as Datus's dict has them
    created, updated = datetime.fromisoformat(info["created_at"]), datetime.fromisoformat(info["updated_at"])
    latest, latest_user = (datetime.fromisoformat(info["latest_message_at"]),
                           datetime.fromisoformat(info["latest_user_message_at"]))
    assert created == datetime.fromisoformat(empty["created_at"]) and created < updated
    assert latest_user < latest <= updated
    if store.kind == "files":
        path = Path(store.where) / "s.db"
        assert info["db_path"] == str(path) and info["file_size"] == path.stat().st_size
        assert info["file_modified"] == path.stat().st_mtime
    else:  # no file: the store, and the last update as the modification time
        assert info["db_path"] == manager.url and info["file_size"] is None
        assert info["file_modified"] == updated.replace(tzinfo=UTC).timestamp()
    model = session.info()  # the typed form
    assert isinstance(model, SessionInfo) and model.created_at is not None and model.created_at.tzinfo is not None
    assert model.item_count == info["item_count"] and model.latest_user_message == "second question"


@pytest.mark.parametrize("session_id", ["s", "../etc/passwd", "a/b", "", "x" * 201])
def test_info_and_exists_of_an_unknown_or_impossible_id(manager: SessionManager, session_id: str) -> None:
    assert manager.session_exists(session_id) is False
    assert manager.get_session_info(session_id) == {"exists": False, "session_id": session_id}


def test_token_totals(manager: SessionManager, caplog: pytest.LogCaptureFixture) -> None:
    session = manager.create_session("s")
    session.add_messages([_user("q"), _said("a")], [3, 4])
    session.add_messages([_user("q2")])  # no counts: adds nothing
    assert manager.get_session_info("s")["total_tokens"] == 7
    manager.update_session_tokens("s", 1500)  # Datus's node stores its own running count
    assert manager.get_session_info("s")["total_tokens"] == 1500
    session.add_messages([_said("more")], [10])
    assert session.info().total_tokens == 1510
    manager.clear_session("s")
    assert session.info().total_tokens == 0
    with caplog.at_level(logging.WARNING, logger="datus.models.session_manager"):
        manager.update_session_tokens("ghost", 5)  # Datus logs and goes on
    assert "ghost" in caplog.text and not manager.session_exists("ghost")
    with pytest.raises(ValueError):
        manager.update_session_tokens("s", -1)


def test_every_message_shape_round_trips(open_manager: Callable[[], SessionManager]) -> None:
    writer = open_manager()
    writer.create_session("whole").add_messages(EVERY_SHAPE)
    piecewise = writer.create_session("piecewise")
    for message in EVERY_SHAPE:  # boundaries between appends too: each assistant stays its own message
        piecewise.add_messages([message])
    reader = open_manager()  # as another provider's worker would read it
    assert reader.create_session("whole").get_messages() == EVERY_SHAPE
    assert reader.create_session("piecewise").get_messages() == EVERY_SHAPE
    assert reader.create_session("whole").get_messages(limit=3) == EVERY_SHAPE[-3:]


def test_get_messages_limit(manager: SessionManager) -> None:
    session = manager.create_session("s")
    session.add_messages([_user(str(i)) for i in range(5)])
    assert [m.content for m in session.get_messages(limit=2)] == ["3", "4"]
    assert session.get_messages(limit=0) == []
    assert len(session.get_messages(limit=50)) == 5
    with pytest.raises(ValueError):
        session.get_messages(limit=-1)


def test_a_resumed_run_appends_once(manager: SessionManager) -> None:
    session = manager.create_session("s")
    session.add_messages([_user("earlier"), _said("reply")], [1, 1])
    run = [_user("q"), EVERY_SHAPE[2], EVERY_SHAPE[3], EVERY_SHAPE[4], _said("answer")]
    session.add_messages(run, [1] * 5, once_after=2)
    session.add_messages(run, [1] * 5, once_after=2)  # the same run, delivered again
    assert session.get_messages() == [_user("earlier"), _said("reply"), *run]
    assert session.info().total_tokens == 7  # counted once
    session.add_messages([_user("other")], once_after=2)  # not what follows the first 2: appended
    assert session.get_messages()[-1] == _user("other")


def test_the_openai_agents_session_methods(manager: SessionManager) -> None:
    session = manager.create_session("s")

    async def use() -> None:
        await session.add_items([{"role": "user", "content": "hi"},
                                 {"type": "message", "role": "assistant", "content": [
                                     {"type": "output_text", "text": "hello", "annotations": []}]}])
        assert await session.get_items(limit=1) == [{"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "hello", "annotations": []}]}]
        assert session.get_messages() == [_user("hi"), _said("hello")]
        assert (await session.pop_item())["type"] == "message"
        assert await session.get_items() == [{"role": "user", "content": "hi"}]
        await session.clear_session()
        assert await session.get_items() == [] and await session.pop_item() is None

    asyncio.run(use())


# ---------------------------------------------------------------- ids and errors


@pytest.mark.parametrize("bad", ["../escape", "a/b", "a\\b", "", "x" * 201, "new\nline", "sp ace", 123])
def test_session_ids_are_validated(files: SessionManager, tmp_path: Path, bad: Any) -> None:
    for call in (lambda: files.create_session(bad), lambda: files.delete_session(bad), lambda: files.clear_session(bad),
                 lambda: files.update_session_tokens(bad, 1)):
        with pytest.raises(InvalidSessionIdError) as caught:
            call()
        error = caught.value
        assert isinstance(error, ValueError) and isinstance(error, DatusException)
        assert error.code is ErrorCode.COMMON_FIELD_INVALID and "invalid session id" in str(error)
    assert [p.name for p in tmp_path.rglob("*.db")] == []  # nothing was written anywhere
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is InvalidSessionIdError and str(copy) == str(error)
    assert files.create_session("Ab-9_.x").session_id == "Ab-9_.x"  # the characters Datus's web UI allows


def test_unknown_session_is_a_clear_error(manager: SessionManager, store: Store) -> None:
    ghost = manager.create_session("ghost")
    manager.delete_session("ghost")
    for call in (ghost.info, ghost.get_messages, lambda: ghost.add_messages([_user("x")])):
        with pytest.raises(SessionNotFoundError) as caught:
            call()
        error = caught.value
        assert isinstance(error, KeyError) and isinstance(error, DatusException)
        assert error.code is ModelErrorCode.SESSION_NOT_FOUND and error.session_id == "ghost"
        assert str(error) == "session 'ghost' does not exist"
    assert manager.get("ghost") is None  # the failed append did not bring it back
    if store.kind == "files":
        assert not (Path(store.where) / "ghost.db").exists()
    assert manager.clear_session("ghost") is False  # Datus's: nothing to clear, a warning
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is SessionNotFoundError and copy.session_id == "ghost" and copy.code is error.code


def test_bad_append_stores_nothing(manager: SessionManager) -> None:
    session = manager.create_session("s")
    with pytest.raises(ValueError, match="2 messages but 1 token counts"):
        session.add_messages([_user("a"), _user("b")], [1])
    assert session.get_messages() == []


# ---------------------------------------------------------------- concurrency and other processes


def test_concurrent_threads_lose_nothing(open_manager: Callable[[], SessionManager]) -> None:
    manager = open_manager()
    manager.create_session("s")
    start = threading.Barrier(8)

    def append(worker: int) -> None:
        session = manager.create_session("s")
        start.wait()  # all eight append at once
        for i in range(40):
            session.add_messages([_user(f"{worker}:{i}")], [1])

    with ThreadPoolExecutor(max_workers=8) as pool:
        for done in [pool.submit(append, worker) for worker in range(8)]:
            done.result()  # re-raises what a thread raised
    contents = [m.content for m in open_manager().create_session("s").get_messages()]
    assert len(contents) == 320 and len(set(contents)) == 320
    for worker in range(8):  # each thread's appends appear in the order it made them
        assert [c for c in contents if c.startswith(f"{worker}:")] == [f"{worker}:{i}" for i in range(40)]
    assert manager.get_session_info("s")["total_tokens"] == 320


APPENDER = """
    import os, sys, time
    from datus.models.messages import ChatMessage, ToolCall
    spec, worker, go = sys.argv[1:]
    while not os.path.exists(go):  # start together, so creating the tables and the file races too
        time.sleep(0.002)
    session = open_manager(spec).create_session("shared")
    for i in range(40):
        session.add_messages([
            ChatMessage(role="user", content=f"{worker}:{i}"),
            ChatMessage(role="assistant", content="", tool_calls=[ToolCall(id=f"c{worker}{i}", name="t")]),
            ChatMessage(role="tool", content="r", tool_call_id=f"c{worker}{i}"),
            ChatMessage(role="assistant", content=f"{worker}:{i}:answer")], [1, 1, 1, 1])
"""


def test_concurrent_processes_lose_nothing(store: Store, tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = [_run_python(APPENDER, store.spec, str(worker), str(go), wait=False) for worker in range(4)]
    time.sleep(1.0)  # let them all import and wait at the line
    go.touch()
    for proc in procs:
        _check(proc)
    manager = store.open()
    messages = manager.create_session("shared").get_messages()
    assert len(messages) == 4 * 40 * 4 and manager.get_session_info("shared")["total_tokens"] == 640
    for index in range(0, len(messages), 4):  # each four-message append stayed together, in order
        question, call, result, answer = messages[index:index + 4]
        assert [m.role for m in messages[index:index + 4]] == ["user", "assistant", "tool", "assistant"]
        assert answer.content == f"{question.content}:answer" and result.tool_call_id == call.tool_calls[0].id
    for worker in range(4):
        assert [m.content for m in messages[::4] if m.content.startswith(f"{worker}:")] == [
            f"{worker}:{i}" for i in range(40)]
    # Datus's web UI orders by created_at: the same order as ours, every time distinct
    engine = store.raw_engine() if store.kind != "files" else create_engine(
        f"sqlite:///{Path(store.where) / 'shared.db'}")
    with engine.connect() as conn:
        by_time = conn.execute(text("SELECT id, created_at FROM agent_messages WHERE session_id = 'shared' "
                                    "ORDER BY created_at")).all()
    engine.dispose()
    assert [row[0] for row in by_time] == sorted(row[0] for row in by_time)
    assert len({row[1] for row in by_time}) == len(by_time)
    manager.close()


def test_another_process_clears_and_deletes(manager: SessionManager, store: Store) -> None:
    kept, gone = manager.create_session("kept"), manager.create_session("gone")
    kept.add_messages([_user("a")], [5])
    gone.add_messages([_user("b")])
    _run_python("""
        import sys
        from datus.models.messages import ChatMessage
        manager = open_manager(sys.argv[1])  # a fresh manager: nothing cached about these sessions
        assert manager.clear_session("kept") and manager.delete_session("gone")
        manager.create_session("theirs").add_messages([ChatMessage(role="user", content="c")])
        manager.update_session_tokens("theirs", 77)
    """, store.spec)
    assert kept.get_messages() == [] and kept.info().total_tokens == 0 and manager.get("gone") is None
    with pytest.raises(SessionNotFoundError):
        gone.add_messages([_user("too late")])
    assert manager.get_session_info("theirs")["total_tokens"] == 77
    assert manager.delete_session("theirs")  # and this process deletes what the other created
    assert manager.list_sessions() == ["kept"]


CHURN = """
    import os, sys, time
    from pathlib import Path
    from datus.models.messages import ChatMessage
    from datus.models.session_manager import SessionNotFoundError
    spec, role, flags = sys.argv[1:]
    flags = Path(flags)
    manager = open_manager(spec)
    while not (flags / "go").exists():
        time.sleep(0.002)
    if role == "delete":  # until both appenders are done
        deleted = 0
        while not ((flags / "done-a").exists() and (flags / "done-b").exists()):
            deleted += manager.delete_session("hot")
            time.sleep(0.001)
        print(deleted)
        sys.exit()
    appended = 0
    for i in range(100):
        try:
            manager.create_session("hot").add_messages([ChatMessage(role="user", content=f"{role}:{i}"),
                                                        ChatMessage(role="assistant", content=f"{role}:{i}:answer")])
            appended += 1
        except SessionNotFoundError:
            pass  # deleted between our create and our append: what any caller may meet
    (flags / f"done-{role}").touch()
    print(appended)
"""


def test_deletes_racing_creates_and_appends_leave_sound_files(files: SessionManager, tmp_path: Path) -> None:
    spec = f"dir:{files.session_dir}"
    procs = [_run_python(CHURN, spec, role, str(tmp_path), wait=False) for role in ("a", "b", "delete")]
    time.sleep(1.0)  # let them all import and wait at the line
    (tmp_path / "go").touch()
    appended = [int(_check(proc)) for proc in procs]
    assert appended[0] > 0 and appended[1] > 0 and appended[2] > 0  # some appends and some deletes happened
    directory = Path(files.session_dir or "")
    assert not list(directory.glob("*-journal")) and not list(directory.glob("*-wal"))
    if files.session_exists("hot"):
        with sqlite3.connect(directory / "hot.db") as raw:
            assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        messages = files.create_session("hot").get_messages()
        for question, answer in zip(messages[::2], messages[1::2], strict=True):  # no half append
            assert answer.content == f"{question.content}:answer"


def test_a_delete_waits_for_operations_in_progress(files: SessionManager) -> None:
    """No connection of ours may outlive the file it opened (session_store): a delete waits
    until operations that have the file open are done."""
    session = files.create_session("s")
    path = Path(files.session_dir or "") / "s.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # a foreign writer: the append below waits for it
    lock_file = path.parent / ".sessions.lock"

    def operation_in_progress() -> bool:  # someone holds the directory lock shared
        fd = os.open(lock_file, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    with ThreadPoolExecutor(max_workers=2) as pool:
        append = pool.submit(session.add_messages, [_user("in progress")])
        for _ in range(3000):  # until the append has the file open (and waits for the write lock)
            if operation_in_progress():
                break
            time.sleep(0.01)
        delete = pool.submit(files.delete_session, "s")
        time.sleep(0.2)
        assert not append.done() and not delete.done()  # the delete waits for the append
        holder.execute("COMMIT")
        holder.close()
        append.result(timeout=30)  # had the file gone from under it, this would fail: not found
        assert delete.result(timeout=30) is True
    assert not path.exists() and not files.session_exists("s")


def test_a_file_foreign_code_deletes_and_makes_again_under_a_write(files: SessionManager,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Datus's own code removes session files without our lock: a write of ours on the file it
    removed must land in the file made in its place, not in the removed one."""
    session = files.create_session("s")
    session.add_messages([_user("old")])
    path = Path(files.session_dir or "") / "s.db"
    real_connect = sqlite3.connect
    interfered: list[bool] = []

    def connect_then_interfere(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = real_connect(*args, **kwargs)
        if not interfered:  # the append's connection, open on the old file...
            interfered.append(True)
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            os.remove(path)  # ...when Datus's delete_session removes it, and Datus makes it again
            SessionManager(sessions_dir=files.session_dir).create_session("s").add_messages([_user("new")])
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect_then_interfere)
    session.add_messages([_said("after")])
    monkeypatch.undo()
    assert interfered and session.get_messages() == [_user("new"), _said("after")]


async def test_async_twins_do_not_block_the_loop(manager: SessionManager, store: Store) -> None:
    session = manager.create_session("s")
    holder = store.raw_engine()
    conn = holder.connect()
    # another writer holds the session (the file's write lock / the Postgres row lock)
    conn.execute(text("UPDATE agent_sessions SET total_tokens = total_tokens WHERE session_id = 's'"))
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    ticker = asyncio.create_task(tick())
    append = asyncio.create_task(session.aadd_messages([_user("hi")]))
    before = ticks
    for _ in range(20):  # the loop keeps ticking while the append waits for the lock
        await asyncio.sleep(0.01)
    assert ticks > before + 5 and not append.done()
    conn.commit()
    conn.close()
    holder.dispose()
    await asyncio.wait_for(append, timeout=30)
    ticker.cancel()
    assert await session.aget_messages() == [_user("hi")]


# ---------------------------------------------------------------- where sessions live


def test_default_location_is_datus_sessions_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a machine without Datus-agent first (where it is installed, its path manager would answer)
    monkeypatch.setitem(sys.modules, "datus.utils.path_manager", None)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(SESSION_URL_ENV, raising=False)
    SessionManager().create_session("s").add_messages([_user("hi")])  # Datus's web UI calls it so
    assert (tmp_path / ".datus" / "sessions" / "s.db").is_file()

    # where Datus-agent is installed, its path manager says where ({agent.home}/sessions); a
    # stand-in for its module here
    home = tmp_path / "agent_home"
    path_manager = types.ModuleType("datus.utils.path_manager")
    path_manager.get_path_manager = lambda: types.SimpleNamespace(sessions_dir=home / "sessions")  # type: ignore
    monkeypatch.setitem(sys.modules, "datus.utils.path_manager", path_manager)
    manager = SessionManager()
    assert manager.session_dir == str(home / "sessions") and manager.url is None
    manager.create_session("t")
    assert (home / "sessions" / "t.db").is_file()
    assert shared_session_manager().session_dir == str(home / "sessions")


def test_a_url_names_a_shared_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SESSION_URL_ENV, f"sqlite:///{tmp_path / 'env' / 'env.db'}")
    assert SessionManager().url.endswith("env/env.db") and SessionManager().session_dir is None
    assert SessionManager(f"sqlite:///{tmp_path / 'arg.db'}").url.endswith("arg.db")  # the argument wins
    assert SessionManager(sessions_dir=tmp_path / "d").session_dir == str(tmp_path / "d")  # so does a directory
    with pytest.raises(ValueError):
        SessionManager("sqlite:///x.db", sessions_dir=tmp_path)


@pytest.mark.parametrize("url", [
    "not a url", "nosuchdb://host/db", "sqlite://", "sqlite:///{tmp}/a_file/sessions.db",
    "postgresql://postgres:secret@127.0.0.1:1/nowhere",
])
def test_bad_url_is_a_clear_error(url: str, tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(SessionStoreError) as caught:
        SessionManager(url.format(tmp=tmp_path)).create_session("s")  # connecting is deferred
    assert caught.value.code is ErrorCode.COMMON_CONFIG_ERROR
    assert "secret" not in str(caught.value)
    assert "session store" in str(caught.value)


def test_a_sessions_dir_that_cannot_be_made_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(SessionStoreError, match="session store"):
        SessionManager(sessions_dir=tmp_path / "a_file" / "sessions").create_session("s")


def test_through_a_model_as_datus_calls_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # the default store: files in ~/.datus/sessions
    monkeypatch.setitem(sys.modules, "datus.utils.path_manager", None)  # as without Datus-agent (its home wins)
    monkeypatch.delenv(SESSION_URL_ENV, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-used")  # no request is made
    model = LLMBaseModel.create_model(None, "openai:gpt-4o-mini")
    assert model.session_manager is shared_session_manager()
    assert "chat_session_1" not in model.list_sessions() and not model.session_exists("chat_session_1")
    session = model.create_session("chat_session_1")  # agentic_node: self._session = model.create_session(id)
    session.add_messages([_user("hello"), _said("hi")], [4, 6])
    model.session_manager.update_session_tokens("chat_session_1", 321)  # agentic_node._add_session_tokens
    info = model.session_manager.get_session_info("chat_session_1")  # Datus's model tests
    assert info["exists"] is True and info["item_count"] > 0 and info["total_tokens"] == 321
    assert model.session_manager.session_exists("chat_session_1")
    assert (tmp_path / ".datus" / "sessions" / "chat_session_1.db").is_file()
    model.clear_session("chat_session_1")
    assert model.get_session_info("chat_session_1")["item_count"] == 0
    model.delete_session("chat_session_1")  # compaction, or the CLI's .clear
    assert model.list_sessions() == [] and not (tmp_path / ".datus" / "sessions" / "chat_session_1.db").exists()


# ---------------------------------------------------------------- the stored items, as Datus reads them


def test_items_are_openai_agents_responses_items() -> None:
    items = messages_to_items(EVERY_SHAPE[1:5])
    plain = [{key: value for key, value in item.items() if key != "datus"} for item in items]
    assert plain == [
        {"role": "user", "content": "How many orders? ✓ «ünïcode»"},
        {"type": "reasoning", "id": "__fake_id__",
         "summary": [{"type": "summary_text", "text": "I should look at the tables first."}]},
        {"type": "message", "id": "__fake_id__", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "Let me look at the tables.", "annotations": []}]},
        {"type": "function_call", "id": "__fake_id__", "call_id": "call_1", "name": "list_tables", "arguments": "{}"},
        {"type": "function_call", "id": "__fake_id__", "call_id": "call_2", "name": "read_query",
         "arguments": '{"sql": "SELECT count(*) FROM orders"}'},
        {"type": "function_call_output", "call_id": "call_1",
         "output": '{"success": 1, "error": null, "result": ["orders"]}'},
        {"type": "function_call_output", "call_id": "call_2", "output": "query failed: no such table"},
    ]
    # what the standard shape cannot hold rides in the one extra key
    assert items[0]["datus"] == {"fields": {"name": "ann"}}
    assert items[1]["datus"] == {"fields": {"reasoning_details": EVERY_SHAPE[2].reasoning_details}}
    assert items[5]["datus"] == {"fields": {"name": "list_tables"}}
    assert [item for item in messages_to_items(EVERY_SHAPE) if "new_message" in item.get("datus", {})] != []
    # an ordinary turn carries no extra key at all
    turn = [_user("q"), ChatMessage(role="assistant", tool_calls=[ToolCall(id="c", name="t")]),
            ChatMessage(role="tool", content="r", tool_call_id="c"), _said("a")]
    assert all("datus" not in item for item in messages_to_items(turn))


def test_items_written_by_openai_agents_are_read() -> None:
    """What Datus's own layer (openai-agents 0.3.2, chat-completions models) stored."""
    items = [
        {"content": "How many orders?", "role": "user"},
        {"id": "__fake_id__", "summary": [{"text": "think", "type": "summary_text"}], "type": "reasoning",
         "content": [{"text": "claude thinking", "type": "reasoning_text"}], "encrypted_content": "sig"},
        {"id": "__fake_id__", "content": [{"annotations": [], "text": "Looking.", "type": "output_text",
                                           "logprobs": []}], "role": "assistant", "status": "completed",
         "type": "message"},
        {"id": "__fake_id__", "call_id": "c1", "arguments": '{"sql": "SELECT 1"}', "name": "read_query",
         "type": "function_call"},
        {"call_id": "c1", "output": "{'success': 1, 'error': None, 'result': [[1]]}", "type": "function_call_output"},
        {"type": "web_search_call", "id": "ws", "status": "completed"},  # a hosted tool: skipped
        {"id": "__fake_id__", "content": [{"annotations": [], "text": "One.", "type": "output_text"}],
         "role": "assistant", "status": "completed", "type": "message"},
        {"role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
    ]
    assert items_to_messages(items) == [
        _user("How many orders?"),
        ChatMessage(role="assistant", content="Looking.", reasoning="think",
                    tool_calls=[ToolCall(id="c1", name="read_query", arguments='{"sql": "SELECT 1"}')]),
        ChatMessage(role="tool", content="{'success': 1, 'error': None, 'result': [[1]]}", tool_call_id="c1"),
        _said("One."),
        ChatMessage(role="system", content="Be brief."),
    ]


def datus_web_ui_view(sessions_dir: Path, session_id: str) -> list[dict[str, Any]]:
    """What Datus's web UI shows of a session: its SQL on ``{sessions_dir}/{id}.db`` and its
    reading of each item (cli/web/session_loader.py, get_session_messages), in brief."""
    view: list[dict[str, Any]] = []
    group: dict[str, Any] | None = None

    def open_group(created_at: str) -> dict[str, Any]:
        return group or {"role": "assistant", "content": "", "timestamp": created_at, "progress": [], "actions": []}

    with sqlite3.connect(sessions_dir / f"{session_id}.db") as conn:
        rows = conn.execute("SELECT message_data, created_at FROM agent_messages WHERE session_id = ? "
                            "ORDER BY created_at", (session_id,)).fetchall()
    for message_data, created_at in rows:
        item = json.loads(message_data)
        role, kind = item.get("role", ""), item.get("type", "")
        datetime.fromisoformat(created_at)  # the loader parses every item's time
        if role == "user":
            if group:
                view.append(group)
                group = None
            view.append({"role": "user", "content": item.get("content", "")})
        elif kind == "function_call":
            group = open_group(created_at)
            arguments = json.loads(item.get("arguments") or "{}")
            group["progress"].append(f"Tool call: {item.get('name', 'unknown')}")
            group["actions"].append({"tool": item.get("name"), "input": {"function_name": item.get("name"),
                                                                         **arguments}, "output": None})
        elif kind == "function_call_output":
            if group and group["actions"]:  # the loader fills the last action it made
                output = item.get("output", "")
                try:
                    parsed = ast.literal_eval(output)
                except (ValueError, SyntaxError):
                    try:
                        parsed = json.loads(output)
                    except json.JSONDecodeError:
                        parsed = {"result": output}
                group["actions"][-1]["output"] = parsed
        elif role == "assistant":
            for part in item.get("content", []):
                text_ = part.get("text", "") if isinstance(part, dict) else ""
                if not (isinstance(part, dict) and part.get("type") == "output_text" and text_):
                    continue
                if text_.strip().startswith("{"):
                    try:
                        final = json.loads(text_)
                    except json.JSONDecodeError:
                        final = {}
                    if "sql" in final and "output" in final:
                        group = open_group(created_at)
                        group.update(content=final["output"], sql=final["sql"])
                        view.append(group)
                        group = None
                        continue
                group = open_group(created_at)
                group["progress"].append(f"Thinking: {text_}")
    if group:
        group["content"] = group["content"] or "Processing completed"
        view.append(group)
    return view


def test_a_session_file_renders_in_datus_web_ui(files: SessionManager) -> None:
    session = files.create_session("chat_session_0f1e2d3c")
    session.add_messages([
        _user("How many orders?"),
        ChatMessage(role="assistant", content="Let me check.", reasoning="The orders table.",
                    reasoning_details=[{"type": "thinking", "thinking": "t", "signature": "s"}],
                    tool_calls=[ToolCall(id="c1", name="read_query", arguments='{"sql": "SELECT count(*) FROM o"}')]),
        ChatMessage(role="tool", tool_call_id="c1", name="read_query",
                    content='{"success": 1, "error": null, "result": {"original_rows": 1, "compressed_data": "42"}}'),
        _said('{"sql": "SELECT count(*) FROM o", "output": "There are 42 orders."}'),
    ])
    session.add_messages([_user("Thanks!"), _said("Glad to help.")])
    view = datus_web_ui_view(Path(files.session_dir or ""), "chat_session_0f1e2d3c")
    assert [(entry["role"], entry["content"]) for entry in view] == [
        ("user", "How many orders?"), ("assistant", "There are 42 orders."),
        ("user", "Thanks!"), ("assistant", "Processing completed")]
    answer = view[1]
    assert answer["sql"] == "SELECT count(*) FROM o"
    assert answer["progress"] == ["Thinking: Let me check.", "Tool call: read_query"]
    assert answer["actions"] == [{"tool": "read_query", "input": {"function_name": "read_query",
                                                                  "sql": "SELECT count(*) FROM o"},
                                  "output": {"success": 1, "error": None,
                                             "result": {"original_rows": 1, "compressed_data": "42"}}}]
    assert view[3]["progress"] == ["Thinking: Glad to help."]
    # the sidebar: list, info (created_at, message_count, latest_user_message), exists
    info = files.get_session_info("chat_session_0f1e2d3c")
    assert info["latest_user_message"] == "Thanks!" and info["message_count"] == 6 and info["created_at"]


def test_datus_own_sql_on_our_files(files: SessionManager) -> None:
    """Datus's SessionManager reads and writes the files with SQL of its own (session_exists,
    get_session_info, update_session_tokens): it works on ours, and we read what it wrote."""
    files.create_session("s").add_messages([_user("q"), _said("a")])
    path = Path(files.session_dir or "") / "s.db"
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM agent_messages WHERE session_id = ?", ("s",)).fetchone()[0] == 2
        created, _, total = conn.execute("SELECT created_at, updated_at, COALESCE(total_tokens, 0) as total_tokens "
                                         "FROM agent_sessions WHERE session_id = ?", ("s",)).fetchone()
        assert datetime.fromisoformat(created) and total == 0
        conn.execute("UPDATE agent_sessions SET total_tokens = ?, updated_at = CURRENT_TIMESTAMP "
                     "WHERE session_id = ?", (900, "s"))
    assert files.get_session_info("s")["total_tokens"] == 900


def test_a_file_datus_wrote_is_used_as_is(files: SessionManager) -> None:
    """A session file from Datus's own layer: openai-agents' schema (here from before Datus
    added total_tokens), WAL mode, second-resolution CURRENT_TIMESTAMP times."""
    directory = Path(files.session_dir or "")
    directory.mkdir(parents=True)
    with sqlite3.connect(directory / "old.db") as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE agent_sessions (session_id TEXT PRIMARY KEY, created_at TIMESTAMP DEFAULT "
                     "CURRENT_TIMESTAMP, updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP)")
        conn.execute("CREATE TABLE agent_messages (id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL, "
                     "message_data TEXT NOT NULL, created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP)")
        conn.execute("INSERT INTO agent_sessions (session_id) VALUES ('old')")
        for item in ({"content": "hi", "role": "user"},
                     {"id": "__fake_id__", "content": [{"annotations": [], "text": "hello", "type": "output_text"}],
                      "role": "assistant", "status": "completed", "type": "message"}):
            conn.execute("INSERT INTO agent_messages (session_id, message_data, created_at) "
                         "VALUES ('old', ?, '2099-01-01 00:00:00')", (json.dumps(item),))  # a clock ahead of ours
    assert files.session_exists("old") and files.list_sessions() == ["old"]
    session = files.create_session("old")
    assert session.get_messages() == [_user("hi"), _said("hello")]
    session.add_messages([_user("and now?")], [3])  # after the stored items, whatever the clocks say
    assert session.info().total_tokens == 3  # the column was added, as Datus adds it
    assert [m.content for m in session.get_messages()] == ["hi", "hello", "and now?"]
    assert datus_web_ui_view(directory, "old")[-1] == {"role": "user", "content": "and now?"}
    assert files.delete_session("old")
    assert sorted(p.name for p in directory.iterdir()) == [".sessions.lock"]  # no -wal / -shm left


# ---------------------------------------------------------------- the earlier store


LEGACY_SCHEMA = (
    ("CREATE TABLE sessions (id VARCHAR(255) PRIMARY KEY, created_at DATETIME NOT NULL, "
     "updated_at DATETIME NOT NULL, metadata JSON NOT NULL)"),
    ("CREATE TABLE session_messages (session_id VARCHAR(255) NOT NULL, seq INTEGER NOT NULL, role VARCHAR(16) "
     "NOT NULL, message JSON NOT NULL, token_count INTEGER NOT NULL, created_at DATETIME NOT NULL, "
     "PRIMARY KEY (session_id, seq))"),
)


def test_sessions_of_the_earlier_store_are_imported_once(tmp_path: Path) -> None:
    sessions_dir = tmp_path / "sessions"
    sessions_dir.mkdir()
    legacy = sessions_dir / "sessions.db"  # where the earlier store kept them by default
    with sqlite3.connect(legacy) as conn:
        for statement in LEGACY_SCHEMA:
            conn.execute(statement)
        for number, session_id in enumerate(["analyst-1", "bad/id", "kept"]):
            conn.execute("INSERT INTO sessions VALUES (?, ?, ?, '{}')", (session_id, f"2025-01-0{number + 1}",
                                                                         f"2025-01-0{number + 1}"))
        for seq, message in enumerate(EVERY_SHAPE[1:6], start=1):
            conn.execute("INSERT INTO session_messages VALUES ('analyst-1', ?, ?, ?, ?, '2025-01-01')",
                         (seq, message.role, message.model_dump_json(exclude_defaults=True), seq * 10))
    target = SessionManager(sessions_dir=sessions_dir)
    target.create_session("kept").add_messages([_user("already here")])
    report = import_legacy_sessions(target, f"sqlite:///{legacy}")
    assert (report.imported, report.already_there, report.invalid_ids) == (["analyst-1"], ["kept"], ["bad/id"])
    assert target.create_session("analyst-1").get_messages() == EVERY_SHAPE[1:6]
    assert target.get_session_info("analyst-1")["total_tokens"] == 150
    assert target.create_session("kept").get_messages() == [_user("already here")]
    assert not legacy.exists() and report.retired_file == sessions_dir / "sessions.db.imported"
    assert "sessions" not in target.list_sessions()
    # run again (the command line): nothing left to import
    assert import_main(["--source", f"sqlite:///{legacy}", "--sessions-dir", str(sessions_dir)]) == 0
    assert sorted(target.list_sessions()) == ["analyst-1", "kept"]


@pytest.mark.skipif(not PG_URL, reason="set DQ_TEST_POSTGRES_URL to run on Postgres")
def test_sessions_of_the_earlier_store_in_postgres_are_imported_next_to_it() -> None:
    """A fleet's earlier store (DQ_SESSION_URL on Postgres): the new tables go next to the old
    ones in the same database, which are left alone."""
    with _pg_schema() as url:
        engine = create_engine(_pg(url))
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE sessions (id VARCHAR(255) PRIMARY KEY, created_at TIMESTAMPTZ NOT "
                                 "NULL, updated_at TIMESTAMPTZ NOT NULL, metadata JSON NOT NULL)")
            conn.exec_driver_sql("CREATE TABLE session_messages (session_id VARCHAR(255) NOT NULL, seq INTEGER NOT "
                                 "NULL, role VARCHAR(16) NOT NULL, message JSON NOT NULL, token_count INTEGER NOT "
                                 "NULL, created_at TIMESTAMPTZ NOT NULL, PRIMARY KEY (session_id, seq))")
            conn.execute(text("INSERT INTO sessions VALUES ('job-7', now(), now(), '{}')"))
            for seq, message in enumerate(EVERY_SHAPE[:5], start=1):
                conn.execute(text("INSERT INTO session_messages VALUES ('job-7', :seq, :role, :message, 2, now())"),
                             {"seq": seq, "role": message.role, "message": message.model_dump_json()})
        target = SessionManager(url)
        report = import_legacy_sessions(target, url)
        assert report.imported == ["job-7"] and report.retired_file is None
        assert target.create_session("job-7").get_messages() == EVERY_SHAPE[:5]
        assert target.get_session_info("job-7")["total_tokens"] == 10
        assert import_legacy_sessions(target, url).already_there == ["job-7"]  # again: nothing twice
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM session_messages").scalar() == 5  # left alone
        target.close()
        engine.dispose()
