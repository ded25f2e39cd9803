"""The job store on a real SQLite file always, and on Postgres when DQ_TEST_POSTGRES_URL is set
(in a schema of its own for the test session, dropped afterwards: other modules share the db)."""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy.exc
from pydantic import ValidationError
from sqlalchemy import JSON, DateTime, bindparam, create_engine, event, func, insert, select, text, update
from sqlalchemy.engine import URL, make_url

from datus_queue.tasks.schemas import JobError, JobRequest, JobStatus
from datus_queue.tasks.store import BatchItem, BatchStatus, JobStore, StoreError
from datus_queue.tasks.store.schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    SchemaTooNewError,
    batches,
    create_store_engine,
    job_checkpoints,
    jobs,
    schema_version,
)

REPO = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get("DQ_TEST_POSTGRES_URL")
FAKE_KEY = "sk-test-FAKE-9c1d7e2b4a6f8e0d"


def _pg(url: str) -> URL:
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+psycopg2") if parsed.drivername == "postgresql" else parsed


@contextmanager
def _pg_schema(prefix: str) -> Iterator[str]:
    """A fresh Postgres schema, dropped afterwards; yields a URL whose connections use it (the
    search_path rides in the URL, so subprocesses given only the URL land there too)."""
    assert PG_URL
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(_pg(PG_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with _pg_schema("dq_store_test") as url:
        yield url


_BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.skipif(
    not PG_URL, reason="set DQ_TEST_POSTGRES_URL to run on Postgres"))]


@pytest.fixture(params=_BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(store_url: str) -> Iterator[JobStore]:
    opened = JobStore(store_url)
    yield opened
    opened.close()


def _id() -> str:
    return uuid.uuid4().hex


def _request(**fields: object) -> JobRequest:
    return JobRequest(**{"model": "openai:gpt-4o", "prompt": "How many orders?"} | fields)


def _error(code: str = "rate_limited") -> JobError:
    return JobError(code=code, type="RateLimitError", message="slow down", provider="openai",
                    status_code=429, retryable=True)


def _new_job(store: JobStore, **fields: object) -> str:
    job_id, created = store.create_job(_id(), _request(**fields), "openai")
    assert created
    return job_id


# -- jobs ----------------------------------------------------------------------------------


def test_create_round_trips_the_request(store: JobStore) -> None:
    request = _request(kind="json", output_schema={"type": "object"}, batch_id="b", item_id="i",
                       metadata={"user": "ann"}, idempotency_key=_id())
    job_id, created = store.create_job("job-1", request, "openai")
    assert (job_id, created) == ("job-1", True)
    assert store.get_request("job-1") == request
    job = store.get("job-1")
    assert job is not None
    assert (job.status, job.kind.value, job.model, job.provider) == (JobStatus.QUEUED, "json", "openai:gpt-4o", "openai")
    assert (job.batch_id, job.item_id, job.attempts, job.started_at, job.final) == ("b", "i", 0, None, False)
    assert store.get("nope") is None and store.get_request("nope") is None


def test_create_is_idempotent(store: JobStore) -> None:
    key = _id()
    first = store.create_job("a-" + key, _request(idempotency_key=key), "openai")
    again = store.create_job("b-" + key, _request(idempotency_key=key, prompt="other"), "openai")
    assert first == ("a-" + key, True) and again == ("a-" + key, False)
    assert store.get("b-" + key) is None  # the second submission wrote nothing
    assert store.get_request("a-" + key).prompt == "How many orders?"
    # no key: the job id alone decides; a different key is a different job
    assert store.create_job("a-" + key, _request(), "openai") == ("a-" + key, False)
    assert store.create_job("c-" + key, _request(idempotency_key=_id()), "openai") == ("c-" + key, True)


def test_concurrent_creates_with_one_key_make_one_row(store_url: str) -> None:
    key, barrier = _id(), threading.Barrier(8)
    stores = [JobStore(store_url) for _ in range(8)]  # a store each, like separate clients
    for each in stores:
        each.migrate()

    def submit(index: int) -> tuple[str, bool]:
        barrier.wait()
        return stores[index].create_job(f"job-{index}-{key}", _request(idempotency_key=key), "openai")

    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(submit, range(8)))
        assert sum(created for _, created in results) == 1
        assert len({job_id for job_id, _ in results}) == 1
        with stores[0]._engine.connect() as conn:
            assert conn.execute(select(func.count()).where(jobs.c.idempotency_key == key)).scalar_one() == 1
    finally:
        for each in stores:
            each.close()


def test_finish_wins_once(store: JobStore) -> None:
    job_id = _new_job(store)
    assert store.mark_running(job_id, 1) is not None
    assert store.finish(job_id, JobStatus.SUCCEEDED, output="SELECT 1", run=1) is True
    assert store.finish(job_id, JobStatus.FAILED, error=_error("server_error")) is False
    assert store.finish(job_id, "succeeded", output="SELECT 2") is False
    job = store.get(job_id)
    assert (job.status, job.output, job.error) == (JobStatus.SUCCEEDED, "SELECT 1", None)
    with pytest.raises(ValueError, match="final status"):
        store.finish(job_id, JobStatus.RUNNING)


def test_a_final_job_never_runs_again(store: JobStore) -> None:
    job_id = _new_job(store)
    store.mark_running(job_id, 1)
    store.finish(job_id, JobStatus.SUCCEEDED, output="done", run=1)
    # a redelivered message of a job already final: no second model call
    assert store.mark_running(job_id, 1) is None
    assert store.mark_running(job_id, 2) is None
    assert store.mark_retrying(job_id, 1, _error(), 1.0) is False
    assert store.get(job_id).status is JobStatus.SUCCEEDED
    assert store.mark_running("unknown-job", 1) is None


def test_redelivery_and_stale_runs(store: JobStore) -> None:
    job_id = _new_job(store)
    first = store.mark_running(job_id, 1, lease_s=0)  # a lease that has passed at once: its worker is gone
    assert (first.status, first.runs, first.deliveries) == (JobStatus.RUNNING, 1, 1)
    again = store.mark_running(job_id, 1)  # the worker died; the same message came back
    assert (again.runs, again.deliveries) == (1, 2)
    assert again.started_at == first.started_at  # the first start stays: queue time is honest
    store.mark_retrying(job_id, 1, _error(), 0.5)
    second = store.mark_running(job_id, 2)
    assert (second.runs, second.deliveries) == (2, 1)  # a new run counts afresh
    assert store.mark_running(job_id, 1) is None  # a stale message of an older run
    assert store.get(job_id).runs == 2


async def test_runs_count_the_limiter_waits_attempts_do_not(store: JobStore) -> None:
    job_id = _new_job(store)
    await store.amark_running(job_id, 1)  # run 1 only waits for the limiter: no request
    await store.amark_retrying(job_id, 1, _error("rate_limit_wait"), 0.0, rate_limit_retries=0, rate_limit_waits=1)
    job = await store.amark_running(job_id, 2)  # run 2 is the first attempt
    assert (job.runs, job.rate_limit_waits, job.attempts) == (2, 1, 1)
    await store.afinish(job_id, JobStatus.SUCCEEDED, output="ok", run=2)
    job = store.get(job_id)
    assert (job.runs, job.attempts, job.model_dump()["attempts"]) == (2, 1, 1)


def test_retries_are_recorded(store: JobStore) -> None:
    job_id = _new_job(store)
    store.mark_running(job_id, 1)
    before = datetime.now(UTC)
    assert store.mark_retrying(job_id, 1, _error(), countdown_s=30) is True
    job = store.get(job_id)
    assert (job.status, job.runs, job.error) == (JobStatus.RETRYING, 1, _error())
    assert before + timedelta(seconds=29) < job.retry_at < datetime.now(UTC) + timedelta(seconds=31)

    job = store.mark_running(job_id, 2)
    assert (job.status, job.runs, job.retry_at) == (JobStatus.RUNNING, 2, None)
    assert store.mark_retrying(job_id, 2, _error("overloaded"), countdown_s=1) is True
    assert store.get(job_id).error.code == "overloaded"
    store.mark_running(job_id, 3)
    assert store.finish(job_id, JobStatus.SUCCEEDED, output={"sql": "SELECT 1"},
                        sql_contexts=[{"sql_query": "SELECT 1", "row_count": 1}],
                        usage={"input_tokens": 10, "output_tokens": 5}, cost_usd=0.0015, run=3)
    job = store.get(job_id)
    assert (job.status, job.runs, job.attempts, job.error) == (JobStatus.SUCCEEDED, 3, 3, None)  # the error cleared
    assert job.output == {"sql": "SELECT 1"} and job.sql_contexts == [{"sql_query": "SELECT 1", "row_count": 1}]
    assert job.usage == {"input_tokens": 10, "output_tokens": 5} and job.cost_usd == pytest.approx(0.0015)


def test_a_permanent_failure_keeps_the_error(store: JobStore) -> None:
    job_id = _new_job(store)
    store.mark_running(job_id, 1)
    error = JobError(code="auth_error", type="AuthenticationError", message="invalid key", status_code=401)
    assert store.finish(job_id, JobStatus.FAILED, error=error, run=1)
    job = store.get(job_id)
    assert (job.status, job.error, job.final) == (JobStatus.FAILED, error, True)


def test_timings(store: JobStore) -> None:
    # each stamp is taken during its own call: bracketed by the clock read before and after it
    before_create = datetime.now(UTC)
    job_id = _new_job(store)
    after_create = datetime.now(UTC)
    time.sleep(0.08)
    before_start = datetime.now(UTC)
    store.mark_running(job_id, 1)
    after_start = datetime.now(UTC)
    time.sleep(0.12)
    before_finish = datetime.now(UTC)
    store.finish(job_id, JobStatus.SUCCEEDED, output="x", run=1)
    after_finish = datetime.now(UTC)
    job = store.get(job_id)
    for stamp in (job.created_at, job.started_at, job.finished_at, job.updated_at):
        assert stamp.utcoffset() == timedelta(0)  # aware UTC on both backends
    assert before_create <= job.created_at <= after_create
    assert before_start <= job.started_at <= after_start
    assert before_finish <= job.finished_at <= after_finish and before_finish <= job.updated_at <= after_finish
    assert job.queue_ms >= 80 and job.run_ms >= 120  # the sleeps fell between the stamps


def test_cancel_in_each_state(store: JobStore) -> None:
    queued = _new_job(store)
    assert store.cancel(queued) is JobStatus.CANCELLED
    assert store.mark_running(queued, 1) is None  # a queued job cancelled never runs
    assert store.get(queued).finished_at is not None

    retrying = _new_job(store)
    store.mark_running(retrying, 1)
    store.mark_retrying(retrying, 1, _error(), 5)
    assert store.cancel(retrying) is JobStatus.CANCELLED
    job = store.get(retrying)
    assert (job.status, job.retry_at) == (JobStatus.CANCELLED, None)
    assert store.mark_running(retrying, 2) is None  # the retry message arrives: nothing runs

    running = _new_job(store)
    store.mark_running(running, 1)
    assert store.cancel(running) is JobStatus.RUNNING  # the caller signals the worker
    assert store.get(running).status is JobStatus.RUNNING
    assert store.finish(running, JobStatus.CANCELLED) is True  # the worker stops at its next step
    assert store.finish(running, JobStatus.SUCCEEDED, output="late") is False
    assert store.cancel(running) is JobStatus.CANCELLED

    done = _new_job(store)
    store.mark_running(done, 1)
    store.finish(done, JobStatus.SUCCEEDED, output="x", run=1)
    assert store.cancel(done) is JobStatus.SUCCEEDED
    assert store.get(done).status is JobStatus.SUCCEEDED
    assert store.cancel("unknown-job") is None


def test_counts_and_listing(store: JobStore) -> None:
    batch = _id()
    ids = [_new_job(store, batch_id=batch, item_id=str(n)) for n in range(5)]
    _new_job(store)  # another batch's: not counted
    store.mark_running(ids[0], 1)
    store.mark_running(ids[1], 1)
    store.finish(ids[1], JobStatus.SUCCEEDED, run=1)
    store.cancel(ids[2])
    counts = store.count_by_status(batch_id=batch)
    assert counts == {"queued": 2, "running": 1, "retrying": 0, "succeeded": 1, "failed": 0, "cancelled": 1, "dead": 0}
    assert sum(store.count_by_status().values()) >= 6
    listed = store.list_jobs(batch_id=batch)
    assert [job.job_id for job in listed] == ids[::-1]  # newest first
    assert [job.job_id for job in store.list_jobs(status="queued", batch_id=batch)] == [ids[4], ids[3]]
    assert len(store.list_jobs(batch_id=batch, limit=2)) == 2


async def test_async_twins(store: JobStore) -> None:
    job_id = _new_job(store)
    assert (await store.aget_request(job_id)).prompt == "How many orders?"
    first, duplicate = await asyncio.gather(store.amark_running(job_id, 1), store.amark_running(job_id, 1))
    assert first.deliveries == 1 and duplicate is None  # the first holds its lease: no second start
    assert await store.amark_retrying(job_id, 1, _error(), 0.1)
    await store.amark_running(job_id, 2)
    wins = await asyncio.gather(*(store.afinish(job_id, JobStatus.SUCCEEDED, output=n, run=2) for n in range(4)))
    assert sum(wins) == 1
    assert (await store.aget(job_id)).output in range(4)
    assert await store.acancel(job_id) is JobStatus.SUCCEEDED


def _count_commits(store: JobStore) -> list[str]:
    """A list that grows by one for each transaction the store's engine commits."""
    commits: list[str] = []
    event.listen(store._engine, "commit", lambda conn: commits.append(threading.current_thread().name))
    return commits


async def test_writes_of_one_loop_turn_share_one_transaction(store: JobStore) -> None:
    ids = [_new_job(store) for _ in range(40)]
    commits = _count_commits(store)
    started = await asyncio.gather(*(store.amark_running(job_id, 1) for job_id in ids))
    assert [job.job_id for job in started] == ids and all(j.status is JobStatus.RUNNING for j in started)
    wins = await asyncio.gather(*(store.afinish(job_id, JobStatus.SUCCEEDED, output=i, run=1)
                                  for i, job_id in enumerate(ids)))
    assert all(wins) and len(commits) == 2  # two transactions for eighty writes
    assert set(commits) == {"dq-store-writer"}  # made by the store's writer thread, not on the loop
    assert [store.get(job_id).output for job_id in ids] == list(range(40))


async def test_a_group_keeps_the_order_of_its_writes(store: JobStore) -> None:
    job_id, other = _new_job(store), _new_job(store)
    store.cancel(other)
    results = await asyncio.gather(
        store.amark_running(job_id, 1), store.amark_retrying(job_id, 1, _error(), 5.0),
        store.amark_running(job_id, 2), store.afinish(job_id, JobStatus.SUCCEEDED, output="a", run=2),
        store.afinish(job_id, JobStatus.FAILED, error=_error("x"), run=2), store.amark_running(other, 1),
        store.afinish(other, JobStatus.SUCCEEDED, run=1))
    first, retrying, second, won, lost, cancelled_start, cancelled_finish = results
    assert (first.runs, retrying, second.runs, won, lost) == (1, True, 2, True, False)
    assert (cancelled_start, cancelled_finish) == (None, False)
    job = store.get(job_id)
    assert (job.status, job.output, job.runs, job.error) == (JobStatus.SUCCEEDED, "a", 2, None)
    assert store.get(other).status is JobStatus.CANCELLED


async def test_a_write_that_fails_fails_only_its_caller(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from datus_queue.tasks.store import writes as job_writes

    job_id, poison = _new_job(store), _new_job(store)
    apply = job_writes.apply

    def failing(conn: object, writes: list[job_writes.JobWrite]) -> list[object]:
        if any(write.job_id == poison for write in writes):
            raise ValueError("cannot write this one")
        return apply(conn, writes)

    monkeypatch.setattr(job_writes, "apply", failing)
    error, started = await asyncio.gather(store.amark_running(poison, 1), store.amark_running(job_id, 1),
                                          return_exceptions=True)
    assert isinstance(error, ValueError) and started.status is JobStatus.RUNNING
    assert store.get(poison).status is JobStatus.QUEUED


# -- off the event loop: a database that makes writers wait never stops the loop --------------


@contextmanager
def _write_lock(store_url: str) -> Iterator[threading.Event]:
    """Another connection holds what the store's writes need until the block ends (SQLite: the
    database's write lock, BEGIN IMMEDIATE; Postgres: a lock on the jobs table that blocks
    UPDATE but not SELECT). Yields an event set once the lock is held."""
    held, release = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    def hold() -> None:
        try:
            if store_url.startswith("sqlite"):
                import sqlite3

                conn = sqlite3.connect(make_url(store_url).database, isolation_level=None)
                conn.execute("BEGIN IMMEDIATE")
                held.set()
                release.wait(60)
                conn.execute("ROLLBACK")
                conn.close()
                return
            engine = create_engine(_pg(store_url))
            with engine.begin() as conn:
                conn.exec_driver_sql("LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE")
                held.set()
                release.wait(60)
            engine.dispose()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failed.append(exc)
            held.set()

    holder = threading.Thread(target=hold, name="lock-holder")
    holder.start()
    held.wait(30)
    assert not failed, failed
    try:
        yield held
    finally:
        release.set()
        holder.join(30)


async def test_the_loop_runs_on_while_a_write_waits_for_a_lock(store: JobStore, store_url: str) -> None:
    job_id = _new_job(store)
    store.get(job_id)  # migrated and connected before the lock is taken
    ticks = 0

    async def tick() -> None:  # stands for every other job, pub/sub reader and renewal on the loop
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    with _write_lock(store_url):
        write = asyncio.create_task(store.amark_running(job_id, 1))
        while ticks < 50:  # the loop goes on turning while the write waits for the lock
            await asyncio.sleep(0.01)
        assert not write.done()  # still waiting: the lock is held
        assert store.get(job_id).status is JobStatus.QUEUED  # reads go on meanwhile
    started = await write  # the lock released: the write is made and its caller hears of it
    ticker.cancel()
    assert started is not None and started.status is JobStatus.RUNNING
    assert store.get(job_id).status is JobStatus.RUNNING


async def test_writes_handed_over_while_the_writer_waits_share_its_next_transaction(
        store: JobStore, store_url: str) -> None:
    ids = [_new_job(store) for _ in range(10)]
    commits = _count_commits(store)
    with _write_lock(store_url):
        writes = []
        for job_id in ids:  # one write per loop turn: ten hand-overs
            writes.append(asyncio.create_task(store.amark_running(job_id, 1)))
            await asyncio.sleep(0.01)
        assert not any(write.done() for write in writes)
    started = await asyncio.gather(*writes)
    assert [job.job_id for job in started] == ids
    # the first turn's write waited for the lock in the writer; the nine handed over meanwhile
    # went in one transaction after it (all ten in one, if the writer took them together)
    assert len(commits) <= 2


async def test_an_unavailable_database_fails_the_group_once(tmp_path: Path) -> None:
    """The lock wait ran out: every write of the group hears that error at once, instead of the
    writer trying each alone and waiting out the busy timeout once per write."""
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    # a busy timeout of 0.2 s instead of 30 s, so that the wait runs out while the lock is held
    store = JobStore(url, busy_timeout_s=0.2)
    try:
        ids = [_new_job(store) for _ in range(20)]
        tries: list[int] = []  # one per failed try: the lock wait is the transaction's first statement
        event.listen(store._engine, "handle_error", lambda context: tries.append(1))
        with _write_lock(url):
            results = await asyncio.gather(*(store.amark_running(job_id, 1) for job_id in ids), return_exceptions=True)
        assert all(isinstance(result, sqlalchemy.exc.OperationalError) for result in results)
        assert len(tries) == 1  # one transaction tried, not one per write
        assert [job.job_id for job in await asyncio.gather(*(store.amark_running(i, 1) for i in ids))] == ids
    finally:
        store.close()


async def test_a_cancelled_waiter_leaves_its_write_standing(store: JobStore, store_url: str) -> None:
    job_id = _new_job(store)
    store.get(job_id)
    with _write_lock(store_url):
        write = asyncio.create_task(store.afinish(job_id, JobStatus.SUCCEEDED, output="kept", run=1))
        await asyncio.sleep(0.05)
        write.cancel()
    with pytest.raises(asyncio.CancelledError):
        await write
    await store.arenew(_new_job(store))  # a later write: its transaction comes after the cancelled one's
    assert store.get(job_id).output == "kept"


def test_a_forked_child_writes_through_a_writer_of_its_own(store: JobStore) -> None:
    parent_job, child_job = _new_job(store), _new_job(store)
    assert asyncio.run(store.amark_running(parent_job, 1)) is not None  # the parent's writer thread runs
    pid = os.fork()
    if pid == 0:  # the child: the parent's thread and pooled connections are not there
        code = 1
        try:
            code = 0 if asyncio.run(store.amark_running(child_job, 1)) is not None else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.get(child_job).status is JobStatus.RUNNING
    assert asyncio.run(store.afinish(parent_job, JobStatus.SUCCEEDED, run=1))  # the parent's still works


def test_no_secret_is_stored(store: JobStore, store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the key the model config would use: present in the environment of the submitting process
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    job_id, _ = store.create_job(_id(), _request(idempotency_key=_id(), metadata={"team": "bi"}), "openai")
    store.mark_running(job_id, 1)
    store.finish(job_id, JobStatus.SUCCEEDED, output="SELECT 1", run=1)
    assert store.get_request(job_id).model == "openai:gpt-4o"
    with pytest.raises(ValidationError, match="secrets"):  # a request cannot smuggle one in
        store.create_job(_id(), {"model": "openai:gpt-4o", "prompt": "x", "metadata": {"api_key": FAKE_KEY}},
                         "openai")
    # nothing in the store's API takes a key
    for name, method in inspect.getmembers(JobStore, inspect.isfunction):
        for param in inspect.signature(method).parameters:
            assert not any(word in param.lower() for word in ("api_key", "secret", "token", "password")), (name, param)
    # every stored value, as text
    with store._engine.connect() as conn:
        dumped = "".join(str(tuple(row)) for table in ("jobs", "batches", "batch_items")
                         for row in conn.exec_driver_sql(f"SELECT * FROM {table}"))
    assert "openai:gpt-4o" in dumped and FAKE_KEY not in dumped
    if store_url.startswith("sqlite"):
        store.close()  # checkpoint the WAL into the file; scan every file the database left behind
        path = Path(make_url(store_url).database)
        files = [p for p in path.parent.iterdir() if p.name.startswith(path.name)]
        assert path in files
        assert not any(FAKE_KEY.encode() in p.read_bytes() for p in files)


# -- batches -------------------------------------------------------------------------------


def _batch(store: JobStore, batch_id: str | None = None) -> str:
    batch_id = batch_id or _id()
    store.create_batch(batch_id, model="openai:gpt-4o", prompt_hash="p1", mode="generate", name="bird-dev")
    return batch_id


def test_batch_lifecycle(store: JobStore) -> None:
    batch_id = _id()
    info, created = store.create_batch(batch_id, model="openai:gpt-4o", prompt_hash="p1", mode="generate",
                                       name="bird-dev", metadata={"input": "dev.jsonl"})
    assert created and (info.status, info.total, info.metadata) == (BatchStatus.RUNNING, 0, {"input": "dev.jsonl"})
    assert info.created_at.utcoffset() == timedelta(0)
    again, created = store.create_batch(batch_id, model="other", prompt_hash="p2", mode="tool_run")
    assert not created and (again.model, again.prompt_hash) == ("openai:gpt-4o", "p1")  # unchanged, for resume checks
    assert store.finish_batch(batch_id, BatchStatus.INTERRUPTED) is True
    assert store.finish_batch(batch_id) is False  # no longer running
    assert store.get_batch(batch_id).status is BatchStatus.INTERRUPTED
    assert store.resume_batch(batch_id) is True and store.resume_batch(batch_id) is False
    assert store.get_batch(batch_id).finished_at is None
    assert store.finish_batch(batch_id, "completed") is True
    assert store.get_batch(batch_id).finished_at is not None
    assert store.get_batch("nope") is None and store.batch_summary("nope") is None
    with pytest.raises(KeyError, match="create_batch"):
        store.add_batch_items("nope", [{"item_id": "1", "question": "q"}])


def _rows_handed(statement: str, params: Any, executemany: bool) -> int:
    """Rows in one statement handed to the driver: a list of rows (executemany), or one INSERT
    with a VALUES group per row and one flat parameter dict — how SQLAlchemy 2.0 sends a page
    of rows to psycopg2 ("insertmanyvalues")."""
    if isinstance(params, dict):
        return statement.upper().split(" VALUES ", 1)[1].count("), (") + 1
    return len(params) if executemany else 1


def test_ten_thousand_items(store: JobStore) -> None:
    batch_id = _batch(store)
    ids = [f"q{n}" for n in range(10_000)]  # q10 sorts before q2: iteration must keep input order
    inserts: list[int] = []  # rows per INSERT the driver was handed
    commits: list[bool] = []

    def count_insert(_conn: object, _cursor: object, statement: str, params: object, _context: object,
                     executemany: bool) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO BATCH_ITEMS"):
            inserts.append(_rows_handed(statement, params, executemany))

    def count_commit(_conn: object) -> None:
        commits.append(True)

    event.listen(store._engine, "before_cursor_execute", count_insert)
    event.listen(store._engine, "commit", count_commit)
    try:
        added = store.add_batch_items(batch_id, ({"item_id": i, "question": f"question {i}?"} for i in ids))
    finally:
        event.remove(store._engine, "before_cursor_execute", count_insert)
        event.remove(store._engine, "commit", count_commit)
    assert added == 10_000
    # in bulk, not row by row: one INSERT of 1,000 rows per chunk, each chunk a short transaction of its own
    assert inserts == [1000] * 10 and len(commits) == 10
    assert store.get_batch(batch_id).total == 10_000
    # adding the whole file again (resume) is a no-op; a new item is added
    assert store.add_batch_items(batch_id, [{"item_id": i, "question": "changed"} for i in ids[:3000]]) == 0
    assert store.add_batch_items(batch_id, [BatchItem(batch_id=batch_id, item_id="extra", question="more?")]) == 1
    assert store.get_batch(batch_id).total == 10_001

    statements: list[str] = []

    def record(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if "FROM batch_items" in statement:
            statements.append(statement)

    event.listen(store._engine, "before_cursor_execute", record)
    try:
        iterator = store.items(batch_id, chunk_size=1000)
        first = next(iterator)
        assert (first.item_id, first.question, first.status, first.job_id) == ("q0", "question q0?", "queued", None)
        assert len(statements) == 1 and "LIMIT" in statements[0].upper()  # one chunk read, not the batch
        seen = ["q0"]
        for item in iterator:
            seen.append(item.item_id)
            # a write between chunks: no read transaction is held open while the caller works
            if item.item_id == "q5000":
                assert store.set_item_result(batch_id, "q9999", JobStatus.SUCCEEDED, {"match": True}, 0.01)
        assert seen == [*ids, "extra"]
        assert len(statements) == 11
    finally:
        event.remove(store._engine, "before_cursor_execute", record)


def test_item_results_summary_and_resume(store: JobStore) -> None:
    batch_id = _batch(store)
    other = _batch(store)
    store.add_batch_items(batch_id, [{"item_id": str(n), "question": f"q{n}"} for n in range(6)])
    store.add_batch_items(other, [{"item_id": "0", "question": "elsewhere"}])
    assert store.final_item_ids(batch_id) == set()

    assert store.set_item_result(batch_id, "0", JobStatus.RUNNING, job_id="job-0")
    assert store.set_item_result(batch_id, "0", JobStatus.SUCCEEDED, {"sql": "SELECT 1", "match": True}, 0.25)
    assert store.set_item_result(batch_id, "1", "failed", {"error": "invalid_sql"}, 0.5, job_id="job-1")
    assert store.set_item_result(batch_id, "2", JobStatus.CANCELLED)
    assert store.set_item_result(batch_id, "3", JobStatus.RUNNING, job_id="job-3")
    # a final item keeps its one result
    assert store.set_item_result(batch_id, "0", JobStatus.FAILED, {"sql": "other"}, 9.0) is False
    assert store.set_item_result(batch_id, "missing", JobStatus.SUCCEEDED) is False

    assert store.final_item_ids(batch_id) == {"0", "1", "2"}
    done = {item.item_id: item for item in store.items(batch_id, status=JobStatus.SUCCEEDED)}
    assert list(done) == ["0"]
    assert (done["0"].job_id, done["0"].result, done["0"].cost_usd, done["0"].final) == (
        "job-0", {"sql": "SELECT 1", "match": True}, 0.25, True)
    pending = [item.item_id for item in store.items(batch_id, status=["queued", JobStatus.RUNNING], chunk_size=2)]
    assert pending == ["3", "4", "5"]
    store.mark_items_submitted(batch_id, [("0", "job-x"), ("4", "job-4"), ("5", "job-5")])  # "0" is final
    items = {item.item_id: item for item in store.items(batch_id)}
    assert (items["0"].job_id, items["0"].status) == ("job-0", JobStatus.SUCCEEDED)
    assert [(items[i].job_id, items[i].status) for i in "45"] == [("job-4", "running"), ("job-5", "running")]
    assert next(store.items(other)).job_id is None  # the same item id in another batch: untouched

    summary = store.batch_summary(batch_id)
    assert (summary.total, summary.done, summary.cost_usd) == (6, 3, pytest.approx(0.75))
    assert summary.counts == {"queued": 0, "running": 3, "retrying": 0, "succeeded": 1, "failed": 1,
                              "cancelled": 1, "dead": 0}
    assert store.batch_summary(other).total == 1 and store.final_item_ids(other) == set()


# -- schema and migrations -----------------------------------------------------------------


_MIGRATE = """
    import sys, time
    from pathlib import Path
    from datus_queue.tasks.store import JobStore
    from datus_queue.tasks.schemas import JobRequest
    url, ready, go, index = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    (ready / index).touch()
    while not go.exists():
        time.sleep(0.001)
    store = JobStore(url)
    version = store.migrate()
    store.create_job("job-" + index, JobRequest(model="openai:gpt-4o", prompt="hi", idempotency_key="k"), "openai")
    print(version)
"""


@pytest.fixture(params=_BACKENDS)
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh' / 'jobs.db'}"  # not even the directory exists yet
    else:
        with _pg_schema("dq_store_migrate") as url:
            yield url


def test_migrations_from_four_processes_at_once(fresh_url: str, tmp_path: Path) -> None:
    ready, go = tmp_path / "ready", tmp_path / "go"
    ready.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(_MIGRATE), fresh_url, str(ready), str(go),
                               str(n)], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in range(4)]
    deadline = time.monotonic() + 60
    while len(list(ready.iterdir())) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()  # all four start migrating the fresh database in the same instant
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.strip() == str(SCHEMA_VERSION)

    store = JobStore(fresh_url)
    try:
        assert store.migrate() == SCHEMA_VERSION and store.migrate() == SCHEMA_VERSION
        assert JobStore(fresh_url).migrate() == SCHEMA_VERSION  # a later start: nothing to do
        with store._engine.connect() as conn:
            assert list(conn.execute(select(schema_version.c.version)).scalars()) == sorted(m.version for m in MIGRATIONS)
            assert conn.execute(select(func.count()).select_from(jobs)).scalar_one() == 1  # one key, one row
            assert conn.execute(select(func.count()).select_from(batches)).scalar_one() == 0
        if fresh_url.startswith("sqlite"):
            with store._engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    finally:
        store.close()


def test_migration_5_renames_the_run_number_and_keeps_it(fresh_url: str) -> None:
    """A database at schema 4 (``jobs.attempts``, ``job_checkpoints.attempt``) keeps its run
    numbers under their new names."""
    engine = create_store_engine(fresh_url)
    try:
        with engine.begin() as conn:
            schema_version.create(conn)
            for migration in MIGRATIONS:
                if migration.version <= 4:
                    migration.apply(conn)
                    conn.execute(insert(schema_version).values(version=migration.version,
                                                               description=migration.description,
                                                               applied_at=datetime.now(UTC)))
            typed = {"request": bindparam("request", type_=JSON), "step": bindparam("step", type_=JSON),
                     "at": bindparam("at", type_=DateTime(timezone=True))}
            at = datetime.now(UTC)
            conn.execute(text(
                "INSERT INTO jobs (job_id, kind, model, provider, status, request, cost_usd, attempts, deliveries, "
                "created_at, updated_at, rate_limit_waits) VALUES ('old', 'generate', 'openai:gpt-4o', 'openai', "
                "'retrying', :request, 0.0, 3, 1, :at, :at, 1)").bindparams(typed["request"], typed["at"]),
                {"request": {"model": "openai:gpt-4o"}, "at": at})
            conn.execute(text("INSERT INTO job_checkpoints (job_id, position, kind, attempt, step, created_at) "
                              "VALUES ('old', 0, 'turn', 3, :step, :at)").bindparams(typed["step"], typed["at"]),
                         {"step": {"kind": "turn"}, "at": at})
    finally:
        engine.dispose()
    store = JobStore(fresh_url)
    try:
        assert store.migrate() == SCHEMA_VERSION
        job = store.get("old")
        assert (job.runs, job.rate_limit_waits, job.attempts) == (3, 1, 2)
        assert store.mark_running("old", 2) is None and store.mark_running("old", 4).runs == 4  # the guard holds
        with store._engine.connect() as conn:
            assert conn.execute(select(job_checkpoints.c.run)).scalars().all() == [3]
    finally:
        store.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    store = JobStore(url)
    store.migrate()
    with store._writer.begin() as conn:
        conn.execute(insert(schema_version).values(version=SCHEMA_VERSION + 1, description="future",
                                                   applied_at=datetime.now(UTC)))
    store.close()
    with pytest.raises(SchemaTooNewError, match="upgrade datus-queue"):
        JobStore(url).get("x")


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "mysql://u:hunter2@h/db", "not a url"])
def test_unusable_urls_are_clear_errors(url: str) -> None:
    with pytest.raises(StoreError, match="DQ_DATABASE_URL") as caught:
        JobStore(url)
    assert "hunter2" not in str(caught.value)


def test_an_unreachable_database_is_a_store_error() -> None:
    store = JobStore("postgresql://nobody@127.0.0.1:1/nothing")
    with pytest.raises(StoreError, match="cannot open the job store"):
        store.get("x")


def test_default_url_comes_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datus_queue.tasks.settings import get_settings

    monkeypatch.setenv("DQ_DATABASE_URL", f"sqlite:///{tmp_path / 'from-env.db'}")
    get_settings.cache_clear()
    try:
        store = JobStore()
        assert store.url.endswith("from-env.db")
        _new_job(store)
        store.close()
        assert (tmp_path / "from-env.db").exists()
    finally:
        get_settings.cache_clear()


def test_conditional_updates_leave_final_rows_alone(store: JobStore) -> None:
    """The WHERE clauses hold even against a writer that skips the store's own checks."""
    job_id = _new_job(store)
    store.mark_running(job_id, 1)
    with store._writer.begin() as conn:  # as if another worker finished it a moment ago
        conn.execute(update(jobs).where(jobs.c.job_id == job_id).values(status="failed"))
    assert store.finish(job_id, JobStatus.SUCCEEDED, output="late") is False
    assert store.mark_running(job_id, 1) is None
    assert store.cancel(job_id) is JobStatus.FAILED


# -- tool-run checkpoints ---------------------------------------------------------------------


async def test_checkpoints_are_kept_in_order_once_per_place(store: JobStore) -> None:
    import sqlalchemy.exc

    job_id, _ = store.create_job("job-cp", JobRequest(model="openai", kind="tool_run", prompt="x"), "openai")
    steps = [{"kind": "turn", "turn": 1, "message": {"role": "assistant", "content": "a"}},
             {"kind": "tool", "turn": 1, "call": 0, "message": {"role": "tool", "content": "b"}}]
    # one loop turn: both go in the group commit's one transaction, with a status write
    results = await asyncio.gather(store.acheckpoint(job_id, 1, 0, "turn", steps[0]),
                                   store.amark_running(job_id, 1),
                                   store.acheckpoint(job_id, 1, 1, "tool", steps[1]))
    assert results[0] is True and results[2] is True and results[1] is not None
    assert store.checkpoints(job_id) == steps == await store.acheckpoints(job_id)
    with pytest.raises(sqlalchemy.exc.IntegrityError):  # another delivery recorded that place first
        await store.acheckpoint(job_id, 1, 1, "tool", steps[1])
    assert store.checkpoints(job_id) == steps and store.checkpoints("job-other") == []
