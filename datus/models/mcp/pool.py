"""MCP servers kept running and connected across tool runs: one `MCPPool` per event loop (a
worker process has one; the model layer used on its own has none, and each run then starts
and stops its own servers)::

    pool = MCPPool()
    async with pool.lease({"sql": spec}) as group:   # an MCPServerGroup, as multiple_mcp_servers gives
        tools = await group.tools()
    ...
    await pool.aclose()                              # at shutdown: every server stopped

A server is pooled per name and config (a hash of its spec: the same name with other
arguments, e.g. another database URL, is another server). Each pooled server has up to
``max_sessions`` sessions — a stdio process each, or a streamable-HTTP session — opened on
demand: a request goes to the live session with the fewest requests in flight, and another
session is opened only when every one has ``requests_per_session`` in flight (MCP numbers
its requests, so one session carries many at once). The tool list is cached per session and
dropped when the server sends ``notifications/tools/list_changed`` (`MCPConnection`).

A session unused for ``idle_timeout_s`` is closed; an idle one is pinged every
``health_interval_s`` (a ``tools/list``: the newest MCP revision has no ping) and closed if that fails. A session whose server died (a lost
connection during a request, or a failed ping) is dropped; the next request starts a new one,
after a back-off that doubles with each consecutive loss. The request that saw the loss gets
`MCPConnectionLostError` — a durable tool run turns that into a retry that resumes.

A server configured ``shared: false`` is never pooled: each lease starts its own, as
`multiple_mcp_servers` does, and stops it when the lease ends.

Every session runs in a task of its own that enters and leaves the transport's cancel scopes
itself (`connect_and_serve`); the pool's callers only send requests through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio

from datus.models.mcp.connection import MCPConnection, MCPTool, ToolResult, connect_and_serve
from datus.models.mcp.servers import (
    MCPConnectError,
    MCPConnectionLostError,
    MCPServerGroup,
    MCPServerSpec,
    _gather,
    multiple_mcp_servers,
    resolve_mcp_servers,
)

__all__ = ["MCPPool", "PooledServer"]

logger = logging.getLogger(__name__)


@dataclass
class _Session:
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    connection: MCPConnection | None = None
    error: str | None = None
    retryable: bool = False
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None

    @property
    def live(self) -> bool:
        return self.connection is not None and not self.stop.is_set() and not self.connection._closed

    def connected(self, connection: MCPConnection) -> None:
        self.connection = connection
        self.ready.set()


class PooledServer:
    """One pooled server (a name and a config) and its sessions. It answers `list_tools` and
    `call_tool` like an `MCPConnection`, so an `MCPServerGroup` can hold it."""

    def __init__(self, name: str, spec: MCPServerSpec, pool: MCPPool) -> None:
        self.name, self.spec, self.pool = name, spec, pool
        self.sessions: list[_Session] = []
        self.starts = 0  # sessions started (for stdio: processes)
        self.losses = 0  # sessions whose server died under us
        self._failures = 0  # consecutive losses or failed starts: the back-off
        self._not_before = 0.0
        self._opening: asyncio.Future[_Session] | None = None

    # -- what a group asks of a server ---------------------------------------------------

    async def list_tools(self) -> list[MCPTool]:
        session = await self._acquire()
        return await self._use(session, session.connection.list_tools)  # type: ignore[union-attr]

    async def call_tool(self, name: str, arguments: Mapping[str, Any] | None = None) -> ToolResult:
        session = await self._acquire()
        result = await self._use(session, lambda: session.connection.call_tool(name, arguments))  # type: ignore[union-attr]
        self._failures = 0  # the server answers: the next loss starts the back-off afresh
        return result

    async def _use(self, session: _Session, send: Any) -> Any:
        session.in_flight += 1
        try:
            return await send()
        except MCPConnectionLostError:
            self._lost(session, "the connection was lost during a request")
            raise
        finally:
            session.in_flight -= 1
            session.last_used = time.monotonic()

    # -- sessions -------------------------------------------------------------------------

    async def start(self) -> None:
        """Make sure one session is connected (raises `MCPConnectError` naming why not)."""
        await self._acquire()

    async def _acquire(self) -> _Session:
        live = [session for session in self.sessions if session.live]
        best = min(live, key=lambda session: session.in_flight, default=None)
        if best is not None and (best.in_flight < self.spec.requests_per_session
                                 or len(self.sessions) >= self.spec.max_sessions):
            return best
        if self._opening is None:  # one opening at a time; the callers meanwhile share it
            self._opening = asyncio.ensure_future(self._open())
            self._opening.add_done_callback(self._opened)
        opening = self._opening
        if best is not None:  # busy, not dead: use it rather than wait for the new session
            return best
        return await asyncio.shield(opening)

    def _opened(self, future: asyncio.Future[_Session]) -> None:
        self._opening = None
        if not future.cancelled():
            future.exception()  # retrieved: a failed start is raised to the callers that waited

    async def _open(self) -> _Session:
        attempts = self.pool.connect_retries + 1
        for attempt in range(attempts):
            wait = self._not_before - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            session = _Session()
            self.sessions.append(session)
            self.starts += 1
            session.task = asyncio.get_running_loop().create_task(self._serve(session), name=f"mcp-pool:{self.name}")
            await session.ready.wait()
            if session.connection is not None:
                if self.starts > 1:
                    logger.info("MCP server %r: session %d started", self.name, self.starts)
                return session
            self._backoff()
            if not session.retryable or attempt == attempts - 1:
                why = session.error if attempt == 0 else f"{session.error} (after {attempt + 1} attempts)"
                raise MCPConnectError(f"MCP server {self.name!r} failed to start: {why}", server=self.name,
                                      failures={self.name: str(why)})
            logger.info("MCP server %r failed to start (%s); retrying", self.name, session.error)
        raise AssertionError("unreachable")

    async def _serve(self, session: _Session) -> None:
        try:
            failure = await connect_and_serve(self.name, self.spec, session.stop, self.pool.connect_timeout_s,
                                              session.connected)
            if failure is not None:
                session.error, session.retryable = failure
            elif not session.stop.is_set():  # it ended by itself: the server went away
                self._lost(session, "the server closed the connection")
        except Exception as exc:  # noqa: BLE001 - a session's task never takes the worker down
            session.error, session.retryable = f"{type(exc).__name__}: {exc}", True
        finally:
            session.stop.set()
            session.ready.set()
            if session in self.sessions:
                self.sessions.remove(session)

    def _lost(self, session: _Session, why: str) -> None:
        if session.stop.is_set():
            return
        session.stop.set()
        self.losses += 1
        self._backoff()
        delay = max(0.0, self._not_before - time.monotonic())
        logger.warning("MCP server %r: %s; a new session starts on the next request (back-off %.2fs)",
                       self.name, why, delay)

    def _backoff(self) -> None:
        self._failures += 1
        delay = 0.0 if self._failures == 1 else min(self.pool.max_backoff_s, 0.25 * 2 ** (self._failures - 2))
        self._not_before = time.monotonic() + delay

    async def check(self, now: float) -> None:
        """Close idle sessions past the idle timeout; ping the other idle ones."""
        for session in [s for s in self.sessions if s.live and s.in_flight == 0]:
            idle = now - session.last_used
            if idle >= self.spec.idle_timeout_s:
                logger.debug("MCP server %r: closing a session idle for %.0fs", self.name, idle)
                session.stop.set()
            elif idle >= self.pool.health_interval_s:
                try:
                    # tools/list, not ping: the 2026-07-28 revision removed ping, every revision lists tools
                    with anyio.fail_after(self.pool.health_timeout_s):
                        await session.connection._fetch_tools()  # type: ignore[union-attr]
                    session.last_used = time.monotonic() - idle  # a health check is not use: the idle clock runs on
                except Exception as exc:  # noqa: BLE001 - a failed ping is a dead server
                    self._lost(session, f"the health check failed ({type(exc).__name__})")

    async def aclose(self) -> None:
        for session in self.sessions:
            session.stop.set()
        tasks = [session.task for session in self.sessions if session.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self.pool.close_timeout_s)


class MCPPool:
    """Servers kept running across runs, per name and config, on the loop that uses it."""

    def __init__(self, *, connect_timeout_s: float = 30.0, connect_retries: int = 2, health_interval_s: float = 30.0,
                 health_timeout_s: float = 5.0, max_backoff_s: float = 30.0, close_timeout_s: float = 5.0) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.connect_retries = connect_retries
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.max_backoff_s = max_backoff_s
        self.close_timeout_s = close_timeout_s
        self.servers: dict[tuple[str, str], PooledServer] = {}
        self._janitor: asyncio.Task[None] | None = None
        self._closed = False

    def server(self, name: str, spec: MCPServerSpec) -> PooledServer:
        if self._closed:
            raise RuntimeError("the MCP pool is closed")
        key = (name, _fingerprint(spec))
        server = self.servers.get(key)
        if server is None:
            server = self.servers[key] = PooledServer(name, spec, self)
        if self._janitor is None or self._janitor.done():
            self._janitor = asyncio.get_running_loop().create_task(self._watch(), name="mcp-pool:janitor")
        return server

    @contextlib.asynccontextmanager
    async def lease(self, servers: Any, *, agent_config: Any = None) -> AsyncIterator[MCPServerGroup]:
        """The servers of one run (names, specs or a dict, as `multiple_mcp_servers` takes):
        the shared ones from the pool (started if need be), the ``shared: false`` ones started
        for this lease alone. A server that cannot start raises `MCPConnectError`."""
        specs = resolve_mcp_servers(servers, agent_config)
        pooled = {name: self.server(name, spec) for name, spec in specs.items() if spec.shared}
        own = {name: spec for name, spec in specs.items() if not spec.shared}
        await _gather({name: server.start for name, server in pooled.items()})
        if not own:
            yield MCPServerGroup(dict(pooled), {})  # type: ignore[arg-type]
            return
        async with multiple_mcp_servers(own, connect_retries=self.connect_retries,
                                        connect_timeout_s=self.connect_timeout_s) as group:
            yield MCPServerGroup({**pooled, **group.servers}, {})  # type: ignore[arg-type]

    def stats(self) -> dict[str, dict[str, int]]:
        """Per server name: sessions open, sessions started, servers lost."""
        out: dict[str, dict[str, int]] = {}
        for (name, _), server in self.servers.items():
            entry = out.setdefault(name, {"sessions": 0, "starts": 0, "losses": 0})
            entry["sessions"] += sum(1 for session in server.sessions if session.live)
            entry["starts"] += server.starts
            entry["losses"] += server.losses
        return out

    async def _watch(self) -> None:
        while not self._closed:
            idle = [server.spec.idle_timeout_s for server in self.servers.values()]
            await asyncio.sleep(max(0.05, min(self.health_interval_s, *idle) / 2))
            now = time.monotonic()
            for server in list(self.servers.values()):
                await server.check(now)

    async def aclose(self) -> None:
        """Stop every server (stdio processes exit) and the health checks; idempotent."""
        self._closed = True
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._janitor
        await asyncio.gather(*(server.aclose() for server in self.servers.values()), return_exceptions=True)
        self.servers.clear()


def _fingerprint(spec: MCPServerSpec) -> str:
    # the spec may hold secrets (env, headers): only a hash of it is kept as the key
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()
