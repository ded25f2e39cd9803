"""A job row as the store hands it back (`StoredJob`), and the status groups its queries use."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import Field
from sqlalchemy.engine import Row

from datus_queue.tasks.schemas import FINAL_STATUSES, JobError, JobResult, JobStatus
from datus_queue.tasks.store.schema import jobs

__all__ = ["FINAL", "OPEN", "RESULT_COLUMNS", "StoredJob", "now", "to_job", "utc"]

FINAL = [s.value for s in FINAL_STATUSES]
OPEN = [JobStatus.QUEUED.value, JobStatus.RETRYING.value, JobStatus.RUNNING.value]  # may still change
RESULT_COLUMNS = [c for c in jobs.c if c.name not in ("request", "idempotency_key")]  # the prompt can be large


class StoredJob(JobResult):
    """A `JobResult` plus the store's bookkeeping the worker needs. ``runs`` is the stored run
    number (every start from a message, limiter-only waits included); the inherited ``attempts``
    is the runs that sent a request: ``runs - rate_limit_waits - caller_waits``."""

    runs: int = 0  # the current run's number (jobs.runs); a message's retries + 1
    deliveries: int = 0  # how many times the current run was started (redeliveries + 1)
    retry_at: datetime | None = None
    updated_at: datetime | None = None
    lease_until: datetime | None = None  # running: the worker holding it renews this
    resends: int = 0  # how often the sweeper sent it again (its message was lost, or its worker died)
    replays: int = 0  # how often `dq dead replay` ran it again
    replayed_at: datetime | None = None
    rate_limit_retries: int = 0  # attempts retried after a rate-limit answer (not counted against max_retries)
    rate_limit_waits: int = 0  # runs that only waited for the limiter (not attempts: no request was made)
    rate_limited_since: datetime | None = None
    rate_ticket: int | None = None
    caller_waits: int = 0  # runs that only handed the job back to wait for the caller's own tools
    # the job's request as stored (JSON), read with the claim (`JobStore.mark_running`) and
    # nowhere else: never dumped, never shown
    request: dict[str, Any] | None = Field(default=None, exclude=True, repr=False)


def to_job(row: Row[Any]) -> StoredJob:
    m = row._mapping
    return StoredJob(
        job_id=m["job_id"], status=JobStatus(m["status"]), kind=m["kind"], model=m["model"], provider=m["provider"],
        output=m["output"], sql_contexts=m["sql_contexts"] or [], usage=m["usage"], cost_usd=m["cost_usd"] or 0.0,
        error=None if m["error"] is None else JobError.model_validate(m["error"]),
        runs=m["runs"], attempts=m["runs"] - (m["rate_limit_waits"] or 0) - (m["caller_waits"] or 0),  # runs include the waits
        batch_id=m["batch_id"], item_id=m["item_id"], deliveries=m["deliveries"],
        created_at=utc(m["created_at"]), started_at=utc(m["started_at"]), finished_at=utc(m["finished_at"]),
        retry_at=utc(m["retry_at"]), updated_at=utc(m["updated_at"]), lease_until=utc(m["lease_until"]),
        resends=m["resends"] or 0, replays=m["replays"] or 0, replayed_at=utc(m["replayed_at"]),
        rate_limit_retries=m["rate_limit_retries"] or 0, rate_limit_waits=m["rate_limit_waits"] or 0,
        rate_limited_since=utc(m["rate_limited_since"]),
        rate_ticket=m["rate_ticket"], caller_waits=m["caller_waits"] or 0, request=m.get("request"),
    )


def now() -> datetime:
    return datetime.now(UTC)


def utc(value: datetime | None) -> datetime | None:
    # SQLite hands back the naive UTC we stored; Postgres an aware time in the session's zone
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
