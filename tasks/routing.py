"""Provider -> queue. Queues come from one enum; Celery routes through ``task_routes``.

Job tasks go to their provider's queue; the maintenance tasks `dq beat` sends (sweep, prune,
scheduled batches) go to ``dq.maintenance``, which every worker consumes.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from datus.models.base import PROVIDERS

__all__ = ["MAINTENANCE_QUEUE", "MAINTENANCE_TASKS", "Queue", "queue_for", "route_task"]

Queue = Enum("Queue", {provider.upper(): f"llm.{provider}" for provider in PROVIDERS}, type=str)  # type: ignore[misc]
Queue.__doc__ = "One queue per provider: llm.openai, llm.claude, ..."
MAINTENANCE_QUEUE = "dq.maintenance"
# the maintenance tasks' names (a wire contract, like dq.generate): tasks/maintenance/tasks.py
MAINTENANCE_TASKS = frozenset({"dq.sweep", "dq.prune", "dq.run_schedule"})


def queue_for(provider: str) -> str:
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")
    return Queue[provider.upper()].value


def route_task(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any) -> dict[str, str] | None:
    """Celery router: a job's payload names its provider, which picks the queue."""
    if not name.startswith("dq."):
        return None
    if name in MAINTENANCE_TASKS:
        return {"queue": MAINTENANCE_QUEUE}
    payload = (kwargs or {}).get("payload") or (args[1] if args and len(args) > 1 else None)
    if isinstance(payload, dict) and isinstance(payload.get("provider"), str):
        try:
            return {"queue": queue_for(payload["provider"])}
        except ValueError:
            return None
    return None
