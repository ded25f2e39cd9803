"""One live MCP server connection: its transport (stdio subprocess or streamable HTTP), the
tools it lists, the calls it makes, and the reasons a start failed, in words a user can act on.

Private: `datus.models.mcp.servers` is the public face (specs, the server group, the errors) and
re-exports what is public here. That module imports this one, so the errors and spec classes
defined there are imported here inside the functions that need them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from pydantic import ValidationError

if TYPE_CHECKING:
    from anyio.abc import TaskGroup, TaskStatus
    from mcp import Client

    from datus.models.mcp.servers import MCPConnectionLostError, MCPServerSpec, MCPServerStreamableHttp

__all__ = ["MCPConnection", "MCPTool", "ToolResult", "connect_and_serve", "safe_url"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
_MAX_TOOL_PAGES = 100  # a server whose cursor never ends cannot hang a listing


# ---------------------------------------------------------------- tools and results


@dataclass(frozen=True)
class MCPTool:
    """A tool of one server. ``name`` is the server's own; ``exposed_name`` is unique across
    the servers of a group (``<server>__<name>`` when two servers share a tool name)."""

    server: str
    name: str
    description: str = ""
    input_schema: dict[str, Any] = field(default_factory=dict)
    exposed_name: str = ""

    def __post_init__(self) -> None:
        if not self.exposed_name:
            object.__setattr__(self, "exposed_name", self.name)


@dataclass(frozen=True)
class ToolResult:
    """What a tool call returned: its text content joined, and structured content if any."""

    text: str
    is_error: bool = False
    structured_content: dict[str, Any] | None = None
    server: str = ""
    tool: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _result_from_mcp(server: str, tool: str, result: Any) -> ToolResult:
    parts: list[str] = []
    for block in result.content:
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(block.text)
        elif kind == "resource":
            parts.append(getattr(block.resource, "text", None) or f"[resource {block.resource.uri}]")
        elif kind == "resource_link":
            parts.append(f"[resource {block.uri}]")
        else:
            parts.append(f"[{kind} {getattr(block, 'mime_type', '')}]".replace(" ]", "]"))
    text = "\n".join(parts)
    if not text and result.structured_content is not None:
        text = json.dumps(result.structured_content, default=str)
    return ToolResult(text, bool(result.is_error), result.structured_content, server, tool)


# ---------------------------------------------------------------- one connection


class MCPConnection:
    """One connected server. Its tool list is cached until the server announces a change
    (``notifications/tools/list_changed``); calls may run concurrently."""

    def __init__(self, name: str, spec: MCPServerSpec, stderr: _StderrLog | None = None) -> None:
        self.name = name
        self.spec = spec
        self._client: Client | None = None
        self._stderr = stderr
        self._tools: list[MCPTool] | None = None
        self._generation = 0  # bumped by every change notice, so a listing in flight is not cached stale
        self._cache_tools = True
        self._listing = anyio.Lock()
        self._closed = False
        self.stream_errors: list[str] = []

    @property
    def protocol_version(self) -> str:
        return self._live().protocol_version

    def invalidate_tools(self) -> None:
        self._generation += 1
        self._tools = None

    async def list_tools(self) -> list[MCPTool]:
        if self._tools is not None:
            return list(self._tools)
        async with self._listing:  # concurrent callers share one listing
            if self._tools is not None:
                return list(self._tools)
            generation = self._generation
            tools = await self._request("tools/list", self._fetch_tools)
            if self._cache_tools and generation == self._generation:
                self._tools = tools
            return list(tools)

    async def _fetch_tools(self) -> list[MCPTool]:
        client, tools, cursor = self._live(), [], None
        for _ in range(_MAX_TOOL_PAGES):
            page = await client.list_tools(cursor=cursor)
            tools += [MCPTool(self.name, t.name, t.description or "", dict(t.input_schema or {})) for t in page.tools]
            cursor = page.next_cursor
            if not cursor:
                break
        return tools

    async def call_tool(self, name: str, arguments: Mapping[str, Any] | None = None) -> ToolResult:
        """Errors of the tool come back as ``is_error`` results; a lost transport raises."""
        from mcp import MCPError

        client = self._live()
        try:
            result = await self._request(f"tools/call {name!r}", lambda: client.call_tool(name, dict(arguments or {})))
        except MCPError as exc:  # the server answered with a JSON-RPC error: the call failed, the server did not
            return ToolResult(f"MCP error {exc.code}: {exc.message}", is_error=True, server=self.name, tool=name)
        except (ValidationError, RuntimeError) as exc:  # a result not matching the protocol or the tool's schema
            return ToolResult(f"invalid result from tool {name!r}: {exc}", is_error=True, server=self.name, tool=name)
        return _result_from_mcp(self.name, name, result)

    async def _request(self, what: str, send: Callable[[], Awaitable[T]]) -> T:
        from mcp import MCPError
        from mcp_types import CONNECTION_CLOSED, REQUEST_TIMEOUT

        from datus.models.mcp.servers import MCPRequestTimeoutError

        try:
            return await send()
        except MCPError as exc:
            if exc.code == REQUEST_TIMEOUT:
                raise MCPRequestTimeoutError(f"MCP server {self.name!r} did not answer {what} within "
                                             f"{self.spec.request_timeout_s:g}s", server=self.name) from exc
            if exc.code != CONNECTION_CLOSED:
                raise
            raise self._lost(what) from exc
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError) as exc:
            raise self._lost(what) from exc

    def _lost(self, what: str) -> MCPConnectionLostError:
        from datus.models.mcp.servers import MCPConnectionLostError

        tail = self._stderr.tail() if self._stderr else ""
        return MCPConnectionLostError(
            f"MCP server {self.name!r} closed the connection during {what} (it exited, was killed or dropped "
            f"the connection){'; its stderr ends with: ' + tail if tail else ''}", server=self.name)

    def _live(self) -> Client:
        from datus.models.mcp.servers import MCPConnectionLostError

        if self._client is None or self._closed:
            raise MCPConnectionLostError(f"MCP server {self.name!r} is not connected (its server group has exited)",
                                         server=self.name)
        return self._client

    async def _on_message(self, message: Any) -> None:
        from mcp.types import ToolListChangedNotification

        if isinstance(message, ToolListChangedNotification):
            self.invalidate_tools()
        elif isinstance(message, Exception):  # e.g. a line on stdout that is not JSON-RPC
            bad = message.errors()[0].get("input") if isinstance(message, ValidationError) else None
            self.stream_errors.append(repr(bad)[:120] if isinstance(bad, str) else str(message)[:120])
            logger.warning("MCP server %r sent something that is not MCP: %s", self.name, self.stream_errors[-1])

    async def _watch_tool_changes(self, tg: TaskGroup) -> None:
        # Since the 2026-07-28 revision change notices flow only on a subscriptions/listen
        # stream; before it they arrive unasked and _on_message sees them.
        from mcp_types.version import MODERN_PROTOCOL_VERSIONS

        client = self._live()
        tools = client.server_capabilities.tools
        if client.protocol_version not in MODERN_PROTOCOL_VERSIONS or not (tools and tools.list_changed):
            return
        try:
            await tg.start(self._listen)
        except Exception as exc:  # no change notices: never serve a cached list then
            self._cache_tools = False
            logger.warning("MCP server %r: cannot listen for tool changes (%s); tool lists are not cached",
                           self.name, exc)

    async def _listen(self, *, task_status: TaskStatus[None]) -> None:
        started = False
        try:
            async with self._live().listen(tools_list_changed=True) as subscription:
                task_status.started()
                started = True
                async for _event in subscription:
                    self.invalidate_tools()
        except Exception as exc:
            if not started:
                raise
            logger.debug("MCP server %r: tool-change stream failed: %s", self.name, exc)
        # The stream is over, so are change notices: from now on every listing asks the server.
        self._cache_tools = False
        self.invalidate_tools()


class _StderrLog:
    """A stdio server's stderr, kept in an unlinked temp file: its tail says why a start failed."""

    def __init__(self) -> None:
        fd, path = tempfile.mkstemp(prefix="datus-mcp-", suffix=".stderr")
        os.close(fd)
        # Append mode (O_APPEND): reading the tail never moves where the child writes.
        self.file = open(path, "a+", encoding="utf-8", errors="replace")  # noqa: SIM115 (lives as long as the server)
        os.unlink(path)

    def tail(self, limit: int = 1000) -> str:
        try:
            fd = self.file.fileno()
            size = os.fstat(fd).st_size
            data = os.pread(fd, limit, max(0, size - limit)).decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""
        return " | ".join(line.strip() for line in data.strip().splitlines()[-6:] if line.strip())

    def close(self) -> None:
        self.file.close()


# ---------------------------------------------------------------- serving, transports, failures


async def connect_and_serve(
    name: str, spec: MCPServerSpec, stop: anyio.Event, timeout_s: float,
    on_connected: Callable[[MCPConnection], None],
) -> tuple[str, bool] | None:
    """Connect, hand the connection to ``on_connected``, serve until ``stop``, disconnect.
    None once served; else (why the start failed, whether a retry may help)."""
    from mcp import Client
    from mcp.types import Implementation

    from datus.models.mcp.servers import MCPServerStdio

    served = False
    stderr = _StderrLog() if isinstance(spec, MCPServerStdio) and hasattr(os, "pread") else None
    connection = MCPConnection(name, spec, stderr)
    try:
        # One scope around the whole connection, its deadline lifted once connected: a
        # timeout scope around the handshake alone would close before the transport's own.
        with anyio.CancelScope(deadline=anyio.current_time() + timeout_s) as scope:
            client = Client(_transport(spec, stderr), mode=spec.protocol, cache=None,
                            read_timeout_seconds=spec.request_timeout_s, message_handler=connection._on_message,
                            client_info=Implementation(name="datus-queue", version="0.1.0"))
            async with client, anyio.create_task_group() as tg:
                connection._client = client
                await connection._watch_tool_changes(tg)
                scope.deadline = math.inf
                served = True
                on_connected(connection)
                await stop.wait()
                tg.cancel_scope.cancel()
        if scope.cancelled_caught and not served:
            return _timeout_reason(connection, timeout_s), False
        return None
    except Exception as exc:
        if served:  # it served; only the goodbye failed
            logger.debug("MCP server %r: error while disconnecting: %r", name, exc)
            return None
        return _failure_reason(spec, exc, stderr)
    finally:
        connection._closed = True
        if stderr is not None:
            stderr.close()


def _transport(spec: MCPServerSpec, stderr: _StderrLog | None) -> Any:
    import sys

    from mcp.client.stdio import StdioServerParameters, stdio_client

    from datus.models.mcp.servers import MCPServerStdio

    if isinstance(spec, MCPServerStdio):
        params = StdioServerParameters(command=spec.command, args=spec.args, env=spec.env or None, cwd=spec.cwd)
        return stdio_client(params, errlog=stderr.file if stderr else sys.stderr)
    return _http_transport(spec)


@asynccontextmanager
async def _http_transport(spec: MCPServerStreamableHttp) -> AsyncIterator[Any]:
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    timeout = httpx2.Timeout(spec.timeout_s, read=spec.read_timeout_s)
    async with (httpx2.AsyncClient(headers=spec.headers, timeout=timeout) as http,
                streamable_http_client(spec.url, http_client=http) as streams):
        yield streams


def _timeout_reason(connection: MCPConnection, timeout_s: float) -> str:
    reason = f"did not complete the MCP handshake within {timeout_s:g}s"
    if connection.stream_errors:
        errors = connection.stream_errors
        reason += f"; it wrote {len(errors)} line(s) that are not MCP, first {errors[0]}"
    tail = connection._stderr.tail() if connection._stderr else ""
    return reason + (f"; its stderr ends with: {tail}" if tail else "")


def _failure_reason(spec: MCPServerSpec, exc: BaseException, stderr: _StderrLog | None) -> tuple[str, bool]:
    from mcp import MCPError
    from mcp_types import CONNECTION_CLOSED

    from datus.models.mcp.servers import MCPServerStdio

    error = _leaf(exc)
    tail = stderr.tail() if stderr else ""
    said = f"; its stderr ends with: {tail}" if tail else ""
    closed = (isinstance(error, MCPError) and error.code == CONNECTION_CLOSED) or isinstance(
        error, (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError))
    if isinstance(spec, MCPServerStdio):
        if isinstance(error, FileNotFoundError):
            if spec.cwd and error.filename == spec.cwd:
                return f"working directory {spec.cwd!r} does not exist", False
            return f"command {spec.command!r} not found{'' if os.sep in spec.command else ' on PATH'}", False
        if isinstance(error, PermissionError):
            return f"command {spec.command!r} is not executable", False
        if closed:
            return f"exited at start{said or ' without writing to stderr'}", True
    else:
        cause: BaseException | None = error
        for _ in range(10):  # httpx wraps the socket's error; a bounded walk down the causes
            if cause is None or isinstance(cause, ConnectionRefusedError):
                break
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, ConnectionRefusedError):
            return f"connection to {safe_url(spec.url)} refused", True
        if type(error).__module__.startswith("httpx"):
            return f"HTTP request to {safe_url(spec.url)} failed: {type(error).__name__}: {error}", True
        if closed:
            return f"{safe_url(spec.url)} closed the connection during the handshake", True
    if isinstance(error, MCPError):
        return f"MCP error {error.code} during the handshake: {error.message}{said}", False
    return f"{type(error).__name__}: {error}{said}", False


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = next((e for e in exc.exceptions if not isinstance(e, anyio.get_cancelled_exc_class())), exc.exceptions[0])
    return exc


def safe_url(url: str) -> str:
    """The URL with any user:password@ masked, fit for messages and reprs."""
    return re.sub(r"//[^/@]*@", "//***@", url)
