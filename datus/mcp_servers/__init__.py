"""MCP servers shipped with the package.

- `datus.mcp_servers.sql_server`: read-only SQL over any SQLAlchemy URL (SQLite, Postgres),
  run as ``python -m datus.mcp_servers.sql_server --url sqlite:///path.db``.

Nothing here is imported by ``datus.models``: a server runs in its own process, on mcp 1.x or
2.x (through `datus.models.mcp.sdk`, the one place that knows which is installed).
"""
