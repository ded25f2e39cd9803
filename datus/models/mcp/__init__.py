"""MCP servers for tool runs.

- `servers`: specs (`MCPServerStdio`, `MCPServerStreamableHttp`), the agent.yml form, the errors,
  and `multiple_mcp_servers` (a run's own servers: started with it, stopped with it);
- `connection`: one live connection (transport, tool list cache, calls, why a start failed);
- `pool`: `MCPPool`, servers kept running and connected across runs (a worker process has one);
- `tools`: a connected server's tools as tools of the tool loop;
- `sdk`: where mcp 1.x (what Datus-agent's openai-agents pins) and mcp 2.x differ, and nowhere else.

``datus.models.mcp_utils`` is the same public API under its Datus import path.
"""

from __future__ import annotations

from datus.models.mcp.servers import *
from datus.models.mcp.servers import __all__ as _server_names

__all__ = list(_server_names)
