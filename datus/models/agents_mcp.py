"""MCP servers given as openai-agents server objects (``MCPServerStdio``, ``MCPServerSse``,
``MCPServerStreamableHttp``, subclasses such as Datus's ``SilentMCPServerStdio``, or any object
with ``connect()``/``cleanup()`` or ``async with``, ``list_tools(run_context, agent)`` and
``call_tool(name, arguments)``), taken by what they expose.

Datus passes them unconnected, and some are process-wide singletons, so a run connects each
for its duration and cleans it up afterwards. Connecting and cleaning up happen in one task
per server object and event loop (the *holder*): openai-agents' servers enter anyio cancel
scopes on connect that must be left by the task that entered them, and a streamed run may be
closed from another task than the one that started it (Datus's web UI drives each step with
its own ``run_until_complete``). Concurrent runs on one loop share the holder: the server is
connected once and cleaned up when the last run using it ends. The anyio "cancel scope in a
different task" RuntimeError is still suppressed on cleanup, as Datus does; other cleanup errors
are logged. A server the caller has already connected (its ``session`` is set) is used as it is
and left connected.

A server that fails to connect, or to list its tools, is logged and left out of the run
(Datus's behaviour). ``list_tools`` gets a run context and an agent, since openai-agents 0.3.2
refuses to apply a ``tool_filter`` without them. A tool result becomes the text of its content
for the model; ``raw_output`` is the JSON text openai-agents would have returned
(``content[0].model_dump_json()``, a JSON list for several items, the structured content for a
server with ``use_structured_content``), which Datus's CLI parses.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import re
import weakref
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from datus.models.agents_compat import AgentInfo, RunContext
from datus.models.function_tools import Tool, ToolContext, ToolOutcome
from datus.models.generation import ToolSpec

__all__ = ["AgentsMCPTool", "is_server_object", "server_object_tools", "split_servers"]

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 60.0
CONNECT_ATTEMPTS = 2
_RETRY_PAUSE_S = 0.5
_CANCEL_SCOPE_ERROR = "cancel scope in a different task"


def is_server_object(value: Any) -> bool:
    """An MCP server object (as opposed to one of our specs, a config mapping or a name)."""
    if isinstance(value, (str, Mapping)) or not callable(getattr(value, "call_tool", None)):
        return False
    return callable(getattr(value, "list_tools", None)) and (
        callable(getattr(value, "connect", None)) or callable(getattr(value, "__aenter__", None)))


def split_servers(mcp_servers: Any) -> tuple[Any, dict[str, Any]]:
    """(what our own MCP layer takes — names, specs, config mappings — or None, name -> server
    object). A dict keeps its keys as names; a listed server object is named by ``.name``."""
    if mcp_servers is None:
        return None, {}
    if isinstance(mcp_servers, Mapping):
        objects = {name: server for name, server in mcp_servers.items() if is_server_object(server)}
        rest = {name: server for name, server in mcp_servers.items() if name not in objects}
        return rest or None, objects
    if is_server_object(mcp_servers):
        items: list[Any] = [mcp_servers]
    elif isinstance(mcp_servers, (list, tuple, set, frozenset)):
        items = list(mcp_servers)
    else:  # a name or one of our specs
        return mcp_servers, {}
    objects = {}
    rest_list: list[Any] = []
    for item in items:
        if not is_server_object(item):
            rest_list.append(item)
            continue
        name = str(getattr(item, "name", "") or type(item).__name__)
        base, n = name, 2
        while name in objects:
            name, n = f"{base}_{n}", n + 1
        objects[name] = item
    return rest_list or None, objects


# ---------------------------------------------------------------- connecting: one holder per server


@dataclass(eq=False)
class _Holder:
    server: Any
    users: int = 0
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None
    closing: bool = False
    task: asyncio.Task[None] | None = None


_holders: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, _Holder]] = weakref.WeakKeyDictionary()


def _connected_by_caller(server: Any) -> bool:
    return getattr(server, "session", None) is not None


async def _connect(server: Any) -> None:
    if callable(getattr(server, "connect", None)):
        await server.connect()
    else:
        await server.__aenter__()


async def _cleanup(name: str, server: Any) -> None:
    try:
        if callable(getattr(server, "cleanup", None)):
            await server.cleanup()
        else:
            await server.__aexit__(None, None, None)
    except RuntimeError as exc:
        if _CANCEL_SCOPE_ERROR not in str(exc):
            logger.warning("MCP server %r: cleanup failed: %s", name, exc)
    except Exception as exc:  # noqa: BLE001 - the run is over; a failed cleanup must not undo it
        logger.warning("MCP server %r: cleanup failed: %s: %s", name, type(exc).__name__, exc)


async def _hold(name: str, holder: _Holder, registry: dict[int, _Holder]) -> None:
    """The holder's task: connect, wait until the last run lets go, clean up."""
    try:
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await _connect(holder.server)
                break
            except asyncio.CancelledError:  # every run waiting for it went away
                await _cleanup(name, holder.server)
                raise
            except Exception as exc:  # noqa: BLE001 - whatever a server raises, it is left out (Datus's behaviour)
                await _cleanup(name, holder.server)  # a half-made connection
                if attempt == CONNECT_ATTEMPTS:
                    holder.error = exc
                    return
                logger.info("MCP server %r failed to connect (%s: %s); retrying", name, type(exc).__name__, exc)
                await asyncio.sleep(_RETRY_PAUSE_S)
        holder.connected.set()
        await holder.release.wait()
        await _cleanup(name, holder.server)
    finally:
        holder.closing = True
        holder.connected.set()
        if registry.get(id(holder.server)) is holder:
            del registry[id(holder.server)]


async def _acquire(name: str, server: Any) -> _Holder:
    loop = asyncio.get_running_loop()
    registry = _holders.setdefault(loop, {})
    while True:
        holder = registry.get(id(server))
        if holder is None:
            holder = registry[id(server)] = _Holder(server)
            holder.task = loop.create_task(_hold(name, holder, registry), name=f"mcp-holder:{name}")
        if not holder.closing:
            break
        await _finished(holder.task)  # type: ignore[arg-type]  # the last run's cleanup, then connect anew
    holder.users += 1
    try:
        await holder.connected.wait()
    except BaseException:
        await _release(holder)
        raise
    if holder.error is not None:
        error = holder.error
        await _release(holder)
        raise error
    return holder


async def _release(holder: _Holder) -> None:
    holder.users -= 1
    if holder.users > 0:
        return
    holder.closing = True  # a run arriving now waits for this cleanup, then connects anew
    holder.release.set()
    if holder.task is not None and not holder.connected.is_set():
        holder.task.cancel()  # still connecting, and nobody waits for it any more
    if holder.task is not None:
        await _finished(holder.task)  # a run cancelled while it ends still has its servers stopped


async def _finished(task: asyncio.Task[None]) -> None:
    """Wait for a holder's task to end, however it ends (cancelled while connecting included);
    shielded, so it ends even if the waiting run is cancelled (which then raises here)."""
    await asyncio.shield(asyncio.wait([task]))


@contextlib.asynccontextmanager
async def _connected(name: str, server: Any) -> AsyncIterator[bool]:
    """Yields True once the server is connected for this run, False if it could not be."""
    held = id(server) in _holders.get(asyncio.get_running_loop(), {})  # by another run: share it
    if not held and _connected_by_caller(server):
        yield True
        return
    try:
        holder = await _acquire(name, server)
    except Exception as exc:  # noqa: BLE001 - the holder's error, reported here
        logger.error("MCP server %r failed to connect and is left out of the run: %s: %s", name,
                     type(exc).__name__, exc)
        yield False
        return
    try:
        yield True
    finally:
        await _release(holder)


# ---------------------------------------------------------------- tools


class AgentsMCPTool:
    """One tool of a server object."""

    def __init__(self, server_name: str, server: Any, tool: Any, exposed_name: str) -> None:
        self.server = server
        self.tool_name = str(tool.name)
        self.meta = {"server": server_name, "tool": self.tool_name}
        schema = dict(_field(tool, "inputSchema", "input_schema") or {"type": "object"})
        schema.setdefault("properties", {})  # MCP does not require it; model APIs do
        self.spec = ToolSpec(name=exposed_name, description=getattr(tool, "description", None) or "",
                             parameters=schema)

    async def call(self, arguments: dict[str, Any], ctx: ToolContext | None = None) -> ToolOutcome:
        result = await self.server.call_tool(self.tool_name, arguments)
        content = list(_field(result, "content") or [])
        structured = _field(result, "structuredContent", "structured_content")
        if getattr(self.server, "use_structured_content", False) and structured:
            raw = text = json.dumps(structured, ensure_ascii=False)
        else:
            raw = _item_json(content[0]) if len(content) == 1 else json.dumps([_item_dict(i) for i in content])
            text = "\n".join(_item_text(item) for item in content)
            if not text and structured:
                text = json.dumps(structured, ensure_ascii=False)
        is_error = bool(_field(result, "isError", "is_error"))
        return ToolOutcome(text, is_error=is_error, structured=structured, meta=self.meta, raw=raw)


def _field(value: Any, *names: str) -> Any:
    for name in names:
        if isinstance(value, Mapping) and name in value:
            return value[name]
        if hasattr(value, name):
            return getattr(value, name)
    return None


def _item_dict(item: Any) -> Any:
    if isinstance(item, Mapping):
        return dict(item)
    dump = getattr(item, "model_dump", None)
    return dump(mode="json") if callable(dump) else str(item)


def _item_json(item: Any) -> str:
    dump = getattr(item, "model_dump_json", None)
    return dump() if callable(dump) else json.dumps(_item_dict(item), default=str)


def _item_text(item: Any) -> str:
    if _field(item, "type") == "text":
        return str(_field(item, "text") or "")
    return json.dumps(_item_dict(item), ensure_ascii=False, default=str)


async def _list_tools(server: Any, run_context: RunContext, agent: AgentInfo) -> list[Any]:
    list_tools = server.list_tools
    try:
        parameters = inspect.signature(list_tools).parameters
    except (TypeError, ValueError):
        parameters = {}
    takes = {"run_context", "agent"} <= set(parameters) or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    result = list_tools(run_context=run_context, agent=agent) if takes else list_tools()
    return list(await result if inspect.isawaitable(result) else result)


@contextlib.asynccontextmanager
async def server_object_tools(servers: Mapping[str, Any], run_context: RunContext,
                              agent: AgentInfo) -> AsyncIterator[list[Tool]]:
    """The tools of every server object that connects, for the block's duration. A tool name
    two servers share is exposed as ``<server>__<tool>`` (the server still gets its own name)."""
    if not servers:
        yield []
        return
    async with contextlib.AsyncExitStack() as stack:
        listed: dict[str, list[Any]] = {}
        for name, server in servers.items():  # one after the other: Datus's servers may share state
            if not await stack.enter_async_context(_connected(name, server)):
                continue
            try:
                listed[name] = await _list_tools(server, run_context, agent)
            except Exception as exc:  # noqa: BLE001 - a server that cannot list its tools is left out
                logger.error("MCP server %r could not list its tools and is left out of the run: %s: %s", name,
                             type(exc).__name__, exc)
        counts: dict[str, int] = {}
        for tools in listed.values():
            for tool in tools:
                counts[str(tool.name)] = counts.get(str(tool.name), 0) + 1
        out: list[Tool] = []
        for name, tools in listed.items():
            for tool in tools:
                exposed = str(tool.name) if counts[str(tool.name)] == 1 else _prefixed(name, str(tool.name))
                out.append(AgentsMCPTool(name, servers[name], tool, exposed))
        yield out


def _prefixed(server: str, tool: str) -> str:
    # Model APIs accept tool names of [A-Za-z0-9_-]{1,64}.
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', server)}__{tool}"[:64]
