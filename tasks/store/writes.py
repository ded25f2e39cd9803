"""A job's status writes — start an attempt, schedule a retry, finish — applied set-wise.

`apply` takes writes in the order they were asked for and applies them on one connection
with one statement per run of writes of the same kind (a run ends where a job repeats, so a
later write always sees the earlier ones): ``UPDATE ... WHERE job_id IN (...) RETURNING`` to
start attempts, and for retries and results a locked ``SELECT`` of the rows still open followed
by one executemany ``UPDATE``. Measured here: about 0.04 ms of CPU per write against 0.3–0.8 ms
for a statement of its own (SQLite and Postgres, batches of 100).

Every write is conditional, as in the store's docstring: a final job never changes, a start
never goes back to an older attempt, and exactly one ``finish`` per job wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic_core import to_jsonable_python
from sqlalchemy import Connection, Integer, bindparam, case, func, select, update

from tasks.schemas import FINAL_STATUSES, JobError, JobStatus
from tasks.store.rows import FINAL, OPEN, RESULT_COLUMNS, StoredJob, now, to_job
from tasks.store.schema import jobs

__all__ = ["JobWrite", "apply", "finish", "retrying", "running"]

Kind = Literal["running", "retrying", "finish"]


@dataclass(frozen=True)
class JobWrite:
    kind: Kind
    job_id: str
    attempt: int | None = None  # running, retrying: the attempt; finish: None keeps the stored count
    values: dict[str, Any] = field(default_factory=dict)  # finish: result columns; retrying: the error
    countdown_s: float = 0.0  # retrying: the next attempt is due this much later


def running(job_id: str, attempt: int) -> JobWrite:
    """Start ``attempt`` (1-based): the `StoredJob`, or None when it must not run (unknown, final,
    or a stale message of an older attempt). A redelivery of the running attempt counts in
    ``deliveries``."""
    return JobWrite("running", job_id, attempt)


def retrying(job_id: str, attempt: int, error: JobError, countdown_s: float, *,
             rate_limit_retries: int | None = None, rate_limit_waits: int | None = None,
             rate_limited_since: datetime | None = None, rate_ticket: int | None = None) -> JobWrite:
    """Record a retryable failure of ``attempt``; True unless the job is already final. A
    retry that waits for a provider's limits also records how many such retries the job has
    had (they are not counted against its attempts), since when it is rate limited, and its
    ticket in the limiter's line (``attempt`` is the store's run number, waits included)."""
    values: dict[str, Any] = {"error": error.model_dump(mode="json"), "rate_ticket": rate_ticket}
    if rate_limit_retries is not None:
        values.update(rate_limit_retries=rate_limit_retries, rate_limit_waits=rate_limit_waits or 0,
                      rate_limited_since=rate_limited_since)
    return JobWrite("retrying", job_id, attempt, values, max(0.0, countdown_s))


def finish(job_id: str, status: JobStatus | str, *, output: Any = None, sql_contexts: Any = None, usage: Any = None,
           cost_usd: float = 0.0, error: JobError | None = None, attempts: int | None = None) -> JobWrite:
    """The job's one final result; True for the write that made it final."""
    status = JobStatus(status)
    if status not in FINAL_STATUSES:
        raise ValueError(f"finish takes a final status ({', '.join(sorted(FINAL))}), not {status.value!r}")
    return JobWrite("finish", job_id, attempts, {
        "status": status.value, "output": to_jsonable_python(output), "sql_contexts": to_jsonable_python(sql_contexts),
        "usage": to_jsonable_python(usage), "cost_usd": float(cost_usd),
        "error": None if error is None else error.model_dump(mode="json")})


def apply(conn: Connection, writes: Sequence[JobWrite]) -> list[Any]:
    """Apply ``writes`` in order on ``conn`` (inside the caller's transaction); one result each."""
    at = now()
    results: list[Any] = []
    for run in _runs(writes):
        results.extend(_start(conn, run, at) if run[0].kind == "running" else _update_open(conn, run, at))
    return results


def _runs(writes: Sequence[JobWrite]) -> list[list[JobWrite]]:
    runs: list[list[JobWrite]] = []
    seen: set[str] = set()
    for write in writes:
        if not runs or write.kind != runs[-1][0].kind or write.job_id in seen:
            runs.append([])
            seen = set()
        runs[-1].append(write)
        seen.add(write.job_id)
    return runs


# built once: SQLAlchemy then reuses their compiled form without recomputing cache keys
_ATTEMPT = bindparam("attempt", type_=Integer)
_AT = bindparam("at", type_=jobs.c.updated_at.type)
_START = (
    update(jobs)
    .where(jobs.c.job_id.in_(bindparam("ids", expanding=True)), jobs.c.status.in_(OPEN), jobs.c.attempts <= _ATTEMPT)
    .values(status=JobStatus.RUNNING.value, attempts=_ATTEMPT, retry_at=None, updated_at=_AT,
            started_at=func.coalesce(jobs.c.started_at, _AT),
            deliveries=case(((jobs.c.attempts == _ATTEMPT) & (jobs.c.status == JobStatus.RUNNING.value),
                             jobs.c.deliveries + 1), else_=1))
    .returning(*RESULT_COLUMNS)
)
_STILL_OPEN = (select(jobs.c.job_id)  # locked until commit (Postgres; SQLite holds the write lock)
               .where(jobs.c.job_id.in_(bindparam("ids", expanding=True)), jobs.c.status.in_(OPEN)).with_for_update())
_SET_BY_ID = update(jobs).where(jobs.c.job_id == bindparam("b_job_id"))  # SET: the parameters' columns


def _start(conn: Connection, run: list[JobWrite], at: datetime) -> list[StoredJob | None]:
    started: dict[str, StoredJob] = {}
    for attempt in sorted({w.attempt for w in run if w.attempt is not None}):
        ids = [w.job_id for w in run if w.attempt == attempt]
        rows = conn.execute(_START, {"ids": ids, "attempt": attempt, "at": at}).all()
        started.update((row.job_id, to_job(row)) for row in rows)
    return [started.get(w.job_id) for w in run]


def _update_open(conn: Connection, run: list[JobWrite], at: datetime) -> list[bool]:
    ids = [w.job_id for w in run]
    still_open = set(conn.execute(_STILL_OPEN, {"ids": ids}).scalars())
    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for write in run:
        if write.job_id not in still_open:
            continue
        row = {"b_job_id": write.job_id, **_values(write, at)}
        by_columns.setdefault(tuple(sorted(row)), []).append(row)
    for rows in by_columns.values():  # only rows locked open above: no status condition needed
        conn.execute(_SET_BY_ID, rows)
    return [w.job_id in still_open for w in run]


def _values(write: JobWrite, at: datetime) -> dict[str, Any]:
    if write.kind == "retrying":
        return {"status": JobStatus.RETRYING.value, "attempts": write.attempt, **write.values,
                "retry_at": at + timedelta(seconds=write.countdown_s), "updated_at": at}
    values = {**write.values, "retry_at": None, "finished_at": at, "updated_at": at}
    if write.attempt is not None:
        values["attempts"] = write.attempt
    return values
