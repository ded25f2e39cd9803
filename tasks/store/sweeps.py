"""The sweeper's queries: open jobs that are overdue, and the conditional updates that claim
them for a re-send or a dead letter.

A job is overdue (`overdue`) when it is

- ``queued`` and was sent (created, re-sent, replayed) more than ``grace_s`` ago,
- ``retrying`` and its retry was due more than ``grace_s`` ago, or
- ``running`` and its lease has passed (its worker stopped renewing it) or was released.

``grace_s`` is ``DQ_RESEND_AFTER_S``: how long a message may be on its way (sent, not yet in a
queue list; popped, not yet recorded as a worker's) before its absence means it is lost. A
running job needs no grace: its lease (``DQ_LEASE_S``) is the time a worker has to show it is alive.

Whether it still has a message in Redis is for the sweeper to find out; this module only
claims. A claim is one ``UPDATE … WHERE job_id IN (…) AND <overdue> RETURNING``: the first
sweeper to run it moves the job out of the overdue set (``updated_at``/``retry_at`` = now), so a
second sweeper running at the same time claims nothing and sends nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, case, func, or_, select, update

from datus_queue.tasks.schemas import JobError, JobStatus
from datus_queue.tasks.store.rows import RESULT_COLUMNS, StoredJob, to_job
from datus_queue.tasks.store.schema import jobs

__all__ = ["Resend", "claim_resends", "dead_overdue", "overdue", "overdue_jobs"]

_QUEUED, _RETRYING, _RUNNING = JobStatus.QUEUED.value, JobStatus.RETRYING.value, JobStatus.RUNNING.value


@dataclass(frozen=True)
class Resend:
    """A job claimed for a re-send: what its message needs."""

    job_id: str
    status: JobStatus  # after the claim: a running job whose worker is gone is queued again
    run: int  # the stored run number (jobs.runs)
    resends: int
    provider: str
    request: dict[str, Any]

    @property
    def retries(self) -> int:
        """The message's ``retries`` (runs before the one it starts): a retrying job's next run,
        else the same run again."""
        return self.run if self.status is JobStatus.RETRYING else max(self.run - 1, 0)


def overdue(now: datetime, grace_s: float) -> ColumnElement[bool]:
    cutoff = now - timedelta(seconds=grace_s)
    return or_(
        and_(jobs.c.status == _QUEUED, jobs.c.updated_at < cutoff),
        and_(jobs.c.status == _RETRYING, func.coalesce(jobs.c.retry_at, jobs.c.updated_at) < cutoff),
        and_(jobs.c.status == _RUNNING, or_(jobs.c.lease_until.is_(None), jobs.c.lease_until < now)),
    )


def overdue_jobs(conn: Connection, now: datetime, grace_s: float, limit: int) -> list[StoredJob]:
    """The longest-waiting overdue jobs first, at most ``limit``."""
    rows = conn.execute(select(*RESULT_COLUMNS).where(overdue(now, grace_s))
                        .order_by(jobs.c.updated_at, jobs.c.job_id).limit(limit)).all()
    return [to_job(row) for row in rows]


def claim_resends(conn: Connection, job_ids: Sequence[str], now: datetime, grace_s: float) -> list[Resend]:
    """Claim the jobs among ``job_ids`` that are still overdue, counting one re-send each."""
    if not job_ids:
        return []
    rows = conn.execute(
        update(jobs).where(jobs.c.job_id.in_(list(job_ids)), overdue(now, grace_s)).values(
            resends=jobs.c.resends + 1, updated_at=now, lease_until=None,
            # the worker of a running job is gone: the job waits in the queue again
            status=case((jobs.c.status == _RUNNING, _QUEUED), else_=jobs.c.status),
            retry_at=case((jobs.c.status == _RETRYING, now), else_=None),
        ).returning(jobs.c.job_id, jobs.c.status, jobs.c.runs, jobs.c.resends, jobs.c.provider, jobs.c.request)
    ).all()
    return [Resend(row.job_id, JobStatus(row.status), row.runs, row.resends, row.provider, row.request)
            for row in rows]


def dead_overdue(conn: Connection, job_ids: Sequence[str], now: datetime, grace_s: float,
                 error: JobError) -> list[str]:
    """Move the jobs among ``job_ids`` that are still overdue to ``dead``; their ids."""
    if not job_ids:
        return []
    return list(conn.execute(
        update(jobs).where(jobs.c.job_id.in_(list(job_ids)), overdue(now, grace_s)).values(
            status=JobStatus.DEAD.value, error=error.model_dump(mode="json"), finished_at=now, updated_at=now,
            retry_at=None, lease_until=None,
        ).returning(jobs.c.job_id)).scalars())
