"""A job's writes — start a run, renew or release its lease, schedule a retry, finish,
checkpoint a tool run's step — applied set-wise.

`apply` takes writes in the order they were asked for and applies them on one connection
with one statement per batch of writes of the same kind (a batch ends where a job repeats, so a
later write always sees the earlier ones): ``UPDATE ... WHERE job_id IN (...) RETURNING`` to
start runs and to renew leases, for retries and results a locked ``SELECT`` of the rows
still open followed by one executemany ``UPDATE``, and for checkpoints one executemany
``INSERT``. Measured here: about 0.04 ms of CPU per write against 0.3–0.8 ms for a statement of
its own (SQLite and Postgres, batches of 100).

Every write is conditional, as in the store's docstring: a final job never changes, a start
never goes back to an older run, and exactly one ``finish`` per job wins. A checkpoint is
an insert keyed on (job, position): a second one for the same place fails (IntegrityError).

Leases: a start sets ``lease_until`` and the worker renews it while the job runs (all of a
process's running jobs in one statement, `tasks.leases`). A second delivery of the run that
is running cannot start it while that lease holds — a duplicate message (one the sweeper sent
again, one restored after the visibility timeout) never makes a second model call next to the
first. Once the lease has passed, the worker holding it counts as gone and the delivery takes
the job over. A newer run (a retry the running delivery asked for) always may start.

``run`` is the store's run number (``jobs.runs``): each start of the job from a message is a run,
the limiter's and the caller's waits included (``attempts`` as read = runs - rate_limit_waits -
caller_waits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic_core import to_jsonable_python
from sqlalchemy import Connection, Integer, bindparam, case, func, insert, or_, select, update

from datus_queue.tasks.schemas import FINAL_STATUSES, JobError, JobStatus
from datus_queue.tasks.store.rows import FINAL, OPEN, RESULT_COLUMNS, StoredJob, now, to_job
from datus_queue.tasks.store.schema import job_checkpoints, jobs

__all__ = ["JobWrite", "apply", "checkpoint", "finish", "lease", "retrying", "running"]

Kind = Literal["running", "lease", "retrying", "finish", "checkpoint"]


@dataclass(frozen=True)
class JobWrite:
    kind: Kind
    job_id: str
    run: int | None = None  # running, retrying, checkpoint: the run number; finish: None keeps the stored one
    values: dict[str, Any] = field(default_factory=dict)  # finish: result columns; retrying: the error
    countdown_s: float = 0.0  # retrying: the next run is due this much later
    lease_s: float | None = None  # running, lease: the lease from now (lease: None releases it)


def running(job_id: str, run: int, lease_s: float) -> JobWrite:
    """Start ``run`` (1-based) under a lease of ``lease_s``: the `StoredJob`, or None when it
    must not run (unknown, final, a stale message of an older run, or the run is running
    under another delivery's lease). A redelivery of the run counts in ``deliveries``."""
    return JobWrite("running", job_id, run, lease_s=lease_s)


def lease(job_id: str, lease_s: float | None) -> JobWrite:
    """Renew a running job's lease to ``lease_s`` from now, or release it (None: the delivery gave
    the job back, so the next one may start it at once). True if the job is still running."""
    return JobWrite("lease", job_id, None, lease_s=lease_s)


def retrying(job_id: str, run: int, error: JobError, countdown_s: float, *,
             rate_limit_retries: int | None = None, rate_limit_waits: int | None = None,
             rate_limited_since: datetime | None = None, rate_ticket: int | None = None,
             caller_waits: int | None = None) -> JobWrite:
    """Record a retryable failure of run ``run``; True unless the job is already final. A
    retry that waits for a provider's limits also records how many such retries the job has
    had (they are not counted against its max_retries), the runs that only waited, since when
    it is rate limited, and its ticket in the limiter's line; a hand-back to wait for the
    caller's own tools counts in ``caller_waits`` (not attempts either)."""
    values: dict[str, Any] = {"error": error.model_dump(mode="json"), "rate_ticket": rate_ticket}
    if rate_limit_retries is not None:
        values.update(rate_limit_retries=rate_limit_retries, rate_limit_waits=rate_limit_waits or 0,
                      rate_limited_since=rate_limited_since)
    if caller_waits is not None:  # a hand-back to wait for the caller's own tools
        values["caller_waits"] = caller_waits
    return JobWrite("retrying", job_id, run, values, max(0.0, countdown_s))


def finish(job_id: str, status: JobStatus | str, *, output: Any = None, sql_contexts: Any = None, usage: Any = None,
           cost_usd: float = 0.0, error: JobError | None = None, run: int | None = None) -> JobWrite:
    """The job's one final result, written by run ``run`` (None keeps the stored run number);
    True for the write that made it final."""
    status = JobStatus(status)
    if status not in FINAL_STATUSES:
        raise ValueError(f"finish takes a final status ({', '.join(sorted(FINAL))}), not {status.value!r}")
    return JobWrite("finish", job_id, run, {
        "status": status.value, "output": to_jsonable_python(output), "sql_contexts": to_jsonable_python(sql_contexts),
        "usage": to_jsonable_python(usage), "cost_usd": float(cost_usd),
        "error": None if error is None else error.model_dump(mode="json")})


def checkpoint(job_id: str, run: int, position: int, kind: str, step: dict[str, Any]) -> JobWrite:
    """Record step ``position`` (0-based) of a tool run, written by run ``run``; True once stored."""
    return JobWrite("checkpoint", job_id, run, {"position": position, "kind": kind, "step": step})


def apply(conn: Connection, writes: Sequence[JobWrite]) -> list[Any]:
    """Apply ``writes`` in order on ``conn`` (inside the caller's transaction); one result each."""
    at = now()
    results: list[Any] = []
    for batch in _batches(writes):
        kind = batch[0].kind
        if kind == "running":
            results.extend(_start(conn, batch, at))
        elif kind == "lease":
            results.extend(_lease(conn, batch, at))
        elif kind == "checkpoint":
            results.extend(_insert_checkpoints(conn, batch, at))
        else:
            results.extend(_update_open(conn, batch, at))
    return results


def _batches(writes: Sequence[JobWrite]) -> list[list[JobWrite]]:
    batches: list[list[JobWrite]] = []
    seen: set[str] = set()
    for write in writes:
        if not batches or write.kind != batches[-1][0].kind or write.job_id in seen:
            batches.append([])
            seen = set()
        batches[-1].append(write)
        seen.add(write.job_id)
    return batches


# built once: SQLAlchemy then reuses their compiled form without recomputing cache keys
_RUN = bindparam("run", type_=Integer)
_AT = bindparam("at", type_=jobs.c.updated_at.type)
_UNTIL = bindparam("until", type_=jobs.c.lease_until.type)
_IDS = bindparam("ids", expanding=True)
_START = (
    update(jobs)
    .where(jobs.c.job_id.in_(_IDS), jobs.c.status.in_(OPEN), jobs.c.runs <= _RUN,
           # not while another delivery of this run holds a live lease (NULL: none, or released)
           or_(jobs.c.status != JobStatus.RUNNING.value, jobs.c.runs != _RUN, jobs.c.lease_until.is_(None),
               jobs.c.lease_until <= _AT))
    .values(status=JobStatus.RUNNING.value, runs=_RUN, retry_at=None, updated_at=_AT, lease_until=_UNTIL,
            started_at=func.coalesce(jobs.c.started_at, _AT),
            # the same run again (a redelivery, or a re-send after its worker died) counts
            deliveries=case((jobs.c.runs == _RUN, jobs.c.deliveries + 1), else_=1))
    .returning(*RESULT_COLUMNS, jobs.c.request)  # the worker's request: its message carries none
)
_LEASE = (update(jobs).where(jobs.c.job_id.in_(_IDS), jobs.c.status == JobStatus.RUNNING.value)
          .values(lease_until=_UNTIL).returning(jobs.c.job_id))
_STILL_OPEN = (select(jobs.c.job_id)  # locked until commit (Postgres; SQLite holds the write lock)
               .where(jobs.c.job_id.in_(_IDS), jobs.c.status.in_(OPEN)).with_for_update())
_SET_BY_ID = update(jobs).where(jobs.c.job_id == bindparam("b_job_id"))  # SET: the parameters' columns


def _start(conn: Connection, batch: list[JobWrite], at: datetime) -> list[StoredJob | None]:
    started: dict[str, StoredJob] = {}
    for number, lease_s in sorted({(w.run, w.lease_s or 0.0) for w in batch if w.run is not None}):
        ids = [w.job_id for w in batch if (w.run, w.lease_s or 0.0) == (number, lease_s)]
        rows = conn.execute(_START, {"ids": ids, "run": number, "at": at,
                                     "until": at + timedelta(seconds=lease_s)}).all()
        started.update((row.job_id, to_job(row)) for row in rows)
    return [started.get(w.job_id) for w in batch]


_INSERT_CHECKPOINT = insert(job_checkpoints)


def _insert_checkpoints(conn: Connection, batch: list[JobWrite], at: datetime) -> list[bool]:
    conn.execute(_INSERT_CHECKPOINT, [{"job_id": w.job_id, "run": w.run, "created_at": at, **w.values}
                                      for w in batch])
    return [True] * len(batch)


def _lease(conn: Connection, batch: list[JobWrite], at: datetime) -> list[bool]:
    held: set[str] = set()
    for lease_s in {w.lease_s for w in batch}:
        ids = [w.job_id for w in batch if w.lease_s == lease_s]
        until = None if lease_s is None else at + timedelta(seconds=lease_s)
        held.update(conn.execute(_LEASE, {"ids": ids, "until": until}).scalars())
    return [w.job_id in held for w in batch]


def _update_open(conn: Connection, batch: list[JobWrite], at: datetime) -> list[bool]:
    ids = [w.job_id for w in batch]
    still_open = set(conn.execute(_STILL_OPEN, {"ids": ids}).scalars())
    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for write in batch:
        if write.job_id not in still_open:
            continue
        row = {"b_job_id": write.job_id, **_values(write, at)}
        by_columns.setdefault(tuple(sorted(row)), []).append(row)
    for rows in by_columns.values():  # only rows locked open above: no status condition needed
        conn.execute(_SET_BY_ID, rows)
    return [w.job_id in still_open for w in batch]


def _values(write: JobWrite, at: datetime) -> dict[str, Any]:
    if write.kind == "retrying":
        return {"status": JobStatus.RETRYING.value, "runs": write.run, **write.values,
                "retry_at": at + timedelta(seconds=write.countdown_s), "updated_at": at, "lease_until": None}
    values = {**write.values, "retry_at": None, "finished_at": at, "updated_at": at, "lease_until": None}
    if write.run is not None:
        values["runs"] = write.run
    return values
