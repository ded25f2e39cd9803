"""The worker's pool: job tasks run as coroutines on the process's event loop, no thread each.

Celery hands every message to its pool as ``apply_async(trace, args=(task name, id, request,
body, ...), callback=..., accept_callback=...)``; the threads pool runs Celery's tracer in a
thread, which for our tasks only waits while the event loop does the work. With hundreds of
jobs in flight those threads cost more than the jobs (12.8 ms of worker CPU per job, against
6.1 ms once the jobs ran on the loop, with group commit). Here a job task (`JOB_TASKS`) goes straight to the loop, where this module
plays the tracer's part for it:

- accepted → ``accept_callback`` (the ``task-started`` event, the worker's active list);
- the message checked (`tasks.messages.parse_delivery`: the body decoded with the app's
  accepted content types, the headers and arguments read) — nothing in it can raise here;
- `tasks.jobs.run_message` awaited (a malformed message is dead-lettered there);
- its outcome (`tasks.outcomes`) reported through the request's callback, as the tracer reports
  a task's: `Finished` or `Dropped` → success (acknowledged: ``acks_late``); `Retry` or
  `ComeBack` → the message is published again with the same task id (``retries + 1``, or the
  same ``retries``), then this one acknowledged; cancelled at shutdown → ``Reject(requeue=True)``
  (the message goes back to the queue at once).

Any other task runs in a thread as in Celery's threads pool. At a cold or soft shutdown Celery
cancels running requests through ``terminate_job``: the jobs on the loop are cancelled and
their messages requeued.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from billiard.einfo import ExceptionInfo
from celery.concurrency.thread import ApplyResult, TaskPool
from celery.exceptions import Reject
from kombu.serialization import prepare_accept_content

from datus_queue.tasks.client import TASK_NAMES
from datus_queue.tasks.jobs import report, run_message
from datus_queue.tasks.messages import JobMessage, parse_delivery
from datus_queue.tasks.outcomes import ComeBack, Retry
from datus_queue.workers.runtime import runtime

__all__ = ["JOB_TASKS", "RuntimeThreadPool"]

logger = logging.getLogger("datus_queue.workers.pool")
JOB_TASKS = frozenset(TASK_NAMES.values())  # dq.generate, dq.tool_run


class RuntimeThreadPool(TaskPool):
    def on_start(self) -> None:  # the runtime itself is started by workers.signals at worker init
        super().on_start()
        self._accept = prepare_accept_content(self.app.conf.accept_content)

    def on_apply(self, target: Callable[..., Any], args: tuple[Any, ...] | None = None,
                 kwargs: dict[str, Any] | None = None, callback: Callable[..., Any] | None = None,
                 accept_callback: Callable[..., Any] | None = None, **options: Any) -> ApplyResult | None:
        if not args or len(args) < 6 or args[0] not in JOB_TASKS or callback is None:
            return super().on_apply(target, args, kwargs, callback, accept_callback, **options)
        task_name, task_id, request, body, content_type, content_encoding = args[:6]
        runtime.spawn(self._run(self.app.tasks[task_name], task_id, request, body, content_type, content_encoding,
                                callback, accept_callback))
        return None  # the job reports through the callbacks; nothing waits on a result

    def terminate_job(self, pid: Any, signal: Any = None) -> None:
        runtime.cancel_all()

    async def _run(self, task: Any, task_id: Any, request: dict[str, Any], body: Any, content_type: str | None,
                   content_encoding: str | None, callback: Callable[..., Any],
                   accept_callback: Callable[..., Any] | None) -> None:
        started = time.monotonic()
        try:
            if accept_callback is not None:
                accept_callback(os.getpid(), started)
            message = parse_delivery(task.name, task_id, request, body, content_type, content_encoding, self._accept)
            outcome = await run_message(message)
            if isinstance(outcome, (Retry, ComeBack)) and isinstance(message, JobMessage):
                # published from a thread: a broker that is slow or down must not hold the loop
                sent = await asyncio.to_thread(report, self.app, message, outcome)
                result: tuple[int, Any] = (1, _einfo(sent))
            else:  # Finished, Dropped: acknowledged
                result = (0, repr(outcome))
        except (asyncio.CancelledError, concurrent.futures.CancelledError):
            result = (1, _einfo(Reject("worker shutting down", requeue=True)))
        except Exception as exc:  # run_message sorts a job's errors; this is the last resort
            logger.error("job task %s[%s] failed", task.name, task_id, exc_info=exc)
            result = (1, _einfo(exc))
        try:
            callback((*result, time.monotonic() - started))
        except Exception as exc:  # noqa: BLE001 - e.g. the ack on a lost broker connection: it comes back
            logger.warning("job task %s[%s]: could not report its outcome (%s: %s)", task.name, task_id,
                           type(exc).__name__, exc)


def _einfo(exc: BaseException) -> ExceptionInfo:
    try:
        raise exc
    except BaseException:  # noqa: BLE001 - ExceptionInfo reads the exception being handled
        return ExceptionInfo()
