"""The maintenance tasks on queue ``dq.maintenance`` (every `dq worker` consumes it; they run in the
worker's threads, off its event loop). Thin: the work is in the modules named after it. Each run
is counted in Redis (`tasks.maintenance.runs`).

`dq beat` sends ``dq.prune`` and ``dq.run_schedule``. The sweep needs no beat: every worker runs
it in turn (`tasks.maintenance.sweep_loop`); ``dq.sweep`` stays a task so that an operator (or a
`dq beat` of an older release) can still ask for one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from datus_queue.tasks.app import app
from datus_queue.tasks.context import get_context
from datus_queue.tasks.maintenance.runs import record_run

__all__ = ["prune_task", "run_schedule_task", "sweep_task"]


@app.task(name="dq.sweep", ignore_result=True)
def sweep_task() -> dict[str, Any]:
    """Send overdue jobs again (`tasks.maintenance.sweeper`), now."""
    from datus_queue.tasks.maintenance.sweeper import sweep

    ctx = get_context()
    return record_run(ctx.redis, "sweep", sweep(ctx.store, ctx.redis, app, ctx.settings).model_dump())


@app.task(name="dq.prune", ignore_result=True)
def prune_task() -> dict[str, Any]:
    """Delete what is older than its retention (`tasks.maintenance.prune`)."""
    from datus_queue.tasks.maintenance.prune import prune

    ctx = get_context()
    return record_run(ctx.redis, "prune", prune(ctx.store, ctx.redis, ctx.settings).model_dump())


@app.task(name="dq.run_schedule", ignore_result=True)
def run_schedule_task(name: str, slot: str | None = None) -> dict[str, Any]:
    """Run a scheduled batch for its slot, once (`tasks.maintenance.schedules`). A slot that is
    not due (a forged or stale message) is refused: a log line, and the refusal as the result."""
    from datus_queue.tasks.maintenance.schedules import SlotRefused, logger, run_schedule

    ctx = get_context()
    try:
        try:
            when = datetime.fromisoformat(slot) if slot else None
        except (ValueError, TypeError):
            raise SlotRefused(f"schedule {str(name)[:80]}: slot is not an ISO time") from None
        if when is not None and when.tzinfo is None:
            raise SlotRefused(f"schedule {str(name)[:80]}: slot has no timezone")
        run = run_schedule(ctx.store, ctx.settings, ctx.agent_config, name, when)
    except SlotRefused as exc:
        reason = str(exc)
        logger.error("dq.run_schedule refused, nothing run: %s", reason)
        return record_run(ctx.redis, "run_schedule", {"schedule": str(name)[:80], "slot": str(slot)[:40],
                                                      "refused": reason})
    return record_run(ctx.redis, "run_schedule", {"schedule": name, "slot": slot,
                                                  "run": None if run is None else run.model_dump(mode="json")})
