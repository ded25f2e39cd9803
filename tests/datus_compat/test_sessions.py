"""Datus's sessions: made and dropped through the model by its agentic nodes (CP-8, CP-11),
listed by its web UI through ``SessionManager()`` (CP-13) and read by the web UI straight from
the session files with SQL of its own (CP-14). Each test names the Datus file:line it
mirrors; the runs go over HTTP to the fake provider server."""

from __future__ import annotations

import ast
import asyncio
import json
import re
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from datus.models.base import LLMBaseModel
from datus.models.scripted import Reply
from datus.models.scripted import ScriptedToolCall as Call
from datus.models.session_manager import SessionManager
from datus.schemas.action_history import ActionHistory
from datus.testing.fake_server import FakeProviderServer
from tests.datus_compat.datus_tools import CITY_SQL, DatusDBTools, node_manager, node_tokens

PROVIDERS = ["deepseek", "anthropic", "gemini-2.5"]
QUESTION = "How many customers per city?"
ANSWER = json.dumps({"sql": CITY_SQL, "output": "Berlin and Lisbon have 15 customers each."})
# agentic_node.py:248-254
SUMMARIZATION_PROMPT = ("Summarize our conversation up to this point. The summary should be a concise yet "
                        "comprehensive overview of all key topics, questions, answers, and important details discussed.")


def sql_exchange(answer: str = ANSWER) -> list[Reply]:
    """read_query (with a reasoning text, which the stored items carry too), then the answer."""
    return [
        Reply(text="Counting per city.", reasoning="The customers table has a city column.",
              tool_calls=[Call("read_query", {"sql": CITY_SQL}, id="call_1")], input_tokens=100, output_tokens=10),
        Reply(text=answer, input_tokens=200, output_tokens=20),
    ]


async def achat_turn(model: LLMBaseModel, session: Any, prompt: str, tools: DatusDBTools,
                     manager: Any = None) -> list[ActionHistory]:
    """One agentic node turn (chat_agentic_node.py:617-626) on the node's manager."""
    manager = node_manager(prompt, manager)
    steps = [action async for action in model.generate_with_tools_stream(
        prompt=prompt, tools=tools.available_tools(), mcp_servers={}, instruction="You are Datus.",
        max_turns=30, session=session, action_history_manager=manager, hooks=None)]
    assert node_tokens(manager) > 0
    return steps


def chat_turn(model: LLMBaseModel, session: Any, prompt: str, tools: DatusDBTools,
              manager: Any = None) -> list[ActionHistory]:
    """A CLI chat turn: the node's stream under asyncio.run (chat_commands.py:277)."""
    return asyncio.run(achat_turn(model, session, prompt, tools, manager))


def sent(body: dict[str, Any]) -> tuple[Any, Any]:
    """(temperature, max output tokens) of a request, in any wire format."""
    if "generationConfig" in body:
        config = body["generationConfig"]
        return config.get("temperature"), config.get("maxOutputTokens")
    return body.get("temperature"), body.get("max_tokens", body.get("max_completion_tokens"))


# ---------------------------------------------------------------- CP-8: compaction


@pytest.mark.parametrize("name", PROVIDERS)
async def test_compaction_summarizes_the_session_then_deletes_it(datus_config: Any, server: FakeProviderServer,
                                                                  db_tools: DatusDBTools, name: str) -> None:
    """agentic_node.py:257-290 (CP-8): generate_with_tools(prompt=str, session=..., max_turns=1,
    temperature=0.3, max_tokens=2000) with no tools; reads result.get("content", "") and
    result.get("usage", {}).get("output_tokens", 0); then model.delete_session(old id)."""
    model = LLMBaseModel.create_model(datus_config, name)
    session_id = "chat_session_5e6f7a8b"
    session = model.create_session(session_id)
    server.script.add(*sql_exchange())
    await achat_turn(model, session, QUESTION, db_tools)  # the conversation to compact

    server.script.add(Reply(text="We counted customers per city: 15 in Berlin, 15 in Lisbon.", output_tokens=17))
    result = await model.generate_with_tools(prompt=SUMMARIZATION_PROMPT, session=session, max_turns=1,
                                             temperature=0.3, max_tokens=2000)
    summary = result.get("content", "")
    summary_token = result.get("usage", {}).get("output_tokens", 0)
    assert summary == "We counted customers per city: 15 in Berlin, 15 in Lisbon." and summary_token == 17
    assert isinstance(summary_token, int)
    request = server.requests[-1].body
    assert sent(request) == (0.3, 2000)
    assert QUESTION in json.dumps(request) and "Berlin,15" in json.dumps(request)  # the session's history went along

    model.delete_session(session_id)
    assert not model.session_manager.session_exists(session_id)
    assert session_id not in model.session_manager.list_sessions()
    if model.session_manager.session_dir is not None:  # a file per session (in-process; not the fleet's store)
        assert not (Path(model.session_manager.session_dir) / f"{session_id}.db").exists()
    model.delete_session(session_id)  # again (agentic_node.py:585 after a compaction): nothing to do


# ---------------------------------------------------------------- CP-11: the lifecycle through the model


@pytest.mark.parametrize("name", ["deepseek", "anthropic"])
def test_session_lifecycle_through_the_model(datus_config: Any, server: FakeProviderServer, db_tools: DatusDBTools,
                                             name: str) -> None:
    """agentic_node.py:179-181 create_session(id) passed as session=; :226-227
    session_manager.update_session_tokens(id, n) (guarded by hasattr); Datus's model tests read
    session_manager.get_session_info(id)["exists"] / ["item_count"] > 0 and session_exists(id)
    (test_deepseek_model.py:378-379, :439); :577 clear_session, :585 delete_session. Each
    agentic node has a model object of its own (CP-1): another one sees the same session."""
    model = LLMBaseModel.create_model(datus_config, name)
    session_id = "chat_session_0a1b2c3d"
    session = model.create_session(session_id)
    server.script.add(*sql_exchange())
    manager = node_manager(QUESTION)
    chat_turn(model, session, QUESTION, db_tools, manager)

    assert hasattr(model, "session_manager")
    tokens = node_tokens(manager)  # what _add_session_tokens got (chat_agentic_node.py:449-468)
    model.session_manager.update_session_tokens(session_id, tokens)
    info = model.session_manager.get_session_info(session_id)
    assert info["exists"] is True and info["item_count"] > 0 and info["total_tokens"] == tokens == 330
    assert model.session_manager.session_exists(session_id)
    other_node_model = LLMBaseModel.create_model(datus_config, name)
    assert other_node_model.session_manager.get_session_info(session_id)["total_tokens"] == 330

    model.clear_session(session_id)
    cleared = model.session_manager.get_session_info(session_id)
    assert cleared["exists"] is True and cleared["item_count"] == 0
    server.script.add(Reply(text="Starting afresh."))
    chat_turn(model, session, "Hello again", db_tools)
    assert QUESTION not in json.dumps(server.requests[-1].body)  # nothing of the cleared history was sent

    model.delete_session(session_id)
    assert not model.session_manager.session_exists(session_id)
    assert model.session_manager.get_session_info(session_id)["exists"] is False


# ---------------------------------------------------------------- CP-13: the web UI's SessionManager()


def test_web_ui_session_list(datus_config: Any, server: FakeProviderServer, db_tools: DatusDBTools) -> None:
    """cli/web/chatbot.py:63 SessionManager() made at app start; :261-276 list_sessions() (ids),
    get_session_info(sid) kept if info.get("exists"), sorted by info.get("file_modified", 0);
    ui_components.py:58-68 reads info["session_id"], .get("created_at"), .get("message_count", 0),
    .get("latest_user_message", ""); :433 session_exists(sid) before loading one."""
    web_ui = SessionManager()  # before any session exists: what is made later is listed too
    model = LLMBaseModel.create_model(datus_config)
    for session_id, question in (("chat_session_11111111", QUESTION), ("gen_sql_session_22222222", "Orders?")):
        server.script.add(*sql_exchange())
        chat_turn(model, model.create_session(session_id), question, db_tools)

    for manager in (web_ui, SessionManager()):
        sessions = manager.list_sessions()
        assert sorted(sessions) == ["chat_session_11111111", "gen_sql_session_22222222"]
        assert all(isinstance(sid, str) for sid in sessions)
        infos = [info for info in (manager.get_session_info(sid) for sid in sessions) if info.get("exists")]
        infos.sort(key=lambda x: x.get("file_modified", 0), reverse=True)
        by_id = {info["session_id"]: info for info in infos}
        chat = by_id["chat_session_11111111"]
        assert chat["session_id"][:8] == "chat_ses" and datetime.fromisoformat(chat["created_at"])
        assert chat["message_count"] > 0 and chat.get("latest_user_message", "")[:50] == QUESTION
        assert by_id["gen_sql_session_22222222"]["latest_user_message"] == "Orders?"
        assert isinstance(chat["file_modified"], float)
        assert manager.session_exists("chat_session_11111111")
        assert not manager.session_exists("no_such_session") and not manager.session_exists("../etc/passwd")


# ---------------------------------------------------------------- CP-14: the web UI reads the files itself


def web_ui_session_messages(sessions_dir: Path, session_id: str) -> list[dict[str, Any]]:
    """What cli/web/session_loader.py:31-247 makes of a session file: its own SQL on
    ``{sessions_dir}/{id}.db``; user items; an assistant group gathering tool calls
    (``function_call`` → an action with ``{"function_name": name, **json.loads(arguments)}``),
    their outputs (``ast.literal_eval``, then ``json.loads``, else ``{"result": text}``) and
    ``output_text`` parts — one that is JSON with "sql" and "output" ends the group as the
    answer, others are thinking; a group that never got one ends as "Processing completed"."""
    if not re.match(r"^[A-Za-z0-9_.-]+$", session_id):
        return []
    path = sessions_dir / f"{session_id}.db"
    if not path.exists():
        return []
    messages: list[dict[str, Any]] = []
    group: dict[str, Any] | None = None

    def assistant_group(created_at: str) -> dict[str, Any]:
        nonlocal group
        if group is None:
            group = {"role": "assistant", "content": "", "timestamp": created_at, "progress": [], "actions": []}
        return group

    def flush() -> None:
        nonlocal group
        if group is not None:
            messages.append(group)
            group = None

    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT message_data, created_at FROM agent_messages WHERE session_id = ? "
                            "ORDER BY created_at", (session_id,)).fetchall()
    for message_data, created_at in rows:
        item = json.loads(message_data)
        when = datetime.fromisoformat(created_at)  # the loader stamps its actions with these
        if item.get("role") == "user":
            flush()
            messages.append({"role": "user", "content": item.get("content", ""), "timestamp": created_at})
        elif item.get("type") == "function_call":
            arguments = json.loads(item.get("arguments") or "{}")
            current = assistant_group(created_at)
            current["progress"].append(f"Tool call: {item.get('name')}({str(arguments)[:60]})")
            current["actions"].append({"function_name": item.get("name"), "input": {
                "function_name": item.get("name"), **arguments}, "output": None, "start_time": when})
        elif item.get("type") == "function_call_output":
            if group is not None and group["actions"]:
                text = item.get("output", "")
                try:
                    output = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    try:
                        output = json.loads(text)
                    except json.JSONDecodeError:
                        output = {"result": text}
                group["actions"][-1].update(output=output, end_time=when)
        elif item.get("role") == "assistant":
            for part in item.get("content", []):
                text = part.get("text", "") if isinstance(part, dict) else ""
                if not (isinstance(part, dict) and part.get("type") == "output_text" and text):
                    continue
                if text.strip().startswith("{"):
                    try:
                        final = json.loads(text)
                    except json.JSONDecodeError:
                        final = {}
                    if "sql" in final and "output" in final:
                        assistant_group(created_at).update(content=final["output"], sql=final["sql"])
                        flush()
                        continue
                assistant_group(created_at)["progress"].append(f"Thinking: {text}")
    if group is not None:
        group["content"] = group["content"] or "Processing completed"
        flush()
    return messages


@pytest.mark.in_process_only("the per-session files of ~/.datus/sessions; a queue model's sessions are in the fleet's shared store")
@pytest.mark.parametrize("name", PROVIDERS)
def test_web_ui_renders_a_tool_runs_session(datus_config: Any, server: FakeProviderServer, db_tools: DatusDBTools,
                                            name: str) -> None:
    """cli/web/session_loader.py:31-247 (CP-14) on the files the model layer wrote for two chat
    turns with tool calls: the path from the sessions directory (get_path_manager().sessions_dir,
    the one SessionManager() uses), the read_query call and its result as a dict, the JSON answer
    as the assistant's content and SQL, a plain answer as "Processing completed"."""
    model = LLMBaseModel.create_model(datus_config, name)
    session_id = "chat_session_9c8d7e6f"
    session = model.create_session(session_id)
    server.script.add(*sql_exchange())
    chat_turn(model, session, QUESTION, db_tools)
    server.script.add(Reply(text="Glad to help."))
    chat_turn(model, session, "Thanks!", db_tools)

    sessions_dir = Path(SessionManager().session_dir or "")
    assert SessionManager().session_exists(session_id)  # chatbot.py:433
    view = web_ui_session_messages(sessions_dir, session_id)
    assert [(m["role"], m["content"]) for m in view] == [
        ("user", QUESTION), ("assistant", "Berlin and Lisbon have 15 customers each."),
        ("user", "Thanks!"), ("assistant", "Processing completed")]
    answer = view[1]
    assert answer["sql"] == CITY_SQL
    assert answer["progress"] == ["Thinking: Counting per city.", f"Tool call: read_query({str({'sql': CITY_SQL})[:60]})"]
    [query] = answer["actions"]
    assert query["input"] == {"function_name": "read_query", "sql": CITY_SQL}
    assert query["output"]["success"] == 1 and query["output"]["result"]["original_rows"] == 2
    assert query["output"]["result"]["compressed_data"] == "city,n\nBerlin,15\nLisbon,15\n"
    assert query["end_time"] >= query["start_time"]
    assert view[3]["progress"] == ["Thinking: Glad to help."]
