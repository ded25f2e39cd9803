"""How a delivery of a job message ends (tasks/outcomes.py), in process against a real Redis, a
SQLite job store and the fake provider: a closed set of types — the job finished, retries, comes
back later, or the delivery is dropped — and which errors are the infrastructure's.

The worker end to end (real `dq worker` processes) is in test_jobs_faults.py and
test_malformed_messages.py; here each case is one delivery, `execute` / `run_message` awaited."""

from __future__ import annotations

import errno
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import kombu.exceptions
import pytest
import redis.exceptions
import sqlalchemy.exc

from datus.models.config import AgentConfig
from datus.models.errors import ModelConnectionError, RateLimitError
from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks.context import JobContext
from datus_queue.tasks.events import read_events
from datus_queue.tasks.jobs import COME_BACK_MARGIN_S, execute, run_message
from datus_queue.tasks.messages import JobMessage, Malformed, header_problem, parse_delivery, parse_job, valid_id
from datus_queue.tasks.outcomes import ComeBack, Dropped, DropReason, Finished, Retry, is_infrastructure
from datus_queue.tasks.schemas import JobRequest, JobStatus
from tests.tasks.conftest import JobEnv, generations


@pytest.fixture
async def ctx(job_env: JobEnv) -> AsyncIterator[JobContext]:
    context = JobContext(job_env.settings(), AgentConfig.from_file(job_env.agent_yml))  # the default settings
    yield context
    await context.aclose()
    context.store.close()


def payload(prompt: str) -> dict[str, Any]:
    return {"provider": "openai", "request": {"model": "openai", "prompt": prompt, "stream": False}}


def queued(ctx: JobContext, job_id: str, prompt: str = "hello") -> str:
    return ctx.store.create_job(job_id, JobRequest(model="openai", prompt=prompt), "openai")[0]


# -- the outcomes of one delivery --------------------------------------------------------------------


async def test_a_delivery_that_runs_the_job_finishes_it(ctx: JobContext, fake: FakeProviderServer) -> None:
    job_id = queued(ctx, "j-run")
    assert await execute(job_id, payload("hello"), context=ctx) == Finished(JobStatus.SUCCEEDED)
    assert ctx.store.get(job_id).status is JobStatus.SUCCEEDED
    # the same message again (a redelivery after the result): nothing to do, no second call
    assert await execute(job_id, payload("hello"), context=ctx) == Dropped(DropReason.FINAL)
    assert len(generations(fake, "hello")) == 1


async def test_a_duplicate_that_meets_a_live_lease_comes_back_when_the_lease_can_have_lapsed(
        ctx: JobContext, fake: FakeProviderServer) -> None:
    job_id = queued(ctx, "j-leased")
    running = ctx.store.mark_running(job_id, 1, ctx.settings.lease_s)  # another delivery has run 1
    before = datetime.now(UTC)
    outcome = await execute(job_id, payload("leased"), context=ctx)  # a duplicate of run 1
    after = datetime.now(UTC)

    assert isinstance(outcome, ComeBack)
    # back just after the lease's end, wherever in between the countdown was taken (a live worker
    # renews the lease meanwhile: the duplicate then comes back again)
    back_at = running.lease_until + timedelta(seconds=COME_BACK_MARGIN_S)
    assert before + timedelta(seconds=outcome.countdown) <= back_at <= after + timedelta(seconds=outcome.countdown)
    assert generations(fake) == []  # no model call next to the running one
    assert ctx.store.get(job_id).deliveries == 1  # and it is not counted as a start of the run


async def test_a_stale_delivery_is_dropped(ctx: JobContext, fake: FakeProviderServer) -> None:
    newer = queued(ctx, "j-newer")
    ctx.store.mark_running(newer, 2, ctx.settings.lease_s)  # run 2 has it: a message of run 1 is stale
    assert await execute(newer, payload("x"), retries=0, context=ctx) == Dropped(DropReason.SUPERSEDED)
    assert generations(fake) == []


async def test_a_message_for_no_job_of_this_store_is_dead_lettered(ctx: JobContext) -> None:
    assert await execute("j-nowhere", payload("x"), context=ctx) == Dropped(DropReason.REJECTED)
    [letter] = ctx.store.dead_letters()
    assert letter.dead_id == "j-nowhere" and "no such job" in letter.reason


async def test_a_retryable_model_error_is_a_retry_and_a_permanent_one_fails(ctx: JobContext,
                                                                          fake: FakeProviderServer) -> None:
    from datus.models.scripted import Fault

    fake.script.add(Fault("status", status=503), match="flaky")
    fake.script.add(Fault("status", status=401), match="denied")
    flaky, denied = queued(ctx, "j-flaky", "flaky"), queued(ctx, "j-denied", "denied")  # the store is the truth
    outcome = await execute(flaky, payload("flaky"), context=ctx)
    assert isinstance(outcome, Retry) and outcome.infra_retries == 0 and outcome.error.retryable
    assert ctx.store.get(flaky).status is JobStatus.RETRYING
    assert await execute(denied, payload("denied"), context=ctx) == Finished(JobStatus.FAILED,
                                                                            "model_authentication_error")


async def test_a_request_the_worker_cannot_run_fails_at_once_as_an_internal_error(
        ctx: JobContext, fake: FakeProviderServer, caplog: pytest.LogCaptureFixture) -> None:
    """A message whose content is not text passes the client's checks and breaks the model layer's
    `to_messages` (ValueError): a bug's stand-in, with no code changed for the test."""
    bad = {"model": "openai", "messages": [{"role": "user", "content": 42}]}
    job_id = ctx.store.create_job("j-bug", JobRequest.model_validate(bad), "openai")[0]  # the store is the truth
    message = JobMessage(task_name="dq.generate", task_id=job_id, job_id=job_id, payload={"provider": "openai"})

    with caplog.at_level("WARNING", logger="datus_queue.tasks.jobs"):
        assert await run_message(message, ctx) == Finished(JobStatus.FAILED, "internal_error")
    row = ctx.store.get(job_id)
    assert row.status is JobStatus.FAILED and row.error.code == "internal_error" and row.error.type == "ValueError"
    [record] = [r for r in caplog.records if r.name == "datus_queue.tasks.jobs"]  # one line, its traceback, no retry
    assert record.levelname == "ERROR" and record.exc_info is not None and job_id in record.getMessage()
    assert generations(fake) == []
    [terminal] = [event for event in read_events(ctx.redis, job_id) if event.terminal]
    assert terminal.status is JobStatus.FAILED and terminal.step["output"]["code"] == "internal_error"


async def test_a_malformed_message_fails_the_job_waiting_for_it_and_leaves_a_running_one_alone(
        ctx: JobContext) -> None:
    waiting, running = queued(ctx, "j-waiting"), queued(ctx, "j-running")
    ctx.store.mark_running(running, 1, ctx.settings.lease_s)
    for job_id in (waiting, running):
        assert await run_message(Malformed("the 'retries' header is a str", job_id), ctx) == Dropped(
            DropReason.REJECTED)
    assert ctx.store.get(waiting).status is JobStatus.FAILED
    assert ctx.store.get(waiting).error.code == "invalid_message"
    assert ctx.store.get(running).status is JobStatus.RUNNING  # a stray: its own delivery finishes it
    assert {letter.dead_id for letter in ctx.store.dead_letters()} == {waiting, running}
    [terminal] = [event for event in read_events(ctx.redis, waiting) if event.terminal]
    assert terminal.status is JobStatus.FAILED


def test_finished_takes_a_final_status_only() -> None:
    with pytest.raises(ValueError, match="final status"):
        Finished(JobStatus.RUNNING)


# -- reading a message -------------------------------------------------------------------------------


REQUEST = {"id": "job-1", "task": "dq.generate", "retries": 2, "dq_infra_retries": 1, "argsrepr": "(label)",
           "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
           "delivery_info": {"routing_key": "llm.openai", "priority": 6}}


def test_a_job_message_is_read_into_its_parts() -> None:
    message = parse_job("dq.generate", REQUEST, ["job-1", payload("x")], {}, {})
    assert message == JobMessage(task_name="dq.generate", task_id="job-1", job_id="job-1", payload=payload("x"),
                                 retries=2, infra_retries=1, trace_headers={"traceparent": REQUEST["traceparent"]},
                                 priority=6, queue="llm.openai", argsrepr="(label)")
    by_name = parse_job("dq.generate", REQUEST, [], {"job_id": "job-1", "payload": payload("x")}, None)
    assert isinstance(by_name, JobMessage) and by_name.payload == payload("x")


@pytest.mark.parametrize(("args", "kwargs", "options", "headers", "why"), [
    (["job-1", {}], {}, {}, {"retries": "abc"}, "'retries' header is of type str"),
    (["job-1", {}], {}, {}, {"retries": True}, "'retries' header is of type bool"),
    (["job-1", {}], {}, {}, {"retries": -1}, "out of range"),
    (["job-1", {}], {}, {}, {"retries": 10 ** 30}, "out of range"),
    (["job-1", {}], {}, {}, {"dq_infra_retries": 2.5}, "'dq_infra_retries' header is of type float"),
    (["job-1", {}], {}, {}, {"tracestate": 7}, "'tracestate' header is of type int"),
    (["job-1", {}], {}, {}, {"timelimit": [1]}, "not [hard, soft]"),
    (["job-1", {}], {}, "embed", {}, "options are a str"),
    ("job-1", {}, {}, {}, "arguments are a str"),
    (["job-1", {}], ["x"], {}, {}, "a list and a list"),
    (["job-1"], {}, {}, {}, "take (job_id, payload)"),
    (["job-1", {}, 3], {}, {}, {}, "take (job_id, payload)"),
    ([12345, {}], {}, {}, {}, "not a job id"),
    (["x" * 256, {}], {}, {}, {}, "not a job id"),
    (["bad\x00id", {}], {}, {}, {}, "not a job id"),
])
def test_a_malformed_job_message_says_what_is_wrong_and_which_job_it_names(
        args: Any, kwargs: Any, options: Any, headers: dict[str, Any], why: str) -> None:
    parsed = parse_job("dq.generate", {**REQUEST, **headers}, args, kwargs, options)
    assert isinstance(parsed, Malformed) and why in parsed.reason, parsed
    # the job a malformed message names: its job id when it has one, else its message id
    assert parsed.job_id == "job-1"


def test_an_undecodable_body_is_malformed_never_an_exception() -> None:
    from kombu.serialization import prepare_accept_content

    accept = prepare_accept_content(["json"])
    for body, content_type in ((b"{not json", "application/json"), (b"\x80\x04K\x01.", "application/x-python-serialize"),
                               (b"[" * 100_000 + b"]" * 100_000, "application/json"), (b"[1, 2]", "application/json"),
                               (object(), "application/json")):
        parsed = parse_delivery("dq.generate", "job-1", REQUEST, body, content_type, "utf-8", accept)
        assert isinstance(parsed, Malformed) and parsed.job_id == "job-1", (body, parsed)


def test_headers_celery_reads_before_the_job_are_checked() -> None:
    good = {"id": "job-1", "task": "dq.generate", "eta": None, "expires": None, "timelimit": [None, None]}
    assert header_problem(good, {"priority": 0}, 3600) is None
    assert "not a mapping" in header_problem(["task"])
    assert "no id" in header_problem({key: value for key, value in good.items() if key != "id"})
    assert "'id' header is of type NoneType" in header_problem({**good, "id": None})
    assert "expires" in header_problem({**good, "expires": "2030-01-01T00:00:00"})  # a job's deadline is in its request
    assert "ISO 8601" in header_problem({**good, "eta": "soon"})
    assert "visibility timeout" in header_problem({**good, "eta": "2999-01-01T00:00:00+00:00"}, None, 3600)
    assert "priority" in header_problem(good, {"priority": "high"})
    assert "stamped_headers" in header_problem({**good, "stamped_headers": [1]})


def test_valid_ids() -> None:
    assert valid_id("0f3c-job_1.x") == "0f3c-job_1.x"
    assert [valid_id(bad) for bad in ("", "a" * 256, "a\nb", "a\x00b", 5, None, ["a"])] == [None] * 7


# -- which errors are the infrastructure's -----------------------------------------------------------


def _caused(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize("exc", [
    redis.exceptions.ConnectionError("refused"), redis.exceptions.TimeoutError("slow"),
    redis.exceptions.BusyLoadingError("loading"), redis.exceptions.ReadOnlyError("replica"),
    kombu.exceptions.OperationalError("broker"),
    sqlalchemy.exc.OperationalError("UPDATE jobs", {}, Exception("server closed the connection")),
    sqlalchemy.exc.InterfaceError("SELECT 1", {}, Exception("connection already closed")),
    sqlalchemy.exc.TimeoutError("QueuePool limit reached"),
    sqlalchemy.exc.DBAPIError("SELECT 1", {}, Exception("gone"), connection_invalidated=True),
    ConnectionResetError(errno.ECONNRESET, "reset"), TimeoutError("timed out"), socket.gaierror(-2, "no such host"),
    OSError(errno.EHOSTUNREACH, "no route to host"),
    _caused(RuntimeError("the store's writer gave up"), ConnectionRefusedError(errno.ECONNREFUSED, "refused")),
    ExceptionGroup("both", [redis.exceptions.ConnectionError("a"), ConnectionResetError("b")]),
], ids=lambda exc: type(exc).__name__)
def test_infrastructure_errors(exc: BaseException) -> None:
    assert is_infrastructure(exc)


@pytest.mark.parametrize("exc", [
    TypeError("unsupported operand"), KeyError("usage"), AttributeError("no attribute"), ValueError("bad value"),
    RuntimeError("the tool run ended without a final answer"), ZeroDivisionError(),
    redis.exceptions.ResponseError("WRONGTYPE"), redis.exceptions.DataError("invalid input"),
    sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("duplicate key")),
    sqlalchemy.exc.DBAPIError("SELECT 1", {}, Exception("bad"), connection_invalidated=False),
    FileNotFoundError(errno.ENOENT, "no such file"), PermissionError(errno.EACCES, "denied"),
    # a model's own connection errors are the model's: its retry policy decides about them
    _caused(ModelConnectionError("could not connect", provider="openai"), ConnectionRefusedError("refused")),
    RateLimitError("slow down", provider="openai"),
    ExceptionGroup("mixed", [redis.exceptions.ConnectionError("a"), KeyError("b")]),
], ids=lambda exc: type(exc).__name__)
def test_bugs_and_model_errors_are_not_infrastructure(exc: BaseException) -> None:
    assert not is_infrastructure(exc)
