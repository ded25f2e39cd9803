"""Objects shaped like the openai-agents ones Datus-agent hands the model layer, built without
openai-agents: a ``FunctionTool`` dataclass, Datus's database tools made the way Datus's
``trans_to_function_tool`` makes them (tools/func_tool/base.py, database.py), ``AgentHooks``
that record what they get, the exceptions Datus's plan mode raises from hooks, and an MCP server
object with openai-agents' server interface over the mcp SDK's own client."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from tests.mcp_servers.conftest import FAKE_SERVER


@dataclass
class FunctionToolShape:
    """openai-agents 0.3.2's ``FunctionTool`` fields, nothing else."""

    name: str
    description: str
    params_json_schema: dict[str, Any]
    on_invoke_tool: Callable[[Any, str], Awaitable[Any]]
    strict_json_schema: bool = True
    is_enabled: Any = True


def strict_schema(**properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


class ShopTools:
    """Datus's ``DBFuncTool`` answers (``FuncToolResult.model_dump()``) over a real SQLite file;
    ``contexts`` keeps the tool context of every call (Datus's tools ignore it)."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.contexts: list[Any] = []
        self.arguments: list[str] = []
        self.requests_seen: list[Any] = []  # the run's usage.requests when each call was made

    def list_tables(self) -> dict[str, Any]:
        with sqlite3.connect(self.db) as conn:
            rows = conn.execute("SELECT type, name FROM sqlite_master WHERE type IN ('table', 'view') "
                                "ORDER BY name").fetchall()
        return {"success": 1, "error": None, "result": [{"type": kind, "name": name} for kind, name in rows]}

    def read_query(self, sql: str) -> dict[str, Any]:
        try:
            with sqlite3.connect(self.db) as conn:
                cursor = conn.execute(sql)
                columns = [d[0] for d in cursor.description or []]
                rows = cursor.fetchall()
        except sqlite3.Error as exc:
            return {"success": 0, "error": str(exc), "result": None}
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        return {"success": 1, "error": None, "result": {
            "original_rows": len(rows), "original_columns": columns, "is_compressed": False,
            "compressed_data": out.getvalue(), "removed_columns": [], "compression_type": "none"}}

    def tool(self, method: Callable[..., Any], schema: dict[str, Any], description: str) -> FunctionToolShape:
        async def final_invoker(tool_ctx: Any, args_str: str) -> Any:  # as trans_to_function_tool's
            self.contexts.append(tool_ctx)
            self.arguments.append(args_str)
            self.requests_seen.append(getattr(getattr(tool_ctx, "usage", None), "requests", None))
            try:
                args = json.loads(args_str) if args_str else {}
            except (TypeError, json.JSONDecodeError):
                return {"success": 0, "error": "Invalid JSON arguments", "result": None}
            return method(**args)

        return FunctionToolShape(name=method.__name__, description=description, params_json_schema=schema,
                                 on_invoke_tool=final_invoker)

    def tools(self) -> list[FunctionToolShape]:
        return [
            self.tool(self.list_tables, strict_schema(), "Return table-like objects visible to the connector."),
            self.tool(self.read_query, strict_schema(sql={"type": "string"}),
                      "Execute arbitrary SQL and return the result rows (optionally compressed)."),
        ]


class PlanningPhaseException(Exception):
    """As Datus's cli/plan_hooks.py."""


class UserCancelledException(Exception):
    """As Datus's cli/plan_hooks.py."""


class RecordingHooks:
    """Every ``AgentHooks`` method, recording its arguments; one of them synchronous (hooks
    may be either). ``raise_in`` maps a hook name to the exception it raises."""

    def __init__(self, raise_in: dict[str, BaseException] | None = None) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.raise_in = raise_in or {}

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if name in self.raise_in:
            raise self.raise_in[name]

    async def on_start(self, context: Any, agent: Any) -> None:
        self._record("on_start", context, agent)

    def on_llm_start(self, context: Any, agent: Any, system_prompt: Any, input_items: Any) -> None:
        self._record("on_llm_start", context, agent, system_prompt, input_items)

    async def on_llm_end(self, context: Any, agent: Any, response: Any) -> None:
        self._record("on_llm_end", context, agent, response)

    async def on_tool_start(self, context: Any, agent: Any, tool: Any) -> None:
        self._record("on_tool_start", context, agent, tool)

    async def on_tool_end(self, context: Any, agent: Any, tool: Any, result: Any) -> None:
        self._record("on_tool_end", context, agent, tool, result)

    async def on_end(self, context: Any, agent: Any, output: Any) -> None:
        self._record("on_end", context, agent, output)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


@dataclass(eq=False)
class DuckMCPServer:
    """openai-agents' MCP server interface (``name``, ``tool_filter``, ``connect``/``cleanup``,
    ``list_tools(run_context, agent)``, ``call_tool``, ``session``) over the mcp SDK, running
    tests/fakes/mcp_tool_server.py. As openai-agents 0.3.2, a ``tool_filter`` (here: allowed
    names) needs ``run_context`` and ``agent``. Records which task connected and cleaned up."""

    name: str = "tools"
    tool_filter: dict[str, list[str]] | None = None
    use_structured_content: bool = False
    command: list[str] = field(default_factory=lambda: [sys.executable, str(FAKE_SERVER)])
    session: Any = None
    events: list[tuple[str, Any]] = field(default_factory=list)
    filter_contexts: list[tuple[Any, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.exit_stack = AsyncExitStack()

    async def connect(self) -> None:
        from mcp import ClientSession, StdioServerParameters
        from mcp.client.stdio import stdio_client

        self.events.append(("connect", asyncio.current_task()))
        streams = await self.exit_stack.enter_async_context(
            stdio_client(StdioServerParameters(command=self.command[0], args=self.command[1:])))
        session = await self.exit_stack.enter_async_context(ClientSession(streams[0], streams[1]))
        await session.initialize()
        self.session = session

    async def cleanup(self) -> None:
        self.events.append(("cleanup", asyncio.current_task()))
        try:
            await self.exit_stack.aclose()
        finally:
            self.session = None

    async def list_tools(self, run_context: Any = None, agent: Any = None) -> list[Any]:
        if self.session is None:
            raise RuntimeError("Server not initialized. Make sure you call `connect()` first.")
        tools = list((await self.session.list_tools()).tools)
        if self.tool_filter is not None:
            if run_context is None or agent is None:
                raise RuntimeError("run_context and agent are required for dynamic tool filtering")
            self.filter_contexts.append((run_context, agent))
            tools = [tool for tool in tools if tool.name in self.tool_filter["allowed_tool_names"]]
        return tools

    async def call_tool(self, tool_name: str, arguments: dict[str, Any] | None) -> Any:
        if self.session is None:
            raise RuntimeError("Server not initialized. Make sure you call `connect()` first.")
        return await self.session.call_tool(tool_name, arguments)

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


class ContextManagedServer(DuckMCPServer):
    """A server object used only through ``async with`` (no ``connect``/``cleanup``)."""

    async def __aenter__(self) -> Self:
        await DuckMCPServer.connect(self)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await DuckMCPServer.cleanup(self)

    connect = None  # type: ignore[assignment]
    cleanup = None  # type: ignore[assignment]
