"""Every periodic entry of `dq beat`, in one place.

    prune             dq.prune         every DQ_PRUNE_INTERVAL_S (1 h): old rows and stray keys
    batch:<name>      dq.run_schedule  each agent.yml schedule, on its cron expression (UTC)

All go to queue ``dq.maintenance``, which every worker consumes. The prune message expires after
its interval: if no worker took one by then, the next one does its work.

The sweep is not here: every worker runs it in turn (`tasks.maintenance.sweep_loop`), so a dead
worker's jobs are sent again whether or not a beat runs.
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
        "prune": {"task": "dq.prune", "schedule": timedelta(seconds=settings.prune_interval_s),
                  "options": {"queue": MAINTENANCE_QUEUE, "expires": settings.prune_interval_s}},
    }
    for name, schedule in load_schedules(agent_config).items():
        entries[f"batch:{name}"] = {"task": RUN_SCHEDULE, "schedule": schedule.crontab(), "args": [name],
                                    "options": {"queue": MAINTENANCE_QUEUE}}
    return entries
