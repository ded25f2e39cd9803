"""Sessions on a real SQLite file always, and on Postgres when DQ_TEST_POSTGRES_URL is set (each
Postgres test gets a fresh schema, dropped afterwards, since other tests share the database)."""

from __future__ import annotations

import asyncio
import os
import pickle
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

from datus.models.base import LLMBaseModel
from datus.models.errors import ModelErrorCode
from datus.models.messages import ChatMessage, ToolCall
from datus.models.session_manager import (
    SESSION_URL_ENV,
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


def _pg(url: str) -> URL:
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+psycopg2") if parsed.drivername == "postgresql" else parsed


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.skipif(
    not PG_URL, reason="set DQ_TEST_POSTGRES_URL to run on Postgres"))])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sessions.db'}"
        return
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
def open_manager(store_url: str) -> Iterator[Callable[[], SessionManager]]:
    managers: list[SessionManager] = []

    def open_() -> SessionManager:
        managers.append(SessionManager(store_url))
        return managers[-1]

    yield open_
    for manager in managers:
        manager.close()


@pytest.fixture
def manager(open_manager: Callable[[], SessionManager]) -> SessionManager:
    return open_manager()


def _user(text_: str) -> ChatMessage:
    return ChatMessage(role="user", content=text_)


def _run_python(code: str, *args: str, wait: bool = True) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        _check(proc)
    return proc


def _check(proc: subprocess.Popen[str]) -> None:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"subprocess failed:\n{out}\n{err}"


def test_create_get_list_clear_delete(manager: SessionManager) -> None:
    first = manager.create_session("first", metadata={"user": "ann"})
    second = manager.create_session()
    assert isinstance(first, Session) and first.session_id == "first"
    assert second.session_id and second.session_id != "first"
    assert manager.get("first") == first and manager.get_session(second.session_id) == second
    assert manager.get("nope") is None

    first.add_messages([_user("hello"), ChatMessage(role="assistant", content="hi")])
    second.add_messages([_user("later")])
    assert manager.list_sessions() == [second.session_id, "first"]  # the ids, most recently updated first
    assert "first" in manager.list_sessions() and "nope" not in manager.list_sessions()
    assert manager.get_session_info("first")["metadata"] == {"user": "ann"}

    manager.clear_session("first")
    assert first.get_messages() == [] and manager.get_session_info("first")["message_count"] == 0
    assert manager.get("first") is not None  # cleared, not deleted
    first.add_messages([_user("again")])
    assert [m.content for m in first.get_messages()] == ["again"]

    manager.delete_session("first")
    assert manager.get("first") is None
    assert manager.list_sessions() == [second.session_id]
    second.clear()
    assert second.info().message_count == 0


def test_create_is_idempotent(manager: SessionManager) -> None:
    manager.create_session("s", metadata={"v": 1}).add_messages([_user("kept")])
    again = manager.create_session("s", metadata={"v": 2})
    assert again.get_messages() == [_user("kept")]
    assert again.info().metadata == {"v": 1}
    assert manager.list_sessions() == ["s"]


def test_session_info(manager: SessionManager) -> None:
    session = manager.create_session("s")
    empty = session.info()
    assert (empty.message_count, empty.total_tokens, empty.last_user_message) == (0, 0, None)
    time.sleep(0.01)
    session.add_messages([_user("first question"), ChatMessage(role="assistant", content="a1")], [12, 30])
    session.add_messages([_user("second question"), ChatMessage(role="assistant", content="a2")], [15, 40])
    session.add_messages([ChatMessage(role="tool", content="r", tool_call_id="c")])  # no counts: 0
    info = session.info()
    assert isinstance(info, SessionInfo) and info.message_count == 5 and info.total_tokens == 97
    assert info.last_user_message == "second question"
    assert info.created_at == empty.created_at and info.updated_at > empty.updated_at
    assert info.created_at.tzinfo is not None and info.updated_at.tzinfo is not None
    # upstream Datus's dict: "exists" and the same fields
    assert manager.get_session_info("s") == {"exists": True, **info.model_dump()}
    assert set(manager.get_session_info("s")) == {"exists", "session_id", "created_at", "updated_at",
                                                  "message_count", "total_tokens", "last_user_message", "metadata"}


def test_session_exists_and_info_of_an_unknown_id(manager: SessionManager) -> None:
    assert manager.session_exists("s") is False
    assert manager.get_session_info("s") == {"exists": False, "session_id": "s"}
    manager.create_session("s", metadata={"user": "ann"})
    assert manager.session_exists("s") is True
    info = manager.get_session_info("s")
    assert (info["exists"], info["session_id"], info["message_count"], info["metadata"]) == (
        True, "s", 0, {"user": "ann"})
    manager.delete_session("s")
    assert manager.session_exists("s") is False and manager.get_session_info("s")["exists"] is False
    assert manager.list_sessions() == []


def test_through_a_model_as_datus_users_call_it(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SESSION_URL_ENV, store_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-used")  # no request is made
    model = LLMBaseModel.create_model(None, "openai:gpt-4o-mini")
    try:
        assert "user_123" not in model.list_sessions() and not model.session_exists("user_123")
        assert model.get_session_info("user_123") == {"exists": False, "session_id": "user_123"}
        model.create_session("user_123").add_messages([_user("hello"), ChatMessage(role="assistant", content="hi")])
        model.create_session("user_456")
        assert "user_123" in model.list_sessions() and model.session_exists("user_123")
        assert model.list_sessions() == ["user_456", "user_123"]  # most recently updated first
        info = model.get_session_info("user_123")
        assert info["exists"] is True and info["session_id"] == "user_123" and info["message_count"] == 2
        assert info["last_user_message"] == "hello" and info["created_at"] <= info["updated_at"]
        model.clear_session("user_123")
        assert model.get_session_info("user_123")["message_count"] == 0
        model.delete_session("user_123")
        assert model.list_sessions() == ["user_456"] and not model.session_exists("user_123")
    finally:
        shared_session_manager(store_url).close()  # before the Postgres schema is dropped


def test_messages_round_trip_across_managers(open_manager: Callable[[], SessionManager]) -> None:
    conversation = [
        ChatMessage(role="system", content="You write SQL."),
        _user("How many orders?"),
        ChatMessage(
            role="assistant", content="",
            reasoning="I should look at the tables first.",
            reasoning_details=[{"type": "thinking", "thinking": "look at tables", "signature": "c2lnbmF0dXJl=="}],
            tool_calls=[ToolCall(id="call_1", name="list_tables", arguments="{}"),
                        ToolCall(id="call_2", name="read_query", arguments='{"sql": "SELECT count(*) FROM orders"}')],
        ),
        ChatMessage(role="tool", content='["orders"]', tool_call_id="call_1", name="list_tables"),
        ChatMessage(role="tool", content="[[42]]", tool_call_id="call_2", name="read_query"),
        ChatMessage(role="assistant", content="There are 42 orders. ✓ «ünïcode»"),
    ]
    open_manager().create_session("s").add_messages(conversation)
    # a different manager (as another provider's worker would have) reads exactly what was written
    assert open_manager().get("s").get_messages() == conversation


def test_get_messages_limit(manager: SessionManager) -> None:
    session = manager.create_session("s")
    session.add_messages([_user(str(i)) for i in range(5)])
    assert [m.content for m in session.get_messages(limit=2)] == ["3", "4"]
    assert session.get_messages(limit=0) == []
    assert len(session.get_messages(limit=50)) == 5
    with pytest.raises(ValueError):
        session.get_messages(limit=-1)


def test_unknown_session_is_a_clear_error(manager: SessionManager) -> None:
    ghost = manager.create_session("ghost")
    manager.delete_session("ghost")
    calls = [
        lambda: manager.clear_session("ghost"), lambda: manager.delete_session("ghost"),
        ghost.info, ghost.get_messages, lambda: ghost.add_messages([_user("x")]),
    ]
    for call in calls:
        with pytest.raises(SessionNotFoundError) as caught:
            call()
        error = caught.value
        assert isinstance(error, KeyError) and isinstance(error, DatusException)
        assert error.code is ModelErrorCode.SESSION_NOT_FOUND and error.session_id == "ghost"
        assert str(error) == "session 'ghost' does not exist"
    assert manager.get("ghost") is None  # the failed append did not bring it back
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is SessionNotFoundError and copy.session_id == "ghost" and copy.code is error.code


def test_bad_append_stores_nothing(manager: SessionManager) -> None:
    session = manager.create_session("s")
    with pytest.raises(ValueError, match="2 messages but 1 token counts"):
        session.add_messages([_user("a"), _user("b")], [1])
    with pytest.raises(ValueError):
        manager.create_session("")
    assert session.get_messages() == []


def test_concurrent_threads_lose_nothing(open_manager: Callable[[], SessionManager]) -> None:
    manager = open_manager()
    manager.create_session("s")
    start = threading.Barrier(8)

    def append(worker: int) -> None:
        session = manager.get("s")
        start.wait()  # all eight append at once
        for i in range(50):
            session.add_messages([_user(f"{worker}:{i}")], [1])

    with ThreadPoolExecutor(max_workers=8) as pool:
        for done in [pool.submit(append, worker) for worker in range(8)]:
            done.result()  # re-raises what a thread raised
    contents = [m.content for m in open_manager().get("s").get_messages()]
    assert len(contents) == 400 and len(set(contents)) == 400
    for worker in range(8):  # each thread's appends appear in the order it made them
        assert [c for c in contents if c.startswith(f"{worker}:")] == [f"{worker}:{i}" for i in range(50)]
    assert manager.get_session_info("s")["total_tokens"] == 400


APPENDER = """
    import os, sys, time
    url, worker, go = sys.argv[1:]
    from datus.models.session_manager import SessionManager
    from datus.models.messages import ChatMessage
    while not os.path.exists(go):  # start together, so creating the tables races too
        time.sleep(0.002)
    session = SessionManager(url).create_session("shared")
    for i in range(50):
        session.add_messages([ChatMessage(role="user", content=f"{worker}:{i}"),
                              ChatMessage(role="assistant", content=f"{worker}:{i}:answer")], [1, 2])
"""


def test_concurrent_processes_lose_nothing(store_url: str, tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = [_run_python(APPENDER, store_url, str(worker), str(go), wait=False) for worker in range(4)]
    time.sleep(1.0)  # let them all import and wait at the line
    go.touch()
    for proc in procs:
        _check(proc)
    manager = SessionManager(store_url)
    contents = [m.content for m in manager.get("shared").get_messages()]
    manager.close()
    assert len(contents) == 400
    for index in range(0, 400, 2):  # each two-message append stayed together
        assert contents[index + 1] == f"{contents[index]}:answer"
    for worker in range(4):
        assert [c for c in contents[::2] if c.startswith(f"{worker}:")] == [f"{worker}:{i}" for i in range(50)]


def test_another_process_clears_and_deletes(manager: SessionManager, store_url: str) -> None:
    kept, gone = manager.create_session("kept"), manager.create_session("gone")
    kept.add_messages([_user("a")])
    gone.add_messages([_user("b")])
    _run_python("""
        import sys
        from datus.models.session_manager import SessionManager
        from datus.models.messages import ChatMessage
        manager = SessionManager(sys.argv[1])
        manager.clear_session("kept")
        manager.delete_session("gone")
        manager.create_session("theirs").add_messages([ChatMessage(role="user", content="c")])
    """, store_url)
    assert kept.get_messages() == [] and manager.get("gone") is None
    with pytest.raises(SessionNotFoundError):
        gone.add_messages([_user("too late")])
    manager.delete_session("theirs")  # and this process deletes what the other created
    assert manager.list_sessions() == ["kept"]


async def test_async_twins_do_not_block_the_loop(manager: SessionManager, store_url: str) -> None:
    session = manager.create_session("s")
    holder = create_engine(_pg(store_url) if store_url.startswith("postgresql") else store_url)
    conn = holder.connect()
    # another writer holds the session (Postgres row lock / SQLite write lock)
    conn.execute(text("UPDATE sessions SET updated_at = updated_at WHERE id = 's'"))
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    append = asyncio.create_task(session.aadd_messages([_user("hi")], [3]))
    await asyncio.sleep(0)  # the append starts
    seen = ticks
    while ticks < seen + 10:  # a blocking append would stop the ticker until the lock went
        await asyncio.sleep(0.01)
    assert not append.done()  # still waiting on the lock, while the loop runs on
    conn.commit()
    conn.close()
    holder.dispose()
    await asyncio.wait_for(append, timeout=20)
    ticker.cancel()
    assert await session.aget_messages() == [_user("hi")]


def test_default_path_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(SESSION_URL_ENV, raising=False)
    manager = SessionManager()
    manager.create_session("s").add_messages([_user("hi")])
    manager.close()
    default = tmp_path / ".datus" / "sessions" / "sessions.db"
    assert default.exists()
    with sqlite3.connect(default) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT count(*) FROM session_messages").fetchone()[0] == 1

    monkeypatch.setenv(SESSION_URL_ENV, f"sqlite:///{tmp_path / 'env' / 'env.db'}")
    assert SessionManager().url.endswith("env/env.db")
    assert SessionManager(f"sqlite:///{tmp_path / 'arg.db'}").url.endswith("arg.db")  # the argument wins


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
