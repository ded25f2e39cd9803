"""MCP servers given as openai-agents server objects (``mcp_servers={"name": MCPServerStdio(...)}``,
passed unconnected, as Datus-agent's gen_sql and semantic nodes do): real server processes
(tests/fakes/mcp_tool_server.py, the shipped SQL server) behind an object with openai-agents'
server interface over the mcp SDK, and the real ``agents.mcp.MCPServerStdio`` where openai-agents
is installed. The model is the scripted `FakeModel`."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from datus.models.agents_compat import AgentInfo, RunContext
from datus.models.config import ModelConfig
from datus.models.fake_model import FakeModel
from datus.models.scripted import Reply, ScriptedRequest
from datus.models.scripted import ScriptedToolCall as Call
from datus.schemas.action_history import ActionHistory, ActionRole, ActionStatus
from tests.mcp_servers.conftest import FAKE_SERVER, make_shop_db, pid_alive, sql_server
from tests.models.agents_shapes import ContextManagedServer, DuckMCPServer, RecordingHooks

ALLOWED = {"allowed_tool_names": ["echo", "pid", "fail"]}


def fake(handler: Any) -> FakeModel:
    return FakeModel(ModelConfig(type="fake", model="scripted", retry_base_delay_s=0.0), handler=handler)


def scripted(*replies: Reply, seen: list[ScriptedRequest] | None = None) -> FakeModel:
    answers = iter(replies)
    return fake(lambda request: (seen.append(request) if seen is not None else None) or next(answers))


def pid_of(actions: list[ActionHistory]) -> int:
    step = next(a for a in actions if a.action_type == "pid" and a.status == ActionStatus.SUCCESS)
    return int(json.loads(step.output["raw_output"])["text"])


def echo_run() -> list[Reply]:
    return [Reply(tool_calls=[Call("pid", {}, id="p"), Call("echo", {"text": "hello"}, id="e"),
                              Call("fail", {"message": "no luck"}, id="f")]),
            Reply(text="done")]


@pytest.mark.parametrize("stream_it", [False, True], ids=["plain", "streamed"])
async def test_a_server_object_is_connected_for_the_run_and_cleaned_up_after(stream_it: bool) -> None:
    server = DuckMCPServer(tool_filter=ALLOWED)  # unconnected, with a tool filter: as Datus's filesystem server
    seen: list[ScriptedRequest] = []
    model = scripted(*echo_run(), seen=seen)
    if stream_it:
        actions = [a async for a in model.generate_with_tools_stream(prompt="go", mcp_servers={"tools": server})]
    else:
        from datus.schemas.action_history import ActionHistoryManager

        manager = ActionHistoryManager()
        result = await model.generate_with_tools(prompt="go", mcp_servers={"tools": server},
                                                 action_history_manager=manager)
        assert result["content"] == "done"
        actions = manager.get_actions()

    assert sorted(tool["name"] for tool in seen[0].tools) == ["echo", "fail", "pid"]  # the filter applied
    run_context, agent = server.filter_contexts[0]
    assert isinstance(run_context, RunContext) and isinstance(agent, AgentInfo) and agent.mcp_servers == [server]
    _, echo, fail = (a for a in actions if a.role == ActionRole.TOOL)
    # raw_output: the JSON text openai-agents makes of MCP content (Datus's CLI parses it); the model reads the text
    assert json.loads(echo.output["raw_output"])["text"] == "hello" and echo.input["server"] == "tools"
    assert [m["content"] for m in seen[1].messages if m["role"] == "tool"][1] == "hello"
    assert fail.status == ActionStatus.SUCCESS and fail.output["success"] is False and "no luck" in fail.output["error"]
    # connected and cleaned up once, by one task; the process is gone
    assert server.kinds() == ["connect", "cleanup"] and server.events[0][1] is server.events[1][1]
    assert server.session is None and not pid_alive(pid_of(actions))


def test_a_stream_driven_step_by_step_from_other_tasks_cleans_up_in_the_task_that_connected() -> None:
    """Datus's web UI: ``loop.run_until_complete(agen.__anext__())`` per step, each its own task."""
    server = DuckMCPServer(tool_filter=ALLOWED)
    loop = asyncio.new_event_loop()
    models: list[FakeModel] = []  # kept until the loop is closed: a model dropped earlier closes its clients there
    try:
        for close_early in (False, True):
            server.events.clear()
            models.append(scripted(*echo_run()))
            steps = models[-1].generate_with_tools_stream(prompt="go", mcp_servers={"tools": server})
            actions: list[ActionHistory] = []
            while True:
                try:
                    actions.append(loop.run_until_complete(steps.__anext__()))
                except StopAsyncIteration:
                    break
                if close_early and actions[-1].action_type == "pid":
                    loop.run_until_complete(steps.aclose())  # the user stopped the answer
                    break
            assert server.kinds() == ["connect", "cleanup"] and server.events[0][1] is server.events[1][1]
            assert not pid_alive(pid_of(actions))
    finally:
        loop.close()


async def test_one_server_object_shared_by_concurrent_runs_is_connected_once() -> None:
    server = DuckMCPServer(tool_filter=ALLOWED)  # a process-wide singleton, as Datus's filesystem server

    def answer(request: ScriptedRequest) -> Reply:
        told = [m for m in request.messages if m["role"] == "tool"]
        if not told:
            return Reply(tool_calls=[Call("pid", {})], latency_s=0.2)  # both runs hold the server at once
        return Reply(text=f"{request.messages[0]['content']}: {json.loads(told[0]['content'])}")

    model = fake(answer)
    first, second = await asyncio.gather(model.generate_with_tools(prompt="first", mcp_servers={"fs": server}),
                                         model.generate_with_tools(prompt="second", mcp_servers={"fs": server}))
    assert server.kinds() == ["connect", "cleanup"]
    assert first["content"].split(": ")[1] == second["content"].split(": ")[1]  # one process served both
    await model.generate_with_tools(prompt="third", mcp_servers={"fs": server})
    assert server.kinds() == ["connect", "cleanup", "connect", "cleanup"]  # connected anew for the next run


async def test_a_run_joining_a_server_another_run_connected_shares_it_until_both_end() -> None:
    server = DuckMCPServer(tool_filter=ALLOWED)
    first_connected, second_joined, first_done = asyncio.Event(), asyncio.Event(), asyncio.Event()

    class FirstHooks:  # the first run holds its connected server until the second run has joined
        async def on_llm_start(self, *args: Any) -> None:
            first_connected.set()
            await second_joined.wait()

    class SecondHooks:
        async def on_start(self, *args: Any) -> None:  # its tools are listed by now
            second_joined.set()

        async def on_tool_start(self, *args: Any) -> None:  # its call comes after the first run has ended
            await first_done.wait()

    def pid_then_answer(request: ScriptedRequest) -> Reply:
        told = [m for m in request.messages if m["role"] == "tool"]
        return Reply(text=f"pid {json.loads(told[0]['content'])}") if told else Reply(tool_calls=[Call("pid", {})])

    model = fake(pid_then_answer)

    async def second() -> dict[str, Any]:
        await first_connected.wait()
        assert server.session is not None  # connected by the first run, not by its caller
        return await model.generate_with_tools(prompt="second", mcp_servers={"fs": server}, hooks=SecondHooks())

    async def first() -> dict[str, Any]:
        try:
            return await model.generate_with_tools(prompt="first", mcp_servers={"fs": server}, hooks=FirstHooks())
        finally:
            first_done.set()

    one, two = await asyncio.gather(first(), second())
    assert server.kinds() == ["connect", "cleanup"] and one["content"] == two["content"]
    assert server.session is None


async def test_a_server_that_fails_to_connect_is_left_out(caplog: pytest.LogCaptureFixture) -> None:
    broken = DuckMCPServer(name="broken", command=[sys.executable, "-c", "import sys; sys.exit('no config')"])
    seen: list[ScriptedRequest] = []
    model = scripted(Reply(tool_calls=[Call("echo", {"text": "still here"})]), Reply(text="ok"), seen=seen)
    with caplog.at_level(logging.ERROR, logger="datus.models.agents_mcp"):
        result = await model.generate_with_tools(prompt="go", mcp_servers={"broken": broken,
                                                                           "tools": DuckMCPServer(tool_filter=ALLOWED)})
    assert result["content"] == "ok"
    assert sorted(tool["name"] for tool in seen[0].tools) == ["echo", "fail", "pid"]
    assert "MCP server 'broken' failed to connect and is left out of the run" in caplog.text
    assert broken.session is None


async def test_a_run_cancelled_while_its_server_connects_stops_the_server(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    silent = DuckMCPServer(name="silent", command=[  # starts, never answers the handshake
        sys.executable, "-c", "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)",
        str(pid_file)])
    model = scripted(Reply(text="never asked"))
    run = asyncio.create_task(model.generate_with_tools(prompt="go", mcp_servers={"silent": silent}))
    async with asyncio.timeout(60):
        while not (pid_file.exists() and pid_file.read_text()):
            await asyncio.sleep(0.02)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert silent.kinds() == ["connect", "cleanup"] and silent.session is None
    assert not pid_alive(int(pid_file.read_text()))


async def test_server_objects_next_to_our_own_servers_and_to_each_other(tmp_path: Path) -> None:
    db = make_shop_db(tmp_path / "shop.db")
    query = "SELECT city, count(*) FROM customers GROUP BY city"
    objects = {"a": ContextManagedServer(name="a", tool_filter={"allowed_tool_names": ["echo"]}),
               "b": DuckMCPServer(name="b", tool_filter={"allowed_tool_names": ["echo"]})}
    seen: list[ScriptedRequest] = []
    model = scripted(Reply(tool_calls=[Call("a__echo", {"text": "from a"}, id="1"),
                                       Call("b__echo", {"text": "from b"}, id="2"),
                                       Call("read_query", {"query": query}, id="3")]),
                     Reply(text="Berlin and Lisbon."), seen=seen)
    result = await model.generate_with_tools(prompt="go", mcp_servers={**objects, "sql": sql_server(db)})
    names = sorted(tool["name"] for tool in seen[0].tools)
    assert names == ["a__echo", "b__echo", "describe_table", "list_tables", "read_query"]
    told = [m["content"] for m in seen[1].messages if m["role"] == "tool"]
    assert told[:2] == ["from a", "from b"] and json.loads(told[2])["row_count"] == 2
    assert objects["a"].kinds() == ["connect", "cleanup"] and objects["b"].kinds() == ["connect", "cleanup"]
    assert [c.row_count for c in result["sql_contexts"]] == [2]


async def test_sql_contexts_from_a_server_object_and_hooks_on_its_tools(tmp_path: Path) -> None:
    db = make_shop_db(tmp_path / "shop.db")
    sql = DuckMCPServer(name="warehouse", command=[sys.executable, "-m", "datus.mcp_servers.sql_server",
                                                   "--url", f"sqlite:///{db}"])
    query = "SELECT id FROM customers WHERE city = 'Berlin'"
    hooks = RecordingHooks()
    model = scripted(Reply(tool_calls=[Call("read_query", {"query": query}, id="q")]), Reply(text="15 of them."))
    result = await model.generate_with_tools(prompt="Berlin?", mcp_servers={"warehouse": sql}, hooks=hooks)
    [context] = result["sql_contexts"]
    assert (context.sql_query, context.row_count, context.sql_error) == (query, 15, "")
    assert json.loads(context.sql_return)["row_count"] == 15  # the text of the MCP content, unwrapped
    (_, (ctx, _, tool)), (_, (_, _, same, raw)) = [call for call in hooks.calls if call[0].startswith("on_tool")]
    assert (tool.name, tool.server, ctx.tool_arguments) == ("read_query", "warehouse", json.dumps({"query": query}))
    assert same == tool and json.loads(json.loads(raw)["text"])["row_count"] == 15


@pytest.mark.parametrize("stream_it", [False, True], ids=["plain", "streamed"])
async def test_real_openai_agents_mcp_server_stdio(stream_it: bool) -> None:
    agents_mcp = pytest.importorskip("agents.mcp")

    class SilentMCPServerStdio(agents_mcp.MCPServerStdio):  # a subclass, as Datus's
        pass

    server = SilentMCPServerStdio(params={"command": sys.executable, "args": [str(FAKE_SERVER)]}, name="fake",
                                  tool_filter=agents_mcp.create_static_tool_filter(allowed_tool_names=["echo", "pid"]))
    seen: list[ScriptedRequest] = []
    model = scripted(Reply(tool_calls=[Call("pid", {}, id="p"), Call("echo", {"text": "hi"}, id="e")]),
                     Reply(text="done"), seen=seen)
    if stream_it:
        actions = [a async for a in model.generate_with_tools_stream(prompt="go", mcp_servers={"fake": server})]
    else:
        from datus.schemas.action_history import ActionHistoryManager

        manager = ActionHistoryManager()
        await model.generate_with_tools(prompt="go", mcp_servers={"fake": server}, action_history_manager=manager)
        actions = manager.get_actions()
    assert sorted(tool["name"] for tool in seen[0].tools) == ["echo", "pid"]
    echo = next(a for a in actions if a.action_type == "echo")
    assert json.loads(echo.output["raw_output"]) == {"type": "text", "text": "hi", "annotations": None, "meta": None}
    assert server.session is None and not pid_alive(pid_of(actions))
