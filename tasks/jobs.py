"""Running one job: the plain functions behind the thin Celery tasks.

A delivery of a job message (see docs/architecture.md), `run_message`: a message that cannot be a
job's is dead-lettered (`tasks.messages`); otherwise `execute` validates the payload, claims the
row under a lease (a job that is already final, or running under another delivery's lease, makes
no second model call); too many starts of one run → dead letter; the model runs while the
process renews the lease (`tasks.leases`), publishing every step; the result is written to the
store *before* the task returns (the message is acknowledged after that); the terminal event is
published. Each delivery ends in exactly one `tasks.outcomes` type:

- `Finished`: the job is final: succeeded, failed (a permanent model error at once, with the
  provider's message; a retryable one once its retries are spent), dead, cancelled.
- `Retry`: a retryable model error, a limiter's hand-back (`Deferred`), or Redis or the store
  failing (`is_infrastructure`; at most `INFRA_RETRIES` in a row, then the job fails with
  ``infrastructure_error`` once that can be recorded). Countdown = max(Retry-After, full-jitter
  backoff) for a model error, capped to the visibility margin (`retry_ceiling`).
- `ComeBack`: the run is running under another delivery's live lease: this duplicate comes back
  once the lease can have lapsed — to find the job final, or to take it over from a dead worker.
- `Dropped`: final already, superseded by a newer run, or rejected.

Any other exception is a bug: the job fails at once with ``internal_error``, logged once with its
traceback — never retried.

Provider limits (``tasks.ratelimit``): rate-limit and overload answers, and cooldowns, are retried
until the job's time budget (``DQ_RATE_LIMIT_MAX_WAIT_S`` from the first one, or the job's
``deadline``) and are not counted against the model's ``max_retries``; other retryable errors keep
that attempt budget. Runs that only waited for the limiter are not attempts: the store's run
number (``runs``; a message's ``retries + 1``, the stale-message guard) counts them, ``attempts``
(``runs - rate_limit_waits - caller_waits``; the caller's waits, `tasks.caller_tools`) does not.

Tool runs are durable (`tasks.checkpoints`): every completed step is checkpointed before the next
one, and any new delivery of the job resumes from the checkpoints. So a retryable error in any
turn, and Redis or the store failing mid-run, are retries that resume.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from celery.exceptions import Reject
from celery.exceptions import Retry as CeleryRetry
from pydantic import ValidationError

from datus.models.errors import ModelError
from datus.models.retry import RetryPolicy, is_rate_limited
from datus.models.usage import Usage, track_usage
from datus.schemas.action_history import ActionHistory, ActionRole, ActionStatus
from datus_queue.tasks.caller_tools import (
    REQUEST_STEP,
    CallerGone,
    CallerToolTimeout,
    CallerToolWait,
    all_answered,
    mark_sent,
)
from datus_queue.tasks.checkpoints import RunSuperseded
from datus_queue.tasks.context import JobContext, get_context
from datus_queue.tasks.databases import database_refusal
from datus_queue.tasks.execution import run_coroutine
from datus_queue.tasks.messages import JobMessage, Malformed, error_step, parse_job, reject, send_again
from datus_queue.tasks.observability import metrics, traces
from datus_queue.tasks.outcomes import ComeBack, Dropped, DropReason, Finished, Outcome, Retry, is_infrastructure
from datus_queue.tasks.ratelimit import DeadlineExceeded, Deferred, JobWait, RateLimitWaitExceeded, current_job
from datus_queue.tasks.runner import JobCancelled, JobRunner, cancel_flag_set
from datus_queue.tasks.schemas import JobError, JobRequest, JobStatus, TaskPayload
from datus_queue.tasks.settings import Settings

if TYPE_CHECKING:
    from datus_queue.tasks.store import StoredJob

__all__ = ["INFRA_RETRIES", "execute", "job_error", "report", "retry_ceiling", "run_message", "run_task"]

logger = logging.getLogger("datus_queue.tasks.jobs")
INFRA_RETRIES = 8  # in a row (a job's other retries — rate limits above all — do not count)
COME_BACK_MARGIN_S = 1.0  # after a lease's end: the clocks of the worker that set it and this one may differ


def run_task(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Outcome:
    """The body of every job task under Celery's own pools (prefork, solo): run the delivery's
    coroutine, publish a `Retry` or `ComeBack` as a new message (this one is then acknowledged)
    and requeue a job cancelled at shutdown. The worker's own pool (`workers.pool`) awaits
    `run_message` on its event loop instead."""
    message = parse_job(task.name, vars(task.request), args, kwargs)
    try:
        outcome = run_coroutine(run_message(message))
    except (asyncio.CancelledError, concurrent.futures.CancelledError):
        # the worker is shutting down and cancelled the job: back to the queue at once
        raise Reject("worker shutting down", requeue=True) from None
    if isinstance(outcome, (Retry, ComeBack)) and isinstance(message, JobMessage):
        raise report(task.app, message, outcome)
    return outcome


def report(app: Any, message: JobMessage, outcome: Retry | ComeBack) -> BaseException:
    """Publish ``message`` again for ``outcome``, and what the delivery then reports to Celery:
    ``Retry`` (acknowledged: the new message carries the job on), or when the broker failed,
    ``Reject(requeue=True)`` (this message goes back to the queue: the job is never dropped)."""
    try:
        send_again(app, message, outcome)
    except Exception as exc:
        if is_infrastructure(exc):
            logger.warning("could not publish job %s again (%s: %s); requeueing this delivery", message.job_id,
                           type(exc).__name__, _brief(exc))
            return Reject("not published again", requeue=True)
        # not the broker: the row stays retrying (or running elsewhere) and the sweeper sends it again
        logger.error("job %s could not be published again", message.job_id, exc_info=exc)
        return exc
    what = "retry" if isinstance(outcome, Retry) else "back"
    return CeleryRetry(f"{what} in {outcome.countdown:.2f}s", when=outcome.countdown)


async def run_message(message: JobMessage | Malformed, context: JobContext | None = None) -> Outcome:
    """One delivery of a job message. A `Malformed` one is dead-lettered (`Dropped`); otherwise
    the job runs (`execute`). Redis or the job store failing around the job gives a `Retry`, at
    most `INFRA_RETRIES` in a row (``message.infra_retries``: so far, from its header); any other
    exception is a bug, which fails the job at once (``internal_error``). Cancellation
    (shutdown) propagates."""
    ctx = context or get_context()
    if isinstance(message, Malformed):
        try:
            await asyncio.to_thread(reject, ctx, message.reason, message.job_id, queue=message.queue)
        except Exception as exc:  # noqa: BLE001 - acknowledged regardless: a message nobody can run must not stay
            logger.error("could not record the dead letter of message %s (%s: %s): %s", message.job_id or "(no id)",
                         type(exc).__name__, exc, message.reason)
        return Dropped(DropReason.REJECTED)
    try:
        return await execute(message.job_id, message.payload, retries=message.retries, context=ctx,
                             trace_context=message.trace_headers)
    except Exception as exc:
        if is_infrastructure(exc):
            return await _infrastructure_error(ctx, message, exc)
        # one record, its traceback ending in the exception's message: the job fails, never retried
        logger.error("job %s failed with an internal error (%s)", message.job_id, type(exc).__name__, exc_info=exc)
        error = JobError(code="internal_error", type=type(exc).__name__, message=str(exc) or type(exc).__name__)
        try:
            return await _fail(ctx, message.job_id, error, message.retries + 1)
        except Exception as again:
            if is_infrastructure(again):  # the failure could not be recorded: the next delivery records it
                return await _infrastructure_error(ctx, message, again)
            raise


async def _infrastructure_error(ctx: JobContext, message: JobMessage, exc: Exception) -> Outcome:
    done = message.infra_retries
    if done >= INFRA_RETRIES:
        error = JobError(code="infrastructure_error", type=type(exc).__name__,
                         message=f"{done} infrastructure retries in a row, the last: {_brief(exc)}", retryable=True)
        try:
            outcome = await _fail(ctx, message.job_id, error, message.retries + 1)
        except Exception as again:  # noqa: BLE001 - still down: it cannot fail either; try again later
            logger.warning("job %s: could not record its failure either (%s: %s)", message.job_id,
                           type(again).__name__, _brief(again))
        else:
            logger.error("job %s failed after %d infrastructure retries in a row: %s: %s", message.job_id, done,
                         type(exc).__name__, _brief(exc))
            return outcome
    countdown = min(60.0, 0.5 * 2 ** done)
    logger.warning("job %s: infrastructure error %s: %s; retry in %.1fs", message.job_id, type(exc).__name__,
                   _brief(exc), countdown)
    return Retry(countdown, job_error(exc), min(done + 1, INFRA_RETRIES))


async def _fail(ctx: JobContext, job_id: str, error: JobError, run: int) -> Finished | Dropped:
    """Fail the job outside a claimed run (a bug, the infrastructure given up on)."""
    if not await ctx.store.afinish(job_id, JobStatus.FAILED, error=error, run=run):
        return Dropped(DropReason.FINAL)
    await _terminal(ctx, job_id, JobStatus.FAILED, error_step(error))
    stored = await ctx.store.aget(job_id)
    if stored is not None:
        metrics.job_finished(stored.provider or "unknown", stored.kind.value if stored.kind else "unknown",
                             JobStatus.FAILED.value, error.code)
    return Finished(JobStatus.FAILED, error.code)


_CODES = {RateLimitWaitExceeded: "rate_limit_wait_exceeded", DeadlineExceeded: "deadline_exceeded",
          CallerGone: "caller_gone", CallerToolTimeout: "caller_tool_timeout"}


def job_error(exc: BaseException) -> JobError:
    """The stable code and message of what ended a run (or sent it back): the model's error, a
    limiter's, the infrastructure failing, or a bug (``internal_error``)."""
    if isinstance(exc, ModelError):
        return JobError(code=exc.slug, type=type(exc).__name__, message=exc.reason,
                        provider=exc.provider, status_code=exc.status_code, retryable=exc.retryable)
    if is_infrastructure(exc):
        return JobError(code="infrastructure_error", type=type(exc).__name__, message=_brief(exc), retryable=True)
    code = _CODES.get(type(exc), "internal_error")
    return JobError(code=code, type=type(exc).__name__, message=str(exc) or type(exc).__name__)


def _brief(exc: BaseException) -> str:
    """The first line of an infrastructure error: SQLAlchemy's go on with the statement and its
    parameters, which may hold a job's output."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def retry_ceiling(settings: Settings) -> float:
    """The longest countdown a retry may have: a message held for its countdown longer than
    the visibility timeout would be handed to a second worker."""
    return min(settings.max_retry_countdown_s, settings.visibility_timeout_s * 0.5)


async def execute(job_id: str, payload: Any, retries: int = 0, context: JobContext | None = None,
                  trace_context: Mapping[str, Any] | None = None) -> Outcome:
    """One delivery of job ``job_id`` (a checked id) with ``payload`` as sent. A claimed run is
    traced when tracing is on (`tasks.observability.traces`): ``trace_context`` holds the
    message's trace headers."""
    ctx = context or get_context()
    try:
        task_payload = TaskPayload.model_validate(payload)
    except ValidationError as exc:
        await asyncio.to_thread(reject, ctx, f"invalid payload: {_first_error(exc)}", job_id, code="invalid_payload")
        return Dropped(DropReason.REJECTED)

    cancel_requested = await cancel_flag_set(ctx, job_id)  # in the loop turn's Redis pipeline
    run = retries + 1  # the store's guard against stale messages; limiter waits count here, not as attempts
    # the claim hands back the job's request: the message carries none (a message of the previous
    # format does, and it is ignored: the store is the truth)
    claimed = await ctx.store.amark_running(job_id, run, ctx.settings.lease_s)
    if claimed is None:
        return await _not_claimed(ctx, job_id, run)
    try:
        request = JobRequest.model_validate(claimed.request)
    except ValidationError as exc:  # a row written by hand, or by a version whose requests this one refuses
        error = JobError(code="invalid_request", type="InvalidRequest",
                         message=f"the job's stored request is invalid: {_first_error(exc)}")
        return await _finish_failed(ctx, job_id, JobStatus.FAILED, error, run)
    job = traces.JobInfo(job_id, task_payload.provider, run, request)
    with traces.traced_job(job, trace_context, ctx.settings) as trace:
        outcome = await _claimed_run(ctx, job_id, task_payload.provider, request, claimed, run,
                                     bool(cancel_requested))
        if trace is not None:
            trace.finish(outcome)
    return outcome


async def _not_claimed(ctx: JobContext, job_id: str, run: int) -> Outcome:
    """The store would not start this run: why, and what becomes of this delivery."""
    current = await ctx.store.aget(job_id)
    if current is None:
        await asyncio.to_thread(reject, ctx, "the job store has no such job", job_id)
        return Dropped(DropReason.REJECTED)
    if current.final:  # a redelivery after the result, or cancelled while queued
        logger.info("job %s is %s; this delivery ends", job_id, current.status.value)
        return Dropped(DropReason.FINAL)
    if current.runs > run or (current.status is JobStatus.RETRYING and current.runs == run):
        logger.info("job %s: run %d has it, this message is of run %d; this delivery ends", job_id, current.runs, run)
        return Dropped(DropReason.SUPERSEDED)  # a newer run's own message carries the job
    # the same run under another delivery's live lease: a duplicate (re-sent by the sweeper,
    # restored after the visibility timeout). It makes no model call now, and it is not dropped:
    # it comes back when the lease can have lapsed — to find the job final, or to take it over
    # from a worker that died (whose lease nobody renews)
    countdown = _lease_wait(ctx.settings, current.lease_until)
    logger.info("job %s: run %d is running elsewhere (lease until %s); this delivery comes back in %.1fs",
                job_id, current.runs, current.lease_until, countdown)
    return ComeBack(countdown)


def _lease_wait(settings: Settings, lease_until: datetime | None) -> float:
    remaining = 0.0 if lease_until is None else (lease_until - datetime.now(UTC)).total_seconds()
    return min(max(remaining, 0.0) + COME_BACK_MARGIN_S, retry_ceiling(settings))


async def _claimed_run(ctx: JobContext, job_id: str, provider: str, request: JobRequest, claimed: StoredJob, run: int,
                       cancel_requested: bool) -> Outcome:
    """The delivery holds the job's row: dead-letter it, refuse it, or run it."""
    kind = request.kind.value
    # poison: the run was started (claimed, not merely delivered: a duplicate delivery that
    # found the job running or final comes back or is dropped above, and counts for nothing) too many times
    redeliveries = claimed.deliveries - 1
    if redeliveries >= ctx.settings.dead_letter_threshold:
        reason = f"delivered {claimed.deliveries} times ({redeliveries} redeliveries without a result)"
        await asyncio.to_thread(ctx.store.record_dead_letter, job_id, reason, job_id=job_id)
        logger.warning("job %s dead-lettered: %s", job_id, reason)
        error = JobError(code="dead_letter", type="DeadLetter", message=reason)
        outcome = await _finish_failed(ctx, job_id, JobStatus.DEAD, error, run)
    elif not ctx.agent_config.is_model_allowed(request.model):  # sent around a client, or a config changed
        allowed = ", ".join(ctx.agent_config.allowed_model_patterns()) or "(none)"
        error = JobError(code="model_not_allowed", type="ModelNotAllowed",
                         message=f"model {request.model!r} is not allowed on this worker (agent.allowed_models: "
                                 f"{allowed})")
        outcome = await _finish_failed(ctx, job_id, JobStatus.FAILED, error, run)
    elif (refusal := await database_refusal(ctx, request)) is not None:  # sent around a client, or config changed
        error = JobError(code="database_not_allowed", type="DatabaseNotAllowed", message=refusal)
        outcome = await _finish_failed(ctx, job_id, JobStatus.FAILED, error, run)
    else:
        # any start but the very first may find steps of an earlier delivery to resume from (a
        # re-send by the sweeper counts as a delivery of the same run)
        resuming = run > 1 or claimed.deliveries > 1
        if not resuming:
            metrics.first_start(provider, kind, claimed.created_at)
        with metrics.in_flight(provider), track_usage() as calls:
            try:
                async with ctx.leases.hold(job_id):
                    outcome = await _run(ctx, job_id, request, claimed, run, cancel_requested, resuming)
            finally:
                metrics.model_calls(calls)
    match outcome:
        case Retry(error=error):
            metrics.job_retried(provider, error.code)
        case Finished(status=status, error_code=code):
            metrics.job_finished(provider, kind, status.value, code)
    return outcome


async def _finish_failed(ctx: JobContext, job_id: str, status: JobStatus, error: JobError,
                         run: int) -> Finished | Dropped:
    """End the claimed run failed (or dead) with ``error``, before any model call."""
    if await ctx.store.afinish(job_id, status, error=error, run=run):
        await _terminal(ctx, job_id, status, error_step(error))
        return Finished(status, error.code)
    return Dropped(DropReason.FINAL)


def _job_wait(ctx: JobContext, job_id: str, request: JobRequest, stored: StoredJob) -> JobWait:
    """What the job's requests tell the limiter: its lane, its ticket, its time budget."""
    settings = ctx.settings
    deadline = request.deadline.timestamp() if request.deadline is not None else None
    since = stored.rate_limited_since.timestamp() if stored.rate_limited_since else time.time()
    budget_end = deadline if deadline is not None else since + settings.rate_limit_max_wait_s
    lane = 1 if request.batch_id is not None and settings.batch_priority > 0 else 0
    return JobWait(job_id, lane=lane, ticket_us=stored.rate_ticket or 0, budget_end=budget_end, deadline=deadline)


async def _run(ctx: JobContext, job_id: str, request: JobRequest, stored: StoredJob, run: int,
               cancel_requested: bool, resuming: bool = False) -> Outcome:
    """Run the claimed job; ``run`` is its run number (``stored.runs``, what the store writes),
    ``stored.attempts`` its attempt (the runs that were not limiter waits). The model's failures
    are outcomes here; anything else it raises (Redis, the store, a bug) is `run_message`'s to sort."""
    runner = JobRunner(ctx, job_id, request, cancel_requested, run, resuming)
    token = current_job.set(_job_wait(ctx, job_id, request, stored))
    try:
        with track_usage() as calls:
            output, sql_contexts = await runner.run()
    except RunSuperseded as exc:  # another delivery of this job is running it: leave it that one
        logger.warning("%s; this delivery stops", exc)
        return Dropped(DropReason.SUPERSEDED)
    except JobCancelled:
        if await ctx.store.afinish(job_id, JobStatus.CANCELLED, run=run):
            await _terminal(ctx, job_id, JobStatus.CANCELLED, ActionHistory.create_action(
                ActionRole.WORKFLOW, "cancelled", "cancelled", None, None, ActionStatus.FAILED))
            return Finished(JobStatus.CANCELLED)
        return Dropped(DropReason.FINAL)
    except Deferred as deferred:
        return await _deferred(ctx, job_id, stored, run, deferred)
    except CallerToolWait as wait:
        return await _caller_wait(ctx, job_id, stored, run, wait)
    except (ModelError, RateLimitWaitExceeded, DeadlineExceeded, CallerGone) as exc:
        return await _failed(ctx, job_id, request, stored, run, exc)
    finally:
        current_job.reset(token)
    traces.job_output(output)
    # a resumed tool run's usage covers the turns it replayed, which made no call this time
    usage = runner.usage or (sum(calls, Usage()) if calls else Usage())
    won = await ctx.store.afinish(
        job_id, JobStatus.SUCCEEDED, output=output, sql_contexts=sql_contexts,
        usage=usage.model_dump(), cost_usd=usage.cost_usd, run=run,
    )
    if not won:
        return Dropped(DropReason.FINAL)  # another delivery or a cancel made it final
    final = runner.final_step or runner.final_response(output)
    if isinstance(final.output, dict):
        final.output = {**final.output, "usage": usage.model_dump()}
    await _terminal(ctx, job_id, JobStatus.SUCCEEDED, final)
    return Finished(JobStatus.SUCCEEDED)


async def _deferred(ctx: JobContext, job_id: str, stored: StoredJob, run: int, deferred: Deferred) -> Outcome:
    """The limiter handed the job back: a retry after its wait (capped to the visibility
    margin: a longer wait comes back and waits again, keeping its ticket). It made no
    request, so it is not an attempt."""
    attempt = stored.attempts
    countdown = min(deferred.wait_s, retry_ceiling(ctx.settings))
    since = stored.rate_limited_since or (datetime.now(UTC) if deferred.rate_limited else None)
    error = JobError(code="rate_limit_wait", type="RateLimitWait", message=str(deferred), provider=stored.provider,
                     retryable=True)
    if not await ctx.store.amark_retrying(job_id, run, error, countdown, rate_limit_retries=stored.rate_limit_retries,
                                          rate_limit_waits=stored.rate_limit_waits + 1, rate_limited_since=since,
                                          rate_ticket=deferred.ticket_us or None):
        return Dropped(DropReason.FINAL)  # cancelled meanwhile: do not come back
    await ctx.publisher.publish(job_id, ActionHistory.create_action(
        ActionRole.WORKFLOW, "rate_limit_wait", f"{deferred}: back in {countdown:.2f}s", None,
        {"countdown_s": countdown, "wait_s": deferred.wait_s, "attempt": attempt, "rate_limited": deferred.rate_limited},
        ActionStatus.PROCESSING))
    logger.info("job %s attempt %d: %s; back in %.2fs", job_id, attempt, deferred, countdown)
    return Retry(countdown, error)


async def _caller_wait(ctx: JobContext, job_id: str, stored: StoredJob, run: int, wait: CallerToolWait) -> Outcome:
    """The model called the caller's own tools (`tasks.caller_tools`): the job is handed back,
    holding no slot, until the caller's answers re-send it (`JobClient.send_tool_results`) or
    the wait's bound is due (then the next run looks again: the caller still beating, it waits
    on; gone, past its tool's bound or the job's deadline, the job fails). Marked retrying
    *before* the request is published, so the caller's re-send always finds the job waiting.
    Counted in ``caller_waits``, not as an attempt: no model request was made. The turn's calls
    not requested yet go out in one step; a later look publishes nothing."""
    countdown = min(max(wait.wait_s, 0.0) + COME_BACK_MARGIN_S, retry_ceiling(ctx.settings))
    error = JobError(code="caller_tool_wait", type="CallerToolWait", message=str(wait), provider=stored.provider,
                     retryable=True)
    if not await ctx.store.amark_retrying(job_id, run, error, countdown, caller_waits=stored.caller_waits + 1):
        return Dropped(DropReason.FINAL)  # cancelled meanwhile: do not come back
    unsent = [call for call in wait.calls if not call.sent]
    if unsent:
        await ctx.publisher.publish(job_id, ActionHistory.create_action(
            ActionRole.WORKFLOW, REQUEST_STEP, f"the caller runs its tool(s) {', '.join(c.name for c in unsent)}",
            None, {"calls": [call.asked() for call in unsent], "timeout_s": ctx.settings.caller_tool_timeout_s,
                   "liveness_s": ctx.settings.caller_liveness_s, "run": run}, ActionStatus.PROCESSING))
        await mark_sent(ctx, job_id, unsent)
    if await all_answered(ctx, job_id, wait.calls):  # while this run looked: the caller's re-send found it running
        countdown = 0.0
    logger.info("job %s: %s; back in %.2fs at the latest", job_id, wait, countdown)
    return Retry(countdown, error)


async def _failed(ctx: JobContext, job_id: str, request: JobRequest, stored: StoredJob, run: int,
                  exc: ModelError | RateLimitWaitExceeded | DeadlineExceeded | CallerGone) -> Outcome:
    """The model failed: a retry if the error is retryable and the job's budget allows, else
    the job fails with the provider's message."""
    error = job_error(exc)
    attempt = stored.attempts
    if isinstance(exc, ModelError) and exc.retryable:  # a tool run resumes from its checkpoints
        retry = _retry_countdown(ctx, request, stored, exc)
        if isinstance(retry, str):
            error = error.model_copy(update={"message": f"{error.message} ({retry})"})
        else:
            countdown, rate_limit = retry
            await ctx.store.amark_retrying(job_id, run, error, countdown, **rate_limit)
            await ctx.publisher.publish(job_id, ActionHistory.create_action(
                ActionRole.WORKFLOW, "retry", f"{error.type}: retrying in {countdown:.2f}s", None,
                {"error": error.model_dump(), "countdown_s": countdown, "attempt": attempt,
                 "rate_limited": bool(rate_limit)}, ActionStatus.PROCESSING))
            logger.info("job %s attempt %d: %s; retry in %.2fs", job_id, attempt, error.type, countdown)
            return Retry(countdown, error)
    traces.job_error(error)
    if await ctx.store.afinish(job_id, JobStatus.FAILED, error=error, run=run):
        await _terminal(ctx, job_id, JobStatus.FAILED, error_step(error))
        return Finished(JobStatus.FAILED, error.code)
    return Dropped(DropReason.FINAL)  # another delivery or a cancel made it final


def _retry_countdown(ctx: JobContext, request: JobRequest, stored: StoredJob,
                     exc: ModelError) -> tuple[float, dict[str, Any]] | str:
    """The retry of a retryable model error: ``(countdown, rate-limit bookkeeping)``, or why
    not. The model's own policy decides the delay (the job's model object tries each request
    once). Rate-limit and overload answers spend the job's time budget, not its attempts;
    other errors spend attempts. The countdown is capped to the visibility margin."""
    policy = RetryPolicy.from_config(ctx.model(request.model, in_process_retries=False).model_config)
    settings = ctx.settings
    if is_rate_limited(exc):
        times = stored.rate_limit_retries + 1
        delay = max(exc.retry_after or 0.0, policy.backoff(times))
        now = datetime.now(UTC)
        since = stored.rate_limited_since or now
        if request.deadline is not None:
            end, budget = request.deadline, "the job's deadline"
        else:
            end = since + timedelta(seconds=settings.rate_limit_max_wait_s)
            budget = f"DQ_RATE_LIMIT_MAX_WAIT_S={settings.rate_limit_max_wait_s:g}"
        if now + timedelta(seconds=delay) > end:
            return f"gave up: rate limited since {since.isoformat(timespec='seconds')}, past {budget}"
        return min(delay, retry_ceiling(settings)), {"rate_limit_retries": times, "rate_limit_waits": stored.rate_limit_waits,
                                                     "rate_limited_since": since}
    counted = stored.attempts - stored.rate_limit_retries  # the attempts that spend max_retries
    delay = policy.delay_for(exc, counted)
    if delay is None:
        return f"gave up after {counted} attempts (max_retries)"
    return min(delay, retry_ceiling(settings)), {}


async def _terminal(ctx: JobContext, job_id: str, status: JobStatus, step: ActionHistory) -> None:
    await ctx.publisher.publish(job_id, step, terminal=True, status=status)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "(payload)"
    return f"{where}: {error['msg']}"
