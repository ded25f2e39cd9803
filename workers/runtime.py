"""The worker process runtime: one long-lived asyncio loop per process and its SDK clients.

Created after fork (prefork) or at worker start (our pool, which does not fork). The worker's
pool spawns each job's coroutine here (`spawn`); under prefork or solo a task blocks on it
through ``tasks.execution`` (`run`). Either way one process keeps hundreds of model calls in
flight. At shutdown running jobs are cancelled (their unacknowledged messages go back to the
queue), allowed to report, and the loop's clients are closed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any

from datus.models._clients import keep as keep_clients
from datus_queue.tasks import execution
from datus_queue.tasks.context import get_context

__all__ = ["WorkerRuntime", "runtime"]

logger = logging.getLogger("datus_queue.workers.runtime")


class WorkerRuntime:
    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self._futures: set[Future[Any]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()  # touched on the loop's thread only
        self._lock = threading.Lock()

    def start(self) -> None:
        if self.loop is not None:
            return
        loop = asyncio.new_event_loop()
        keep_clients(loop)  # the process's loop: its SDK clients serve every job until shutdown
        thread = threading.Thread(target=loop.run_forever, name="dq-worker-loop", daemon=True)
        thread.start()
        self.loop, self.thread = loop, thread
        execution.install_runner(self.run)
        logger.info("worker runtime started: one event loop for this process")

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Start ``coro`` on the loop without waiting for it (the worker's pool: ``coro``
        reports its own outcome). Cheaper than `run`: no future to wait on."""
        assert self.loop is not None, "the worker runtime is not started"
        self.loop.call_soon_threadsafe(self._spawn, coro)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` on the loop and wait for its result (a task under a thread or process
        pool); `cancel_all` cancels it until it is done."""
        assert self.loop is not None, "the worker runtime is not started"
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        with self._lock:
            self._futures.add(future)
        try:
            return future.result()
        finally:
            with self._lock:
                self._futures.discard(future)

    def cancel_all(self) -> None:
        """Cancel every job running on the loop (shutdown): their tasks requeue them."""
        with self._lock:
            pending = list(self._futures)
        for future in pending:
            future.cancel()
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._cancel_spawned)

    async def _wind_down(self, timeout_s: float) -> None:
        """Let the cancelled jobs report (their messages go back to the queue), then close
        the clients."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)
        await get_context().aclose()

    def _cancel_spawned(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def stop(self, timeout_s: float = 2.0) -> None:
        loop = self.loop
        if loop is None:
            return
        execution.uninstall_runner()
        self.cancel_all()  # running jobs stop now; their messages are requeued
        try:
            asyncio.run_coroutine_threadsafe(self._wind_down(timeout_s), loop).result(timeout_s * 2)
        except Exception as exc:  # noqa: BLE001 - shutting down: log and go on
            logger.warning("closing clients at shutdown failed: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        if self.thread is not None:
            self.thread.join(timeout_s)
        self.loop = self.thread = None
        logger.info("worker runtime stopped")


runtime = WorkerRuntime()
