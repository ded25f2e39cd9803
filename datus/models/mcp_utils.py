"""MCP servers: their specs, live connections, and the group a tool run works with::

    servers = {"sql": MCPServerStdio(command="python", args=["-m", "datus.mcp_servers.sql_server",
                                                            "--url", "sqlite:///shop.db"])}
    async with multiple_mcp_servers(servers) as mcp:          # or ["sql"] + agent_config
        tools = await mcp.tools()                             # names unique across servers
        result = await mcp.call_tool(tools[0].exposed_name, {})

Lifecycle: the context manager owns one task group in its own task; each server gets a task
in it that connects (bounded retries, a deadline per attempt), serves until the group
closes, and disconnects. Every cancel scope is so entered and left by the task that owns it,
whatever happens: a server failing midway, the body raising, the body being cancelled.

Errors (`DatusException`, code ``model_tool_error``)::

    MCPServerError                  anything about one server; ``server`` names it
    ├── MCPConnectError             strict start failed; ``failures``: name -> reason
    ├── MCPConnectionLostError      transport gone mid-run (the process died, HTTP dropped)
    ├── MCPRequestTimeoutError      no answer within ``request_timeout_s``
    └── MCPToolNotFoundError        no tool of that name in the group

A tool that fails is not an exception: `call_tool` returns a `ToolResult` with ``is_error``.
Config mistakes (unknown server name, unknown key, unset ``${VAR}``) raise `ConfigError`.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from datus.configuration.agent_config import ConfigError, substitute_env
from datus.utils.exceptions import DatusException, ErrorCode

if TYPE_CHECKING:
    from anyio.abc import TaskGroup, TaskStatus
    from mcp import Client

    from datus.configuration.agent_config import AgentConfig

__all__ = [
    "MCPConnectError", "MCPConnection", "MCPConnectionLostError", "MCPRequestTimeoutError", "MCPServerError",
    "MCPServerGroup", "MCPServerSpec", "MCPServerStdio", "MCPServerStreamableHttp", "MCPTool", "MCPToolNotFoundError",
    "ToolResult", "mcp_server_from_config", "multiple_mcp_servers", "resolve_mcp_servers",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")
_MAX_TOOL_PAGES = 100  # a server whose cursor never ends cannot hang a listing


class MCPServerError(DatusException):
    def __init__(self, message: str, *, server: str | None = None) -> None:
        super().__init__(ErrorCode.MODEL_TOOL_ERROR, message)
        self.server = server

    def __reduce__(self) -> tuple[Any, ...]:  # survives pickling (errors cross Redis)
        return (type(self), (self.message,), self.__dict__)


class MCPConnectError(MCPServerError):
    def __init__(self, message: str, *, server: str | None = None, failures: dict[str, str] | None = None) -> None:
        super().__init__(message, server=server)
        self.failures = dict(failures or {})


class MCPConnectionLostError(MCPServerError):
    """The server is gone (exited, killed, connection dropped): retrying the call will not help."""


class MCPRequestTimeoutError(MCPServerError):
    """No answer within the spec's ``request_timeout_s``."""


class MCPToolNotFoundError(MCPServerError):
    """No tool of that name in the group."""


# ---------------------------------------------------------------- specs


class _ServerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(default=None, description="set from the config key or the dict key")
    protocol: Literal["auto", "legacy"] = Field(
        default="auto", description="auto: newest MCP revision, falling back to the initialize handshake; "
        "legacy: the handshake only (for servers that stall on unknown methods)")
    request_timeout_s: float | None = Field(default=None, gt=0, description="per MCP request; None: no limit")


class MCPServerStdio(_ServerSpec):
    """A server run as a subprocess, speaking MCP on stdin/stdout. The process inherits only
    a safe part of our environment (PATH, HOME, ...) plus ``env``."""

    command: str = Field(min_length=1)
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict, description="may hold secrets: never shown in reprs")
    cwd: str | None = None

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        for key, value in super().__repr_args__():
            yield key, ({name: "***" for name in value} if key == "env" else value)


class MCPServerStreamableHttp(_ServerSpec):
    """A server reached over streamable HTTP."""

    url: str = Field(min_length=1)
    headers: dict[str, str] = Field(default_factory=dict, description="may hold secrets: never shown in reprs")
    timeout_s: float = Field(default=30.0, gt=0, description="connect and write timeout of each HTTP request")
    read_timeout_s: float = Field(default=300.0, gt=0, description="how long a response stream may stay silent")

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        for key, value in super().__repr_args__():
            if key == "headers":
                value = {name: "***" for name in value}
            elif key == "url":
                value = _safe_url(value)
            yield key, value


MCPServerSpec = MCPServerStdio | MCPServerStreamableHttp
_KINDS: dict[str, type[_ServerSpec]] = {
    "stdio": MCPServerStdio, "http": MCPServerStreamableHttp, "streamable_http": MCPServerStreamableHttp,
    "streamable-http": MCPServerStreamableHttp, "streamablehttp": MCPServerStreamableHttp,
}


def mcp_server_from_config(name: str, section: Mapping[str, Any]) -> MCPServerSpec:
    """Build the spec of ``agent.mcp_servers.<name>``: ``command``/``args``/``env``/``cwd`` (stdio)
    or ``url``/``headers`` (streamable HTTP), optionally ``type``; ``${VAR}`` is substituted."""
    where = f"agent.mcp_servers.{name}"
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: expected a mapping with 'command' (stdio) or 'url' (streamable HTTP)")
    data = dict(section)
    kind = str(data.pop("type", "") or ("stdio" if "command" in data else "http" if "url" in data else ""))
    if kind.lower() not in _KINDS:
        raise ConfigError(f"{where}: needs 'command' (a stdio server) or 'url' (streamable HTTP)" if not kind
                          else f"{where}: unknown type {kind!r}; use 'stdio' or 'streamable_http'")
    cls = _KINDS[kind.lower()]
    allowed = sorted(set(cls.model_fields) - {"name"})
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        hints = [f"{key!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(key, allowed, 1))
                 else repr(key) for key in unknown]
        raise ConfigError(f"{where}: unknown key(s) {', '.join(hints)}; a {kind} server takes: {', '.join(allowed)}")
    missing: list[str] = []
    data = _substitute(data, missing)
    if missing:
        raise ConfigError(f"{where} needs environment variable(s) {', '.join(dict.fromkeys(missing))}: "
                          "set them, or change the server's entry in agent.yml")
    try:
        return cls.model_validate({**data, "name": name})  # type: ignore[return-value]
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{where}: {problems}") from None


def _substitute(value: Any, missing: list[str]) -> Any:
    if isinstance(value, str):
        return substitute_env(value, missing)
    if isinstance(value, list):
        return [_substitute(item, missing) for item in value]
    if isinstance(value, dict):
        return {key: _substitute(item, missing) for key, item in value.items()}
    return value


def resolve_mcp_servers(
    servers: Mapping[str, MCPServerSpec | Mapping[str, Any]] | Iterable[str | MCPServerSpec] | str | None,
    agent_config: AgentConfig | Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, MCPServerSpec]:
    """name -> spec, from a dict name -> spec (or config section), a list of names configured
    under ``agent.mcp_servers`` (or of named specs), or None (no servers)."""
    if servers is None:
        return {}
    if isinstance(servers, Mapping):
        resolved: dict[str, MCPServerSpec] = {}
        for name, value in servers.items():
            if isinstance(value, _ServerSpec):
                resolved[name] = value if value.name == name else value.model_copy(update={"name": name})
            elif isinstance(value, Mapping):
                resolved[name] = mcp_server_from_config(name, value)
            else:
                raise ConfigError(f"mcp_servers[{name!r}]: expected MCPServerStdio, MCPServerStreamableHttp "
                                  f"or a config mapping, not {type(value).__name__}")
        return resolved
    configured = getattr(agent_config, "mcp_servers", agent_config) or {}
    resolved = {}
    for item in [servers] if isinstance(servers, (str, _ServerSpec)) else servers:
        if isinstance(item, str):
            if item not in configured:
                raise ConfigError(f"unknown MCP server {item!r}; configured MCP servers: "
                                  f"{', '.join(sorted(configured)) or '(none: no agent.mcp_servers given)'}")
            name, spec = item, mcp_server_from_config(item, configured[item])
        elif isinstance(item, _ServerSpec) and item.name:
            name, spec = item.name, item
        else:
            raise ConfigError("each listed MCP server is a configured name or a spec with name=...; "
                              "or pass a dict name -> spec")
        if name in resolved:
            raise ConfigError(f"MCP server {name!r} is listed twice")
        resolved[name] = spec
    return resolved


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
        tail = self._stderr.tail() if self._stderr else ""
        return MCPConnectionLostError(
            f"MCP server {self.name!r} closed the connection during {what} (it exited, was killed or dropped "
            f"the connection){'; its stderr ends with: ' + tail if tail else ''}", server=self.name)

    def _live(self) -> Client:
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


# ---------------------------------------------------------------- the group


class MCPServerGroup(Mapping[str, MCPConnection]):
    """The connected servers of one `multiple_mcp_servers` block (name -> `MCPConnection`),
    the ones left out in lenient mode (``failed``: name -> reason), and their tools."""

    def __init__(self, servers: dict[str, MCPConnection], failed: dict[str, str]) -> None:
        self.servers = servers
        self.failed = failed
        self._routes: dict[str, tuple[str, str]] = {}

    def __getitem__(self, name: str) -> MCPConnection:
        return self.servers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.servers)

    def __len__(self) -> int:
        return len(self.servers)

    async def tools(self) -> list[MCPTool]:
        """Every server's tools (listed in parallel, from cache where valid), names made unique."""
        listings = await _gather({name: server.list_tools for name, server in self.servers.items()})
        counts = Counter(tool.name for tools in listings.values() for tool in tools)
        unique: list[MCPTool] = []
        for server, tools in listings.items():
            for tool in tools:
                exposed = tool.name if counts[tool.name] == 1 else _prefixed(server, tool.name)
                base, n = exposed, 2
                while any(t.exposed_name == exposed for t in unique):  # a tool may already be named 'a__x'
                    exposed, n = f"{base}_{n}", n + 1
                unique.append(replace(tool, exposed_name=exposed))
        self._routes = {tool.exposed_name: (tool.server, tool.name) for tool in unique}
        return unique

    def route(self, exposed_name: str) -> tuple[str, str] | None:
        """(server, the server's tool name) of a name from the last `tools()`."""
        return self._routes.get(exposed_name)

    async def call_tool(self, exposed_name: str, arguments: Mapping[str, Any] | None = None) -> ToolResult:
        if exposed_name not in self._routes:
            await self.tools()  # first call, or the tool appeared since
        if exposed_name not in self._routes:
            raise MCPToolNotFoundError(f"no MCP tool named {exposed_name!r}; available: "
                                       f"{', '.join(sorted(self._routes)) or '(none)'}")
        server, tool = self._routes[exposed_name]
        return await self.servers[server].call_tool(tool, arguments)


def _prefixed(server: str, tool: str) -> str:
    # Model APIs accept tool names of [A-Za-z0-9_-]{1,64}.
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', server)}__{tool}"[:64]


async def _gather(calls: Mapping[str, Callable[[], Awaitable[T]]]) -> dict[str, T]:
    """Run the calls in parallel; the first error is raised as itself, not as a group."""
    results: dict[str, T] = {}
    errors: list[BaseException] = []

    async def run(name: str, call: Callable[[], Awaitable[T]]) -> None:
        try:
            results[name] = await call()
        except Exception as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for name, call in calls.items():
            tg.start_soon(run, name, call)
    if errors:
        raise errors[0]
    return {name: results[name] for name in calls}


@dataclass
class _Slot:
    ready: anyio.Event = field(default_factory=anyio.Event)
    connection: MCPConnection | None = None
    error: str | None = None


@asynccontextmanager
async def multiple_mcp_servers(
    servers: Mapping[str, MCPServerSpec | Mapping[str, Any]] | Iterable[str | MCPServerSpec] | str | None,
    *,
    agent_config: AgentConfig | Mapping[str, Mapping[str, Any]] | None = None,
    strict: bool = True,
    connect_retries: int = 2,
    connect_timeout_s: float = 30.0,
) -> AsyncIterator[MCPServerGroup]:
    """Connect to every server in parallel and yield the group; disconnect all on exit.

    A failed start is retried up to ``connect_retries`` times (not when the command does not
    exist or the handshake timed out). ``strict`` raises `MCPConnectError` naming each failed
    server and why; otherwise failed servers are logged, left out and listed in ``.failed``."""
    specs = resolve_mcp_servers(servers, agent_config)
    slots = {name: _Slot() for name in specs}
    stop = anyio.Event()
    pending: BaseException | None = None
    async with anyio.create_task_group() as tg:
        for name, spec in specs.items():
            tg.start_soon(_serve, name, spec, slots[name], stop, connect_retries, connect_timeout_s, name=f"mcp:{name}")
        try:
            for slot in slots.values():
                await slot.ready.wait()
            failed = {name: slot.error for name, slot in slots.items() if slot.error is not None}
            if failed and strict:
                pending = MCPConnectError(
                    "; ".join(f"MCP server {name!r} failed to start: {why}" for name, why in failed.items()),
                    server=next(iter(failed)), failures=failed)
            else:
                for name, why in failed.items():
                    logger.warning("MCP server %r is left out: %s", name, why)
                connected = {name: slot.connection for name, slot in slots.items() if slot.connection is not None}
                yield MCPServerGroup(connected, failed)
        except GeneratorExit:
            raise
        except BaseException as exc:
            # Held until the task group is closed: raised inside it, it would come out wrapped
            # in an ExceptionGroup (and a cancellation must reach the servers' tasks first).
            pending = exc
        finally:
            stop.set()
    if pending is not None:
        raise pending


async def _serve(
    name: str, spec: MCPServerSpec, slot: _Slot, stop: anyio.Event, retries: int, timeout_s: float
) -> None:
    """One server's task: connect (with retries), serve until ``stop``, disconnect. Never raises."""
    try:
        for attempt in range(retries + 1):
            failure = await _connect_and_serve(name, spec, slot, stop, timeout_s)
            if failure is None:
                return
            reason, retryable = failure
            if not retryable or attempt == retries:
                slot.error = reason if attempt == 0 else f"{reason} (after {attempt + 1} attempts)"
                return
            logger.info("MCP server %r failed to start (%s); retrying", name, reason)
            await anyio.sleep(min(0.25 * 2**attempt, 2.0))
    finally:
        slot.ready.set()


async def _connect_and_serve(
    name: str, spec: MCPServerSpec, slot: _Slot, stop: anyio.Event, timeout_s: float
) -> tuple[str, bool] | None:
    """None once served; else (why the start failed, whether a retry may help)."""
    from mcp import Client
    from mcp.types import Implementation

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
                slot.connection = connection
                slot.ready.set()
                await stop.wait()
                tg.cancel_scope.cancel()
        if scope.cancelled_caught and slot.connection is None:
            return _timeout_reason(connection, timeout_s), False
        return None
    except Exception as exc:
        if slot.connection is not None:  # it served; only the goodbye failed
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
            return f"connection to {_safe_url(spec.url)} refused", True
        if type(error).__module__.startswith("httpx"):
            return f"HTTP request to {_safe_url(spec.url)} failed: {type(error).__name__}: {error}", True
        if closed:
            return f"{_safe_url(spec.url)} closed the connection during the handshake", True
    if isinstance(error, MCPError):
        return f"MCP error {error.code} during the handshake: {error.message}{said}", False
    return f"{type(error).__name__}: {error}{said}", False


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = next((e for e in exc.exceptions if not isinstance(e, anyio.get_cancelled_exc_class())), exc.exceptions[0])
    return exc


def _safe_url(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", url)
