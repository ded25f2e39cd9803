"""The maintenance tasks `dq beat` sends to queue ``dq.maintenance`` (every `dq worker`
consumes it; they run in the worker's threads, off its event loop). Thin: the work is in the
modules named after it. Each run is counted in Redis (``dq:maintenance:<task>``: runs, last_at,
last), which is where an operator sees that the sweeper runs and what it did."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from datus_queue.tasks import keys
from datus_queue.tasks.app import app
from datus_queue.tasks.context import get_context

__all__ = ["prune_task", "run_schedule_task", "sweep_task"]

logger = logging.getLogger("datus_queue.tasks.maintenance")


@app.task(name="dq.sweep", ignore_result=True)
def sweep_task() -> dict[str, Any]:
    """Send overdue jobs again (`tasks.maintenance.sweeper`)."""
    from datus_queue.tasks.maintenance.sweeper import sweep

    ctx = get_context()
    report = sweep(ctx.store, ctx.redis, app, ctx.settings).model_dump()
    return _record("sweep", report)


@app.task(name="dq.prune", ignore_result=True)
def prune_task() -> dict[str, Any]:
    """Delete what is older than its retention (`tasks.maintenance.prune`)."""
    from datus_queue.tasks.maintenance.prune import prune

    ctx = get_context()
    return _record("prune", prune(ctx.store, ctx.redis, ctx.settings).model_dump())


@app.task(name="dq.run_schedule", ignore_result=True)
def run_schedule_task(name: str, slot: str | None = None) -> dict[str, Any]:
    """Run a scheduled batch for its slot, once (`tasks.maintenance.schedules`)."""
    from datus_queue.tasks.maintenance.schedules import run_schedule

    ctx = get_context()
    run = run_schedule(ctx.store, ctx.settings, ctx.agent_config, name,
                       datetime.fromisoformat(slot) if slot else None)
    return _record("run_schedule", {"schedule": name, "slot": slot,
                                    "run": None if run is None else run.model_dump(mode="json")})


def _record(task: str, report: dict[str, Any]) -> dict[str, Any]:
    try:
        with get_context().redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(keys.maintenance(task), "runs", 1)
            pipe.hset(keys.maintenance(task), mapping={"last_at": datetime.now(UTC).isoformat(),
                                                       "last": json.dumps(report, default=str)[:10_000]})
            pipe.execute()
    except Exception as exc:  # noqa: BLE001 - the run itself is done
        logger.warning("could not record the %s run: %s", task, exc)
    return report
