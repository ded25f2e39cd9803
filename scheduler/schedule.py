"""Every periodic entry of `dq beat`, in one place.

    sweep             dq.sweep         every DQ_SWEEP_INTERVAL_S (30 s): overdue jobs sent again
    prune             dq.prune         every DQ_PRUNE_INTERVAL_S (1 h): old rows and stray keys
    batch:<name>      dq.run_schedule  each agent.yml schedule, on its cron expression (UTC)

All go to queue ``dq.maintenance``, which every worker consumes. The sweep and prune messages
expire after their interval: if no worker took one by then, the next one does its work.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from datus.models.config import AgentConfig
from datus_queue.tasks.maintenance.schedules import load_schedules
from datus_queue.tasks.routing import MAINTENANCE_QUEUE
from datus_queue.tasks.settings import Settings

__all__ = ["RUN_SCHEDULE", "beat_schedule"]

RUN_SCHEDULE = "dq.run_schedule"


def beat_schedule(settings: Settings, agent_config: AgentConfig) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {
        "sweep": {"task": "dq.sweep", "schedule": timedelta(seconds=settings.sweep_interval_s),
                  "options": {"queue": MAINTENANCE_QUEUE, "expires": settings.sweep_interval_s}},
        "prune": {"task": "dq.prune", "schedule": timedelta(seconds=settings.prune_interval_s),
                  "options": {"queue": MAINTENANCE_QUEUE, "expires": settings.prune_interval_s}},
    }
    for name, schedule in load_schedules(agent_config).items():
        entries[f"batch:{name}"] = {"task": RUN_SCHEDULE, "schedule": schedule.crontab(), "args": [name],
                                    "options": {"queue": MAINTENANCE_QUEUE}}
    return entries
