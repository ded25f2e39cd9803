"""Dead letters in the job store: what could not run, and why.

A record per id (``dead_id``): the job's id for a job delivered too often, re-sent too often,
or sent with a payload that is not a job's; ``m-<hex>`` for a message that was not a task
message at all (no id to go by). A record holds the reason, the queue when known and when it
happened — never a payload: what the job asked for is in its row, which holds no secret, and a
message that was not a job has nothing worth keeping that could not also be a secret.

A listing joins each record to its job row (kind, model, status) and adds the ``dead`` jobs
that have no record (one written before the record, or by an older release).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Connection, delete, exists, func, literal, select, union_all, update

from datus_queue.tasks.schemas import JobStatus
from datus_queue.tasks.store.rows import utc
from datus_queue.tasks.store.schema import dead_letters, jobs

__all__ = ["REPLAYABLE", "DeadLetter", "count", "get", "listing", "message_id", "purge", "record", "remove",
           "reset_for_replay"]

REPLAYABLE = (JobStatus.DEAD.value, JobStatus.FAILED.value)


class DeadLetter(BaseModel):
    dead_id: str
    job_id: str | None = None
    reason: str
    queue: str | None = None
    times: int = 1
    first_at: datetime
    at: datetime
    # from the job row, when there is one
    status: JobStatus | None = None
    kind: str | None = None
    model: str | None = None

    @property
    def replayable(self) -> bool:
        return self.status is not None and self.status.value in REPLAYABLE


def message_id() -> str:
    """The id of a record for a message that carried no job id."""
    return f"m-{uuid.uuid4().hex[:12]}"


def record(conn: Connection, insert: Callable[..., Any], dead_id: str, job_id: str | None, reason: str,
           queue: str | None, at: datetime) -> None:
    """Add a record, or count one more for an id already recorded (latest reason wins)."""
    statement = insert(dead_letters).values(dead_id=dead_id, job_id=job_id, reason=reason[:2000], queue=queue,
                                            times=1, first_at=at, at=at)
    conn.execute(statement.on_conflict_do_update(index_elements=[dead_letters.c.dead_id], set_={
        "reason": statement.excluded.reason, "queue": statement.excluded.queue, "at": statement.excluded.at,
        "times": dead_letters.c.times + 1}))


def _query(dead_id: str | None = None) -> Any:
    recorded = (select(dead_letters.c.dead_id, dead_letters.c.job_id, dead_letters.c.reason, dead_letters.c.queue,
                       dead_letters.c.times, dead_letters.c.first_at, dead_letters.c.at, jobs.c.status, jobs.c.kind,
                       jobs.c.model, jobs.c.error)
                .select_from(dead_letters.outerjoin(jobs, jobs.c.job_id == dead_letters.c.job_id)))
    unrecorded = (select(jobs.c.job_id.label("dead_id"), jobs.c.job_id, literal("").label("reason"),
                         literal(None).label("queue"), literal(1).label("times"), jobs.c.finished_at.label("first_at"),
                         jobs.c.finished_at.label("at"), jobs.c.status, jobs.c.kind, jobs.c.model, jobs.c.error)
                  .where(jobs.c.status == JobStatus.DEAD.value,
                         ~exists().where(dead_letters.c.dead_id == jobs.c.job_id)))
    if dead_id is not None:
        recorded = recorded.where(dead_letters.c.dead_id == dead_id)
        unrecorded = unrecorded.where(jobs.c.job_id == dead_id)
    return union_all(recorded, unrecorded).subquery()


def _letter(row: Any) -> DeadLetter:
    m = row._mapping
    reason = m["reason"] or ((m["error"] or {}).get("message") if isinstance(m["error"], dict) else None) or "dead"
    at = utc(m["at"]) or utc(m["first_at"])
    return DeadLetter(dead_id=m["dead_id"], job_id=m["job_id"], reason=reason, queue=m["queue"], times=m["times"],
                      first_at=utc(m["first_at"]) or at, at=at,
                      status=None if m["status"] is None else JobStatus(m["status"]), kind=m["kind"], model=m["model"])


def listing(conn: Connection, limit: int | None = None) -> list[DeadLetter]:
    """The newest first."""
    query = _query()
    statement = select(query).order_by(query.c.at.desc(), query.c.dead_id)
    if limit is not None:
        statement = statement.limit(limit)
    return [_letter(row) for row in conn.execute(statement)]


def count(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(dead_letters)).scalar_one())


def get(conn: Connection, dead_id: str) -> DeadLetter | None:
    row = conn.execute(select(_query(dead_id))).first()
    return None if row is None else _letter(row)


def remove(conn: Connection, dead_id: str) -> bool:
    return conn.execute(delete(dead_letters).where(dead_letters.c.dead_id == dead_id)).rowcount == 1


def purge(conn: Connection, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` records last seen before ``before``; how many."""
    ids = list(conn.execute(select(dead_letters.c.dead_id).where(dead_letters.c.at < before)
                            .order_by(dead_letters.c.at).limit(limit)).scalars())
    if ids:
        conn.execute(delete(dead_letters).where(dead_letters.c.dead_id.in_(ids)))
    return len(ids)


def reset_for_replay(conn: Connection, job_id: str, now: datetime) -> tuple[str, dict[str, Any]] | None:
    """Queue a dead or failed job again as new — no runs, deliveries, re-sends, rate-limit retries
    or waits, no result — counting the replay: ``(provider, request)``, or None if the job is not
    dead or failed."""
    row = conn.execute(update(jobs).where(jobs.c.job_id == job_id, jobs.c.status.in_(REPLAYABLE)).values(
        status=JobStatus.QUEUED.value, runs=0, deliveries=0, resends=0, output=None, sql_contexts=None,
        # attempts are runs - rate_limit_waits - caller_waits: the waits start afresh with the runs (and the wait budget)
        rate_limit_retries=0, rate_limit_waits=0, rate_limited_since=None, rate_ticket=None, caller_waits=0,
        usage=None, cost_usd=0.0, error=None, retry_at=None, lease_until=None, started_at=None, finished_at=None,
        updated_at=now, replays=jobs.c.replays + 1, replayed_at=now,
    ).returning(jobs.c.provider, jobs.c.request)).first()
    return None if row is None else (row.provider, row.request)
