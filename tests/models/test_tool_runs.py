"""The tool loop end to end with real parts: the official SDKs over HTTP to the fake provider
server in each wire format (OpenAI-style for openai and deepseek, Anthropic, Gemini), MCP
servers as real processes (the shipped SQL server, the reference ``mcp-server-sqlite``, the
test server in tests/fakes), sessions on SQLite, and on Postgres with DQ_TEST_POSTGRES_URL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from datus.models.base import LLMBaseModel
from datus.models.config import AgentConfig, ConfigError
from datus.models.errors import MaxTurnsExceededError, TransientModelError
from datus.models.mcp_result_extractors import SQL_QUERY_FUNCTIONS, extract_sql_contexts
from datus.models.mcp_utils import MCPConnectError, MCPServerStdio
from datus.models.run_journal import MemoryJournal, RunStep
from datus.models.scripted import Fault, Reply, ScriptedRequest
from datus.models.scripted import ScriptedToolCall as Call
from datus.models.session_manager import shared_session_manager
from datus.models.tool_runs import prepared_run
from datus.schemas.action_history import ActionHistory, ActionHistoryManager, ActionRole, ActionStatus
from datus.schemas.node_models import SQLContext
from datus.testing.fake_server import FakeProviderServer, RecordedRequest
from tests.mcp_servers.conftest import (
    build_reference_sqlite_server,
    count_rows,
    http_server,
    make_shop_db,
    pid_alive,
    sql_server,
)
from tests.mcp_servers.conftest import fake_server as tools_server

PROVIDERS = {"openai": "gpt-4o", "deepseek": "deepseek-chat", "claude": "claude-sonnet-4-6",
             "gemini": "gemini-2.5-flash"}
PROTOCOL = {"openai": "openai", "deepseek": "openai", "claude": "anthropic", "gemini": "gemini"}
SQL_TOOLS = {"list_tables", "describe_table", "read_query"}
CITY_SQL = "SELECT city, count(*) AS n FROM customers GROUP BY city ORDER BY city"
ANSWER = "Berlin and Lisbon have 15 customers each."
PG_URL = os.environ.get("DQ_TEST_POSTGRES_URL")

MakeModel = Callable[[str, AgentConfig], LLMBaseModel]


def agent_config(server: FakeProviderServer, db: Path | None = None, **agent: Any) -> AgentConfig:
    """Every provider pointed at the fake server; the shipped SQL server as ``sql`` on ``db``;
    ``agent`` adds to (or replaces) sections of ``agent:``."""
    models = {
        name: {"type": name, "model": model, "api_key": "sk-test-key",
               "base_url": server.openai_base_url if PROTOCOL[name] == "openai" else server.url,
               "retry_base_delay_s": 0.0, "retry_max_delay_s": 0.05, "timeout_s": 30}
        for name, model in PROVIDERS.items()
    }
    servers = {"sql": {"command": sys.executable,
                       "args": ["-m", "datus.mcp_servers.sql_server", "--url", f"sqlite:///{db}"]}} if db else {}
    return AgentConfig.from_dict({"agent": {"target": "openai", "models": models, "mcp_servers": servers, **agent}})


@pytest.fixture
async def make_model() -> AsyncIterator[MakeModel]:
    """``make_model(provider, config)``; the SDK clients are closed on the test's own loop."""
    made: list[LLMBaseModel] = []

    def make(provider: str, config: AgentConfig) -> LLMBaseModel:
        made.append(LLMBaseModel.create_model(config, provider))
        return made[-1]

    yield make
    for model in made:
        await model.aclose()


@pytest.fixture
def shop_db(tmp_path: Path) -> Path:
    return make_shop_db(tmp_path / "shop.db")  # 30 customers, 15 in Berlin and 15 in Lisbon


def sql_exchange() -> list[Reply]:
    """list_tables -> read_query -> the answer, with fixed token counts per turn."""
    return [
        Reply(text="Let me look at the tables.", reasoning="Counting per city needs the customers table.",
              tool_calls=[Call("list_tables", {}, id="call_1")], input_tokens=100, output_tokens=10),
        Reply(tool_calls=[Call("read_query", {"query": CITY_SQL}, id="call_2")], input_tokens=200, output_tokens=20),
        Reply(text=ANSWER, input_tokens=300, output_tokens=30),
    ]


async def plain_steps(model: LLMBaseModel, prompt: str, **kwargs: Any) -> tuple[dict[str, Any], list[ActionHistory]]:
    """What `generate_with_tools` runs (the same `prepared_run`, not streamed), with the steps
    it takes: the plain call returns only the result."""
    steps: list[ActionHistory] = []
    async with prepared_run(model, prompt, tools=None, mcp_servers=kwargs.pop("mcp_servers"), instruction="",
                            output_type=str, max_turns=10, manager=None, session=None, kwargs=kwargs,
                            stream=False) as run:
        async for step in run.run_steps():
            steps.append(step)
    assert run.result is not None
    return run.result.as_dict(), steps


async def streamed(model: LLMBaseModel, prompt: str, **kwargs: Any) -> list[ActionHistory]:
    return [step async for step in model.generate_with_tools_stream(prompt, **kwargs)]


def comparable(steps: list[ActionHistory]) -> list[tuple[Any, ...]]:
    """The non-delta steps without action ids, times and latency."""
    out = []
    for step in steps:
        if step.action_type == "assistant_delta":
            continue
        output = step.output
        if isinstance(output, dict) and "usage" in output:
            output = {**output, "usage": {k: v for k, v in output["usage"].items() if k != "latency_ms"}}
        out.append((step.role, step.action_type, step.status, step.messages, step.input, output))
    return out


# ---------------------------------------------------------------- what reached the wire


def bodies(server: FakeProviderServer) -> list[dict[str, Any]]:
    return [request.body for request in server.requests]


def wire_tools(protocol: str, body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Tool name -> JSON schema of its arguments, as sent."""
    if protocol == "openai":
        return {tool["function"]["name"]: tool["function"]["parameters"] for tool in body["tools"]}
    if protocol == "anthropic":
        return {tool["name"]: tool["input_schema"] for tool in body["tools"]}
    declarations = [d for tool in body["tools"] for d in tool.get("functionDeclarations", [])]
    return {d["name"]: next(d[key] for key in ("parametersJsonSchema", "parameters_json_schema", "parameters")
                            if key in d) for d in declarations}


def wire_tool_results(protocol: str, body: dict[str, Any]) -> list[tuple[str | None, str]]:
    """(call id, result text) of every tool result in the request, in each format's own shape:
    OpenAI role=tool messages, Anthropic tool_result blocks opening a user turn, Gemini
    functionResponse parts in a user turn."""
    if protocol == "openai":
        return [(m["tool_call_id"], m["content"]) for m in body["messages"] if m["role"] == "tool"]
    if protocol == "anthropic":
        results = []
        for message in body["messages"]:
            blocks = message["content"] if isinstance(message["content"], list) else []
            kinds = [block["type"] for block in blocks]
            if "tool_result" in kinds:
                assert message["role"] == "user" and kinds[0] == "tool_result"
                results += [(b["tool_use_id"], b.get("content", "")) for b in blocks if b["type"] == "tool_result"]
        return results
    results = []
    for content in body["contents"]:
        for part in content["parts"]:
            if "functionResponse" in part:
                assert content["role"] == "user"
                response = part["functionResponse"]
                results.append((response.get("id"), response["response"]["output"]))
    return results


def was_streamed(request: RecordedRequest) -> bool:
    return "streamGenerateContent" in request.path or bool(isinstance(request.body, dict)
                                                           and request.body.get("stream"))


# ---------------------------------------------------------------- three wire formats


@pytest.mark.parametrize("provider", list(PROVIDERS))
async def test_sql_tool_run_plain_and_streamed_agree(provider: str, fake_server: FakeProviderServer,
                                                     shop_db: Path, make_model: MakeModel) -> None:
    protocol = PROTOCOL[provider]
    model = make_model(provider, agent_config(fake_server, shop_db))

    fake_server.script.add(*sql_exchange())
    result, plain = await plain_steps(model, "How many customers per city?", mcp_servers=["sql"])  # by name
    plain_requests = fake_server.requests

    assert result["content"] == ANSWER
    assert result["turns_used"] == 3 and result["model"] == PROVIDERS[provider]
    usage = result["usage"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["requests"], usage["total_tokens"]) == (600, 60, 3, 660)
    [context] = result["sql_contexts"]
    assert context.sql_query == CITY_SQL and context.row_count == 2 and context.sql_error == ""
    assert json.loads(context.sql_return)["rows"] == [["Berlin", 15], ["Lisbon", 15]]
    assert context.explanation == ANSWER  # the answer that followed the query explains it

    # on the wire: the tools in every request, each result back in the provider's own shape
    assert len(plain_requests) == 3 and not any(was_streamed(r) for r in plain_requests)
    for body in bodies(fake_server):
        tools = wire_tools(protocol, body)
        assert set(tools) == SQL_TOOLS
        assert tools["read_query"]["required"] == ["query"] and "query" in tools["read_query"]["properties"]
    first, second, last = (wire_tool_results(protocol, body) for body in bodies(fake_server))
    assert first == []
    [(call_id, listed)] = second
    assert call_id == "call_1" and json.loads(listed) == {"tables": ["customers", "orders"], "views": ["big_orders"]}
    assert [call_id for call_id, _ in last] == ["call_1", "call_2"]
    assert json.loads(last[1][1])["row_count"] == 2

    # the same exchange streamed, the server given as a spec object this time
    fake_server.reset()
    fake_server.script.add(*sql_exchange())
    manager = ActionHistoryManager()
    steps = await streamed(model, "How many customers per city?", mcp_servers={"sql": sql_server(shop_db)},
                           action_history_manager=manager, live_steps=True)
    assert all(was_streamed(r) for r in fake_server.requests) and len(fake_server.requests) == 3
    finished = [s for s in steps if s.action_type != "user_input" and s.status != ActionStatus.PROCESSING]
    assert comparable(finished) == comparable(plain)
    final = steps[-1]
    assert final.action_type == "final_response" and final.status == ActionStatus.SUCCESS
    assert final.output["content"] == ANSWER
    assert [SQLContext(**c) for c in final.output["sql_contexts"]] == result["sql_contexts"]
    assert final.output["usage"]["input_tokens"] == 600 and final.output["turns_used"] == 3

    # what a user watching the stream sees: the words as they come, each tool call then its result
    deltas = [s for s in steps if s.action_type == "assistant_delta"]
    first_answer = [s for s in deltas if s.action_id == deltas[0].action_id]
    assert "".join(s.output["text"] for s in first_answer) == "Let me look at the tables."
    assert "".join(s.output["reasoning"] or "" for s in first_answer) == "Counting per city needs the customers table."
    [thought] = [s for s in steps if s.action_type == "message"]
    assert (thought.messages, thought.output["reasoning"]) == ("Let me look at the tables.",
                                                              "Counting per city needs the customers table.")
    assert [(s.action_type, s.status) for s in steps if s.role == ActionRole.TOOL] == [
        ("list_tables", "processing"), ("list_tables", "success"), ("read_query", "processing"),
        ("read_query", "success")]
    tool_steps = [s for s in steps if s.role == ActionRole.TOOL]
    assert tool_steps[0].action_id == tool_steps[1].action_id
    assert tool_steps[3].input == {"function_name": "read_query", "tool": "read_query", "server": "sql",
                                   "arguments": {"query": CITY_SQL}, "call_id": "call_2"}
    # the manager holds every step once, in its final state
    recorded = manager.get_actions()
    assert [s.action_id for s in recorded] == list(dict.fromkeys(s.action_id for s in steps
                                                                 if s.action_type != "assistant_delta"))
    assert [s.status for s in recorded if s.role == ActionRole.TOOL] == ["success", "success"]

    # by default (Datus's nodes and CLI): only finished steps, the same ones the plain run took,
    # each yielded object the one added to the caller's manager (which already holds a step)
    fake_server.reset()
    fake_server.script.add(*sql_exchange())
    earlier = ActionHistory.create_action(ActionRole.USER, "user", "user: earlier turn", None,
                                          status=ActionStatus.SUCCESS)
    manager = ActionHistoryManager()
    manager.add_action(earlier)
    quiet = await streamed(model, "How many customers per city?", mcp_servers=["sql"], action_history_manager=manager)
    assert comparable(quiet) == comparable(plain)
    assert [s.action_type for s in quiet] == ["message", "list_tables", "read_query", "final_response"]
    assert manager.get_actions()[0] is earlier and all(a is b for a, b in zip(manager.get_actions()[1:], quiet))
    assert all(s.is_done() and s.end_time is not None for s in quiet)


class CityCounts(BaseModel):
    cities: dict[str, int]
    sql: str


async def test_pydantic_output_type_validates_the_final_answer(fake_server: FakeProviderServer, shop_db: Path,
                                                               make_model: MakeModel) -> None:
    model = make_model("claude", agent_config(fake_server, shop_db))
    wanted = CityCounts(cities={"Berlin": 15, "Lisbon": 15}, sql=CITY_SQL)
    fake_server.script.add(
        Reply(tool_calls=[Call("read_query", {"query": CITY_SQL}, id="q1")]),
        Reply(text="Berlin 15, Lisbon 15"),  # not the JSON asked for: asked again within the turns
        Reply(text=f"```json\n{wanted.model_dump_json()}\n```"),
    )
    result = await model.generate_with_tools("Customers per city?", mcp_servers=["sql"], output_type=CityCounts,
                                             instruction="You answer questions about the shop database.")
    assert result["content"] == wanted and isinstance(result["content"], CityCounts)
    assert result["turns_used"] == 3
    assert [c.sql_query for c in result["sql_contexts"]] == [CITY_SQL]
    first, _, last = bodies(fake_server)
    system = first["system"] if isinstance(first["system"], str) else "".join(b["text"] for b in first["system"])
    assert system.startswith("You answer questions about the shop database.")
    assert '"cities"' in system  # the schema of the output type is in the instruction
    assert "unusable" in json.dumps(last["messages"][-1])


# ---------------------------------------------------------------- the reference server


@pytest.fixture(scope="module")
def reference_sqlite_server() -> Path:
    return build_reference_sqlite_server()


async def test_reference_mcp_server_sqlite_as_the_tool_server(reference_sqlite_server: Path, tmp_path: Path,
                                                              fake_server: FakeProviderServer,
                                                              make_model: MakeModel) -> None:
    db = make_shop_db(tmp_path / "shop.db", rows=4)  # customers 1 and 3 live in Berlin
    reference = MCPServerStdio(command=str(reference_sqlite_server), args=["--db-path", str(db)])
    query = "SELECT id, name FROM customers WHERE city = 'Berlin' ORDER BY id"
    fake_server.script.add(
        Reply(tool_calls=[Call("list_tables", {}, id="t1"), Call("read_query", {"query": query}, id="t2")]),
        Reply(text="Two customers live in Berlin."),
    )
    model = make_model("openai", agent_config(fake_server))
    result = await model.generate_with_tools("Who lives in Berlin?", mcp_servers={"sqlite": reference},
                                             db_type="sqlite")
    assert result["content"] == "Two customers live in Berlin."
    [context] = result["sql_contexts"]  # list_tables runs no SQL
    assert context.sql_query == query and context.sql_error == ""
    assert context.row_count == 2  # counted from its Python-literal answer: [{'id': 2, ...}, {...}]
    assert "customer 1" in context.sql_return and "customer 3" in context.sql_return
    assert {"read_query", "write_query", "append_insight"} <= set(wire_tools("openai", bodies(fake_server)[0]))

    # next to our server: both have read_query, so the model sees them prefixed with the server
    fake_server.reset()
    fake_server.script.add(
        Reply(tool_calls=[Call("sqlite__read_query", {"query": query}, id="r1"),
                          Call("ours__read_query", {"query": query}, id="r2")]),
        Reply(text="Both agree."),
    )
    both = {"sqlite": reference, "ours": sql_server(db)}
    result = await model.generate_with_tools("Who lives in Berlin?", mcp_servers=both, db_type="sqlite")
    assert {"sqlite__read_query", "ours__read_query"} <= set(wire_tools("openai", bodies(fake_server)[0]))
    theirs, ours = result["sql_contexts"]  # found under each server's own tool name
    assert (theirs.sql_query, theirs.row_count) == (query, 2) and "customer 1" in theirs.sql_return
    assert (ours.sql_query, ours.row_count) == (query, 2) and json.loads(ours.sql_return)["rows"][0] == [2, "customer 1"]


async def test_concurrent_runs_on_one_model_keep_their_servers_apart(tmp_path: Path, fake_server: FakeProviderServer,
                                                                     make_model: MakeModel) -> None:
    small, big = make_shop_db(tmp_path / "small.db", rows=4), make_shop_db(tmp_path / "big.db", rows=10)
    count = "SELECT count(*) FROM customers"
    for shop in ("small shop", "big shop"):
        fake_server.script.add(Reply(tool_calls=[Call("read_query", {"query": count})], latency_s=0.2), match=shop)
        fake_server.script.add(Reply(text=f"counted the {shop}"), match=shop)
    command = [sys.executable, "-m", "datus.mcp_servers.sql_server", "--url", f"sqlite:///{big}",
               "--transport", "streamable-http"]
    with http_server(*command) as url:
        config = agent_config(fake_server, mcp_servers={"big": {"url": url}})  # streamable HTTP, by name
        model = make_model("claude", config)
        small_run, big_run = await asyncio.gather(
            model.generate_with_tools("Customers of the small shop?", mcp_servers={"small": sql_server(small)}),
            model.generate_with_tools("Customers of the big shop?", mcp_servers=["big"]),
        )
    assert small_run["content"] == "counted the small shop" and big_run["content"] == "counted the big shop"
    assert json.loads(small_run["sql_contexts"][0].sql_return)["rows"] == [[4]]
    assert json.loads(big_run["sql_contexts"][0].sql_return)["rows"] == [[10]]
    assert small_run["usage"]["requests"] == big_run["usage"]["requests"] == 2


# ---------------------------------------------------------------- bad input


async def test_unknown_or_broken_servers_fail_before_any_model_request(
        fake_server: FakeProviderServer, shop_db: Path, make_model: MakeModel) -> None:
    model = make_model("openai", agent_config(fake_server, shop_db))
    with pytest.raises(ConfigError, match=r"unknown MCP server 'warehouse'; configured MCP servers: sql"):
        await model.generate_with_tools("q", mcp_servers=["sql", "warehouse"])
    with pytest.raises(ConfigError, match="unknown MCP server 'warehouse'"):
        await streamed(model, "q", mcp_servers=["warehouse"])
    missing = MCPServerStdio(command=str(shop_db.parent / "no-such-mcp-server"))
    with pytest.raises(MCPConnectError, match=r"MCP server 'gone' failed to start: command .*no-such-mcp-server"):
        await model.generate_with_tools("q", mcp_servers={"sql": sql_server(shop_db), "gone": missing})
    assert fake_server.requests == []


def _kill_the_server_then_call_it(request: ScriptedRequest) -> Reply:
    """The second answer: kill the server whose pid the first tool call returned, then call it."""
    pid = int(next(m["content"] for m in reversed(request.messages) if m["role"] == "tool"))
    os.kill(pid, signal.SIGKILL)
    return Reply(tool_calls=[Call("echo", {"text": "still there?"}, id="c2")])


@pytest.mark.parametrize("death", ["killed between turns", "exits during a call"])
async def test_a_server_that_dies_mid_run(death: str, fake_server: FakeProviderServer, shop_db: Path,
                                          make_model: MakeModel) -> None:
    if death == "killed between turns":
        fake_server.script.add(Reply(tool_calls=[Call("pid", {}, id="c1")]), _kill_the_server_then_call_it)
    else:
        fake_server.script.add(Reply(tool_calls=[Call("exit_now", {}, id="c1")]),
                               Reply(tool_calls=[Call("echo", {"text": "still there?"}, id="c2")]))
    fake_server.script.add(Reply(tool_calls=[Call("read_query", {"query": "SELECT count(*) FROM orders"}, id="c3")]),
                           Reply(text="The tools server is gone; the database says 30 orders."))
    model = make_model("openai", agent_config(fake_server, shop_db))
    steps = await streamed(model, "go", mcp_servers={"tools": tools_server(), "sql": sql_server(shop_db)})

    assert steps[-1].action_type == "final_response"
    assert steps[-1].output["content"] == "The tools server is gone; the database says 30 orders."
    results = [s for s in steps if s.role == ActionRole.TOOL and s.status != ActionStatus.PROCESSING]
    dead = ["echo"] if death == "killed between turns" else ["exit_now", "echo"]
    assert [s.action_type for s in results if s.output["success"] is False] == dead
    assert all(s.status == ActionStatus.SUCCESS for s in results)  # done steps: the failure is in their output
    for step in results:
        if step.output["success"] is False:
            assert step.input["server"] == "tools"
            assert "MCP server 'tools' closed the connection" in step.output["raw_output"]
    # the model was told which server is gone; the other server kept working
    told = dict(wire_tool_results("openai", bodies(fake_server)[-1]))
    assert "MCP server 'tools' closed the connection during tools/call 'echo'" in told["c2"]
    assert json.loads(told["c3"])["rows"] == [[30]]


async def test_bad_tool_calls_become_failed_results_the_model_reads(fake_server: FakeProviderServer, shop_db: Path,
                                                                    make_model: MakeModel) -> None:
    fake_server.script.add(
        Reply(tool_calls=[
            Call("drop_everything", {}, id="c1"),  # no such tool
            Call("read_query", '{"query": "SELECT 1"', id="c2"),  # arguments that are not JSON
            Call("read_query", {"query": "DELETE FROM orders"}, id="c3"),  # the server refuses (a tool error)
            Call("describe_table", {"table_name": "nowhere"}, id="c4"),  # the tool raises
        ]),
        Reply(text="I could not do any of that."),
    )
    model = make_model("deepseek", agent_config(fake_server, shop_db))
    result = await model.generate_with_tools("break things", mcp_servers=["sql"])
    assert result["content"] == "I could not do any of that." and result["turns_used"] == 2

    told = dict(wire_tool_results("openai", bodies(fake_server)[-1]))
    assert told["c1"].startswith("there is no tool named 'drop_everything'; available: ")
    assert "read_query" in told["c1"]
    assert "arguments are not JSON" in told["c2"]
    assert "refused: only reads are allowed" in told["c3"]
    assert "unknown table 'nowhere'; tables: customers, orders, big_orders" in told["c4"]
    assert count_rows(shop_db, "orders") == 30

    [context] = result["sql_contexts"]  # only the statement that reached the server
    assert context.sql_query == "DELETE FROM orders"
    assert context.sql_return == "" and context.row_count is None
    assert context.sql_error is not None and "refused" in context.sql_error


async def test_max_turns_raises_with_the_steps_so_far(fake_server: FakeProviderServer, shop_db: Path,
                                                      make_model: MakeModel) -> None:
    fake_server.script.add(Reply(tool_calls=[Call("list_tables", {})]), times=None)  # never answers
    model = make_model("gemini", agent_config(fake_server, shop_db))
    with pytest.raises(MaxTurnsExceededError, match="max_turns=2") as info:
        await model.generate_with_tools("loop", mcp_servers=["sql"], max_turns=2)
    steps = info.value.details["steps"]
    assert [(s["action_type"], s["status"]) for s in steps if s["role"] == "tool"] == [
        ("list_tables", "success"), ("list_tables", "success")]
    assert info.value.details["usage"]["requests"] == 2 and len(fake_server.requests) == 2

    fake_server.clear_requests()
    seen: list[ActionHistory] = []
    with pytest.raises(MaxTurnsExceededError):
        async for step in model.generate_with_tools_stream("loop", mcp_servers=["sql"], max_turns=1,
                                                           live_steps=True):
            seen.append(step)
    assert seen[-1].action_type == "error" and seen[-1].status == ActionStatus.FAILED
    assert seen[-1].output["code"] == "model_max_turns_exceeded"


# ---------------------------------------------------------------- retries between tool turns


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
async def test_a_retried_request_never_reruns_a_tool(provider: str, stream: bool, fake_server: FakeProviderServer,
                                                     make_model: MakeModel) -> None:
    ran: list[str] = []

    def count_orders(city: str) -> int:
        """Orders placed from a city."""
        ran.append(city)
        return 7

    fake_server.script.add(Reply(tool_calls=[Call("count_orders", {"city": "Berlin"}, id="c1")]),
                           Fault("rate_limit", retry_after=0.01), Fault("overloaded"), Reply(text="Seven orders."))
    model = make_model(provider, agent_config(fake_server))
    if stream:
        final = (await streamed(model, "Orders from Berlin?", tools=[count_orders]))[-1]
        content, usage = final.output["content"], final.output["usage"]
    else:
        result = await model.generate_with_tools("Orders from Berlin?", tools=[count_orders])
        content, usage = result["content"], result["usage"]
    assert content == "Seven orders."
    assert ran == ["Berlin"]
    assert usage["attempts"] == 4  # the second request took three attempts
    first, *retried = bodies(fake_server)
    assert wire_tools(PROTOCOL[provider], first)["count_orders"]["required"] == ["city"]  # from the signature
    assert len(retried) == 3 and retried[0] == retried[1] == retried[2]  # the same request, tool result included
    assert wire_tool_results(PROTOCOL[provider], retried[0]) == [("c1", "7")]


# ---------------------------------------------------------------- sessions


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.skipif(
    not PG_URL, reason="set DQ_TEST_POSTGRES_URL to run on Postgres"))])
def session_url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh session store as DQ_SESSION_URL (the shared manager is cached per URL, so a
    fresh URL is a fresh store); on Postgres a schema of its own, dropped afterwards."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'sessions.db'}"
        monkeypatch.setenv("DQ_SESSION_URL", url)
        yield url
        return
    assert PG_URL is not None
    schema = f"dq_tool_runs_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(make_url(PG_URL).set(drivername="postgresql+psycopg2"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False)
    monkeypatch.setenv("DQ_SESSION_URL", url)
    try:
        yield url
    finally:
        shared_session_manager(url).close()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


async def test_a_session_started_on_openai_continues_on_claude(session_url: str, fake_server: FakeProviderServer,
                                                               shop_db: Path, make_model: MakeModel) -> None:
    config = agent_config(fake_server, shop_db)
    openai_model, claude_model = make_model("openai", config), make_model("claude", config)
    assert openai_model.session_manager is shared_session_manager(session_url)  # the store DQ_SESSION_URL names
    session = openai_model.create_session()

    fake_server.script.add(*sql_exchange())
    await openai_model.generate_with_tools("How many customers per city?", mcp_servers=["sql"], session=session)
    stored = session.get_messages()
    assert [m.role for m in stored] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert stored[-1].content == ANSWER
    info = session.info()
    assert info.message_count == 6 and info.latest_user_message == "How many customers per city?"
    assert info.total_tokens > 0

    fake_server.reset()
    fake_server.script.add(Reply(tool_calls=[Call("read_query", {"query": "SELECT count(*) FROM orders"},
                                                  id="toolu_3")]),
                           Reply(text="And they placed 30 orders."))
    result = await claude_model.generate_with_tools("And how many orders?", mcp_servers=["sql"],
                                                    session=session.session_id)  # by id, from another model
    assert result["content"] == "And they placed 30 orders."

    # the whole earlier conversation went to Anthropic, in Anthropic's shape
    sent = bodies(fake_server)[0]["messages"]
    shapes = [(m["role"], [b["type"] for b in m["content"]]) for m in sent]
    assert shapes == [
        ("user", ["text"]), ("assistant", ["text", "tool_use"]), ("user", ["tool_result"]),
        ("assistant", ["tool_use"]), ("user", ["tool_result"]), ("assistant", ["text"]), ("user", ["text"]),
    ]
    assert sent[0]["content"][0]["text"] == "How many customers per city?"
    call = {key: value for key, value in sent[3]["content"][0].items() if key != "cache_control"}
    assert call == {"type": "tool_use", "id": "call_2", "name": "read_query", "input": {"query": CITY_SQL}}
    assert [call_id for call_id, _ in wire_tool_results("anthropic", bodies(fake_server)[0])] == ["call_1", "call_2"]
    assert sent[5]["content"][0]["text"] == ANSWER
    assert sent[6]["content"][0]["text"] == "And how many orders?"

    assert session.info().message_count == 6 + 4  # the question, the call, its result, the answer
    assert [m.role for m in session.get_messages()][6:] == ["user", "assistant", "tool", "assistant"]


async def test_a_streamed_run_closed_early_stops_cleanly(fake_server: FakeProviderServer,
                                                         make_model: MakeModel) -> None:
    fake_server.script.add(Reply(tool_calls=[Call("pid", {}, id="c1")]), Reply(text="never asked for"))
    model = make_model("openai", agent_config(fake_server))
    pid = None
    async with contextlib.aclosing(model.generate_with_tools_stream("go", mcp_servers={"tools": tools_server()})) \
            as steps:
        async for step in steps:
            if step.action_type == "pid" and step.status == ActionStatus.SUCCESS:
                pid = int(step.output["raw_output"])
                break  # seen enough: closing the stream ends the run, without an error
    assert pid is not None and not pid_alive(pid)  # its server is stopped
    assert len(fake_server.requests) == 1


async def test_a_streamed_run_stopped_at_its_final_step_still_saves_the_session(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_server: FakeProviderServer, shop_db: Path,
        make_model: MakeModel) -> None:
    monkeypatch.setenv("DQ_SESSION_URL", f"sqlite:///{tmp_path / 'sessions.db'}")
    model = make_model("openai", agent_config(fake_server, shop_db))
    session = model.create_session()
    fake_server.script.add(*sql_exchange())
    async with contextlib.aclosing(model.generate_with_tools_stream(
            "How many customers per city?", mcp_servers=["sql"], session=session)) as steps:
        async for step in steps:
            if step.action_type == "final_response":
                break  # the answer is in: nothing more to wait for
    assert [m.role for m in session.get_messages()] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]


# ---------------------------------------------------------------- SQL contexts


def tool_step(tool: str, arguments: dict[str, Any] | str, raw: Any, ok: bool = True) -> ActionHistory:
    return ActionHistory.create_action(
        ActionRole.TOOL, tool, f"calling {tool}",
        {"function_name": tool, "tool": tool, "server": "db", "arguments": arguments, "call_id": "c"},
        {"success": ok, "raw_output": raw}, ActionStatus.SUCCESS if ok else ActionStatus.FAILED)


def said(text: str, kind: str = "final_response") -> ActionHistory:
    return ActionHistory.create_action(ActionRole.ASSISTANT, kind, text, None, None, ActionStatus.SUCCESS)


@pytest.mark.parametrize(("db_type", "tool", "argument"),
                         [(db, tool, arg) for db, table in SQL_QUERY_FUNCTIONS.items() for tool, arg in table.items()])
def test_each_sql_tool_in_the_table_gives_a_context(db_type: str, tool: str, argument: str) -> None:
    sql = f"SELECT a FROM t -- via {tool}"
    steps = [tool_step(tool, {argument: sql}, json.dumps({"rows": [[1], [2], [3]]})), said("Three rows.")]
    [context] = extract_sql_contexts(steps, db_type)
    assert context == SQLContext(sql_query=sql, explanation="Three rows.", sql_return='{"rows": [[1], [2], [3]]}',
                                 row_count=3)
    # the database type is passed through, not assumed: a tool of another database is no SQL
    others = [db for db, table in SQL_QUERY_FUNCTIONS.items() if tool not in table]
    for other in others:
        assert extract_sql_contexts(steps, other) == []


def test_sql_contexts_row_counts_errors_and_explanations() -> None:
    steps = [
        tool_step("read_query", {"query": "SELECT 1"}, json.dumps({"columns": ["x"], "rows": [[1]], "row_count": 1})),
        said("One row, as expected.", "message"),
        tool_step("read_query", {"query": "SELECT * FROM nope"}, "query failed: no such table: nope", ok=False),
        tool_step("list_tables", {}, '{"tables": ["c"]}'),  # runs no SQL
        tool_step("read_query", '{"query": "SELECT name FROM c"}', "[{'name': 'a'}, {'name': 'b'}]"),  # reference
        said("Two names."),
    ]
    first, failed, literal = extract_sql_contexts(steps, "sqlite")
    assert (first.row_count, first.explanation) == (1, "One row, as expected.")
    assert failed.sql_error == "query failed: no such table: nope" and failed.sql_return == ""
    assert failed.row_count is None and failed.explanation == ""  # another tool call came next
    assert (literal.sql_query, literal.row_count, literal.explanation) == ("SELECT name FROM c", 2, "Two names.")
    # the JSON form of the steps (what MaxTurnsExceededError carries) gives the same contexts
    assert extract_sql_contexts([s.model_dump(mode="json") for s in steps], "sqlite") == [first, failed, literal]
    processing = ActionHistory.create_action(ActionRole.TOOL, "read_query", "", {"arguments": {"query": "SELECT 2"}})
    assert extract_sql_contexts([processing], "sqlite") == []  # not finished: no context yet


def test_sql_contexts_from_datus_read_query_answers_and_wrapped_mcp_content() -> None:
    """Datus's ``read_query`` function tool (argument ``sql``) and its ``FuncToolResult`` answers
    (callsites.md §8), in steps as Datus's own layer wrote them (arguments as raw JSON text,
    ``success`` True even when the answer says 0) and as ours does; and MCP content as
    openai-agents renders it (``{"type": "text", "text": ...}``)."""
    rows = "city,n\nBerlin,15\nLisbon,15\n"
    answer = {"success": 1, "error": None, "result": {
        "original_rows": 2, "original_columns": ["city", "n"], "is_compressed": False, "compressed_data": rows,
        "removed_columns": [], "compression_type": "none"}}
    refused = {"success": 0, "error": "no such table: nowhere", "result": None}
    wrapped = json.dumps({"type": "text", "text": json.dumps({"columns": ["x"], "rows": [[1], [2], [3]]}),
                          "annotations": None, "meta": None})
    steps = [
        tool_step("read_query", json.dumps({"sql": "SELECT city, n FROM t"}), answer),
        said("Two cities.", "message"),
        tool_step("read_query", json.dumps({"sql": "SELECT * FROM nowhere"}), refused),
        tool_step("read_query", {"sql": "SELECT * FROM nowhere"}, refused, ok=False),
        tool_step("search_table", {"query_text": "customers"}, {"success": 1, "error": None, "result": {}}),
        tool_step("read_query", {"query": "SELECT x FROM y"}, wrapped),
        said("Done."),
    ]
    first, theirs, ours, mcp = extract_sql_contexts(steps)
    assert first == SQLContext(sql_query="SELECT city, n FROM t", explanation="Two cities.", sql_return=rows,
                               sql_error="", row_count=2)
    for failed in (theirs, ours):
        assert (failed.sql_error, failed.sql_return, failed.row_count) == ("no such table: nowhere", "", None)
    assert (mcp.sql_query, mcp.row_count, mcp.explanation) == ("SELECT x FROM y", 3, "Done.")
    assert json.loads(mcp.sql_return)["rows"] == [[1], [2], [3]]


def test_extra_functions_extend_the_table() -> None:
    steps = [tool_step("run_statement", {"statement": "SELECT 42"}, "[[42]]"), said("42.")]
    assert extract_sql_contexts(steps, "warehouse") == []
    [context] = extract_sql_contexts(steps, "warehouse", {"warehouse": {"run_statement": "statement"}})
    assert (context.sql_query, context.row_count) == ("SELECT 42", 1)
    [via_sqlite] = extract_sql_contexts(steps, "sqlite", {"sqlite": {"run_statement": "statement"}})
    assert via_sqlite.sql_query == "SELECT 42"


def run_statement(statement: str) -> list[list[int]]:
    """Run a statement on the warehouse."""
    return [[1], [2]]


@pytest.mark.parametrize("where", ["kwarg", "config"])
async def test_sql_functions_from_a_kwarg_or_the_config_reach_the_run(where: str, fake_server: FakeProviderServer,
                                                                      make_model: MakeModel) -> None:
    table = {"warehouse": {"run_statement": "statement"}}
    config = agent_config(fake_server, sql_query_functions=table) if where == "config" else agent_config(fake_server)
    extra: dict[str, Any] = {"sql_functions": table} if where == "kwarg" else {}
    fake_server.script.add(Reply(tool_calls=[Call("run_statement", {"statement": "SELECT x FROM w"}, id="s1")]),
                           Reply(text="Two rows."))
    model = make_model("openai", config)
    result = await model.generate_with_tools("q", tools=[run_statement], db_type="warehouse", **extra)
    [context] = result["sql_contexts"]
    assert (context.sql_query, context.row_count, context.explanation) == ("SELECT x FROM w", 2, "Two rows.")


# ---------------------------------------------------------------- durable runs on the wire


class StoredJournal(MemoryJournal):
    """A journal whose steps go through JSON, as a job store keeps them."""

    async def record(self, step: RunStep) -> None:
        self.steps.append(RunStep.model_validate_json(step.model_dump_json(exclude_defaults=True)))


@pytest.mark.parametrize("provider", ["claude", "gemini", "deepseek"])
async def test_a_resumed_run_replays_reasoning_with_its_signatures_and_saves_the_session_once(
        provider: str, session_url: str, fake_server: FakeProviderServer, shop_db: Path, make_model: MakeModel) -> None:
    config = agent_config(fake_server, shop_db)
    model = make_model(provider, config)
    model.retry_policy = model.retry_policy.__class__(max_attempts=1, base_delay_s=0)
    journal = StoredJournal(f"resume-{provider}")
    session = model.create_session()
    first, second, answer = sql_exchange()
    fake_server.script.add(first, second, Fault("status", status=503))
    with pytest.raises(TransientModelError):
        await model.generate_with_tools("How many customers per city?", mcp_servers=["sql"], session=session,
                                        journal=journal, enable_thinking=True)
    assert [(s.kind, s.turn) for s in journal.steps] == [("turn", 1), ("tool", 1), ("turn", 2), ("tool", 2)]
    assert journal.steps[0].message.reasoning  # the thinking (and, on Claude, its signature) is recorded

    fake_server.clear_requests()
    fake_server.script.add(answer)
    result = await model.generate_with_tools("How many customers per city?", mcp_servers=["sql"], session=session,
                                             journal=journal, enable_thinking=True)
    assert result["content"] == ANSWER and result["turns_used"] == 3
    assert (result["usage"]["input_tokens"], result["usage"]["output_tokens"]) == (600, 60)  # all three turns
    [sent] = bodies(fake_server)  # one request: the turn never answered
    if provider == "claude":  # the thinking block went back with its signature, which the fake checks
        assert "Counting per city" in json.dumps(sent)
    assert len(session.get_messages()) == 6

    # the job finished but was delivered again before its result was stored: nothing twice
    fake_server.clear_requests()
    again = await model.generate_with_tools("How many customers per city?", mcp_servers=["sql"], session=session,
                                            journal=journal, enable_thinking=True)
    assert again["content"] == ANSWER and bodies(fake_server) == []
    assert len(session.get_messages()) == 6
