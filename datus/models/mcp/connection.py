"""One live MCP server connection: its transport (stdio subprocess or streamable HTTP), the
tools it lists, the calls it makes, and the reasons a start failed, in words a user can act on.

Private: `datus.models.mcp.servers` is the public face (specs, the server group, the errors) and
re-exports what is public here. That module imports this one, so the errors and spec classes
defined there are imported here inside the functions that need them. So is `sdk`, the one module
that knows which MCP SDK is installed (1.x or 2.x): the SDK is imported once a server is used.
What comes back from a server is read in its wire form (``model_dump(by_alias=True)``), which
both SDKs produce alike.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from pydantic import ValidationError

if TYPE_CHECKING:
    from anyio.abc import TaskGroup, TaskStatus
    from mcp import ClientSession

    from datus.models.mcp.sdk import Negotiated
    from datus.models.mcp.servers import MCPConnectionLostError, MCPServerSpec

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


def _wire(model: Any) -> dict[str, Any]:
    # The JSON the server sent: camelCase keys in both SDKs (their attribute names differ).
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


def _result_from_mcp(server: str, tool: str, result: Any) -> ToolResult:
    wire = _wire(result)
    parts: list[str] = []
    for block in wire.get("content") or []:
        kind = block.get("type", "")
        if kind == "text":
            parts.append(block.get("text", ""))
        elif kind == "resource":
            resource = block.get("resource") or {}
            parts.append(resource.get("text") or f"[resource {resource.get('uri')}]")
        elif kind == "resource_link":
            parts.append(f"[resource {block.get('uri')}]")
        else:
            parts.append(f"[{kind} {block.get('mimeType', '')}]".replace(" ]", "]"))
    text = "\n".join(parts)
    structured = wire.get("structuredContent")
    if not text and structured is not None:
        text = json.dumps(structured, default=str)
    return ToolResult(text, bool(wire.get("isError")), structured, server, tool)


# ---------------------------------------------------------------- one connection


class MCPConnection:
    """One connected server. Its tool list is cached until the server announces a change
    (``notifications/tools/list_changed``); calls may run concurrently."""

    def __init__(self, name: str, spec: MCPServerSpec, stderr: _StderrLog | None = None) -> None:
        self.name = name
        self.spec = spec
        self._session: ClientSession | None = None
        self._negotiated: Negotiated | None = None
        self._stderr = stderr
        self._tools: list[MCPTool] | None = None
        self._generation = 0  # bumped by every change notice, so a listing in flight is not cached stale
        self._cache_tools = True
        self._listing = anyio.Lock()
        self._closed = False
        self._closed_because = ""
        self._in_flight: set[anyio.CancelScope] = set()
        self.stream_errors: list[str] = []

    @property
    def protocol_version(self) -> str:
        self._live()
        assert self._negotiated is not None  # set before the connection is handed out
        return self._negotiated.protocol_version

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
        from datus.models.mcp import sdk

        session, tools, cursor = self._live(), [], None
        for _ in range(_MAX_TOOL_PAGES):
            page = _wire(await sdk.list_tools_page(session, cursor))
            tools += [MCPTool(self.name, t["name"], t.get("description") or "", dict(t.get("inputSchema") or {}))
                      for t in page.get("tools", [])]
            cursor = page.get("nextCursor")
            if not cursor:
                break
        return tools

    async def call_tool(self, name: str, arguments: Mapping[str, Any] | None = None) -> ToolResult:
        """Errors of the tool come back as ``is_error`` results; a lost transport raises."""
        from datus.models.mcp import sdk

        session = self._live()
        try:
            result = await self._request(f"tools/call {name!r}", lambda: session.call_tool(name, dict(arguments or {})))
        except sdk.McpError as exc:  # the server answered with a JSON-RPC error: the call failed, the server did not
            return ToolResult(f"MCP error {exc.error.code}: {exc.error.message}", is_error=True, server=self.name,
                              tool=name)
        except (ValidationError, RuntimeError) as exc:  # a result not matching the protocol or the tool's schema
            return ToolResult(f"invalid result from tool {name!r}: {exc}", is_error=True, server=self.name, tool=name)
        return _result_from_mcp(self.name, name, result)

    async def _request(self, what: str, send: Callable[[], Awaitable[T]]) -> T:
        from datus.models.mcp import sdk
        from datus.models.mcp.servers import MCPRequestTimeoutError

        with anyio.CancelScope() as scope:
            self._in_flight.add(scope)
            try:
                return await send()
            except sdk.McpError as exc:
                if exc.error.code == sdk.REQUEST_TIMEOUT:
                    raise MCPRequestTimeoutError(f"MCP server {self.name!r} did not answer {what} within "
                                                 f"{self.spec.request_timeout_s:g}s", server=self.name) from exc
                if exc.error.code != sdk.CONNECTION_CLOSED:
                    raise
                raise self._lost(what) from exc
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError) as exc:
                raise self._lost(what) from exc
            finally:
                self._in_flight.discard(scope)
        raise self._lost(what)  # `_close` cancelled it: the connection ended while the request waited

    def _close(self, why: str) -> None:
        """The connection has ended: fail the requests still waiting on it. mcp 1.x leaves a
        request waiting forever when its streamable HTTP transport fails under it."""
        self._closed, self._closed_because = True, why
        for scope in self._in_flight:
            scope.cancel()

    def _lost(self, what: str) -> MCPConnectionLostError:
        from datus.models.mcp.servers import MCPConnectionLostError

        tail = self._stderr.tail() if self._stderr else ""
        return MCPConnectionLostError(
            f"MCP server {self.name!r} closed the connection during {what} (it exited, was killed or dropped "
            f"the connection){'; its stderr ends with: ' + tail if tail else ''}", server=self.name)

    def _live(self) -> ClientSession:
        from datus.models.mcp.servers import MCPConnectionLostError

        if self._session is None or self._closed:
            raise MCPConnectionLostError(f"MCP server {self.name!r} is not connected "
                                         f"({self._closed_because or 'its server group has exited'})", server=self.name)
        return self._session

    async def _on_message(self, message: Any) -> None:
        from datus.models.mcp import sdk

        if sdk.is_tool_list_changed(message):
            self.invalidate_tools()
        elif isinstance(message, Exception):  # e.g. a line on stdout that is not JSON-RPC
            bad = message.errors()[0].get("input") if isinstance(message, ValidationError) else None
            self.stream_errors.append(repr(bad)[:120] if isinstance(bad, str) else str(message)[:120])
            logger.warning("MCP server %r sent something that is not MCP: %s", self.name, self.stream_errors[-1])

    async def _watch_tool_changes(self, tg: TaskGroup) -> None:
        # Since the 2026-07-28 revision change notices flow only on a subscriptions/listen
        # stream; before it they arrive unasked and _on_message sees them.
        negotiated = self._negotiated
        if negotiated is None or not negotiated.modern or not negotiated.tools_list_changed:
            return
        try:
            await tg.start(self._listen)
        except Exception as exc:  # no change notices: never serve a cached list then
            self._cache_tools = False
            logger.warning("MCP server %r: cannot listen for tool changes (%s); tool lists are not cached",
                           self.name, exc)

    async def _listen(self, *, task_status: TaskStatus[None]) -> None:
        from datus.models.mcp import sdk

        started = False
        try:
            async with sdk.listen_tool_changes(self._live()) as subscription:
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
    from datus.models.mcp import sdk
    from datus.models.mcp.servers import MCPServerStdio

    served = False
    stderr = _StderrLog() if isinstance(spec, MCPServerStdio) and hasattr(os, "pread") else None
    connection = MCPConnection(name, spec, stderr)
    try:
        # One scope around the whole connection, its deadline lifted once connected: a
        # timeout scope around the handshake alone would close before the transport's own.
        with anyio.CancelScope(deadline=anyio.current_time() + timeout_s) as scope:
            async with _transport(spec, stderr) as (read, write):
                session = sdk.open_session(read, write, request_timeout_s=spec.request_timeout_s,
                                           message_handler=connection._on_message, client_name="datus-queue",
                                           client_version="0.1.0")
                async with session, anyio.create_task_group() as tg:
                    connection._session = session
                    connection._negotiated = await sdk.handshake(session, spec.protocol)
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
        connection._close("its server group has exited" if stop.is_set() else "the server closed the connection")
        if stderr is not None:
            stderr.close()


def _transport(spec: MCPServerSpec, stderr: _StderrLog | None) -> AbstractAsyncContextManager[tuple[Any, Any]]:
    """The (read, write) streams of the server, while the context lasts."""
    import sys

    from mcp.client.stdio import StdioServerParameters, stdio_client

    from datus.models.mcp import sdk
    from datus.models.mcp.servers import MCPServerStdio

    if isinstance(spec, MCPServerStdio):
        params = StdioServerParameters(command=spec.command, args=spec.args, env=spec.env or None, cwd=spec.cwd)
        return stdio_client(params, errlog=stderr.file if stderr else sys.stderr)
    return sdk.http_streams(spec.url, headers=spec.headers, timeout_s=spec.timeout_s,
                            read_timeout_s=spec.read_timeout_s)


def _timeout_reason(connection: MCPConnection, timeout_s: float) -> str:
    reason = f"did not complete the MCP handshake within {timeout_s:g}s"
    if connection.stream_errors:
        errors = connection.stream_errors
        reason += f"; it wrote {len(errors)} line(s) that are not MCP, first {errors[0]}"
    tail = connection._stderr.tail() if connection._stderr else ""
    from datus.models.redact import redact

    return redact(reason + (f"; its stderr ends with: {tail}" if tail else ""))


def _failure_reason(spec: MCPServerSpec, exc: BaseException, stderr: _StderrLog | None) -> tuple[str, bool]:
    from datus.models.redact import redact

    reason, retryable = _failure(spec, exc, stderr)
    return redact(reason), retryable  # an HTTP error names the URL, a server's stderr may echo a token


def _failure(spec: MCPServerSpec, exc: BaseException, stderr: _StderrLog | None) -> tuple[str, bool]:
    from datus.models.mcp import sdk
    from datus.models.mcp.servers import MCPServerStdio

    error = _leaf(exc)
    tail = stderr.tail() if stderr else ""
    said = f"; its stderr ends with: {tail}" if tail else ""
    closed = (isinstance(error, sdk.McpError) and error.error.code == sdk.CONNECTION_CLOSED) or isinstance(
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
    if isinstance(error, sdk.McpError):
        return f"MCP error {error.error.code} during the handshake: {error.error.message}{said}", False
    return f"{type(error).__name__}: {error}{said}", False


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = next((e for e in exc.exceptions if not isinstance(e, anyio.get_cancelled_exc_class())), exc.exceptions[0])
    return exc


def safe_url(url: str) -> str:
    """The URL fit for messages and reprs: `datus.models.redact.redact` (userinfo and every query
    value masked, key shapes and remembered secrets too)."""
    from datus.models.redact import redact

    return redact(url)
