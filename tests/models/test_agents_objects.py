"""Tool runs called the way Datus-agent calls them (callsites.md CP-7..CP-10, CP-15..CP-17):
openai-agents ``FunctionTool`` objects (a dataclass of the same shape here; the real
``agents.FunctionTool``/``function_tool`` where openai-agents is installed), ``hooks=``, prompts
as message lists, Datus's keywords, and the steps and results with the keys Datus reads. The
tools run real SQL on SQLite; the model is the scripted `FakeModel`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from datus.models.agents_compat import AgentInfo, RunContext
from datus.models.config import ModelConfig
from datus.models.errors import MaxTurnsExceededError
from datus.models.fake_model import FakeModel
from datus.models.scripted import Reply, ScriptedRequest
from datus.models.scripted import ScriptedToolCall as Call
from datus.schemas.action_history import ActionHistory, ActionHistoryManager, ActionRole, ActionStatus
from datus.schemas.node_models import SQLContext
from datus.utils.exceptions import DatusException, ErrorCode
from tests.mcp_servers.conftest import make_shop_db
from tests.models.agents_shapes import (
    FunctionToolShape,
    PlanningPhaseException,
    RecordingHooks,
    ShopTools,
    UserCancelledException,
    strict_schema,
)

CITY_SQL = "SELECT city, count(*) AS n FROM customers GROUP BY city ORDER BY city"
ANSWER = '{"sql": "SELECT city, count(*) AS n FROM customers GROUP BY city", "output": "15 each"}'


@pytest.fixture
def shop(tmp_path: Path) -> ShopTools:
    return ShopTools(make_shop_db(tmp_path / "shop.db"))  # 30 customers, 15 in Berlin and 15 in Lisbon


def fake(*replies: Reply, handler: Any = None) -> FakeModel:
    config = ModelConfig(type="fake", model="scripted", retry_base_delay_s=0.0)
    return FakeModel(config, replies=None if handler else list(replies), handler=handler)


def sql_replies() -> list[Reply]:
    """list_tables, then read_query with arguments as a model writes them, then the answer."""
    return [
        Reply(text="Looking at the tables first.", tool_calls=[Call("list_tables", {}, id="call_1")],
              input_tokens=100, output_tokens=10),
        Reply(tool_calls=[Call("read_query", json.dumps({"sql": CITY_SQL}), id="call_2")],
              input_tokens=200, output_tokens=20),
        Reply(text=ANSWER, input_tokens=300, output_tokens=30),
    ]


async def stream(model: FakeModel, prompt: Any, **kwargs: Any) -> list[ActionHistory]:
    return [action async for action in model.generate_with_tools_stream(prompt=prompt, **kwargs)]


def add_in_sql_context(actions: list[ActionHistory]) -> SQLContext | None:
    """Datus's cli/chat_commands.py:693-734, reading the newest finished read_query step."""
    last = next((a for a in reversed(actions) if a and a.is_done() and a.role == ActionRole.TOOL
                 and a.function_name() == "read_query"), None)
    if last is None:
        return None
    output = last.output
    if not output.get("success", "True"):
        error, sql_return, rows = output.get("error", "") or output.get("raw_output", ""), None, 0
    else:
        tool_result = output.get("raw_output", {})
        if tool_result.get("success", 0) == 1:
            data = tool_result.get("result")
            error, rows, sql_return = None, data.get("original_rows", 0), data.get("compressed_data", "")
        else:
            error, sql_return, rows = tool_result.get("error", ""), "", 0
    return SQLContext(sql_query="q", sql_error=error, sql_return=sql_return, row_count=rows, explanation="")


def chat_node_tokens(actions: list[ActionHistory]) -> int:
    """Datus's chat_agentic_node.py:449-468: newest assistant step with usage.total_tokens."""
    for action in reversed(actions):
        if action.role == ActionRole.ASSISTANT and isinstance(action.output, dict):
            total = (action.output.get("usage") or {}).get("total_tokens")
            if total:
                return total
    return 0


# ---------------------------------------------------------------- FunctionTool objects and steps


async def test_function_tools_run_with_a_tool_context_and_keep_their_raw_answers(shop: ShopTools) -> None:
    seen: list[ScriptedRequest] = []
    replies = iter(sql_replies())
    model = fake(handler=lambda request: seen.append(request) or next(replies))
    manager = ActionHistoryManager()
    actions = await stream(model, "How many customers per city?", tools=shop.tools(), mcp_servers={},
                           instruction="You answer with SQL.", max_turns=10, session=None,
                           action_history_manager=manager, hooks=None)

    # what the model was offered and told
    assert [tool["name"] for tool in seen[0].tools] == ["list_tables", "read_query"]
    assert seen[0].tools[1]["parameters"] == strict_schema(sql={"type": "string"})
    told = [m for m in seen[2].messages if m["role"] == "tool"]
    assert json.loads(told[1]["content"]) == shop.read_query(CITY_SQL)  # the answer's JSON text

    # on_invoke_tool got the model's raw JSON text and a context shaped like openai-agents' ToolContext
    assert shop.arguments == ["{}", json.dumps({"sql": CITY_SQL})]
    ctx = shop.contexts[1]
    assert (ctx.tool_name, ctx.tool_call_id, ctx.tool_arguments) == ("read_query", "call_2", json.dumps({"sql": CITY_SQL}))
    assert ctx.context is None and shop.requests_seen == [1, 2]  # the run's usage so far, as openai-agents'
    assert ctx.usage.total_tokens == 660 and ctx.usage.input_tokens_details.cached_tokens == 0

    # only finished steps, each in the caller's manager
    assert [(a.role, a.action_type, a.status) for a in actions] == [
        ("assistant", "message", "success"), ("tool", "list_tables", "success"), ("tool", "read_query", "success"),
        ("assistant", "final_response", "success")]
    assert manager.get_actions() == actions
    said, listed, query, final = actions
    assert said.output["raw_output"] == "Looking at the tables first." and said.output["success"] is True
    assert query.messages == f"Tool call: read_query('{json.dumps({'sql': CITY_SQL})[:80]}...')"
    assert query.function_name() == "read_query" and query.input["arguments"] == {"sql": CITY_SQL}
    assert query.output["raw_output"] == shop.read_query(CITY_SQL)  # the dict itself
    assert query.output["success"] is True and query.output["summary"] == query.output["status_message"] == "2 rows"
    assert listed.output["summary"] == "3 items" and query.end_time is not None
    assert final.output["raw_output"] == final.output["content"] == ANSWER and final.output["success"] is True
    assert final.output["usage"]["total_tokens"] == 660 and final.output["turns_used"] == 3
    assert final.output["model"] == "scripted"

    # what Datus's CLI and chat node make of them
    assert add_in_sql_context(manager.get_actions()) == SQLContext(
        sql_query="q", sql_error=None, sql_return="city,n\nBerlin,15\nLisbon,15\n", row_count=2, explanation="")
    assert chat_node_tokens(manager.get_actions()) == 660


async def test_the_result_has_datus_keys_and_sql_contexts(shop: ShopTools) -> None:
    model = fake(*sql_replies())
    # Datus's reasoning node: a list of messages, no session, no hooks (reasoning_sql.py:166-176)
    result = await model.generate_with_tools(prompt=[{"role": "user", "content": "Customers per city?"}],
                                             mcp_servers={}, instruction="reasoning_system", tools=shop.tools(),
                                             output_type=str, max_turns=10)
    assert set(result) == {"content", "sql_contexts", "usage", "model", "turns_used"}
    assert result["content"] == ANSWER and result["turns_used"] == 3
    assert result["usage"]["output_tokens"] == 60 and result["usage"]["total_tokens"] == 660
    [context] = result["sql_contexts"]
    assert isinstance(context, SQLContext)
    assert (context.sql_query, context.sql_return, context.sql_error, context.row_count) == (
        CITY_SQL, "city,n\nBerlin,15\nLisbon,15\n", "", 2)
    assert context.explanation == ANSWER


async def test_a_tool_reporting_failure_is_a_done_step_with_its_error(shop: ShopTools) -> None:
    model = fake(Reply(tool_calls=[Call("read_query", {"sql": "SELECT * FROM nowhere"}, id="bad")]),
                 Reply(text="There is no such table."))
    manager = ActionHistoryManager()
    result = await model.generate_with_tools(prompt="q", tools=shop.tools(), action_history_manager=manager)
    [step] = [a for a in manager.get_actions() if a.role == ActionRole.TOOL]
    assert step.status == ActionStatus.SUCCESS and step.output["success"] is False  # the model read the failure
    assert step.output["raw_output"] == {"success": 0, "error": "no such table: nowhere", "result": None}
    assert step.output["error"] == "no such table: nowhere" and step.output["summary"].startswith("Failed: no such")
    assert add_in_sql_context(manager.get_actions()).sql_error == "no such table: nowhere"
    [context] = result["sql_contexts"]
    assert (context.sql_error, context.sql_return, context.row_count) == ("no such table: nowhere", "", None)


async def test_a_tool_that_raises_is_a_failed_result_the_model_reads(shop: ShopTools) -> None:
    async def invoke(ctx: Any, args: str) -> Any:
        raise UserCancelledException("raised by the tool, not a hook")

    broken = FunctionToolShape("broken", "Always raises.", strict_schema(), invoke)
    seen: list[ScriptedRequest] = []
    replies = iter([Reply(tool_calls=[Call("broken", {}, id="b1")]), Reply(text="It broke.")])
    model = fake(handler=lambda request: seen.append(request) or next(replies))
    actions = await stream(model, "go", tools=[broken])
    assert actions[-1].output["content"] == "It broke."
    assert actions[0].status == ActionStatus.SUCCESS and actions[0].output["success"] is False
    assert actions[0].output["error"] == "UserCancelledException: raised by the tool, not a hook"
    assert seen[1].messages[-1]["content"] == "UserCancelledException: raised by the tool, not a hook"


async def test_is_enabled_as_a_bool_or_a_callable_of_the_run_context_and_agent(shop: ShopTools) -> None:
    asked: list[tuple[Any, Any]] = []

    async def only_for_chat(run_context: Any, agent: Any) -> bool:
        asked.append((run_context, agent))
        return agent.name == "chat"

    listed, query = shop.tools()
    listed.is_enabled = False
    query.is_enabled = only_for_chat
    seen: list[ScriptedRequest] = []
    model = fake(handler=lambda request: seen.append(request) or Reply(text="ok"))
    await model.generate_with_tools(prompt="q", tools=[listed, query], agent_name="chat", instruction="be brief")
    await model.generate_with_tools(prompt="q", tools=[listed, query])
    assert [[tool["name"] for tool in request.tools] for request in seen] == [["read_query"], []]
    run_context, agent = asked[0]
    assert isinstance(run_context, RunContext) and run_context.context is None
    assert isinstance(agent, AgentInfo) and agent.instructions == "be brief" and agent.tools == [listed, query]


# ---------------------------------------------------------------- hooks


async def test_hooks_are_called_as_openai_agents_calls_them(shop: ShopTools) -> None:
    hooks = RecordingHooks()
    tools = shop.tools()
    actions = await stream(fake(*sql_replies()), "How many customers per city?", tools=tools,
                           instruction="You answer with SQL.", hooks=hooks, agent_name="chat_agent")
    assert hooks.names() == ["on_start", "on_llm_start", "on_llm_end", "on_tool_start", "on_tool_end",
                             "on_llm_start", "on_llm_end", "on_tool_start", "on_tool_end",
                             "on_llm_start", "on_llm_end", "on_end"]
    (_, (ctx, agent)), (_, (_, _, system_prompt, items)) = hooks.calls[0], hooks.calls[1]
    assert agent.name == "chat_agent" and agent.instructions == "You answer with SQL." and agent.tools == tools
    assert isinstance(ctx, RunContext) and ctx.context is None
    assert system_prompt == "You answer with SQL." and items == [{"role": "user", "content": "How many customers per city?"}]
    tool_start, tool_end = hooks.calls[7][1], hooks.calls[8][1]
    assert tool_start[2] is tools[1] and tool_end[2] is tools[1]  # the FunctionTool object the caller passed
    assert tool_start[0].tool_arguments == json.dumps({"sql": CITY_SQL}) and tool_start[0].tool_call_id == "call_2"
    assert tool_end[3] is actions[2].output["raw_output"]  # the tool's raw dict, not its text
    assert tool_end[3]["result"]["original_rows"] == 2
    assert hooks.calls[-1][1][2] == ANSWER  # on_end's output
    assert hooks.calls[-2][1][2].text == ANSWER  # on_llm_end's response


async def test_a_hooks_object_may_have_only_some_methods(shop: ShopTools) -> None:
    ended: list[tuple[str, Any]] = []

    class GenerationLike:  # as Datus's GenerationHooks reads on_tool_end
        async def on_tool_end(self, context: Any, agent: Any, tool: Any, result: Any) -> None:
            ended.append((getattr(tool, "name", getattr(tool, "__name__", str(tool))), result))

    result = await fake(*sql_replies()).generate_with_tools(prompt="q", tools=shop.tools(), hooks=GenerationLike())
    assert result["content"] == ANSWER
    assert [name for name, _ in ended] == ["list_tables", "read_query"]
    assert ended[1][1]["result"]["compressed_data"].startswith("city,n")


@pytest.mark.parametrize("stream_it", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize(("hook", "error"), [
    ("on_tool_end", PlanningPhaseException("REPLAN_REQUIRED: the user wants another plan")),
    ("on_tool_start", UserCancelledException("User cancelled the plan")),
])
async def test_what_a_hook_raises_leaves_the_run_as_it_is(hook: str, error: Exception, stream_it: bool,
                                                          shop: ShopTools) -> None:
    hooks = RecordingHooks(raise_in={hook: error})
    model = fake(*sql_replies())
    with pytest.raises(type(error)) as info:
        if stream_it:
            await stream(model, "q", tools=shop.tools(), hooks=hooks)
        else:
            await model.generate_with_tools(prompt="q", tools=shop.tools(), hooks=hooks)
    assert info.value is error and str(info.value) == str(error)  # Datus matches the text and the type name
    assert "UserCancelledException" in type(info.value).__name__ or "REPLAN_REQUIRED" in str(info.value)
    # a start hook that raises keeps the tool from running; an end hook runs after it
    assert shop.arguments == ([] if hook == "on_tool_start" else ["{}"])


# ---------------------------------------------------------------- call shapes and errors


async def test_max_turns_raises_datus_max_turns_error_streamed_or_not(shop: ShopTools) -> None:
    endless = [Reply(tool_calls=[Call("list_tables", {})])] * 4
    with pytest.raises(MaxTurnsExceededError) as plain:
        await fake(*endless).generate_with_tools(prompt="q", tools=shop.tools(), max_turns=2)
    with pytest.raises(DatusException) as streamed:
        await stream(fake(*endless), "q", tools=shop.tools(), max_turns=2)
    for error in (plain.value, streamed.value):
        assert error.code == ErrorCode.MODEL_MAX_TURNS_EXCEEDED and error.error_code == ErrorCode.MODEL_MAX_TURNS_EXCEEDED


class ListSession:
    """The session interface a tool run uses (what ``model.create_session(id)`` returns)."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def aget_messages(self) -> list[Any]:
        return list(self.messages)

    async def aadd_messages(self, messages: list[Any], token_counts: list[int], once_after: int | None = None) -> None:
        self.messages += messages


async def test_datus_compaction_call_on_a_session() -> None:
    """agentic_node.py:257-266: no tools, one turn, temperature and max_tokens as keywords."""
    seen: list[ScriptedRequest] = []
    model = fake(handler=lambda request: seen.append(request) or Reply(text="summary", output_tokens=7))
    session = ListSession()
    result = await model.generate_with_tools(prompt="Summarise.", session=session, max_turns=1, temperature=0.3,
                                             max_tokens=2000)
    assert result.get("content", "") == "summary" and result.get("usage", {}).get("output_tokens", 0) == 7
    assert seen[0].body["options"]["temperature"] == 0.3 and seen[0].body["options"]["max_tokens"] == 2000
    assert [m.role for m in session.messages] == ["user", "assistant"]


async def test_live_steps_add_the_user_step_deltas_and_tools_under_way(shop: ShopTools) -> None:
    manager = ActionHistoryManager()
    live = await stream(fake(*sql_replies()), "q", tools=shop.tools(), live_steps=True, action_history_manager=manager)
    kinds = [(a.action_type, a.status) for a in live if a.action_type != "assistant_delta"]
    assert kinds[:4] == [("user_input", "success"), ("message", "success"), ("list_tables", "processing"),
                         ("list_tables", "success")]
    assert any(a.action_type == "assistant_delta" for a in live)
    # the manager holds each step once, in its final state, deltas left out
    assert [a.action_type for a in manager.get_actions()] == [
        "user_input", "message", "list_tables", "read_query", "final_response"]
    assert all(a.is_done() for a in manager.get_actions())


async def test_reasoning_alone_is_a_step_of_live_runs_only(shop: ShopTools) -> None:
    def replies() -> list[Reply]:
        return [Reply(reasoning="The tables first.", tool_calls=[Call("list_tables", {}, id="t")]), Reply(text="ok")]

    quiet = await stream(fake(*replies()), "q", tools=shop.tools())
    live = await stream(fake(*replies()), "q", tools=shop.tools(), live_steps=True)
    assert [a.action_type for a in quiet] == ["list_tables", "final_response"]  # no blank line in Datus's CLI
    [thought] = [a for a in live if a.action_type == "message"]
    assert thought.output["reasoning"] == "The tables first." and thought.output["raw_output"] == ""


@pytest.mark.parametrize("stream_it", [False, True], ids=["plain", "streamed"])
async def test_real_openai_agents_objects(stream_it: bool, shop: ShopTools) -> None:
    agents = pytest.importorskip("agents")

    @agents.function_tool
    def city_count(city: str) -> int:
        """Customers living in a city.

        Args:
            city: the city's name.
        """
        return 15 if city == "Berlin" else 0

    async def invoke(tool_ctx: Any, args_str: str) -> dict[str, Any]:  # Datus's trans_to_function_tool
        return shop.read_query(**json.loads(args_str))

    read_query = agents.FunctionTool(name="read_query", description="Run SQL.",
                                     params_json_schema=strict_schema(sql={"type": "string"}), on_invoke_tool=invoke)
    disabled = agents.FunctionTool(name="hidden", description="Never offered.", params_json_schema=strict_schema(),
                                   on_invoke_tool=invoke, is_enabled=lambda ctx, agent: False)

    class Hooks(agents.AgentHooks):
        def __init__(self) -> None:
            self.ended: list[tuple[str, Any]] = []

        async def on_tool_end(self, context: Any, agent: Any, tool: Any, result: Any) -> None:
            self.ended.append((tool.name, result))

    hooks = Hooks()
    seen: list[ScriptedRequest] = []
    replies = iter([Reply(tool_calls=[Call("city_count", {"city": "Berlin"}, id="a"),
                                      Call("read_query", {"sql": CITY_SQL}, id="b")]),
                    Reply(text="Berlin has 15 customers.")])
    model = fake(handler=lambda request: seen.append(request) or next(replies))
    tools = [city_count, read_query, disabled]
    if stream_it:
        final = (await stream(model, "q", tools=tools, hooks=hooks))[-1]
        content, contexts = final.output["content"], [SQLContext(**c) for c in final.output["sql_contexts"]]
    else:
        result = await model.generate_with_tools(prompt="q", tools=tools, hooks=hooks)
        content, contexts = result["content"], result["sql_contexts"]
    assert content == "Berlin has 15 customers."
    assert [tool["name"] for tool in seen[0].tools] == ["city_count", "read_query"]
    assert seen[0].tools[0]["parameters"]["required"] == ["city"]
    assert next(m["content"] for m in seen[1].messages if m["role"] == "tool") == "15"
    assert hooks.ended[0] == ("city_count", 15) and hooks.ended[1][1]["result"]["original_rows"] == 2
    assert [c.row_count for c in contexts] == [2]
