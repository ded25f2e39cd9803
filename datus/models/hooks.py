"""``hooks=`` of a tool run: openai-agents ``AgentHooks`` (or any object with some of its
methods), called at the points openai-agents calls them::

    on_start(ctx, agent)                                  before the first model request
    on_llm_start(ctx, agent, system_prompt, input_items)  before each model request
    on_llm_end(ctx, agent, response)                      after each answer (a `Generation`)
    on_tool_start(ctx, agent, tool)                       before a tool runs (ctx: a `ToolContext`)
    on_tool_end(ctx, agent, tool, result)                 after it ran; ``result``: its raw return value
    on_end(ctx, agent, output)                            with the final answer

A method the object lacks is skipped; a coroutine is awaited. ``tool`` is the object the caller
passed (a ``FunctionTool``), or a `ToolRef` with ``.name`` for MCP tools and plain functions.
What a hook raises leaves the run as it is — not turned into a failed tool result, not wrapped:
Datus's plan mode stops a run with ``PlanningPhaseException("REPLAN_REQUIRED ...")`` and
``UserCancelledException`` and matches their text and type name. Hooks run in the run's
task, one at a time, before the tool they announce (openai-agents starts ``on_tool_start``
together with the tool), so a hook that raises keeps the tool from running.
"""

from __future__ import annotations

import inspect
from typing import Any

from datus.models.agents_compat import AgentInfo, RunContext, ToolRef
from datus.models.function_tools import ToolContext

__all__ = ["RunHooks", "hook_tool"]


class RunHooks:
    """The caller's hooks object (or None) bound to one run's context and agent."""

    def __init__(self, hooks: Any, run_context: RunContext, agent: AgentInfo) -> None:
        self.hooks = hooks
        self.run_context = run_context
        self.agent = agent

    def __bool__(self) -> bool:
        return self.hooks is not None

    async def _call(self, name: str, *args: Any) -> None:
        method = getattr(self.hooks, name, None) if self.hooks is not None else None
        if method is None:
            return
        result = method(*args)
        if inspect.isawaitable(result):
            await result

    async def start(self) -> None:
        await self._call("on_start", self.run_context, self.agent)

    async def llm_start(self, system_prompt: str | None, input_items: list[dict[str, Any]]) -> None:
        await self._call("on_llm_start", self.run_context, self.agent, system_prompt, input_items)

    async def llm_end(self, response: Any) -> None:
        await self._call("on_llm_end", self.run_context, self.agent, response)

    async def tool_start(self, ctx: ToolContext, tool: Any) -> None:
        await self._call("on_tool_start", ctx, self.agent, tool)

    async def tool_end(self, ctx: ToolContext, tool: Any, result: Any) -> None:
        await self._call("on_tool_end", ctx, self.agent, tool, result)

    async def end(self, output: Any) -> None:
        await self._call("on_end", self.run_context, self.agent, output)


def hook_tool(tool: Any, name: str) -> Any:
    """The ``tool`` hooks get for a tool of the loop: the caller's own object where there is
    one, else a `ToolRef`."""
    original = getattr(tool, "original", None)
    if original is not None:
        return original
    spec = getattr(tool, "spec", None)
    meta = getattr(tool, "meta", None) or {}
    return ToolRef(name=name, description=getattr(spec, "description", "") or "",
                   params_json_schema=getattr(spec, "parameters", None) or {}, server=meta.get("server"))
