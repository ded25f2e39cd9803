"""MCP servers: their specs, the config that names them, and the group a tool run works with::

    servers = {"sql": MCPServerStdio(command="python", args=["-m", "datus.mcp_servers.sql_server",
                                                            "--url", "sqlite:///shop.db"])}
    async with multiple_mcp_servers(servers) as mcp:          # or ["sql"] + agent_config
        tools = await mcp.tools()                             # names unique across servers
        result = await mcp.call_tool(tools[0].exposed_name, {})

Lifecycle: the context manager owns one task group in its own task; each server gets a task
in it that connects (bounded retries, a deadline per attempt), serves until the group
closes, and disconnects. Every cancel scope is so entered and left by the task that owns it,
whatever happens: a server failing midway, the body raising, the body being cancelled. One
connection (`MCPConnection`, its transports, why a start failed) lives in `datus.models.mcp.connection`.

Errors (`DatusException`, code ``model_tool_error``)::

    MCPServerError                  anything about one server; ``server`` names it
    ├── MCPConnectError             strict start failed; ``failures``: name -> reason
    ├── MCPConnectionLostError      transport gone mid-run (the process died, HTTP dropped)
    ├── MCPRequestTimeoutError      no answer within ``request_timeout_s``
    └── MCPToolNotFoundError        no tool of that name in the group

A tool that fails is not an exception: `call_tool` returns a `ToolResult` with ``is_error``.
Config mistakes (unknown server name, unknown key, unset ``${VAR}``, a ``${VAR}`` in a stdio
server's ``command``/``args``, which ``ps`` would show: it goes in ``env:``) raise `ConfigError`.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from datus.models.config import ConfigError, substitute_env
from datus.models.errors import ModelError
from datus.models.mcp.connection import MCPConnection, MCPTool, ToolResult, connect_and_serve, safe_url
from datus.utils.exceptions import ErrorCode

if TYPE_CHECKING:
    from datus.models.config import AgentConfig

__all__ = [
    "MCPConnectError", "MCPConnection", "MCPConnectionLostError", "MCPRequestTimeoutError", "MCPServerError",
    "MCPServerGroup", "MCPServerSpec", "MCPServerStdio", "MCPServerStreamableHttp", "MCPTool", "MCPToolNotFoundError",
    "ToolResult", "mcp_server_from_config", "multiple_mcp_servers", "resolve_mcp_servers",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")


class MCPServerError(ModelError):
    error_code = ErrorCode.TOOL_EXECUTION_FAILED
    slug = "model_tool_error"

    def __init__(self, message: str, *, server: str | None = None) -> None:
        super().__init__(message)
        self.server = server

    def __reduce__(self) -> tuple[Any, ...]:  # survives pickling (errors cross Redis)
        return (type(self), (self.reason,), self.__dict__)


class MCPConnectError(MCPServerError):
    def __init__(self, message: str, *, server: str | None = None, failures: dict[str, str] | None = None) -> None:
        super().__init__(message, server=server)
        self.failures = dict(failures or {})


class MCPConnectionLostError(MCPServerError):
    """The server is gone (exited, killed, connection dropped): retrying on this connection will
    not help. A durable tool run (one with a journal) resumes once the server is back."""

    server_lost: ClassVar[bool] = True  # read by the tool loop, which does not import MCP


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
        "legacy: the handshake only (for servers that stall on unknown methods). With mcp 1.x installed "
        "both are the handshake: the 2026-07-28 revision needs mcp 2")
    request_timeout_s: float | None = Field(default=None, gt=0, description="per MCP request; None: no limit")
    # how an `MCPPool` (a worker process) keeps the server; a run without a pool owns its servers
    shared: bool = Field(default=True, description="false: a fresh server per run, for servers that keep "
                         "per-conversation state; true: pooled, one running server serves many runs")
    max_sessions: int = Field(default=2, ge=1, le=64, description="pooled: sessions (processes, for stdio) at most")
    requests_per_session: int = Field(default=16, ge=1, description="pooled: requests in flight on one session "
                                      "before another is opened (1: a server that answers one at a time)")
    idle_timeout_s: float = Field(default=300.0, gt=0, description="pooled: close a session unused this long")


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
                value = safe_url(value)
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
    if cls is MCPServerStdio:
        _no_variables_in_argv(where, data)
    missing: list[str] = []
    data = _substitute(data, missing)
    if missing:
        raise ConfigError(f"{where} needs environment variable(s) {', '.join(dict.fromkeys(missing))}: "
                          "set them, or change the server's entry in agent.yml")
    from datus.models.redact import remember_secret

    env, headers = data.get("env"), data.get("headers")
    # masked wherever they would be echoed: every env value; the headers that carry credentials
    secrets = [*(env.values() if isinstance(env, Mapping) else ()),
               *(value for name, value in (headers.items() if isinstance(headers, Mapping) else ())
                 if _CREDENTIAL_HEADER.search(str(name)))]
    for secret in secrets:
        remember_secret(secret)
    try:
        return cls.model_validate({**data, "name": name})  # type: ignore[return-value]
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{where}: {problems}") from None


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")
_CREDENTIAL_HEADER = re.compile(r"(?i)auth|key|token|secret|cookie|session|signature|password")


def _no_variables_in_argv(where: str, data: Mapping[str, Any]) -> None:
    """A stdio server's ``command`` and ``args`` become its process's command line, which anyone
    on the machine sees with ``ps``: a ``${VAR}`` there (a secret, as a rule) is refused, pointing
    at ``env:``, which the process alone sees."""
    args = data.get("args")
    places = [("command", data.get("command"))] + (
        [(f"args[{index}]", arg) for index, arg in enumerate(args)] if isinstance(args, list) else [])
    for place, value in places:
        found = _VARIABLE.search(value) if isinstance(value, str) else None
        if found:
            name = found.group(1)
            raise ConfigError(
                f"{where}.{place}: ${{{name}}} is not substituted in a stdio server's command line — anyone who "
                f"runs ps would see its value. Pass it in the server's environment instead (env: {{{name}: "
                f"\"${{{name}}}\"}}) and have the server read it there; a value that is not secret can be "
                "written out literally")


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

    def connected(self, connection: MCPConnection) -> None:
        self.connection = connection
        self.ready.set()


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
        except BaseException as exc:
            # Held until the task group is closed: raised inside it, it would come out wrapped
            # in an ExceptionGroup (and a cancellation must reach the servers' tasks first).
            # GeneratorExit too: a tool-run stream closed early (aclose) must end quietly.
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
            failure = await connect_and_serve(name, spec, stop, timeout_s, slot.connected)
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


