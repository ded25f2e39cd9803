"""Pruning in bounded chunks: each chunk is its own short transaction of at most ``limit`` rows,
so the workers' writes never wait behind a long delete (SQLite's write lock, Postgres row locks)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, delete, select

from datus_queue.tasks.store.rows import FINAL
from datus_queue.tasks.store.schema import job_checkpoints, jobs, schedule_runs

__all__ = ["finished_jobs", "schedule_runs_before"]


def finished_jobs(conn: Connection, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` jobs that finished before ``before`` (oldest first), with their
    tool-run checkpoints; how many jobs."""
    ids = list(conn.execute(select(jobs.c.job_id).where(jobs.c.status.in_(FINAL), jobs.c.finished_at < before)
                            .order_by(jobs.c.finished_at).limit(limit)).scalars())
    if ids:
        conn.execute(delete(job_checkpoints).where(job_checkpoints.c.job_id.in_(ids)))
        conn.execute(delete(jobs).where(jobs.c.job_id.in_(ids)))
    return len(ids)


def schedule_runs_before(conn: Connection, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` records of scheduled runs that started before ``before``."""
    keys = conn.execute(select(schedule_runs.c.schedule, schedule_runs.c.slot)
                        .where(schedule_runs.c.started_at < before).order_by(schedule_runs.c.started_at)
                        .limit(limit)).all()
    for schedule, slot in keys:
        conn.execute(delete(schedule_runs).where(schedule_runs.c.schedule == schedule, schedule_runs.c.slot == slot))
    return len(keys)
