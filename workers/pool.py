"""Celery's threads pool, able to cancel its jobs.

At a cold or soft shutdown Celery cancels the running requests through ``terminate_job``,
which the plain threads pool does not implement, so a SIGTERMed worker used to wait for every
call in flight. Here it cancels the jobs on the runtime's event loop; their tasks answer with
``Reject(requeue=True)`` and the messages go straight back to the queue for another worker.
"""

from __future__ import annotations

from typing import Any

from celery.concurrency.thread import TaskPool

from workers.runtime import runtime

__all__ = ["RuntimeThreadPool"]


class RuntimeThreadPool(TaskPool):
    def terminate_job(self, pid: Any, signal: Any = None) -> None:
        runtime.cancel_all()
