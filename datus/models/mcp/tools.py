"""MCP server tools as tools of a tool run."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from datus.models.function_tools import Tool, ToolContext, ToolOutcome
from datus.models.generation import ToolSpec
from datus.models.mcp.servers import MCPServerGroup, MCPTool, multiple_mcp_servers

if TYPE_CHECKING:
    from datus.models.mcp.pool import MCPPool

__all__ = ["MCPToolAdapter", "mcp_tools_for_run"]


class MCPToolAdapter:
    """One tool of a connected server. A tool that fails inside the server comes back as a
    failed outcome; a server that died raises, and the tool loop turns that into a failed
    result naming the server."""

    def __init__(self, group: MCPServerGroup, tool: MCPTool) -> None:
        self.group = group
        self.tool = tool
        self.meta = {"server": tool.server, "tool": tool.name}
        schema = tool.input_schema or {"type": "object", "properties": {}}
        self.spec = ToolSpec(name=tool.exposed_name, description=tool.description or "", parameters=schema)

    async def call(self, arguments: dict[str, Any], ctx: ToolContext | None = None) -> ToolOutcome:
        result = await self.group.call_tool(self.tool.exposed_name, arguments)
        return ToolOutcome(result.text, is_error=result.is_error, structured=result.structured_content,
                           meta=self.meta)


@contextlib.asynccontextmanager
async def mcp_tools_for_run(mcp_servers: Any, agent_config: Any, strict: bool = True,
                            pool: MCPPool | None = None) -> AsyncIterator[list[Tool]]:
    """The tools of every server (names from ``agent.mcp_servers``, spec objects, or a dict of
    both), listed once: servers leased from ``pool`` (kept running), or else connected for
    this run and disconnected when it ends."""
    lease = (pool.lease(mcp_servers, agent_config=agent_config) if pool is not None
             else multiple_mcp_servers(mcp_servers, agent_config=agent_config, strict=strict))
    async with lease as group:
        tools = await group.tools()
        yield [MCPToolAdapter(group, tool) for tool in tools]
