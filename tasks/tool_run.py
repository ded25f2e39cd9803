"""``dq.tool_run``: tool runs against MCP servers. Thin: the work is in tasks.jobs."""

from __future__ import annotations

from typing import Any

from datus_queue.tasks.app import app
from datus_queue.tasks.jobs import run_task

__all__ = ["tool_run"]


@app.task(name="dq.tool_run", bind=True, acks_late=True, max_retries=None)
def tool_run(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """(job_id, payload): the job's id and a TaskPayload as JSON."""
    return run_task(self, args, kwargs)
