"""What a process needs to run jobs: settings, agent config, the job store, the leases of its
running jobs, Redis clients, the event publisher, the provider-limit limiter, the MCP server
pool and the model objects — created lazily, once per process (after fork), and closed by the
worker runtime at shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

from datus.models.base import LLMBaseModel
from datus.models.config import AgentConfig
from datus_queue.tasks.settings import Settings, get_settings

__all__ = ["JobContext", "get_context", "load_agent_config", "reset_context"]


def load_agent_config(settings: Settings) -> AgentConfig:
    """``DQ_CONFIG``, else ``conf/agent.yml`` in the working directory, else no named models
    (``provider:model`` strings still work, keys from the environment)."""
    if settings.config:
        return AgentConfig.from_file(settings.config)
    default = Path("conf/agent.yml")
    if default.is_file():
        return AgentConfig.from_file(default)
    return AgentConfig()


class JobContext:
    def __init__(self, settings: Settings | None = None, agent_config: AgentConfig | None = None) -> None:
        self.settings = settings or get_settings()
        self.agent_config = agent_config if agent_config is not None else load_agent_config(self.settings)
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._store: Any = None
        self._leases: Any = None
        self._redis: Any = None
        self._limiter: Any = None
        # LRU, bounded: every distinct model name a job names would otherwise stay for good
        self._models: OrderedDict[tuple[str, bool], LLMBaseModel] = OrderedDict()
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Any]] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def store(self) -> Any:
        with self._lock:
            return self._open_store()

    @property
    def leases(self) -> Any:
        """The `LeaseKeeper` of this process's running jobs."""
        with self._lock:
            if self._leases is None:
                from datus_queue.tasks.leases import LeaseKeeper

                self._leases = LeaseKeeper(self._open_store(), self.settings.lease_s)
            return self._leases

    def _open_store(self) -> Any:  # with self._lock held
        if self._store is None:
            from datus_queue.tasks.store import JobStore

            self._store = JobStore(self.settings.database_url)
        return self._store

    @property
    def redis(self) -> Any:
        """A synchronous Redis client (thread-safe; the maintenance tasks run in threads)."""
        with self._lock:
            if self._redis is None:
                from datus_queue.tasks.redis_connect import connect

                self._redis = connect(self.settings)
            return self._redis

    @property
    def limiter(self) -> Any:
        """The provider limits shared by the fleet (`tasks.ratelimit.RedisLimiter`)."""
        with self._lock:
            if self._limiter is None:
                from datus_queue.tasks.ratelimit import RedisLimiter

                self._limiter = RedisLimiter(self)
            return self._limiter

    def model(self, name: str, in_process_retries: bool) -> LLMBaseModel:
        """One model object per (name, retry mode) per process, at most
        ``DQ_MODEL_CACHE_SIZE`` of them (least recently used go first; a model dropped from
        here closes its clients on its loop once the last job using it lets go). Jobs retried
        by Celery use a model that tries each request once; tool runs first retry each request
        in-process (a job retry then resumes from the run's checkpoints), their rate-limit
        answers spending a time budget, not attempts. Every model's requests go through the
        limiter."""
        key = (name, in_process_retries)
        with self._lock:
            model = self._models.get(key)
            if model is not None:
                self._models.move_to_end(key)
                return model
        model = LLMBaseModel.create_model(self.agent_config, name)
        if in_process_retries:
            model.retry_policy = dataclasses.replace(model.retry_policy,
                                                     rate_limit_wait_s=self.settings.rate_limit_max_wait_s)
        else:
            model.retry_policy = dataclasses.replace(model.retry_policy, max_attempts=1)
        if self.settings.rate_limiter:
            model.request_limiter = self.limiter.for_model(model, self.agent_config.rate_limits_for(model.model_config))
        with self._lock:
            found = self._models.setdefault(key, model)  # another thread may have made it meanwhile
            self._models.move_to_end(key)
            while len(self._models) > self.settings.model_cache_size:
                self._models.popitem(last=False)
            return found

    def models(self) -> list[LLMBaseModel]:
        with self._lock:
            return list(self._models.values())

    def _loop_state(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        with self._lock:
            state = self._per_loop.get(loop)
            if state is None:
                from datus_queue.tasks.events import AsyncEventPublisher
                from datus_queue.tasks.redis_connect import async_client

                # blocking pool: at hundreds of jobs in flight, wait for a connection rather
                # than fail (redis-py's default pool raises past 100 connections). No command on
                # this client blocks in Redis, so a reply later than the socket timeout is a hung
                # connection (a peer gone without a reset): it is dropped, not waited on for ever
                client = async_client(self.settings, max_connections=self.settings.redis_max_connections, timeout=30,
                                      socket_timeout=30, socket_connect_timeout=5)
                state = {
                    "redis": client,
                    "publisher": AsyncEventPublisher(client, self.settings.event_ttl_s, self.settings.event_maxlen,
                                                     self.settings.max_event_bytes),
                }
                self._per_loop[loop] = state
            return state

    @property
    def aredis(self) -> Any:
        """The async Redis client of the running event loop."""
        return self._loop_state()["redis"]

    @property
    def publisher(self) -> Any:
        return self._loop_state()["publisher"]

    @property
    def mcp_pool(self) -> Any:
        """The running loop's MCP servers, kept across tool runs (`datus.models.mcp.pool`)."""
        state = self._loop_state()
        pool = state.get("mcp_pool")
        if pool is None:
            from datus.models.mcp.pool import MCPPool

            pool = state["mcp_pool"] = MCPPool()
        return pool

    def mcp_pools(self) -> list[Any]:
        """The MCP pools of every loop of this process (for metrics: any thread may ask)."""
        with self._lock:
            states = list(self._per_loop.values())
        return [state["mcp_pool"] for state in states if state.get("mcp_pool") is not None]

    def script(self, source: str) -> Any:
        """A Lua script on the running loop's Redis client (EVALSHA, loaded once)."""
        state = self._loop_state()
        scripts = state.setdefault("scripts", {})
        if source not in scripts:
            scripts[source] = state["redis"].register_script(source)
        return scripts[source]

    async def aclose(self) -> None:
        """Close what belongs to the running loop: SDK clients, MCP servers (their processes
        exit) and the Redis client."""
        for model in self.models():
            await model.aclose()
        with self._lock:
            state = self._per_loop.pop(asyncio.get_running_loop(), None)
        if state is not None:
            if state.get("mcp_pool") is not None:
                await state["mcp_pool"].aclose()
            await state["redis"].aclose()


_context: JobContext | None = None
_context_lock = threading.Lock()


def get_context() -> JobContext:
    global _context
    with _context_lock:
        if _context is None or _context.pid != os.getpid():  # never share across a fork
            _context = JobContext()
        return _context


def reset_context(context: JobContext | None = None) -> None:
    global _context
    with _context_lock:
        _context = context
