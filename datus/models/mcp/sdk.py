"""The installed MCP SDK: where mcp 1.x and 2.x differ, and nowhere else.

Datus-agent pins openai-agents 0.3.2, which requires ``mcp>=1.11,<2``; our own installs get
mcp 2.x. Both SDKs share what the rest of `datus.models.mcp`, the SQL server and the test
server use (``ClientSession`` over ``stdio_client`` / streamable HTTP streams, the wire types,
the FastMCP-style server and its ``@tool`` decorator). What differs lives here:

============================  =======================================  ===========================================
                              mcp 1.x                                  mcp 2.x
============================  =======================================  ===========================================
protocol revisions            the ``initialize`` handshake only        also 2026-07-28 (``server/discover``,
                              (up to 2025-06-18 or 2025-11-25)         tool changes on ``subscriptions/listen``)
JSON-RPC error class          ``McpError``                             ``MCPError``
request timeout               ``McpError`` code 408                    ``MCPError`` code -32001
read timeout argument         ``timedelta``                            seconds
tools/list cursor             ``list_tools(cursor)``                   ``list_tools(params=...)``
streamable HTTP client        httpx; before 1.24 only                  httpx2
                              ``streamablehttp_client(url, headers..)``
server class                  ``mcp.server.fastmcp.FastMCP``           ``mcp.server.mcpserver.MCPServer``
server host and port          settings (its Host-header guard is       arguments of ``run``
                              chosen for the host at construction)
============================  =======================================  ===========================================
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from importlib.metadata import version
from typing import Any

from mcp import ClientSession
from mcp.types import CONNECTION_CLOSED, Implementation, ToolListChangedNotification

__all__ = [
    "CONNECTION_CLOSED", "MCP_VERSION", "MODERN", "REQUEST_TIMEOUT", "Context", "McpError", "Negotiated", "ToolError",
    "announce_tools_changed", "handshake", "http_streams", "is_tool_list_changed", "list_tools_page",
    "listen_tool_changes", "new_server", "open_session", "run_server",
]

MCP_VERSION = version("mcp")
MODERN = int(MCP_VERSION.split(".")[0]) >= 2
"""The SDK speaks the 2026-07-28 revision too (mcp 2.x)."""

# (Importing `mcp` imports its server half too, in both majors: the server classes cost nothing more.)
if MODERN:
    from mcp.server.mcpserver import Context, MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from mcp.shared.exceptions import MCPError as McpError
    from mcp_types import REQUEST_TIMEOUT
    from mcp_types.version import MODERN_PROTOCOL_VERSIONS
else:
    from mcp.server.fastmcp import Context, FastMCP
    from mcp.server.fastmcp.exceptions import ToolError
    from mcp.shared.exceptions import McpError

    REQUEST_TIMEOUT = 408  # mcp 1.x reports its own read timeout with the HTTP status code
    MODERN_PROTOCOL_VERSIONS = ()

_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


# ---------------------------------------------------------------- client


@dataclass(frozen=True)
class Negotiated:
    """What the handshake settled: the revision, and whether the server announces tool changes."""

    protocol_version: str
    tools_list_changed: bool

    @property
    def modern(self) -> bool:
        """A 2026-07-28 (or later) session: change notices flow on a ``subscriptions/listen`` stream."""
        return self.protocol_version in MODERN_PROTOCOL_VERSIONS


def open_session(
    read: Any, write: Any, *, request_timeout_s: float | None, message_handler: Callable[[Any], Any],
    client_name: str, client_version: str,
) -> ClientSession:
    """An un-entered session over a transport's streams; every request waits at most
    ``request_timeout_s`` (None: no limit)."""
    timeout: Any = request_timeout_s
    if timeout is not None and not MODERN:
        timeout = timedelta(seconds=timeout)
    return ClientSession(read, write, read_timeout_seconds=timeout, message_handler=message_handler,
                         client_info=Implementation(name=client_name, version=client_version))


async def handshake(session: ClientSession, protocol: str) -> Negotiated:
    """Negotiate on an entered session. ``auto`` tries ``server/discover`` (2.x), falling back
    to ``initialize`` when the server answers it with any JSON-RPC error or offers no modern
    revision we share; ``legacy`` (and every session on mcp 1.x) uses ``initialize`` only."""
    if not MODERN:
        result = await session.initialize()
        tools = result.capabilities.tools
        return Negotiated(result.protocolVersion, bool(tools and tools.listChanged))
    if protocol == "auto":
        try:
            await session.discover()
        except (McpError, RuntimeError):  # RuntimeError: it answered, but with no modern revision we know
            await session.initialize()
    else:
        await session.initialize()
    tools = session.server_capabilities.tools if session.server_capabilities else None
    return Negotiated(str(session.protocol_version), bool(tools and tools.list_changed))


async def list_tools_page(session: ClientSession, cursor: str | None) -> Any:
    """One ``tools/list`` page (a ``ListToolsResult``)."""
    if cursor is None:
        return await session.list_tools()
    if MODERN:
        from mcp.types import PaginatedRequestParams

        return await session.list_tools(params=PaginatedRequestParams(cursor=cursor))
    return await session.list_tools(cursor)


def is_tool_list_changed(message: Any) -> bool:
    """Whether what a session's message handler got is ``notifications/tools/list_changed``
    (mcp 1.x hands the handler a ``ServerNotification`` wrapping it, 2.x the notification)."""
    return isinstance(getattr(message, "root", message), ToolListChangedNotification)


def listen_tool_changes(session: ClientSession) -> AbstractAsyncContextManager[AsyncIterator[Any]]:
    """A ``subscriptions/listen`` stream of tool changes; only on a `Negotiated.modern` session."""
    if not MODERN:
        raise RuntimeError(f"mcp {MCP_VERSION} has no subscriptions/listen (it is a 2026-07-28 method)")
    from mcp.client.subscriptions import listen

    return listen(session, tools_list_changed=True)


@asynccontextmanager
async def http_streams(url: str, *, headers: dict[str, str], timeout_s: float,
                       read_timeout_s: float) -> AsyncIterator[tuple[Any, Any]]:
    """The (read, write) streams of a streamable HTTP connection; ``timeout_s`` bounds connect
    and write, ``read_timeout_s`` how long a response stream may stay silent."""
    from mcp.client import streamable_http

    connect = getattr(streamable_http, "streamable_http_client", None)
    if connect is None:  # mcp < 1.24 builds its own HTTP client from these arguments
        async with streamable_http.streamablehttp_client(url, headers=headers, timeout=timeout_s,
                                                         sse_read_timeout=read_timeout_s) as streams:
            yield streams[0], streams[1]
        return
    if MODERN:
        import httpx2 as http_library
    else:
        import httpx as http_library
    timeout = http_library.Timeout(timeout_s, read=read_timeout_s)
    async with (http_library.AsyncClient(headers=headers, timeout=timeout) as http,
                connect(url, http_client=http) as streams):
        yield streams[0], streams[1]  # 1.x adds a third item, the session id getter


# ---------------------------------------------------------------- server


def new_server(name: str, *, instructions: str | None = None) -> Any:
    """A FastMCP-style server (``@server.tool``, ``add_tool``, ``run``) logging warnings only."""
    if MODERN:
        return MCPServer(name, instructions=instructions, log_level="WARNING")
    return FastMCP(name, instructions=instructions, log_level="WARNING")


def run_server(server: Any, transport: str, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve over ``stdio`` or ``streamable-http`` (on ``host``:``port``) until stopped."""
    if transport == "stdio":
        server.run("stdio")
    elif MODERN:
        server.run(transport, host=host, port=port)
    else:
        settings = server.settings
        settings.host, settings.port = host, port
        if host not in _LOCAL_HOSTS and getattr(settings, "transport_security", None) is not None:
            # FastMCP chose its DNS-rebinding guard (localhost names only) for the default host
            # it was built with; served on another address, as mcp 2.x does, it has none.
            settings.transport_security = None
        server.run(transport)


async def announce_tools_changed(ctx: Any) -> None:
    """Tell the client of a tool's ``ctx`` that the tool list changed: on a ``subscriptions/listen``
    stream (2026-07-28) and as ``notifications/tools/list_changed`` (earlier revisions)."""
    if MODERN:
        await ctx.notify_tools_changed()
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return
    await ctx.session.send_tool_list_changed()
