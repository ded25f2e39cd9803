"""openai-agents objects at the boundary of a tool run, taken by what they expose — openai-agents
itself is never imported.

Datus-agent hands its tool runs ``FunctionTool`` objects (``name``, ``description``,
``params_json_schema``, ``strict_json_schema``, ``is_enabled``, an async
``on_invoke_tool(ctx, json_args)``), MCP server objects (`datus.models.agents_mcp`) and
``AgentHooks`` (`datus.models.hooks`). Those call back with a run context, a tool context and
an agent; the stand-ins here carry the attributes openai-agents' own objects have:

- `RunContext`: ``context`` (None: Datus passes none) and ``usage`` (`RunUsage`, summed over the
  run's turns so far, with openai-agents' ``Usage`` attribute names);
- `datus.models.function_tools.ToolContext`: ``tool_name``, ``tool_call_id``, ``tool_arguments``
  (the raw JSON text) besides ``context`` and ``usage``;
- `AgentInfo`: ``name``, ``instructions``, ``tools``, ``mcp_servers``, ``output_type``,
  ``handoffs``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from datus.models.function_tools import ToolContext, ToolOutcome, reported_failure, tool_text
from datus.models.generation import ToolSpec

if TYPE_CHECKING:
    from datus.models.usage import Usage

__all__ = ["AgentInfo", "AgentsFunctionTool", "RunContext", "RunUsage", "ToolRef", "is_function_tool_object"]

DEFAULT_AGENT_NAME = "datus_agent"


@dataclass
class RunUsage:
    """The run's usage so far, under openai-agents' ``Usage`` names."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    input_tokens_details: Any = field(default_factory=lambda: SimpleNamespace(cached_tokens=0))
    output_tokens_details: Any = field(default_factory=lambda: SimpleNamespace(reasoning_tokens=0))

    def set(self, usage: Usage) -> None:
        self.requests, self.input_tokens, self.output_tokens = usage.requests, usage.input_tokens, usage.output_tokens
        self.total_tokens = usage.total_tokens
        self.input_tokens_details = SimpleNamespace(cached_tokens=usage.cached_tokens)
        self.output_tokens_details = SimpleNamespace(reasoning_tokens=usage.reasoning_tokens)


@dataclass
class RunContext:
    """openai-agents' ``RunContextWrapper``: what hooks, tool filters and ``is_enabled`` get."""

    context: Any = None
    usage: RunUsage = field(default_factory=RunUsage)

    def for_call(self, name: str, call_id: str, arguments: str) -> ToolContext:
        return ToolContext(tool_name=name, tool_call_id=call_id, tool_arguments=arguments, context=self.context,
                           usage=self.usage)


@dataclass
class AgentInfo:
    """The agent of a run, as hooks and tool filters see it."""

    name: str = DEFAULT_AGENT_NAME
    instructions: str = ""
    tools: list[Any] = field(default_factory=list)
    mcp_servers: list[Any] = field(default_factory=list)
    output_type: Any = None
    handoffs: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class ToolRef:
    """A tool as hooks see it when the caller gave no tool object of its own (MCP tools,
    plain functions): ``name`` and ``description``, and the server's name for MCP tools."""

    name: str
    description: str = ""
    params_json_schema: dict[str, Any] = field(default_factory=dict)
    server: str | None = None


def is_function_tool_object(item: Any) -> bool:
    return (isinstance(getattr(item, "name", None), str) and isinstance(getattr(item, "params_json_schema", None), dict)
            and callable(getattr(item, "on_invoke_tool", None)))


class AgentsFunctionTool:
    """An openai-agents ``FunctionTool`` (or any object shaped like one) as a tool of the loop.

    ``on_invoke_tool`` gets the call's `ToolContext` and the model's raw JSON arguments; its
    return value is kept as it is (``raw``: Datus's tools return ``{"success", "error",
    "result"}`` dicts, which hooks and Datus's CLI read as dicts) and the model reads its JSON
    text. An answer reporting ``success: 0`` is a failed outcome."""

    def __init__(self, tool: Any) -> None:
        self.original = tool  # what hooks get as ``tool``
        self.meta: dict[str, Any] = {}
        self.spec = ToolSpec(name=tool.name, description=getattr(tool, "description", "") or "",
                             parameters=tool.params_json_schema)

    async def is_enabled(self, run_context: RunContext, agent: AgentInfo) -> bool:
        enabled = getattr(self.original, "is_enabled", True)
        if callable(enabled):
            enabled = enabled(run_context, agent)
            if inspect.isawaitable(enabled):
                enabled = await enabled
        return bool(enabled)

    async def call(self, arguments: dict[str, Any], ctx: ToolContext | None = None) -> ToolOutcome:
        if ctx is None:
            ctx = RunContext().for_call(self.spec.name, "", tool_text(arguments))
        result = self.original.on_invoke_tool(ctx, ctx.tool_arguments)
        if inspect.isawaitable(result):
            result = await result
        failure = reported_failure(result)
        return ToolOutcome(tool_text(result), is_error=failure is not None, raw=result)
