"""``dq.generate``: plain generation and JSON output jobs. Thin: the work is in tasks.jobs."""

from __future__ import annotations

from typing import Any

from datus_queue.tasks.app import app
from datus_queue.tasks.jobs import run_task
from datus_queue.tasks.outcomes import Outcome

__all__ = ["generate"]


# Strategy: how the worker's consumer takes the task's messages — Celery's own, guarded, so that
# no message of any shape stops a worker (tasks/messages.py)
@app.task(name="dq.generate", bind=True, acks_late=True, max_retries=None,
          Strategy="datus_queue.tasks.messages:job_strategy")
def generate(self: Any, *args: Any, **kwargs: Any) -> Outcome:
    """(job_id, payload): the job's id and a TaskPayload as JSON."""
    return run_task(self, args, kwargs)
