"""The worker's pool: job tasks run as coroutines on the process's event loop, no thread each.

Celery hands every message to its pool as ``apply_async(trace, args=(task name, id, request,
body, ...), callback=..., accept_callback=...)``; the threads pool runs Celery's tracer in a
thread, which for our tasks only waits while the event loop does the work. With hundreds of
jobs in flight those threads cost more than the jobs (12.8 ms of worker CPU per job, against
6.1 ms once the jobs ran on the loop, with group commit). Here a job task (`JOB_TASKS`) goes straight to the loop, where this module
plays the tracer's part for it:

- accepted → ``accept_callback`` (the ``task-started`` event, the worker's active list);
- the body decoded with the app's accepted content types (an unreadable one is dead-lettered);
- `tasks.jobs.run_message` awaited;
- its outcome reported through the request's callback, as the tracer reports it: success
  (acknowledged: ``acks_late``), ``RetryLater`` (the retry message is published with the same
  task id, then this one acknowledged), cancelled at shutdown (``Reject(requeue=True)``: the
  message goes back to the queue at once), or an error (acknowledged as failed).

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
from celery.app.task import Context
from celery.concurrency.thread import ApplyResult, TaskPool
from celery.exceptions import Reject, Retry
from kombu.serialization import loads, prepare_accept_content

from datus_queue.tasks.client import TASK_NAMES
from datus_queue.tasks.jobs import INFRA_HEADER, RetryLater, dead_letter_message, run_message, shown_arguments
from datus_queue.tasks.observability.traces import carried_headers
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

    async def _run(self, task: Any, task_id: str, request: dict[str, Any], body: Any, content_type: str | None,
                   content_encoding: str | None, callback: Callable[..., Any],
                   accept_callback: Callable[..., Any] | None) -> None:
        started = time.monotonic()
        if accept_callback is not None:
            accept_callback(os.getpid(), started)
        try:
            if content_type:
                raw = body if isinstance(body, (bytes, str)) else bytes(body)  # a buffer from the transport
                args, kwargs, embed = loads(raw, content_type, content_encoding, accept=self._accept)
            else:
                args, kwargs, embed = body
        except Exception as exc:  # noqa: BLE001 - recorded, acknowledged, the worker goes on
            await dead_letter_message(task_id, f"undecodable task body: {type(exc).__name__}: {exc}"[:500])
            callback((0, repr({"job_id": task_id, "status": "rejected"}), time.monotonic() - started))
            return
        request.update({"args": args, "kwargs": kwargs, "is_eager": False}, **(embed or {}))
        retries = int(request.get("retries") or 0)
        try:
            outcome = await run_message(args, kwargs, retries, int(request.get(INFRA_HEADER) or 0),
                                        trace_context=request)
            if isinstance(outcome, RetryLater):
                report: tuple[int, Any] = self._retry(task, request, args, kwargs, retries, outcome)
            else:
                report = (0, repr(outcome))
        except (asyncio.CancelledError, concurrent.futures.CancelledError):
            report = (1, _einfo(Reject("worker shutting down", requeue=True)))
        except Exception as exc:  # noqa: BLE001 - reported to Celery as the task's failure
            logger.error("job task %s[%s] failed: %s: %s", task.name, task_id, type(exc).__name__, exc)
            report = (1, _einfo(exc))
        callback((*report, time.monotonic() - started))

    @staticmethod
    def _retry(task: Any, request: dict[str, Any], args: Any, kwargs: Any, retries: int,
               outcome: RetryLater) -> tuple[int, ExceptionInfo]:
        """What ``Task.retry`` does: the same message again (same priority), one retry more,
        after the countdown, published before this delivery is acknowledged. If it cannot be
        published, this delivery goes back to the queue instead: the job is never dropped."""
        context = Context(request, args=args, kwargs=kwargs, called_directly=False)
        countdown = outcome.countdown
        try:
            # the retry keeps the message's trace context: its run stays in the submitter's trace
            headers = {**carried_headers(request), **outcome.headers()}
            task.signature_from_request(context, args, kwargs, countdown=countdown, retries=retries + 1,
                                        headers=headers, **shown_arguments(request)).apply_async()
        except Exception as exc:  # noqa: BLE001 - the broker failed: requeue this delivery
            logger.warning("could not publish the retry of %s[%s] (%s); requeueing it", task.name,
                           request.get("id"), exc)
            return 1, _einfo(Reject("retry not published", requeue=True))
        return 1, _einfo(Retry(f"retry in {countdown:.2f}s", when=countdown))


def _einfo(exc: BaseException) -> ExceptionInfo:
    try:
        raise exc
    except BaseException:  # noqa: BLE001 - ExceptionInfo reads the exception being handled
        return ExceptionInfo()
