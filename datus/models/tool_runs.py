"""Setting up a tool run: tools (functions and MCP servers, the run's own or leased from an
`MCPPool`), the conversation (session history, instruction, prompt) and, after a successful
run, the session's new messages — once, even when the run was resumed from a journal."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from datus.models.function_tools import Tool, as_tools
from datus.models.json_output import normalize_response_format
from datus.models.messages import ChatMessage, Prompt, to_messages
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
) -> AsyncIterator[ToolRun]:
    kwargs = dict(kwargs)
    db_type = kwargs.pop("db_type", "datus_sql")
    sql_functions = kwargs.pop("sql_functions", None)
    agent_config = getattr(model, "agent_config", None)
    if sql_functions is None and agent_config is not None:
        sql_functions = getattr(agent_config, "sql_query_functions", None)
    options = model._options(kwargs)
    function_tools = as_tools(tools)
    new_messages = to_messages(prompt)
    session_obj = _session(model, session)
    history = await session_obj.aget_messages() if session_obj is not None else []
    system_text = instruction or ""
    if output_type not in (str, None):
        system_text = f"{system_text}\n\n{output_hint(normalize_response_format(output_type))}".strip()
    messages = ([ChatMessage(role="system", content=system_text)] if system_text else []) + list(history) + new_messages
    user_text = next((m.content for m in reversed(new_messages) if m.role == "user"), "")

    async with _mcp_tools(mcp_servers, agent_config, mcp_pool) as server_tools:
        by_name: dict[str, Tool] = {}
        for tool in [*function_tools, *server_tools]:
            if tool.spec.name in by_name:
                raise ValueError(f"two tools are named {tool.spec.name!r}; rename one of them")
            by_name[tool.spec.name] = tool
        run = ToolRun(
            model, messages, by_name, options, output_type=output_type, max_turns=max_turns, stream=stream,
            manager=manager, db_type=db_type, sql_functions=sql_functions, user_text=user_text,
            journal=journal, session_messages=len(history),
        )
        yield run
    if run.result is not None and session_obj is not None:
        from datus.models.tokens import count_tokens

        stored = [*new_messages, *run.new_messages]
        counts = [int(count_tokens(m.content + (m.reasoning or ""), model.provider, model.model_name)) for m in stored]
        # a resumed run may have saved them already (it finished, then its job was redelivered)
        await session_obj.aadd_messages(stored, counts, once_after=run.session_messages if run.replayed else None)


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
