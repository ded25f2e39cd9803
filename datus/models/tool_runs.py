"""Setting up a tool run: tools (Python functions, openai-agents ``FunctionTool`` objects, MCP
servers — our own, run for the run or leased from an `MCPPool`, and openai-agents server
objects), hooks, the conversation (session history, instruction, prompt) and, after a
successful run, the session's new messages — once, even when the run was resumed from a
journal."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from datus.models.agents_compat import DEFAULT_AGENT_NAME, AgentInfo, RunContext
from datus.models.agents_mcp import server_object_tools, split_servers
from datus.models.function_tools import Tool, as_tools
from datus.models.hooks import RunHooks
from datus.models.json_output import normalize_response_format
from datus.models.messages import ChatMessage, Prompt, to_messages
from datus.models.output_bounds import DEFAULT_TOOL_RESULT_CHARS
from datus.models.tool_loop import ToolRun, output_hint
from datus.schemas.action_history import ActionHistoryManager

if TYPE_CHECKING:
    from datus.models.base import LLMBaseModel

__all__ = ["prepared_run"]


@contextlib.asynccontextmanager
async def prepared_run(
    model: LLMBaseModel,
    prompt: Prompt,
    *,
    tools: Any,
    mcp_servers: Any,
    instruction: str,
    output_type: Any,
    max_turns: int,
    manager: ActionHistoryManager | None,
    session: Any,
    kwargs: dict[str, Any],
    stream: bool,
    journal: Any = None,
    mcp_pool: Any = None,
    hooks: Any = None,
    agent_name: str | None = None,
    live_steps: bool = False,
) -> AsyncIterator[ToolRun]:
    kwargs = dict(kwargs)
    db_type = kwargs.pop("db_type", "datus_sql")
    sql_functions = kwargs.pop("sql_functions", None)
    # a tool's answer reaches the model cut to this many characters (tool_loop: the cap)
    max_tool_result_chars = kwargs.pop("max_tool_result_chars", None) or getattr(
        getattr(model, "model_config", None), "max_tool_result_chars", None) or DEFAULT_TOOL_RESULT_CHARS
    agent_config = getattr(model, "agent_config", None)
    if sql_functions is None and agent_config is not None:
        sql_functions = _configured_sql_functions(agent_config)
    options = model._options(kwargs)
    function_tools = as_tools(tools)
    our_servers, server_objects = split_servers(mcp_servers)
    run_context = RunContext()
    agent = AgentInfo(name=agent_name or DEFAULT_AGENT_NAME, instructions=instruction or "",
                      tools=list(tools) if isinstance(tools, (list, tuple)) else [] if tools is None else [tools],
                      mcp_servers=list(server_objects.values()), output_type=output_type)
    function_tools = [tool for tool in function_tools if await _enabled(tool, run_context, agent)]
    new_messages = to_messages(prompt)
    session_obj = _session(model, session)
    history = await session_obj.aget_messages() if session_obj is not None else []
    system_text = instruction or ""
    if output_type not in (str, None):
        system_text = f"{system_text}\n\n{output_hint(normalize_response_format(output_type))}".strip()
    messages = ([ChatMessage(role="system", content=system_text)] if system_text else []) + list(history) + new_messages
    user_text = next((m.content for m in reversed(new_messages) if m.role == "user"), "")

    async with _mcp_tools(our_servers, agent_config, mcp_pool) as server_tools, \
            server_object_tools(server_objects, run_context, agent) as object_tools:
        by_name: dict[str, Tool] = {}
        for tool in [*function_tools, *server_tools, *object_tools]:
            if tool.spec.name in by_name:
                raise ValueError(f"two tools are named {tool.spec.name!r}; rename one of them")
            by_name[tool.spec.name] = tool
        run = ToolRun(
            model, messages, by_name, options, output_type=output_type, max_turns=max_turns, stream=stream,
            live_steps=live_steps, manager=manager, db_type=db_type, sql_functions=sql_functions,
            user_text=user_text, journal=journal, session_messages=len(history),
            hooks=RunHooks(hooks, run_context, agent), max_tool_result_chars=max_tool_result_chars,
        )
        yield run
    if run.result is not None and session_obj is not None:
        from datus.models.tokens import count_tokens

        stored = [*new_messages, *run.new_messages]
        counts = [int(count_tokens(m.content + (m.reasoning or ""), model.provider, model.model_name)) for m in stored]
        # a resumed run may have saved them already (it finished, then its job was redelivered)
        await session_obj.aadd_messages(stored, counts, once_after=run.session_messages if run.replayed else None)


def _configured_sql_functions(agent_config: Any) -> Any:
    """``agent.sql_query_functions`` of our `AgentConfig` (a section kept as read), if any."""
    sections = getattr(agent_config, "sections", None)
    return sections.get("sql_query_functions") if isinstance(sections, dict) else None


async def _enabled(tool: Tool, run_context: RunContext, agent: AgentInfo) -> bool:
    """openai-agents' ``is_enabled`` (`AgentsFunctionTool.is_enabled`); other tools are enabled."""
    check = getattr(tool, "is_enabled", None)
    return True if not callable(check) else bool(await check(run_context, agent))


def _session(model: LLMBaseModel, session: Any) -> Any:
    if session is None:
        return None
    if isinstance(session, str):
        return model.create_session(session)
    return session


@contextlib.asynccontextmanager
async def _mcp_tools(mcp_servers: Any, agent_config: Any, pool: Any) -> AsyncIterator[list[Tool]]:
    if not mcp_servers:
        yield []
        return
    from datus.models.mcp.tools import mcp_tools_for_run

    async with mcp_tools_for_run(mcp_servers, agent_config, pool=pool) as tools:
        yield tools
