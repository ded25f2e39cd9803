"""Datus's tool runs: each test calls ``generate_with_tools`` / ``generate_with_tools_stream`` as
one Datus node, tool or hook does (callsites.md CP-7, CP-9, CP-10, CP-15, CP-16, CP-17) and
checks what that code then reads. The model answers from the fake provider server over HTTP
(OpenAI-style for DeepSeek, Anthropic, Gemini); the tools are Datus-shaped function tools on a
real SQLite file, and an MCP server object runs the shipped SQL server as a process."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from datus.models.base import LLMBaseModel
from datus.models.scripted import Reply
from datus.models.scripted import ScriptedToolCall as Call
from datus.schemas.action_history import ActionHistory, ActionHistoryManager, ActionRole, ActionStatus
from datus.schemas.node_models import SQLContext
from datus.testing.fake_server import FakeProviderServer
from datus.utils.exceptions import DatusException, ErrorCode
from tests.datus_compat.datus_tools import (
    CITY_SQL,
    DatusDBTools,
    GenerationLikeHooks,
    PlanModeLikeHooks,
    add_in_sql_context,
    chat_answer,
    compare_answer,
    compare_tokens,
    datus_function_tool,
    gen_sql_answer,
    generation_tools,
    llm_result2json,
    node_manager,
    node_tokens,
    plan_tools,
    sql_server_object,
    stream_line,
    summary_answer,
    tool_stats,
    tool_view,
)
from tests.datus_compat.conftest import DatusAgentConfig, DatusModelConfig, Fleet, datus_shaped
from tests.models.agents_shapes import strict_schema

# one model per wire format: OpenAI-style (DeepSeek), Anthropic, Gemini
PROVIDERS = ["deepseek", "anthropic", "gemini-2.5"]
ANSWER = json.dumps({"sql": CITY_SQL, "output": "Berlin and Lisbon have 15 customers each."})
ALL_COORDINATES = {"catalog": None, "database": None, "schema_name": None, "include_views": True}


def sql_exchange(answer: str = ANSWER) -> list[Reply]:
    """list_tables (with the nulls a model sends for Datus's nullable arguments), read_query,
    the answer; 100+10, 200+20, 300+30 tokens: 660 in all."""
    return [
        Reply(text="Let me look at the tables.", tool_calls=[Call("list_tables", ALL_COORDINATES, id="call_1")],
              input_tokens=100, output_tokens=10),
        Reply(tool_calls=[Call("read_query", {"sql": CITY_SQL}, id="call_2")], input_tokens=200, output_tokens=20),
        Reply(text=answer, input_tokens=300, output_tokens=30),
    ]


async def run_stream(model: LLMBaseModel, **kwargs: Any) -> list[ActionHistory]:
    """``async for stream_action in model.generate_with_tools_stream(...): yield stream_action``."""
    return [action async for action in model.generate_with_tools_stream(**kwargs)]


def said_to_model(server: FakeProviderServer) -> str:
    """Everything the model was sent in the last request, as text (any wire format)."""
    return json.dumps(server.requests[-1].body)


class ReasoningResult(BaseModel):
    """The fields of Datus's ReasoningResult (schemas/reason_sql_node_models.py) that
    reasoning_sql.py:199-213 fills from generate_with_tools' result."""

    success: bool
    sql_query: str = ""
    sql_return: Any = ""
    sql_contexts: list[SQLContext] = []


# ---------------------------------------------------------------- CP-7: the reasoning node


@pytest.mark.parametrize("name", PROVIDERS)
def test_reasoning_node_tool_run_from_sync_code(datus_config: Any, server: FakeProviderServer,
                                                db_tools: DatusDBTools, name: str) -> None:
    """tools/llms_tools/reasoning_sql.py:166-213 (CP-7): asyncio.run(generate_with_tools(
    prompt=[{"role": "user", ...}], mcp_servers={}, instruction=..., tools=..., output_type=str,
    max_turns=n)); llm_result2json(content)["sql"]; sql_contexts validated into
    ReasoningResult; reason_sql_node.py:74-88 keeps the contexts with sql_error == "" and
    later nodes render them with to_str() (generate_sql_node.py:254)."""
    server.script.add(
        Reply(text="Trying a first query.", tool_calls=[Call("read_query", {"sql": "SELECT nope FROM customers"})]),
        Reply(tool_calls=[Call("read_query", {"sql": CITY_SQL})]),
        Reply(text=f"```json\n{ANSWER}\n```"),
    )
    model = LLMBaseModel.create_model(datus_config, name)
    prompt = [{"role": "user", "content": "How many customers per city?"}]  # prompts/reasoning_sql_with_mcp.py:130
    result = asyncio.run(model.generate_with_tools(prompt=prompt, mcp_servers={}, instruction="You reason in SQL.",
                                                   tools=db_tools.available_tools(), output_type=str, max_turns=5))

    assert isinstance(result["content"], str) and llm_result2json(result["content"])["sql"] == CITY_SQL
    reasoning = ReasoningResult(success=True, sql_query=CITY_SQL, sql_contexts=result["sql_contexts"])
    kept = [context for context in reasoning.sql_contexts if context.sql_error == ""]
    assert [c.sql_query for c in reasoning.sql_contexts] == ["SELECT nope FROM customers", CITY_SQL]
    assert "no such column" in reasoning.sql_contexts[0].sql_error
    assert [(c.sql_query, c.row_count) for c in kept] == [(CITY_SQL, 2)]
    assert "Berlin,15" in kept[0].sql_return and CITY_SQL in kept[0].to_str()
    usage = result["usage"]  # tests/test_deepseek_model.py:492-494
    assert usage["total_tokens"] > 0 and usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert "How many customers per city?" in said_to_model(server)


# ---------------------------------------------------------------- CP-9: the agentic nodes' streams


@pytest.mark.parametrize("name", PROVIDERS)
def test_chat_node_turns_on_one_manager(datus_config: Any, server: FakeProviderServer, db_tools: DatusDBTools,
                                        name: str) -> None:
    """chat_agentic_node.py:617-626 (CP-9a), a turn per asyncio.run as the CLI runs them
    (chat_commands.py:277-285), one manager for every turn (cli/repl.py:101). After each turn
    the node reads: the answer (l.391-417), the tokens of the newest assistant action with a
    usage (l.449-468), the tool stats (l.470-479); chat_commands.py:693-734 the last read_query."""
    model = LLMBaseModel.create_model(datus_config, name)
    session = model.create_session("chat_session_1a2b3c4d")  # agentic_node.py:160-181
    manager = node_manager("How many customers per city?")
    node_actions = list(manager.get_actions())
    server.script.add(*sql_exchange())

    def turn(prompt: str) -> list[ActionHistory]:
        return asyncio.run(run_stream(model, prompt=prompt, tools=db_tools.available_tools(), mcp_servers={},
                                      instruction="You are Datus.", max_turns=30, session=session,
                                      action_history_manager=manager, hooks=None))

    first = turn("How many customers per city?")
    assert chat_answer(first) == ANSWER
    assert node_tokens(manager) == 660
    assert tool_stats(manager) == {"total_actions": 2 + len(first), "tool_calls_count": 2,
                                   "tools_used": ["list_tables", "read_query"]}
    # no text deltas, no tool calls under way: each yielded action is finished, and in the manager once
    assert all(a.is_done() and a.action_type != "assistant_delta" for a in first)
    assert manager.get_actions() == node_actions + first
    assert [a.status for a in node_actions] == ["processing", "processing"]  # the node's own are left alone
    context = add_in_sql_context(CITY_SQL, first)
    assert context is not None and context.row_count == 2 and context.sql_return == "city,n\nBerlin,15\nLisbon,15\n"
    assert context.sql_error is None

    server.script.add(Reply(text="Lisbon has 15 too.", input_tokens=400, output_tokens=40))
    node_manager("And Lisbon?", manager)
    second = turn("And Lisbon?")
    assert chat_answer(second) == "Lisbon has 15 too."
    assert node_tokens(manager) == 440  # this turn's usage, not the first one's
    assert tool_stats(manager)["tool_calls_count"] == 2 and len(manager.get_actions()) == 4 + len(first) + len(second)
    assert "How many customers per city?" in said_to_model(server)  # the session's history went along


def test_gen_sql_node_with_an_mcp_server_object(datus_config: Any, server: FakeProviderServer,
                                                db_tools: DatusDBTools) -> None:
    """gen_sql_agentic_node.py:513-545 (CP-9b): tools plus mcp_servers={"name": <server object>}
    (an unconnected, process-wide stdio server with a static tool filter, like Datus's
    filesystem server, tools/mcp_tools/mcp_server.py:130-231), used by turn after turn. The
    node's answer is content/response/raw_output of every SUCCESS dict output, the last winning;
    the CLI parses an MCP tool's raw_output text (action_display_app.py:226-314)."""
    sql_mcp = sql_server_object(db_tools.db, allowed=["describe_table"])  # its list_tables/read_query hidden
    tools = [tool for tool in db_tools.available_tools() if tool.name != "describe_table"]
    model = LLMBaseModel.create_model(datus_config)
    for turn in range(2):
        server.script.add(
            Reply(tool_calls=[Call("describe_table", {"table_name": "customers"})]),
            Reply(tool_calls=[Call("read_query", {"sql": CITY_SQL})]),
            Reply(text=ANSWER),
        )
        manager = node_manager("customers per city?")
        steps = asyncio.run(run_stream(model, prompt="customers per city?", tools=tools,
                                       mcp_servers={"sql_mcp": sql_mcp}, instruction="Write SQL.", max_turns=30,
                                       session=None, action_history_manager=manager))
        assert gen_sql_answer(steps) == ANSWER
        described = next(a for a in steps if a.action_type == "describe_table")
        assert described.status == ActionStatus.SUCCESS and described.role == ActionRole.TOOL
        assert isinstance(described.output["raw_output"], str)  # MCP content as JSON text, as openai-agents gives it
        assert "city" in json.dumps(tool_view(described)["items"])
        assert sql_mcp.kinds() == ["connect", "cleanup"] * (turn + 1)  # connected for each run, left clean
    offered = server.requests[0].body["tools"]
    assert sorted(tool["function"]["name"] for tool in offered) == ["describe_table", "get_table_ddl", "list_tables",
                                                                    "read_query"]
    assert len(sql_mcp.filter_contexts) == 2  # the filter got openai-agents' (run_context, agent) each run


def test_gen_sql_node_with_an_mcp_server_object_beside_a_function_tool(datus_config: Any, server: FakeProviderServer,
                                                                      db_tools: DatusDBTools) -> None:
    """gen_sql_agentic_node.py:513-545 (CP-9b) with a server object whose tools no function tool
    shadows: the shipped SQL server (describe_table, read_query) beside Datus's get_table_ddl
    function tool, in one run. Queue-backed, the object is named to the fleet, whose agent.yml
    runs the same server under that name (conftest.fleet_agent_yml): the MCP tools run on the
    worker, the function tool in the caller; the steps are the in-process ones."""
    sql_mcp = sql_server_object(db_tools.db, name="sql")
    tools = [tool for tool in db_tools.available_tools() if tool.name == "get_table_ddl"]
    server.script.add(
        Reply(text="Checking the columns.", tool_calls=[Call("describe_table", {"table_name": "customers"})]),
        Reply(tool_calls=[Call("get_table_ddl", {"table_name": "customers"})]),
        Reply(tool_calls=[Call("read_query", {"query": CITY_SQL})]),
        Reply(text=ANSWER),
    )
    model = LLMBaseModel.create_model(datus_config)
    manager = node_manager("customers per city?")
    steps = asyncio.run(run_stream(model, prompt="customers per city?", tools=tools, mcp_servers={"sql": sql_mcp},
                                   instruction="Write SQL.", max_turns=30, session=None,
                                   action_history_manager=manager))
    assert gen_sql_answer(steps) == ANSWER
    assert [a.action_type for a in steps] == ["message", "describe_table", "get_table_ddl", "read_query",
                                              "final_response"]
    described, ddl, rows = [a for a in steps if a.role == ActionRole.TOOL]
    assert all(a.status == ActionStatus.SUCCESS for a in (described, ddl, rows))
    assert isinstance(described.output["raw_output"], str) and "city" in described.output["raw_output"]
    assert ddl.output["raw_output"]["result"]["definition"].startswith("CREATE TABLE customers")  # the caller's dict
    assert db_tools.calls and json.loads(db_tools.calls[-1][1]) == {"table_name": "customers"}
    assert "Berlin" in rows.output["raw_output"] and "15" in rows.output["raw_output"]
    assert manager.get_actions()[2:] == steps
    offered = server.requests[0].body["tools"]
    assert sorted(tool["function"]["name"] for tool in offered) == ["describe_table", "get_table_ddl", "list_tables",
                                                                    "read_query"]
    assert sql_mcp.kinds() == ["connect", "cleanup"]  # connected for the run (in the caller) and left clean
    assert described.input["server"] == "sql" and ddl.input["server"] is None


def test_an_mcp_tool_step_as_the_cli_shows_it(datus_config: Any, server: FakeProviderServer,
                                              db_tools: DatusDBTools) -> None:
    """cli/screen/action_display_app.py:226-314: an MCP tool's raw_output is what openai-agents
    gives for the server object's tool, the content item as JSON text (``{"type": "text", "text":
    ...}``); the CLI parses it and shows the items of its ``text``."""
    server.script.add(Reply(tool_calls=[Call("describe_table", {"table_name": "customers"})]), Reply(text=ANSWER))
    model = LLMBaseModel.create_model(datus_config)
    steps = asyncio.run(run_stream(model, prompt="columns?", mcp_servers={"sql": sql_server_object(db_tools.db)},
                                   instruction="Write SQL.", max_turns=5, action_history_manager=node_manager("?")))
    [described] = [a for a in steps if a.role == ActionRole.TOOL]
    assert json.loads(described.output["raw_output"])["type"] == "text"
    assert tool_view(described)["items"]["table"] == "customers"


def test_web_ui_drives_the_stream_one_step_per_run_until_complete(datus_config: Any, server: FakeProviderServer,
                                                                  db_tools: DatusDBTools) -> None:
    """cli/web/chat_executor.py:64-118: the node's stream wrapped in an async generator and
    driven one step at a time by loop.run_until_complete(agen.__anext__()) on a new event loop
    (each step a task of its own), then loop.close(); :125-176 turns each step into a line. The
    MCP server object is connected and cleaned up across those tasks."""
    sql_mcp = sql_server_object(db_tools.db, allowed=["describe_table"])
    tools = [tool for tool in db_tools.available_tools() if tool.name != "describe_table"]
    server.script.add(
        Reply(text="Checking the columns.", tool_calls=[Call("describe_table", {"table_name": "customers"})]),
        Reply(tool_calls=[Call("read_query", {"sql": CITY_SQL})]),
        Reply(text=ANSWER),
    )
    model = LLMBaseModel.create_model(datus_config, "anthropic")
    question = "How many customers per city?"
    manager = node_manager(question)

    async def collect_actions() -> Any:
        async for action in model.generate_with_tools_stream(
                prompt=question, tools=tools, mcp_servers={"sql_mcp": sql_mcp}, instruction="Write SQL.",
                max_turns=30, session=model.create_session("web_session_1"), action_history_manager=manager):
            yield stream_line(action)

    lines: list[str] = []
    loop = asyncio.new_event_loop()
    try:
        agen = collect_actions()
        while True:
            try:
                lines.append(loop.run_until_complete(agen.__anext__()))
            except StopAsyncIteration:
                break
    finally:
        loop.close()
    assert lines[0] == "💭Thinking: Checking the columns."
    assert lines[1].startswith("✓Tool call: describe_table (") and lines[1].endswith(" → success: ...")
    assert lines[2].startswith("✓Tool call: read_query (") and "SELECT city, count(*)" in lines[2]
    assert lines[3] == f"💭Thinking: {ANSWER[:100]}..." and len(lines) == 4
    assert sql_mcp.kinds() == ["connect", "cleanup"]


@pytest.mark.parametrize("name", PROVIDERS)
def test_web_ui_turn_leaves_no_connection_on_its_closed_loop(datus_config: Any, server: FakeProviderServer,
                                                             name: str, caplog: pytest.LogCaptureFixture) -> None:
    """cli/web/chat_executor.py:96-118: each web UI turn runs on asyncio.new_event_loop(),
    driven by run_until_complete(agen.__anext__()), then loop.close() — no shutdown_asyncgens.
    Once that loop is closed, the model layer keeps no connection to the provider open for it,
    and leaves no task behind."""
    psutil = pytest.importorskip("psutil")

    def open_connections() -> int:  # this process's client sockets to the provider
        return sum(1 for c in psutil.Process().net_connections(kind="tcp")
                   if c.raddr and c.raddr.port == server.port and c.status == psutil.CONN_ESTABLISHED)

    model = LLMBaseModel.create_model(datus_config, name)
    with caplog.at_level(logging.ERROR, logger="asyncio"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # what GC finds open is counted below, not warned
        loop = asyncio.new_event_loop()
        agen = model.generate_with_tools_stream(prompt="Hello", mcp_servers={}, max_turns=3)
        try:
            while True:
                try:
                    loop.run_until_complete(agen.__anext__())
                except StopAsyncIteration:
                    break
        finally:
            loop.close()
        left_open = open_connections()
        del agen, loop
        gc.collect()
    destroyed = [r.getMessage() for r in caplog.records if "destroyed but it is pending" in r.getMessage()]
    assert (left_open, destroyed) == (0, [])


def test_sql_summary_and_semantic_nodes_with_generation_hooks(datus_config: Any, server: FakeProviderServer,
                                                             db_tools: DatusDBTools, tmp_path: Path) -> None:
    """sql_summary_agentic_node.py:424-458 and semantic_agentic_node.py:457-491 (CP-9c/d):
    interactive mode passes GenerationHooks (CP-15): on_tool_end reads the raw dict of
    end_generation (result["result"]["filepath"]) and of write_file (a sql_summary file per
    context.tool_arguments), and is called for the MCP server's tools too (the semantic node's
    metricflow server); the node's answer is the last SUCCESS raw_output, parsed for
    sql_summary_file / semantic_model_file (l.531-587)."""
    (tmp_path / "semantic").mkdir()
    hooks = GenerationLikeHooks()
    final = json.dumps({"sql_summary_file": "summary.yaml", "semantic_model_file": "customers.yaml",
                        "output": "done"})
    server.script.add(
        Reply(tool_calls=[Call("list_tables", {})]),  # the MCP server's
        Reply(tool_calls=[Call("write_file", {"path": "summary.yaml", "content": "sql: SELECT 1",
                                              "file_type": "sql_summary"})]),
        Reply(tool_calls=[Call("write_file", {"path": "semantic/customers.yaml", "content": "data_source: c",
                                              "file_type": "semantic_model"}),
                          Call("end_generation", {"filepath": "semantic/customers.yaml"})]),
        Reply(text=final),
    )
    model = LLMBaseModel.create_model(datus_config, "anthropic")
    manager = node_manager("summarize this SQL")
    metricflow_like = sql_server_object(db_tools.db, allowed=["list_tables"])
    steps = asyncio.run(run_stream(model, prompt="summarize this SQL", tools=generation_tools(tmp_path),
                                   mcp_servers={"metricflow_mcp": metricflow_like}, instruction="Summarize.",
                                   max_turns=30, session=None, action_history_manager=manager, hooks=hooks))
    assert json.loads(summary_answer(steps))["sql_summary_file"] == "summary.yaml"
    assert hooks.summaries == [str(tmp_path / "summary.yaml")]
    assert hooks.generated == [(str(tmp_path / "semantic" / "customers.yaml"), "data_source: c")]
    assert hooks.unreadable == []
    assert hooks.tools_ended == ["list_tables", "write_file", "write_file", "end_generation"]


def test_reference_sql_init_runs_summary_nodes_concurrently(datus_config: Any, server: FakeProviderServer,
                                                            tmp_path: Path) -> None:
    """storage/reference_sql/reference_sql_init.py:50-67, 180-190: one SqlSummaryAgenticNode
    (so one model object) per SQL item, their streams run together by asyncio.gather under a
    semaphore, workflow mode (session=None, no hooks); each reads the sql_summary_file of its
    own answer."""
    items = range(4)
    for item in items:
        server.script.add(Reply(tool_calls=[Call("write_file", {"path": f"item_{item}.yaml", "content": f"id: {item}",
                                                                "file_type": "sql_summary"})]),
                          Reply(text=json.dumps({"sql_summary_file": f"item_{item}.yaml", "output": "ok"})),
                          match=f"SQL item {item}")

    async def process_all() -> list[Any]:
        semaphore = asyncio.Semaphore(3)

        async def process_sql_item(item: int) -> Any:
            async with semaphore:
                model = LLMBaseModel.create_model(datus_config)
                steps = await run_stream(model, prompt=f"Summarize SQL item {item}", tools=generation_tools(tmp_path),
                                         mcp_servers={}, instruction="Summarize.", max_turns=30, session=None,
                                         action_history_manager=node_manager(f"SQL item {item}"))
                return json.loads(summary_answer(steps))["sql_summary_file"]

        return await asyncio.gather(*[process_sql_item(item) for item in items], return_exceptions=True)

    assert asyncio.run(process_all()) == [f"item_{item}.yaml" for item in items]
    assert sorted(path.name for path in tmp_path.glob("item_*.yaml")) == [f"item_{item}.yaml" for item in items]


async def test_a_function_tool_calls_the_models_sync_json_output_mid_run(datus_config: Any,
                                                                        server: FakeProviderServer) -> None:
    """tools/func_tool/date_parsing_tools.py:22-25, 45-75 (CP-6 inside CP-9a/b): the chat and
    gen_sql nodes' parse_temporal_expressions tool holds the node's model and, inside the
    running tool loop, calls its sync generate_with_json_output (date_parser.py:73)."""
    model = LLMBaseModel.create_model(datus_config)
    dates = {"dates": [{"original_text": "last month", "date_type": "range", "confidence": 0.9}]}

    def parse_temporal_expressions(task_text: str, current_date: str | None = None) -> dict[str, Any]:
        extracted = model.generate_with_json_output(f"Extract the dates of: {task_text}")  # sync, on the loop's thread
        return {"success": 1, "error": None, "result": {"extracted_dates": extracted["dates"]}}

    tool = datus_function_tool(parse_temporal_expressions, strict_schema(
        task_text={"type": "string"}, current_date={"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}),
        "Extract and parse temporal expressions from natural language text.")
    server.script.add(Reply(tool_calls=[Call("parse_temporal_expressions", {"task_text": "sales last month",
                                                                            "current_date": None})]))
    server.script.add(Reply(text=json.dumps(dates)), match="Extract the dates of")
    server.script.add(Reply(text="Last month is 2025-09."))
    steps = await run_stream(model, prompt="sales last month?", tools=[tool], mcp_servers={}, instruction="Chat.",
                             max_turns=5, action_history_manager=node_manager("sales last month?"))
    [parsed] = [a for a in steps if a.role == ActionRole.TOOL]
    assert parsed.status == ActionStatus.SUCCESS
    assert parsed.output["raw_output"]["result"]["extracted_dates"] == dates["dates"]
    assert chat_answer(steps) == "Last month is 2025-09."


@pytest.mark.parametrize("name", PROVIDERS)
async def test_compare_node(datus_config: Any, server: FakeProviderServer, db_tools: DatusDBTools,
                            name: str) -> None:
    """compare_agentic_node.py:234-270 (CP-9e): raw_output of SUCCESS dict outputs (non-dict
    outputs as they are) parsed for explanation/suggest; tokens from the newest ASSISTANT
    action's usage total_tokens or output_tokens."""
    verdict = json.dumps({"explanation": "Both count per city.", "suggest": "Keep the ORDER BY."})
    server.script.add(*sql_exchange(verdict))
    model = LLMBaseModel.create_model(datus_config, name)
    manager = node_manager("compare these SQLs")
    steps = await run_stream(model, prompt="compare these SQLs", tools=db_tools.available_tools(), mcp_servers={},
                             instruction="Compare.", max_turns=30, session=model.create_session("compare_session_1"),
                             action_history_manager=manager)
    assert json.loads(compare_answer(steps)) == {"explanation": "Both count per city.", "suggest": "Keep the ORDER BY."}
    assert compare_tokens(manager) == 660


# ---------------------------------------------------------------- CP-10: the reasoning stream


@pytest.mark.parametrize("name", PROVIDERS)
async def test_reasoning_stream_with_a_list_prompt(datus_config: Any, server: FakeProviderServer,
                                                   db_tools: DatusDBTools, name: str) -> None:
    """mcp_stream_utils.py:55-63 (CP-10): generate_with_tools_stream(prompt=[{"role": "user",
    ...}], tools, mcp_servers={}, instruction, output_type=str, max_turns,
    action_history_manager); reasoning_sql.py:71-131 then reads read_query actions and the
    assistant "message" action (here tolerant of str roles, as agent_commands.py:935-1024,
    since ActionHistory keeps enum values as plain strings)."""
    server.script.add(*sql_exchange())
    model = LLMBaseModel.create_model(datus_config, name)
    manager = ActionHistoryManager()  # reasoning_sql.py:55-56 makes one when none is given
    prompt = [{"role": "user", "content": "How many customers per city?"}]
    steps = await run_stream(model, prompt=prompt, tools=db_tools.available_tools(), mcp_servers={},
                             instruction="Reason.", output_type=str, max_turns=10, action_history_manager=manager)
    assert manager.actions == steps
    queries = [a for a in manager.actions if a.action_type == "read_query" and a.status == "success"]
    assert [a.input["arguments"]["sql"] for a in queries] == [CITY_SQL]
    messages = [a for a in manager.actions if a.action_type == "message" and a.role == "assistant"]
    assert [a.output["raw_output"] for a in messages] == ["Let me look at the tables."]
    final = manager.actions[-1]
    assert final.role == "assistant" and json.loads(final.output["raw_output"])["sql"] == CITY_SQL
    assert [SQLContext(**c).sql_query for c in final.output["sql_contexts"]] == [CITY_SQL]
    assert "How many customers per city?" in said_to_model(server)


# ---------------------------------------------------------------- CP-15: plan mode's hooks


@pytest.mark.parametrize(("choice", "raised"), [("replan", "REPLAN_REQUIRED"), ("cancel", "User cancelled")])
@pytest.mark.parametrize("name", ["deepseek", "anthropic"])
async def test_plan_mode_hooks_stop_the_stream(datus_config: Any, server: FakeProviderServer, db_tools: DatusDBTools,
                                               name: str, choice: str, raised: str) -> None:
    """cli/plan_hooks.py (CP-15) passed by chat_agentic_node.py:625: on_tool_start reads
    tool.name and context.tool_arguments (a pending todo_update, l.302-330); after todo_write
    it raises PlanningPhaseException("REPLAN_REQUIRED: ...") or UserCancelledException, which
    must leave generate_with_tools_stream so that chat_agentic_node.py:518-575 finds
    "REPLAN_REQUIRED" / "User cancelled" in str(e)."""
    todos: list[dict[str, Any]] = [{"id": "1", "content": "count customers", "status": "completed"}]
    new_plan = json.dumps([{"id": "1", "content": "count per city", "status": "pending"}])
    hooks = PlanModeLikeHooks(choice)
    server.script.add(
        Reply(tool_calls=[Call("todo_update", {"todo_id": "1", "status": "pending"})]),
        Reply(tool_calls=[Call("todo_write", {"todos_json": new_plan})]),
        Reply(text="never asked"),
    )
    model = LLMBaseModel.create_model(datus_config, name)
    manager = node_manager("plan it")
    steps: list[ActionHistory] = []
    with pytest.raises(Exception) as caught:
        async for action in model.generate_with_tools_stream(
                prompt="plan it", tools=db_tools.available_tools() + plan_tools(todos), mcp_servers={},
                instruction="Plan.", max_turns=30, session=model.create_session("plan_session_1"),
                action_history_manager=manager, hooks=hooks):
            steps.append(action)
    error = caught.value
    assert raised in str(error) or "UserCancelledException" in type(error).__name__
    assert hooks.started == [("todo_update", {"todo_id": "1", "status": "pending"}),
                             ("todo_write", {"todos_json": new_plan})]
    assert hooks.pending_updates == [{"todo_id": "1", "status": "pending"}]
    assert hooks.events == ["start"] and hooks.ended == ["todo_update", "todo_write"]
    assert todos[0]["content"] == "count per city"  # todo_write ran; its hook stopped the run after it
    assert [a.action_type for a in steps] == ["todo_update"]
    assert len(server.requests) == 2


# ---------------------------------------------------------------- CP-16: Datus's function tools


def wire_schemas(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Tool name -> argument schema as sent, in any wire format."""
    if "contents" in body:
        declarations = [d for tool in body["tools"] for d in tool.get("functionDeclarations", [])]
        return {d["name"]: d.get("parameters_json_schema") or d.get("parametersJsonSchema") or d["parameters"]
                for d in declarations}
    if "system" in body or "input_schema" in json.dumps(body.get("tools", [])):
        return {tool["name"]: tool["input_schema"] for tool in body["tools"]}
    return {tool["function"]["name"]: tool["function"]["parameters"] for tool in body["tools"]}


@pytest.mark.parametrize("name", PROVIDERS)
async def test_function_tools_as_datus_makes_them(datus_config: Any, server: FakeProviderServer,
                                                  db_tools: DatusDBTools, name: str) -> None:
    """tools/func_tool/base.py:49-100 (CP-16): FunctionTool(name, description, strict
    params_json_schema, on_invoke_tool(tool_ctx, args_str)) answering {"success", "error",
    "result"}. The schema reaches the provider as Datus wrote it; the invoker gets the model's
    JSON text and a context with tool_arguments; a tool that raises (Datus's invoker lets a
    method's TypeError through) is a finished step with success false and the error, which the
    model reads, and the run goes on to its answer."""
    tools = db_tools.available_tools()
    server.script.add(
        Reply(tool_calls=[Call("read_query", {"sql": "SELECT 1", "limit": 5}, id="c_raises")]),
        Reply(tool_calls=[Call("read_query", {"sql": CITY_SQL}, id="c_good")]),
        Reply(text=ANSWER),
    )
    model = LLMBaseModel.create_model(datus_config, name)
    steps = await run_stream(model, prompt="per city?", tools=tools, mcp_servers={}, instruction="SQL.",
                             max_turns=10, action_history_manager=node_manager("per city?"))

    schemas = wire_schemas(server.requests[0].body)
    for tool in tools:
        sent = schemas[tool.name]
        assert sent["additionalProperties"] is False and sorted(sent["required"]) == sorted(tool.params_json_schema["properties"])
        assert sent["properties"] == tool.params_json_schema["properties"]
    raised, good = [a for a in steps if a.role == ActionRole.TOOL]
    assert raised.is_done() and not raised.output["success"]
    assert "unexpected keyword argument 'limit'" in raised.output["error"]
    assert "unexpected keyword argument" in json.dumps(server.requests[1].body)  # the model read it
    assert good.status == ActionStatus.SUCCESS and good.output["raw_output"]["result"]["original_rows"] == 2
    assert chat_answer(steps) == ANSWER
    context, args_str = db_tools.calls[-1]
    assert json.loads(args_str) == {"sql": CITY_SQL} and context.tool_arguments == args_str
    assert context.tool_name == "read_query" and context.tool_call_id


@pytest.mark.parametrize("name", ["deepseek", "openai-4o-mini"])  # only a JSON-text wire format carries broken JSON
async def test_arguments_that_are_not_json(datus_config: Any, server: FakeProviderServer, db_tools: DatusDBTools,
                                           name: str) -> None:
    """CP-16: Datus's invoker answers {"success": 0, "error": "Invalid JSON arguments"} to
    arguments that are not JSON (base.py:49-62); here the run answers for it: a finished
    read_query step with success false and the reason, which the model reads before it answers,
    and which chat_commands.py:718-721 reads as the query's error."""
    server.script.add(Reply(tool_calls=[Call("read_query", '{"sql": "SELECT 1"', id="c_bad_json")]), Reply(text=ANSWER))
    model = LLMBaseModel.create_model(datus_config, name)
    steps = await run_stream(model, prompt="per city?", tools=db_tools.available_tools(), mcp_servers={},
                             instruction="SQL.", max_turns=10, action_history_manager=node_manager("per city?"))
    [bad] = [a for a in steps if a.role == ActionRole.TOOL]
    assert bad.is_done() and not bad.output["success"] and "not JSON" in bad.output["error"]
    assert "not JSON" in json.dumps(server.requests[1].body)
    context = add_in_sql_context("SELECT 1", steps)
    assert context is not None and "not JSON" in context.sql_error
    assert chat_answer(steps) == ANSWER


# ---------------------------------------------------------------- CP-17: what reads the steps


async def test_steps_as_the_cli_web_ui_and_benchmarks_read_them(datus_config: Any, server: FakeProviderServer,
                                                                db_tools: DatusDBTools) -> None:
    """CP-17: action_history_display.py:470-505 (role.upper(), status.upper(), messages,
    end_time - start_time), action_display_app.py:41-53 (titles: function_name, or messages up to
    ":") and :188-345 (read_query's compressed rows, result items, "Execute Failed"),
    chat_executor.py:125-176 (function_name(), input without function_name), a failed
    read_query in chat_commands.py:718-730, ChatNodeResult(action_history=[a.model_dump()])
    saved and read back by benchmark_utils.py:465-493 (output["raw_output"]["result"])."""
    server.script.add(
        Reply(text="Tables first.", tool_calls=[Call("list_tables", ALL_COORDINATES)]),
        Reply(tool_calls=[Call("read_query", {"sql": "SELECT id FROM customers"})]),
        Reply(tool_calls=[Call("read_query", {"sql": "SELECT nope FROM customers"})]),
        Reply(text=ANSWER),
    )
    model = LLMBaseModel.create_model(datus_config)
    steps = await run_stream(model, prompt="ids?", tools=db_tools.available_tools(), mcp_servers={},
                             instruction="SQL.", max_turns=10, action_history_manager=node_manager("ids?"))
    assert all(a.role != ActionRole.USER or ":" in a.messages for a in steps)  # action_display_app.py:68
    for action in steps:
        assert action.role.upper() in {"ASSISTANT", "TOOL"} and action.status.upper() in {"SUCCESS", "FAILED"}
        assert isinstance(action.messages, str) and action.messages
        assert isinstance(action.start_time, datetime) and (action.end_time - action.start_time).total_seconds() >= 0
    tables, rows, failed = [a for a in steps if a.role == ActionRole.TOOL]
    assert tool_view(tables) == {"title": "Tool call - list_tables", "items": [
        {"type": "view", "name": "big_orders"}, {"type": "table", "name": "customers"},
        {"type": "table", "name": "orders"}]}
    assert rows.function_name() == "read_query" and rows.messages.startswith("Tool call: read_query(")
    compressed = tool_view(rows)["rows"]  # 30 rows: Datus's compressor keeps the first and last 10
    assert compressed.splitlines()[:2] == ["id", "1"] and "..." in compressed and compressed.splitlines()[-1] == "30"
    assert {k: v for k, v in rows.input.items() if k != "function_name"}["arguments"] == {
        "sql": "SELECT id FROM customers"}
    assert tool_view(failed)["failed"].startswith("Execute Failed: no such column")
    context = add_in_sql_context("SELECT nope FROM customers", steps)
    assert context is not None and "no such column" in context.sql_error and context.row_count == 0

    saved = json.loads(json.dumps([a.model_dump(mode="json") for a in steps]))
    read_back = [a["output"]["raw_output"]["result"] for a in saved
                 if a["role"] == "tool" and a["input"]["function_name"] == "read_query"
                 and a["output"]["raw_output"].get("success")]
    assert [r["original_rows"] for r in read_back] == [30]
    assert saved[-1]["output"]["usage"]["total_tokens"] > 0


def api_sse_events(actions: list[ActionHistory]) -> list[str]:
    """The SSE events api/service.py:355-431 sends for the actions of a workflow stream that
    come from the model layer (reason_sql's stream, CP-10): none, unless an action failed."""
    events = []
    for action in actions:
        if action.action_type not in ("sql_generation", "sql_execution", "output_generation",
                                      "workflow_completion") and action.status == "failed":
            events.append(f"error: {(action.output or {}).get('error', 'Action failed')}")
    return events


async def test_a_tool_error_the_model_recovers_from_is_no_api_error_event(datus_config: Any, server: FakeProviderServer,
                                                                          db_tools: DatusDBTools) -> None:
    """api/service.py:355-431 (CP-17f): the workflow stream's actions, the reasoning node's
    model steps among them, become SSE events; an action with status "failed" becomes
    "event: error". A run whose first query fails and whose second succeeds, and which then
    answers, is no error for the API's client."""
    server.script.add(
        Reply(tool_calls=[Call("read_query", {"sql": "SELECT nope FROM customers"})]),
        Reply(tool_calls=[Call("read_query", {"sql": CITY_SQL})]),
        Reply(text=ANSWER),
    )
    model = LLMBaseModel.create_model(datus_config)
    steps = await run_stream(model, prompt=[{"role": "user", "content": "per city?"}],
                             tools=db_tools.available_tools(), mcp_servers={}, instruction="Reason.",
                             output_type=str, max_turns=10, action_history_manager=ActionHistoryManager())
    assert chat_answer(steps) == ANSWER
    assert api_sse_events(steps) == []


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("name", PROVIDERS)
@pytest.mark.parametrize("streamed", [False, True])
async def test_max_turns_is_datus_max_turns_error(datus_config: Any, server: FakeProviderServer,
                                                  db_tools: DatusDBTools, name: str, streamed: bool) -> None:
    """tests/test_deepseek_model.py:146,192 and test_claude_model.py:146 catch DatusException
    and compare e.code == ErrorCode.MODEL_MAX_TURNS_EXCEEDED, from generate_with_tools and from
    generate_with_tools_stream; the steps streamed before it stay in the node's manager."""
    server.script.add(Reply(tool_calls=[Call("list_tables", ALL_COORDINATES)]), times=None)
    model = LLMBaseModel.create_model(datus_config, name)
    manager = node_manager("loop forever")
    kwargs: dict[str, Any] = {"prompt": "loop forever", "tools": db_tools.available_tools(), "mcp_servers": {},
                              "instruction": "SQL.", "max_turns": 2, "action_history_manager": manager}
    with pytest.raises(DatusException) as caught:
        if streamed:
            await run_stream(model, **kwargs)
        else:
            await model.generate_with_tools(**kwargs)
    assert caught.value.code == ErrorCode.MODEL_MAX_TURNS_EXCEEDED
    assert [a.action_type for a in manager.get_actions()[2:]] == ["list_tables", "list_tables"]


# ---------------------------------------------------------------- in-process and queue-backed, side by side


def step_view(action: ActionHistory) -> tuple[Any, ...]:
    """Everything of a step Datus's nodes, CLI and web UI read: not its id and times, nor the
    usage's ``latency_ms``."""
    given = action.input
    output = json.loads(json.dumps(action.output, default=str))
    if isinstance(output, dict) and isinstance(output.get("usage"), dict):
        output["usage"].pop("latency_ms", None)
    return (action.role, action.action_type, action.status, action.messages,
            json.dumps(given, sort_keys=True, default=str), json.dumps(output, sort_keys=True))


@pytest.mark.parametrize("name", PROVIDERS)
def test_a_chat_turn_is_the_same_in_process_and_queue_backed(fleet: Fleet, monkeypatch: pytest.MonkeyPatch, env: None,
                                                             db_tools: DatusDBTools, name: str) -> None:
    """CP-9a's turn (chat_agentic_node.py:617-626) and CP-7's call (reasoning_sql.py:166-213) on
    the same fake with the same script, once on the in-process model and once on its queue-backed
    twin (the caller's FunctionTools run in the caller both times): the same steps, field for
    field, in the node's manager too, and the same result dict."""
    fleet.caller(monkeypatch)
    server = fleet.server
    server.reset()
    models = {"in-process": LLMBaseModel.create_model(datus_shaped(server), name),
              "queue": LLMBaseModel.create_model(
                  DatusAgentConfig({name: DatusModelConfig("queue", "", "", name)}, name), name)}
    assert type(models["queue"]).__name__ == "QueueModel" and type(models["in-process"]).__name__ != "QueueModel"

    steps, managers, results = {}, {}, {}
    for place, model in models.items():
        server.script.add(*sql_exchange())
        managers[place] = node_manager("How many customers per city?")
        steps[place] = asyncio.run(run_stream(model, prompt="How many customers per city?",
                                              tools=db_tools.available_tools(), mcp_servers={},
                                              instruction="You are Datus.", max_turns=30,
                                              action_history_manager=managers[place]))
        server.script.add(*sql_exchange())
        results[place] = asyncio.run(model.generate_with_tools(
            prompt=[{"role": "user", "content": "How many customers per city?"}], mcp_servers={},
            instruction="You reason in SQL.", tools=db_tools.available_tools(), output_type=str, max_turns=5))
    assert [step_view(a) for a in steps["queue"]] == [step_view(a) for a in steps["in-process"]]
    assert [a.action_type for a in steps["queue"]] == ["message", "list_tables", "read_query", "final_response"]
    assert [step_view(a) for a in managers["queue"].get_actions()] == \
        [step_view(a) for a in managers["in-process"].get_actions()]
    local, queued = results["in-process"], results["queue"]
    assert queued["content"] == local["content"] == ANSWER
    assert [c.model_dump() for c in queued["sql_contexts"]] == [c.model_dump() for c in local["sql_contexts"]]
    for usage in (queued["usage"], local["usage"]):
        usage.pop("latency_ms", None)
    assert (queued["usage"], queued["turns_used"], queued["model"]) == (local["usage"], local["turns_used"],
                                                                       local["model"])


def test_a_function_tool_step_names_no_server(datus_config: Any, server: FakeProviderServer,
                                              db_tools: DatusDBTools) -> None:
    """A function tool's step as the web UI reads it (cli/web/chat_executor.py:125-176): its input
    less ``function_name`` — arguments, call id, tool, and no server (the tool is no MCP server's)."""
    server.script.add(Reply(tool_calls=[Call("read_query", {"sql": "SELECT 1"}, id="c_1")]), Reply(text="one"))
    model = LLMBaseModel.create_model(datus_config)
    steps = asyncio.run(run_stream(model, prompt="one?", tools=db_tools.available_tools(), mcp_servers={},
                                   instruction="SQL.", max_turns=5, action_history_manager=node_manager("one?")))
    [tool] = [a for a in steps if a.role == ActionRole.TOOL]
    assert tool.input["arguments"] == {"sql": "SELECT 1"} and tool.input["call_id"] == "c_1"
    assert tool.input.get("server") is None
