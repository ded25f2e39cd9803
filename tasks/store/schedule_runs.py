"""Scheduled batch runs: one row per (schedule, slot). Inserting it is the claim — ``ON CONFLICT
DO NOTHING``, so of two deliveries of one slot (two beats in a handover, a redelivered message)
exactly one runs the batch."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Connection, select, update

from datus_queue.tasks.store.rows import utc
from datus_queue.tasks.store.schema import schedule_runs

__all__ = ["ScheduleRun", "claim", "finish", "runs"]


class ScheduleRun(BaseModel):
    schedule: str
    slot: datetime
    batch_id: str | None = None
    status: str
    exit_code: int | None = None
    results: str | None = None
    log: str | None = None
    started_at: datetime
    finished_at: datetime | None = None


def claim(conn: Connection, insert: Callable[..., Any], run: ScheduleRun) -> bool:
    return conn.execute(insert(schedule_runs).values(**run.model_dump()).on_conflict_do_nothing()).rowcount == 1


def finish(conn: Connection, schedule: str, slot: datetime, status: str, exit_code: int | None,
           at: datetime) -> None:
    conn.execute(update(schedule_runs).where(schedule_runs.c.schedule == schedule, schedule_runs.c.slot == slot)
                 .values(status=status, exit_code=exit_code, finished_at=at))


def runs(conn: Connection, schedule: str | None = None) -> list[ScheduleRun]:
    """The newest first."""
    query = select(schedule_runs).order_by(schedule_runs.c.slot.desc())
    if schedule is not None:
        query = query.where(schedule_runs.c.schedule == schedule)
    return [ScheduleRun.model_validate({**row._mapping, "slot": utc(row.slot), "started_at": utc(row.started_at),
                                        "finished_at": utc(row.finished_at)}) for row in conn.execute(query)]
