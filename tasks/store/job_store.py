"""The job store: jobs, batches and batch items in one SQLAlchemy database (SQLite or Postgres).

Every status change is one conditional ``UPDATE ... WHERE status IN (...)``: there is no
read-modify-write, so concurrent workers, redeliveries and cancels cannot overwrite each other,
a final job never leaves its final status, and ``finish`` succeeds exactly once per job.

Job statuses (``finish`` moves any status that is not final to a final one)::

    queued ──mark_running──> running ──finish──> succeeded | failed | dead | cancelled
       │                      │   ^
       │            mark_retrying  mark_running (next run, or a redelivery)
       │                      v   │
       └──cancel──> cancelled <──cancel── retrying   (running: the worker finishes it cancelled)

    the sweeper: an overdue job is sent again (a running one whose worker is gone is queued
    again), or moved to dead once re-sent too often; `dq dead replay` queues a dead or failed
    job again as new.

Nothing here accepts an API key: a job row holds the `JobRequest` as JSON, and a request can
carry no secret by construction. Timestamps are timezone-aware UTC.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from enum import Enum
from itertools import islice
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python
from sqlalchemy import Connection, Engine, bindparam, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Row
from sqlalchemy.exc import DBAPIError

from datus_queue.tasks.schemas import FINAL_STATUSES, JobError, JobRequest, JobStatus
from datus_queue.tasks.settings import get_settings
from datus_queue.tasks.store import dead_letters as dead_store
from datus_queue.tasks.store import prune as prune_store
from datus_queue.tasks.store import schedule_runs as run_store
from datus_queue.tasks.store import sweeps
from datus_queue.tasks.store import writes as job_writes
from datus_queue.tasks.store.dead_letters import DeadLetter
from datus_queue.tasks.store.group_commit import GroupCommit
from datus_queue.tasks.store.rows import FINAL as _FINAL
from datus_queue.tasks.store.rows import OPEN as _OPEN
from datus_queue.tasks.store.rows import RESULT_COLUMNS as _RESULT_COLUMNS
from datus_queue.tasks.store.rows import StoredJob
from datus_queue.tasks.store.rows import now as _now
from datus_queue.tasks.store.rows import to_job as _job
from datus_queue.tasks.store.rows import utc as _utc
from datus_queue.tasks.store.schedule_runs import ScheduleRun
from datus_queue.tasks.store.schema import (
    WRITE_OPTION,
    StoreError,
    batch_items,
    batches,
    create_store_engine,
    job_checkpoints,
    jobs,
    migrate,
)
from datus_queue.tasks.store.sweeps import Resend

logger = logging.getLogger("datus_queue.tasks.store")

__all__ = ["BatchInfo", "BatchItem", "BatchStatus", "BatchSummary", "DeadLetter", "JobStore", "Resend",
           "ScheduleRun", "StoreError", "StoredJob"]

_CHUNK = 1000


class BatchStatus(str, Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    INTERRUPTED = "interrupted"  # Ctrl-C: stopped submitting, what finished is recorded
    BUDGET_EXCEEDED = "budget_exceeded"
    FAILED = "failed"


class BatchInfo(BaseModel):
    batch_id: str
    name: str | None = None
    model: str
    prompt_hash: str
    mode: str
    status: BatchStatus
    total: int = 0
    created_at: datetime
    finished_at: datetime | None = None
    metadata: dict[str, Any] = {}


class BatchItem(BaseModel):
    batch_id: str
    item_id: str
    question: str
    status: JobStatus = JobStatus.QUEUED
    job_id: str | None = None
    result: Any = None
    cost_usd: float = 0.0

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES


class BatchSummary(BaseModel):
    batch_id: str
    total: int
    counts: dict[str, int]  # every JobStatus value, zeros included
    done: int  # items in a final status
    cost_usd: float


class JobStore:
    """Jobs, batches and items in the database at ``url`` (default ``DQ_DATABASE_URL``).

    Thread-safe and fork-safe; migrations run on first use (or call `migrate`).
    """

    def __init__(self, url: str | None = None, *, busy_timeout_s: float = 30.0) -> None:
        self._engine: Engine = create_store_engine(url or get_settings().database_url, busy_timeout_s)
        backend = self._engine.dialect.name
        self._insert = postgresql.insert if backend == "postgresql" else sqlite.insert
        self._insert_job = self._insert(jobs).on_conflict_do_nothing()  # built once; values per call
        self._submit_items = update(batch_items).where(  # SET: the parameters' columns
            batch_items.c.batch_id == bindparam("b_batch_id"), batch_items.c.item_id == bindparam("b_item_id"),
            or_(*(batch_items.c.status == status for status in _OPEN)))  # not IN: executemany takes no lists
        self._writer = self._engine.execution_options(**{WRITE_OPTION: True})
        self._lock = threading.Lock()
        self._version: int | None = None
        self._pid = os.getpid()
        self._group = GroupCommit(self._write)  # the async status writes (worker), off the event loop

    @property
    def url(self) -> str:
        return self._engine.url.render_as_string(hide_password=True)

    def migrate(self) -> int:
        """Bring the schema up to date (idempotent, safe across processes); its version."""
        self._fork_check()
        with self._lock:
            if self._version is None:
                try:
                    self._version = migrate(self._engine)
                except DBAPIError as exc:
                    raise StoreError(f"cannot open the job store {self.url}: {exc.orig}") from exc
            return self._version

    def close(self) -> None:
        self._group.close()  # the writes already handed to the writer thread commit first
        self._engine.dispose()

    # -- jobs --------------------------------------------------------------------------

    def create_job(self, job_id: str, request: JobRequest, provider: str) -> tuple[str, bool]:
        """Insert a queued job; ``(job_id, created)``. When the request's idempotency key (or
        the job id) is already stored, nothing is written and the existing job's id comes back
        with ``created=False`` — also when two processes race with the same key."""
        if not isinstance(request, JobRequest):
            request = JobRequest.model_validate(request)
        row = _job_row(job_id, request, provider, _now())
        with self._begin(write=True) as conn:
            # ON CONFLICT DO NOTHING: a concurrent insert with the same key waits for the first
            # to commit, then inserts nothing (no exception, no aborted transaction)
            if conn.execute(self._insert_job, row).rowcount == 1:
                return job_id, True
            if request.idempotency_key is not None:
                existing = conn.execute(
                    select(jobs.c.job_id).where(jobs.c.idempotency_key == request.idempotency_key)).scalar()
                if existing is not None:
                    return existing, False
            return job_id, False  # the job id itself was taken: the same submission again

    def create_jobs(self, new: list[tuple[str, JobRequest, str]]) -> list[tuple[str, bool]]:
        """`create_job` for many ``(job_id, request, provider)`` in one transaction (fresh job
        ids): ``(job_id, created)`` each, in order. An idempotency key already stored — or
        repeated within ``new`` — gives the first job's id with ``created=False``."""
        now = _now()
        rows = [_job_row(job_id, request, provider, now) for job_id, request, provider in new]
        with self._begin(write=True) as conn:
            for start in range(0, len(rows), _CHUNK):
                conn.execute(self._insert_job, rows[start:start + _CHUNK])
            keys = list({row["idempotency_key"] for row in rows if row["idempotency_key"] is not None})
            owner: dict[str, str] = {}
            for start in range(0, len(keys), _CHUNK):
                owner.update((key, job_id) for key, job_id in conn.execute(select(
                    jobs.c.idempotency_key, jobs.c.job_id).where(jobs.c.idempotency_key.in_(keys[start:start + _CHUNK]))))
        out = []
        for row in rows:
            key = row["idempotency_key"]
            job_id = row["job_id"] if key is None else owner[key]
            out.append((job_id, job_id == row["job_id"]))
        return out

    def get(self, job_id: str) -> StoredJob | None:
        with self._begin() as conn:
            row = conn.execute(select(*_RESULT_COLUMNS).where(jobs.c.job_id == job_id)).first()
        return None if row is None else _job(row)

    def final_jobs(self, job_ids: Collection[str]) -> list[StoredJob]:
        """The jobs among ``job_ids`` that are final: what a batch client polls for (its jobs
        in flight, a few hundred at most, so one IN query)."""
        if not job_ids:
            return []
        with self._begin() as conn:
            rows = conn.execute(select(*_RESULT_COLUMNS).where(
                jobs.c.job_id.in_(list(job_ids)), jobs.c.status.in_(_FINAL))).all()
        return [_job(row) for row in rows]

    def get_request(self, job_id: str) -> JobRequest | None:
        with self._begin() as conn:
            stored = conn.execute(select(jobs.c.request).where(jobs.c.job_id == job_id)).scalar()
        return None if stored is None else JobRequest.model_validate(stored)

    def mark_running(self, job_id: str, run: int, lease_s: float | None = None) -> StoredJob | None:
        """Start run ``run`` (1-based) of the job under a lease of ``lease_s`` (default
        ``DQ_LEASE_S``): the job, or None when it must not run — it is unknown, final
        (cancelled included), this is a stale message of an older run, or the run is
        running under a lease that has not passed. A redelivery of the run once its lease
        has passed is allowed and counted in ``deliveries``."""
        return self._write([job_writes.running(job_id, run, _lease(lease_s))])[0]

    def mark_retrying(self, job_id: str, run: int, error: JobError, countdown_s: float) -> bool:
        """Record a retryable failure of run ``run``: the next one is due in ``countdown_s``.
        False when the job is already final (e.g. cancelled meanwhile): do not retry it."""
        return self._write([job_writes.retrying(job_id, run, error, countdown_s)])[0]

    def finish(self, job_id: str, status: JobStatus | str, *, output: Any = None, sql_contexts: Any = None,
               usage: Any = None, cost_usd: float = 0.0, error: JobError | None = None,
               run: int | None = None) -> bool:
        """Write the job's one final result, by run ``run``; True if this call did, False if the
        job was already final (another delivery won, or it was cancelled). ``run=None`` keeps
        the stored run number."""
        return self._write([job_writes.finish(job_id, status, output=output, sql_contexts=sql_contexts, usage=usage,
                                              cost_usd=cost_usd, error=error, run=run)])[0]

    def cancel(self, job_id: str) -> JobStatus | None:
        """Cancel a job. Queued or retrying: cancelled at once (it never runs again). Running:
        left as is and ``running`` returned, so the caller signals the worker, which finishes
        it as cancelled at its next step. Final: its status, unchanged. None if unknown."""
        now = _now()
        waiting = [JobStatus.QUEUED.value, JobStatus.RETRYING.value]
        with self._begin(write=True) as conn:
            if conn.execute(update(jobs).where(jobs.c.job_id == job_id, jobs.c.status.in_(waiting)).values(
                    status=JobStatus.CANCELLED.value, retry_at=None, finished_at=now, updated_at=now)).rowcount:
                return JobStatus.CANCELLED
            status = conn.execute(select(jobs.c.status).where(jobs.c.job_id == job_id)).scalar()
        return None if status is None else JobStatus(status)

    def count_by_status(self, batch_id: str | None = None) -> dict[str, int]:
        """Jobs per status (every status, zeros included), of one batch or of all jobs."""
        query = select(jobs.c.status, func.count()).group_by(jobs.c.status)
        if batch_id is not None:
            query = query.where(jobs.c.batch_id == batch_id)
        with self._begin() as conn:
            found: dict[str, int] = dict(conn.execute(query).all())
        return {s.value: found.get(s.value, 0) for s in JobStatus}

    def list_jobs(self, status: JobStatus | str | None = None, batch_id: str | None = None,
                  limit: int = 100) -> list[StoredJob]:
        """The newest jobs first, at most ``limit``."""
        query = select(*_RESULT_COLUMNS).order_by(jobs.c.created_at.desc(), jobs.c.job_id).limit(limit)
        if status is not None:
            query = query.where(jobs.c.status == JobStatus(status).value)
        if batch_id is not None:
            query = query.where(jobs.c.batch_id == batch_id)
        with self._begin() as conn:
            return [_job(row) for row in conn.execute(query)]

    # thin async twins for the worker's event loop: the blocking calls run in a thread
    async def aget(self, job_id: str) -> StoredJob | None:
        return await asyncio.to_thread(self.get, job_id)

    async def aget_request(self, job_id: str) -> JobRequest | None:
        return await asyncio.to_thread(self.get_request, job_id)

    # a worker's status writes, made by the store's writer thread (`tasks.store.group_commit`): those
    # handed over while it is busy share its next transaction, so the loop never waits for the database
    async def amark_running(self, job_id: str, run: int, lease_s: float | None = None) -> StoredJob | None:
        return await self._group.submit(job_writes.running(job_id, run, _lease(lease_s)))

    async def arenew(self, job_id: str, lease_s: float | None = None) -> bool:
        """Renew a running job's lease (the jobs renewed in one loop turn share one statement)."""
        return await self._group.submit(job_writes.lease(job_id, _lease(lease_s)))

    async def arelease(self, job_id: str) -> bool:
        """Give up a running job's lease: its next delivery may start it at once."""
        return await self._group.submit(job_writes.lease(job_id, None))

    async def amark_retrying(self, job_id: str, run: int, error: JobError, countdown_s: float,
                             **rate_limit: Any) -> bool:
        """`mark_retrying`; ``rate_limit``: see `tasks.store.writes.retrying`."""
        return await self._group.submit(job_writes.retrying(job_id, run, error, countdown_s, **rate_limit))

    async def afinish(self, job_id: str, status: JobStatus | str, **result: Any) -> bool:
        return await self._group.submit(job_writes.finish(job_id, status, **result))

    async def acancel(self, job_id: str) -> JobStatus | None:
        return await asyncio.to_thread(self.cancel, job_id)

    # -- tool-run checkpoints ----------------------------------------------------------

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        """The job's recorded tool-run steps (`RunStep` JSON), in order."""
        with self._begin() as conn:
            return list(conn.execute(select(job_checkpoints.c.step).where(job_checkpoints.c.job_id == job_id)
                                     .order_by(job_checkpoints.c.position)).scalars())

    async def acheckpoints(self, job_id: str) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.checkpoints, job_id)

    async def acheckpoint(self, job_id: str, run: int, position: int, kind: str, step: dict[str, Any]) -> bool:
        """Record step ``position`` of the job's tool run, written by run ``run`` (with the loop's
        other writes); raises IntegrityError when that place is taken (another delivery recorded it)."""
        return await self._group.submit(job_writes.checkpoint(job_id, run, position, kind, step))

    # -- the sweeper, dead letters, pruning, scheduled runs ------------------------------

    def overdue_jobs(self, lease_s: float, limit: int = _CHUNK) -> list[StoredJob]:
        """Open jobs overdue by ``lease_s`` (`tasks.store.sweeps`), the longest-waiting first."""
        with self._begin() as conn:
            return sweeps.overdue_jobs(conn, _now(), lease_s, limit)

    def claim_resends(self, job_ids: Collection[str], lease_s: float) -> list[Resend]:
        """Claim the jobs among ``job_ids`` still overdue for a re-send (each counted once)."""
        with self._begin(write=True) as conn:
            return sweeps.claim_resends(conn, list(job_ids), _now(), lease_s)

    def dead_overdue(self, job_ids: Collection[str], lease_s: float, error: JobError) -> list[str]:
        """Move the jobs among ``job_ids`` still overdue to ``dead``; their ids."""
        with self._begin(write=True) as conn:
            return sweeps.dead_overdue(conn, list(job_ids), _now(), lease_s, error)

    def record_dead_letter(self, dead_id: str, reason: str, *, job_id: str | None = None,
                           queue: str | None = None) -> None:
        with self._begin(write=True) as conn:
            dead_store.record(conn, self._insert, dead_id, job_id, reason, queue, _now())

    def dead_letters(self, limit: int | None = None) -> list[DeadLetter]:
        """Every dead letter, the newest first (`tasks.store.dead_letters`)."""
        with self._begin() as conn:
            return dead_store.listing(conn, limit)

    def count_dead_letters(self) -> int:
        with self._begin() as conn:
            return dead_store.count(conn)

    def dead_letter(self, dead_id: str) -> DeadLetter | None:
        with self._begin() as conn:
            return dead_store.get(conn, dead_id)

    def remove_dead_letter(self, dead_id: str) -> bool:
        with self._begin(write=True) as conn:
            return dead_store.remove(conn, dead_id)

    def purge_dead_letters(self, before: datetime, chunk: int = _CHUNK) -> int:
        """Delete the records last seen before ``before``, ``chunk`` per transaction; how many."""
        return self._in_chunks(lambda conn: dead_store.purge(conn, before, chunk), chunk)

    def reset_for_replay(self, job_id: str) -> tuple[str, JobRequest] | None:
        """Queue a dead or failed job again as new, counting the replay: ``(provider, request)``,
        or None when it is not dead or failed."""
        with self._begin(write=True) as conn:
            reset = dead_store.reset_for_replay(conn, job_id, _now())
        return None if reset is None else (reset[0], JobRequest.model_validate(reset[1]))

    def prune_jobs(self, before: datetime, chunk: int = _CHUNK) -> int:
        """Delete the jobs that finished before ``before``, ``chunk`` per transaction; how many."""
        return self._in_chunks(lambda conn: prune_store.finished_jobs(conn, before, chunk), chunk)

    def prune_schedule_runs(self, before: datetime, chunk: int = _CHUNK) -> int:
        return self._in_chunks(lambda conn: prune_store.schedule_runs_before(conn, before, chunk), chunk)

    def claim_schedule_run(self, run: ScheduleRun) -> bool:
        """Record the run of a schedule's slot; False if that slot has a run already."""
        with self._begin(write=True) as conn:
            return run_store.claim(conn, self._insert, run)

    def finish_schedule_run(self, schedule: str, slot: datetime, status: str, exit_code: int | None) -> None:
        with self._begin(write=True) as conn:
            run_store.finish(conn, schedule, slot, status, exit_code, _now())

    def schedule_runs(self, schedule: str | None = None) -> list[ScheduleRun]:
        with self._begin() as conn:
            return run_store.runs(conn, schedule)

    def _in_chunks(self, step: Any, chunk: int) -> int:
        total = 0
        while True:
            with self._begin(write=True) as conn:  # one short transaction per chunk
                done = step(conn)
            total += done
            if done < chunk:
                return total

    # -- batches -----------------------------------------------------------------------

    def create_batch(self, batch_id: str, *, model: str, prompt_hash: str, mode: str, name: str | None = None,
                     metadata: Mapping[str, Any] | None = None) -> tuple[BatchInfo, bool]:
        """Create a running batch; ``(batch, created)``. An existing batch comes back unchanged
        (compare its model and prompt_hash before resuming it)."""
        with self._begin(write=True) as conn:
            created = conn.execute(self._insert(batches).values(
                batch_id=batch_id, name=name, model=model, prompt_hash=prompt_hash, mode=mode,
                status=BatchStatus.RUNNING.value, total=0, created_at=_now(),
                metadata=to_jsonable_python(dict(metadata or {}))).on_conflict_do_nothing()).rowcount == 1
            row = conn.execute(select(batches).where(batches.c.batch_id == batch_id)).one()
        return _batch(row), created

    def get_batch(self, batch_id: str) -> BatchInfo | None:
        with self._begin() as conn:
            row = conn.execute(select(batches).where(batches.c.batch_id == batch_id)).first()
        return None if row is None else _batch(row)

    def finish_batch(self, batch_id: str, status: BatchStatus | str = BatchStatus.COMPLETED) -> bool:
        """Close a running batch with ``status``; False if it was not running."""
        status = BatchStatus(status)
        if status is BatchStatus.RUNNING:
            raise ValueError("finish_batch takes a final batch status; use resume_batch to reopen")
        with self._begin(write=True) as conn:
            return conn.execute(update(batches).where(
                batches.c.batch_id == batch_id, batches.c.status == BatchStatus.RUNNING.value,
            ).values(status=status.value, finished_at=_now())).rowcount == 1

    def resume_batch(self, batch_id: str) -> bool:
        """Reopen a finished batch (``dq batch --resume``); False if unknown or running."""
        with self._begin(write=True) as conn:
            return conn.execute(update(batches).where(
                batches.c.batch_id == batch_id, batches.c.status != BatchStatus.RUNNING.value,
            ).values(status=BatchStatus.RUNNING.value, finished_at=None)).rowcount == 1

    def add_batch_items(self, batch_id: str, items: Iterable[Mapping[str, Any] | BatchItem]) -> int:
        """Add items (mappings or `BatchItem` with ``item_id``, ``question``, optionally
        ``job_id``), consumed in chunks; an ``item_id`` already in the batch is skipped, so
        re-adding a whole input file on resume is harmless. Returns how many were new."""
        added = 0
        rows = ({"batch_id": batch_id, "item_id": str(item["item_id"]), "question": str(item["question"]),
                 "job_id": item.get("job_id"), "status": JobStatus.QUEUED.value, "cost_usd": 0.0}
                for item in (i.model_dump() if isinstance(i, BaseModel) else i for i in items))
        while chunk := list(islice(rows, _CHUNK)):
            # one short transaction per chunk, so workers' writes are not held up behind a long load
            with self._begin(write=True) as conn:
                before = self._lock_batch(conn, batch_id)
                conn.execute(self._insert(batch_items).on_conflict_do_nothing(), chunk)
                total = conn.execute(select(func.count()).where(batch_items.c.batch_id == batch_id)).scalar_one()
                conn.execute(update(batches).where(batches.c.batch_id == batch_id).values(total=total))
            added += total - before
        return added

    def set_item_result(self, batch_id: str, item_id: str, status: JobStatus | str, result: Any = None,
                        cost_usd: float = 0.0, *, job_id: str | None = None) -> bool:
        """Move an item that is not final to ``status`` (with its scored ``result`` and cost
        when final; ``job_id`` once submitted). False if it is unknown or already final."""
        values: dict[str, Any] = {"status": JobStatus(status).value, "result": to_jsonable_python(result),
                                      "cost_usd": float(cost_usd)}
        if job_id is not None:
            values["job_id"] = job_id
        with self._begin(write=True) as conn:
            return conn.execute(update(batch_items).where(
                batch_items.c.batch_id == batch_id, batch_items.c.item_id == item_id,
                batch_items.c.status.in_(_OPEN)).values(**values)).rowcount == 1

    def mark_items_submitted(self, batch_id: str, submitted: list[tuple[str, str]]) -> None:
        """``set_item_result(..., RUNNING, job_id=...)`` for many ``(item_id, job_id)`` at once
        (items already final are left as they are)."""
        if not submitted:
            return
        rows = [{"b_batch_id": batch_id, "b_item_id": item_id, "job_id": job_id,
                 "status": JobStatus.RUNNING.value, "result": None, "cost_usd": 0.0} for item_id, job_id in submitted]
        with self._begin(write=True) as conn:
            conn.execute(self._submit_items, rows)

    def items(self, batch_id: str, status: JobStatus | str | Collection[JobStatus | str] | None = None,
              *, chunk_size: int = _CHUNK) -> Iterator[BatchItem]:
        """The batch's items in input order, read ``chunk_size`` at a time (keyset paging, one
        short transaction per chunk): memory stays flat however large the batch."""
        wanted = None if status is None else [
            JobStatus(s).value for s in ([status] if isinstance(status, (str, JobStatus)) else status)]
        last = 0
        while True:
            query = (select(batch_items).where(batch_items.c.batch_id == batch_id, batch_items.c.seq > last)
                     .order_by(batch_items.c.seq).limit(chunk_size))
            if wanted is not None:
                query = query.where(batch_items.c.status.in_(wanted))
            with self._begin() as conn:
                rows = conn.execute(query).all()
            for row in rows:
                yield BatchItem.model_validate({k: v for k, v in row._mapping.items() if k != "seq"})
            if len(rows) < chunk_size:
                return
            last = rows[-1].seq

    def final_item_ids(self, batch_id: str) -> set[str]:
        """Ids of the items already final: what ``--resume`` skips."""
        with self._begin() as conn:
            return set(conn.execute(select(batch_items.c.item_id).where(
                batch_items.c.batch_id == batch_id, batch_items.c.status.in_(_FINAL))).scalars())

    def batch_summary(self, batch_id: str) -> BatchSummary | None:
        """Item counts by status and the cost so far, computed in SQL; None if no such batch."""
        with self._begin() as conn:
            if conn.execute(select(batches.c.batch_id).where(batches.c.batch_id == batch_id)).first() is None:
                return None
            rows = conn.execute(select(batch_items.c.status, func.count(), func.sum(batch_items.c.cost_usd))
                                .where(batch_items.c.batch_id == batch_id).group_by(batch_items.c.status)).all()
        counts = {s.value: 0 for s in JobStatus} | {status: n for status, n, _ in rows}
        return BatchSummary(batch_id=batch_id, total=sum(counts.values()), counts=counts,
                            done=sum(counts[s] for s in _FINAL), cost_usd=float(sum(c or 0.0 for *_, c in rows)))

    # -- internals ---------------------------------------------------------------------

    @contextmanager
    def _begin(self, write: bool = False) -> Iterator[Connection]:
        if self._version is None or self._pid != os.getpid():
            self.migrate()
        with (self._writer if write else self._engine).begin() as conn:
            yield conn

    def _fork_check(self) -> None:
        if self._pid != os.getpid():
            # forked (a prefork worker): the parent's pooled connections are not ours to use
            self._engine.dispose(close=False)
            self._lock = threading.Lock()
            self._pid = os.getpid()

    def _write(self, writes: Sequence[job_writes.JobWrite]) -> list[Any]:
        """One transaction of job writes (the group commit's, in its writer thread, or a sync call's)."""
        with self._begin(write=True) as conn:
            return job_writes.apply(conn, writes)

    def _lock_batch(self, conn: Connection, batch_id: str) -> int:
        """Lock the batch row (Postgres; SQLite holds the write lock already) and return its
        item count, so concurrent adders count one after another."""
        total = conn.execute(select(batches.c.total).where(batches.c.batch_id == batch_id)
                             .with_for_update()).scalar()
        if total is None:
            raise KeyError(f"no batch {batch_id!r}: create_batch first")
        return total


def _lease(lease_s: float | None) -> float:
    return get_settings().lease_s if lease_s is None else lease_s


def _job_row(job_id: str, request: JobRequest, provider: str, now: datetime) -> dict[str, Any]:
    """A queued job's row."""
    return {"job_id": job_id, "idempotency_key": request.idempotency_key, "kind": request.kind.value,
            "model": request.model, "provider": provider, "status": JobStatus.QUEUED.value,
            "request": request.model_dump(mode="json"), "cost_usd": 0.0, "runs": 0, "deliveries": 0, "resends": 0,
            "replays": 0,
            "batch_id": request.batch_id, "item_id": request.item_id, "created_at": now, "updated_at": now,
            "rate_limit_retries": 0, "rate_limit_waits": 0, "caller_waits": 0}


def _batch(row: Row[Any]) -> BatchInfo:
    m = dict(row._mapping)
    return BatchInfo.model_validate(m | {"created_at": _utc(m["created_at"]), "finished_at": _utc(m["finished_at"]),
                                         "metadata": m["metadata"] or {}})

