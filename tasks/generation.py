"""``dq.generate``: plain generation and JSON output jobs. Thin: the work is in tasks.jobs."""

from __future__ import annotations

from typing import Any

from datus_queue.tasks.app import app
from datus_queue.tasks.jobs import run_task

__all__ = ["generate"]


@app.task(name="dq.generate", bind=True, acks_late=True, max_retries=None)
def generate(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """(job_id, payload): the job's id and a TaskPayload as JSON."""
    return run_task(self, args, kwargs)
