"""Running one job: the plain functions behind the thin Celery tasks.

A job's life on the worker (see docs/architecture.md): validate the payload; claim the row
under a lease (a job that is already final, or running under another delivery's lease, makes
no second model call); too many starts of one attempt → dead letter; run the model while
the process renews the lease (`tasks.leases`), publishing every step; write the result to the
store *before* the task returns (the message is acknowledged after that); publish the terminal
event. A retryable error asks Celery for a retry with countdown = max(Retry-After,
full-jitter backoff); a permanent one fails at once with the provider's message.

Provider limits (``tasks.ratelimit``): a wait the limiter hands back (`Deferred`) is a Celery
retry too (a tool run resumes from its checkpoints, so that is safe for them as well).
Rate-limit and overload answers, and cooldowns, are retried until the job's time budget
(``DQ_RATE_LIMIT_MAX_WAIT_S`` from the first one, or the job's ``deadline``) and are not counted
against the model's ``max_retries``; other retryable errors keep that attempt budget. A
countdown longer than the visibility margin is capped to it (the job comes back and waits
again), never a reason to fail. Runs that only waited for the limiter are not attempts:
the store's run number (``retries + 1``, the stale-message guard) counts them, ``attempts``
as read does not.

Tool runs are durable (`tasks.checkpoints`): every completed step is checkpointed before the
next one, and any new delivery of the job resumes from the checkpoints, publishing only the
steps no earlier delivery published. So a retryable error in any turn (one that outlasts the
model's in-process retries, or a tool server that died) is a job retry that resumes, and Redis
or the store failing mid-run is an infrastructure retry that resumes too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from celery.exceptions import Reject
from pydantic import ValidationError

from datus.models.errors import ModelError
from datus.models.messages import to_messages
from datus.models.retry import RetryPolicy, is_rate_limited
from datus.models.usage import Usage, track_usage
from datus.schemas.action_history import ActionHistory, ActionRole, ActionStatus
from datus_queue.tasks import keys
from datus_queue.tasks.checkpoints import RunSuperseded, StoreJournal
from datus_queue.tasks.context import JobContext, get_context
from datus_queue.tasks.execution import run_coroutine
from datus_queue.tasks.observability import metrics, traces
from datus_queue.tasks.ratelimit import DeadlineExceeded, Deferred, JobWait, RateLimitWaitExceeded, current_job
from datus_queue.tasks.schemas import (
    DATABASE_SERVER,
    FINAL_STATUSES,
    JobError,
    JobKind,
    JobRequest,
    JobStatus,
    TaskPayload,
)
from datus_queue.tasks.settings import Settings

if TYPE_CHECKING:
    from datus_queue.tasks.store import StoredJob

__all__ = [
    "JobCancelled",
    "RetryLater",
    "dead_letter_message",
    "execute",
    "run_message",
    "run_task",
    "shown_arguments",
]

logger = logging.getLogger("datus_queue.tasks.jobs")
_FINAL_VALUES = frozenset(status.value for status in FINAL_STATUSES)
INFRA_RETRIES = 8  # in a row (a job's other retries — rate limits above all — do not count)
INFRA_HEADER = "dq_infra_retries"  # carried by a retry message: infrastructure retries so far in a row
# a delivery starts: count it (expiring with the job's events) and read the cancel flag, in one call
@dataclass(frozen=True)
class RetryLater:
    countdown: float
    error: JobError
    infra_retries: int = 0  # infrastructure retries in a row, this one included (0: not one)

    def headers(self) -> dict[str, int]:
        """The headers of the retry message."""
        return {INFRA_HEADER: self.infra_retries}


class JobCancelled(Exception):
    pass


def run_task(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The body of every task under a thread or process pool: run the job's coroutine, turn
    ``RetryLater`` into a Celery retry (a new message with the same task id; this one is then
    acknowledged) and a cancelled job into a requeue. The worker's own pool
    (`workers.pool`) awaits `run_message` on its event loop instead."""
    request = vars(task.request)
    try:
        outcome = run_coroutine(run_message(args, kwargs, int(task.request.retries or 0),
                                            int(task.request.get(INFRA_HEADER) or 0), trace_context=request))
    except (asyncio.CancelledError, concurrent.futures.CancelledError):
        # the worker is shutting down and cancelled the job: back to the queue at once
        raise Reject("worker shutting down", requeue=True) from None
    if isinstance(outcome, RetryLater):
        raise task.retry(countdown=outcome.countdown, max_retries=None,
                         headers={**traces.carried_headers(request), **outcome.headers()}, **shown_arguments(request))
    return outcome


def shown_arguments(request: dict[str, Any]) -> dict[str, Any]:
    """A retry keeps the label JobClient gave the arguments (task events, Flower); left to
    Celery, the retry message would carry a repr of the whole request, prompt included."""
    return {"argsrepr": request.get("argsrepr") or "(job)", "kwargsrepr": request.get("kwargsrepr") or "{}"}


async def run_message(args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any], retries: int,
                      infra_retries: int = 0, trace_context: Mapping[str, Any] | None = None) -> Any:
    """One delivery of a job message: the task's return value (a dict), or `RetryLater`.

    Tasks take ``(job_id, payload)``; any other shape (a message not sent by JobClient) is
    dead-lettered here rather than failing inside Celery unrecorded. Redis or the job store
    failing around the job (not the model) gives `RetryLater` too, at most `INFRA_RETRIES`
    in a row (``infra_retries``: so far, from the message's header): the job is not lost, and
    the dead-letter threshold bounds how often. Cancellation (shutdown) propagates.
    ``trace_context``: the message's headers, where a W3C ``traceparent`` may ride."""
    named = dict(kwargs)
    values = list(args) + [named.pop(key) for key in ("job_id", "payload") if key in named]
    if len(values) != 2 or named:
        job_id = str(values[0]) if values else ""
        reason = f"job tasks take (job_id, payload); got {len(args)} positional and {sorted(kwargs)} keyword"
        await _dead_letter(get_context(), job_id, reason, None)
        return {"job_id": job_id, "status": "rejected"}
    job_id, payload = values
    try:
        return await execute(job_id, payload, retries=retries, trace_context=trace_context)
    except Exception as exc:
        if infra_retries >= INFRA_RETRIES:
            raise
        countdown = min(60.0, 0.5 * 2 ** infra_retries)
        logger.warning("job %s: infrastructure error %s: %s; retry in %.1fs", job_id, type(exc).__name__, exc,
                       countdown)
        return RetryLater(countdown, job_error(exc), infra_retries + 1)


async def dead_letter_message(task_id: str, reason: str) -> None:
    """Record a message whose body cannot be read (the worker's pool decodes bodies itself)."""
    await _dead_letter(get_context(), task_id, reason, None)


_CODES = {RateLimitWaitExceeded: "rate_limit_wait_exceeded", DeadlineExceeded: "deadline_exceeded"}


def job_error(exc: BaseException) -> JobError:
    if isinstance(exc, ModelError):
        return JobError(code=exc.slug, type=type(exc).__name__, message=exc.reason,
                        provider=exc.provider, status_code=exc.status_code, retryable=exc.retryable)
    code = _CODES.get(type(exc), "internal_error")
    return JobError(code=code, type=type(exc).__name__, message=str(exc) or type(exc).__name__)


def retry_ceiling(settings: Settings) -> float:
    """The longest countdown a retry may have: a message held for its countdown longer than
    the visibility timeout would be handed to a second worker."""
    return min(settings.max_retry_countdown_s, settings.visibility_timeout_s * 0.5)


async def execute(job_id: str, payload: Any, retries: int = 0, context: JobContext | None = None,
                  trace_context: Mapping[str, Any] | None = None) -> Any:
    """One delivery of a job. A claimed run is traced when tracing is on
    (`tasks.observability.traces`): ``trace_context`` holds the message's trace headers."""
    ctx = context or get_context()
    if not isinstance(job_id, str) or not job_id:
        await _dead_letter(ctx, str(job_id), "the job id is missing or not a string", payload)
        return {"job_id": str(job_id), "status": "rejected"}
    try:
        task_payload = TaskPayload.model_validate(payload)
    except ValidationError as exc:
        reason = f"invalid payload: {_first_error(exc)}"
        await _dead_letter(ctx, job_id, reason, payload)
        await ctx.store.afinish(job_id, JobStatus.FAILED,
                                error=JobError(code="invalid_payload", type="ValidationError", message=reason),
                                attempts=retries + 1)
        return {"job_id": job_id, "status": "rejected"}

    cancel_requested = await ctx.aredis.exists(keys.job_cancel(job_id))
    run_no = retries + 1  # the store's guard against stale messages; limiter waits count here, not as attempts
    claimed = await ctx.store.amark_running(job_id, run_no, ctx.settings.queued_lease_s)
    if claimed is None:  # already final (a redelivery after success), cancelled while queued, or
        current = await ctx.store.aget(job_id)  # running under another delivery's lease: no second call
        if current is not None and current.status is JobStatus.RUNNING:
            logger.info("job %s: attempt %d is running elsewhere (lease until %s); this delivery is dropped",
                        job_id, current.attempts, current.lease_until)
        return {"job_id": job_id, "status": current.status.value if current else "unknown"}
    job = traces.JobInfo(job_id, task_payload.provider, run_no, task_payload.request)
    with traces.traced_job(job, trace_context, ctx.settings) as trace:
        outcome = await _claimed_run(ctx, job_id, task_payload, claimed, run_no, bool(cancel_requested))
        if trace is not None:
            trace.finish(outcome)
    return outcome


async def _claimed_run(ctx: JobContext, job_id: str, task_payload: TaskPayload, claimed: StoredJob, run_no: int,
                       cancel_requested: bool) -> Any:
    """The delivery holds the job's row: dead-letter it, refuse it, or run it."""
    # poison: the attempt was started (claimed, not merely delivered: a duplicate delivery that
    # found the job running or final is dropped above and counts for nothing) too many times
    redeliveries = claimed.deliveries - 1
    if redeliveries >= ctx.settings.dead_letter_threshold:
        reason = f"delivered {claimed.deliveries} times ({redeliveries} redeliveries without a result)"
        await _dead_letter(ctx, job_id, reason, None)
        error = JobError(code="dead_letter", type="DeadLetter", message=reason)
        if await ctx.store.afinish(job_id, JobStatus.DEAD, error=error, attempts=run_no):
            await _terminal(ctx, job_id, JobStatus.DEAD, _error_step(error))
            metrics.job_finished(task_payload.provider, task_payload.request.kind.value, JobStatus.DEAD.value)
        return {"job_id": job_id, "status": JobStatus.DEAD.value}
    request = task_payload.request
    if not ctx.agent_config.is_model_allowed(request.model):  # sent around a client, or a config changed
        allowed = ", ".join(ctx.agent_config.allowed_model_patterns()) or "(none)"
        error = JobError(code="model_not_allowed", type="ModelNotAllowed",
                         message=f"model {request.model!r} is not allowed on this worker (agent.allowed_models: "
                                 f"{allowed})")
        if await ctx.store.afinish(job_id, JobStatus.FAILED, error=error, attempts=run_no):
            await _terminal(ctx, job_id, JobStatus.FAILED, _error_step(error))
            metrics.job_finished(task_payload.provider, request.kind.value, JobStatus.FAILED.value, error.code)
        return {"job_id": job_id, "status": JobStatus.FAILED.value}
    # any start but the very first may find steps of an earlier delivery to resume from (a
    # re-send by the sweeper counts as a delivery of the same attempt)
    resuming = run_no > 1 or claimed.deliveries > 1
    provider, kind = task_payload.provider, request.kind.value
    if not resuming:
        metrics.first_start(provider, kind, claimed.created_at)
    outcome: Any = None
    with metrics.in_flight(provider), track_usage() as calls:
        try:
            async with ctx.leases.hold(job_id):
                outcome = await _run(ctx, job_id, request, claimed, run_no, cancel_requested, resuming)
        finally:
            metrics.model_calls(calls)
    if isinstance(outcome, RetryLater):
        metrics.job_retried(provider, outcome.error.code)
    elif isinstance(outcome, dict) and outcome.get("status") in _FINAL_VALUES:
        metrics.job_finished(provider, kind, outcome["status"], outcome.get("error_code"))
    return outcome


def _job_wait(ctx: JobContext, job_id: str, request: JobRequest, stored: StoredJob) -> JobWait:
    """What the job's requests tell the limiter: its lane, its ticket, its time budget."""
    settings = ctx.settings
    deadline = request.deadline.timestamp() if request.deadline is not None else None
    since = stored.rate_limited_since.timestamp() if stored.rate_limited_since else time.time()
    budget_end = deadline if deadline is not None else since + settings.rate_limit_max_wait_s
    lane = 1 if request.batch_id is not None and settings.batch_priority > 0 else 0
    return JobWait(job_id, lane=lane, ticket_us=stored.rate_ticket or 0, budget_end=budget_end, deadline=deadline)


async def _run(ctx: JobContext, job_id: str, request: JobRequest, stored: StoredJob, run_no: int,
               cancel_requested: bool, resuming: bool = False) -> Any:
    """Run the claimed job; ``stored.attempts`` is its attempt (runs that were not limiter
    waits), ``run_no`` what the store writes."""
    runner = _JobRunner(ctx, job_id, request, cancel_requested, run_no, resuming)
    token = current_job.set(_job_wait(ctx, job_id, request, stored))
    try:
        with track_usage() as calls:
            output, sql_contexts = await runner.run()
    except RunSuperseded as exc:  # another delivery of this job is running it: leave it that one
        logger.warning("%s; this delivery stops", exc)
        return {"job_id": job_id, "status": "superseded"}
    except JobCancelled:
        if await ctx.store.afinish(job_id, JobStatus.CANCELLED, attempts=run_no):
            await _terminal(ctx, job_id, JobStatus.CANCELLED, ActionHistory.create_action(
                ActionRole.WORKFLOW, "cancelled", "cancelled", None, None, ActionStatus.FAILED))
            return {"job_id": job_id, "status": JobStatus.CANCELLED.value}
        return {"job_id": job_id, "status": "final"}
    except Deferred as deferred:
        return await _deferred(ctx, job_id, stored, run_no, deferred)
    except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        if isinstance(exc, Exception) and _is_infrastructure(exc):
            raise  # run_task retries the job later (a tool run resumes); the model error path is for the model
        return await _failed(ctx, job_id, request, stored, run_no, exc)
    finally:
        current_job.reset(token)
    traces.job_output(output)
    # a resumed tool run's usage covers the turns it replayed, which made no call this time
    usage = runner.usage or (sum(calls, Usage()) if calls else Usage())
    won = await ctx.store.afinish(
        job_id, JobStatus.SUCCEEDED, output=output, sql_contexts=sql_contexts,
        usage=usage.model_dump(), cost_usd=usage.cost_usd, attempts=run_no,
    )
    if won:
        final = runner.final_step or ActionHistory.create_action(
            ActionRole.ASSISTANT, "final_response", output if isinstance(output, str) else json.dumps(output), None,
            {"content": output}, ActionStatus.SUCCESS)
        if isinstance(final.output, dict):
            final.output = {**final.output, "usage": usage.model_dump()}
        await _terminal(ctx, job_id, JobStatus.SUCCEEDED, final)
        return {"job_id": job_id, "status": JobStatus.SUCCEEDED.value}
    return {"job_id": job_id, "status": "final"}  # another delivery or a cancel made it final


async def _deferred(ctx: JobContext, job_id: str, stored: StoredJob, run_no: int, deferred: Deferred) -> Any:
    """The limiter handed the job back: a retry after its wait (capped to the visibility
    margin: a longer wait comes back and waits again, keeping its ticket). It made no
    request, so it is not an attempt."""
    attempt = stored.attempts
    countdown = min(deferred.wait_s, retry_ceiling(ctx.settings))
    since = stored.rate_limited_since or (datetime.now(UTC) if deferred.rate_limited else None)
    error = JobError(code="rate_limit_wait", type="RateLimitWait", message=str(deferred), provider=stored.provider,
                     retryable=True)
    if not await ctx.store.amark_retrying(job_id, run_no, error, countdown, rate_limit_retries=stored.rate_limit_retries,
                                          rate_limit_waits=stored.rate_limit_waits + 1, rate_limited_since=since,
                                          rate_ticket=deferred.ticket_us or None):
        return {"job_id": job_id, "status": "final"}  # cancelled meanwhile: do not come back
    await ctx.publisher.publish(job_id, ActionHistory.create_action(
        ActionRole.WORKFLOW, "rate_limit_wait", f"{deferred}: back in {countdown:.2f}s", None,
        {"countdown_s": countdown, "wait_s": deferred.wait_s, "attempt": attempt, "rate_limited": deferred.rate_limited},
        ActionStatus.PROCESSING))
    logger.info("job %s attempt %d: %s; back in %.2fs", job_id, attempt, deferred, countdown)
    return RetryLater(countdown, error)


async def _failed(ctx: JobContext, job_id: str, request: JobRequest, stored: StoredJob, run_no: int,
                  exc: BaseException) -> Any:
    error = job_error(exc)
    attempt = stored.attempts
    if not isinstance(exc, (ModelError, RateLimitWaitExceeded, DeadlineExceeded)):
        logger.exception("job %s failed with an internal error", job_id)
    elif isinstance(exc, ModelError) and exc.retryable:  # a tool run resumes from its checkpoints
        retry = _retry_countdown(ctx, request, stored, exc)
        if isinstance(retry, str):
            error = error.model_copy(update={"message": f"{error.message} ({retry})"})
        else:
            countdown, rate_limit = retry
            await ctx.store.amark_retrying(job_id, run_no, error, countdown, **rate_limit)
            await ctx.publisher.publish(job_id, ActionHistory.create_action(
                ActionRole.WORKFLOW, "retry", f"{error.type}: retrying in {countdown:.2f}s", None,
                {"error": error.model_dump(), "countdown_s": countdown, "attempt": attempt,
                 "rate_limited": bool(rate_limit)}, ActionStatus.PROCESSING))
            logger.info("job %s attempt %d: %s; retry in %.2fs", job_id, attempt, error.type, countdown)
            return RetryLater(countdown, error)
    traces.job_error(error)
    if await ctx.store.afinish(job_id, JobStatus.FAILED, error=error, attempts=run_no):
        await _terminal(ctx, job_id, JobStatus.FAILED, _error_step(error))
        return {"job_id": job_id, "status": JobStatus.FAILED.value, "error_code": error.code}
    return {"job_id": job_id, "status": "final"}  # another delivery or a cancel made it final


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


class _JobRunner:
    """Runs one request on the model layer, publishing each step."""

    def __init__(self, ctx: JobContext, job_id: str, request: JobRequest, cancel_requested: bool, attempt: int = 1,
                 resuming: bool = False) -> None:
        self.ctx, self.job_id, self.request = ctx, job_id, request
        self.final_step: ActionHistory | None = None
        self.usage: Usage | None = None  # a tool run's, summed over all its turns
        self.cancel_requested = cancel_requested  # read when the job started
        self.journal = StoreJournal(ctx, job_id, attempt, resuming) if request.kind is JobKind.TOOL_RUN else None
        self.attempt = attempt
        self._last_cancel_check = time.monotonic()

    async def publish(self, step: ActionHistory) -> None:
        if self.journal is None or not self.journal.seen(step):  # an earlier delivery published it: once is enough
            await self.ctx.publisher.publish(self.job_id, step)
        await self.check_cancelled()

    async def check_cancelled(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_cancel_check < 0.1:
            return
        self._last_cancel_check = now
        if await self.ctx.aredis.exists(keys.job_cancel(self.job_id)):
            raise JobCancelled(self.job_id)

    async def run(self) -> tuple[Any, list[dict[str, Any]]]:
        request = self.request
        if self.cancel_requested:
            raise JobCancelled(self.job_id)
        prompt = request.prompt if request.prompt is not None else request.messages
        text = request.prompt if request.prompt is not None else _last_user(request.messages or [])
        options = request.options.model_dump(exclude_none=True, exclude={"extra_body"})
        if request.kind is JobKind.TOOL_RUN:
            return await self._tool_run(prompt, options)
        await self.publish(ActionHistory.create_action(
            ActionRole.USER, "user_input", text, {"prompt": text}, status=ActionStatus.SUCCESS))
        model = self.ctx.model(request.model, in_process_retries=False)
        messages = to_messages(prompt, request.instruction or None)
        if request.kind is JobKind.JSON:
            output: Any = await model.agenerate_with_json_output(messages, response_format=request.output_schema,
                                                                 **options)
        elif request.stream:
            output = None
            async for item in model.astream(messages, **options):
                if hasattr(item, "usage"):
                    output = item.text
                else:
                    await self.publish(ActionHistory(
                        action_id=self.job_id, role=ActionRole.ASSISTANT, action_type="assistant_delta",
                        messages=item.text or item.reasoning, status=ActionStatus.PROCESSING,
                        output={"kind": "reasoning" if item.reasoning and not item.text else "text",
                                "text": item.text, "reasoning": item.reasoning}))
        else:
            output = await model.agenerate(messages, **options)
        self.final_step = ActionHistory.create_action(
            ActionRole.ASSISTANT, "final_response", output if isinstance(output, str) else json.dumps(output), None,
            {"content": output}, ActionStatus.SUCCESS)
        return output, []

    async def _tool_run(self, prompt: Any, options: dict[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
        request = self.request
        model = self.ctx.model(request.model, in_process_retries=True)
        steps = model.generate_with_tools_stream(
            prompt, mcp_servers=_servers(request, self.ctx.agent_config), instruction=request.instruction,
            output_type=request.output_schema or str, max_turns=request.max_turns,
            session=request.session_id, db_type=request.db_type, journal=self.journal, mcp_pool=self.ctx.mcp_pool,
            live_steps=True, **options)  # live: every step is published, deltas and tool calls under way included
        # aclosing: a cancelled or failed job closes the run (and its MCP servers) in this task
        async with contextlib.aclosing(steps):
            return await self._follow_tool_run(steps)

    async def _follow_tool_run(self, steps: Any) -> tuple[Any, list[dict[str, Any]]]:
        request = self.request
        announced = False
        async for step in steps:
            if not announced and self.journal is not None and self.journal.replayed_steps:
                announced = True  # tell readers why the run goes on from the middle
                await self.ctx.publisher.publish(self.job_id, ActionHistory.create_action(
                    ActionRole.WORKFLOW, "resumed", f"resumed after {self.journal.replayed_steps} recorded step(s)",
                    None, {"attempt": self.attempt, "steps_recorded": self.journal.replayed_steps},
                    ActionStatus.SUCCESS))
            if step.action_type == "assistant_delta" and not request.stream:
                continue
            if step.action_type == "final_response":
                self.final_step = step  # published as the terminal event, after the store write
                output = step.output or {}
                if output.get("usage"):
                    self.usage = Usage.from_dict(output["usage"])
                return output.get("content"), output.get("sql_contexts", [])
            if step.action_type == "error":
                continue  # the exception that follows is recorded and published by the caller
            await self.publish(step)
        raise RuntimeError("the tool run ended without a final answer")


def _servers(request: JobRequest, agent_config: Any) -> dict[str, Any] | None:
    """The tool run's MCP servers: those it names from agent.mcp_servers, and the shipped SQL
    server opened on ``request.database``."""
    from datus.mcp_servers.sql_server import stdio_config
    from datus.models.mcp_utils import resolve_mcp_servers

    servers: dict[str, Any] = dict(resolve_mcp_servers(request.mcp_servers, agent_config)) if request.mcp_servers else {}
    if request.database:
        servers[DATABASE_SERVER] = stdio_config(request.database)
    return servers or None


async def _terminal(ctx: JobContext, job_id: str, status: JobStatus, step: ActionHistory) -> None:
    await ctx.publisher.publish(job_id, step, terminal=True, status=status)


def _error_step(error: JobError) -> ActionHistory:
    return ActionHistory.create_action(ActionRole.WORKFLOW, "error", f"{error.type}: {error.message}", None,
                                       error.model_dump(), ActionStatus.FAILED)


async def _dead_letter(ctx: JobContext, job_id: str, reason: str, payload: Any) -> None:
    """Record a dead letter in the store: the reason only — never the payload, which may be
    anything (the job row already holds what a job asked for)."""
    from datus_queue.tasks.store.dead_letters import message_id

    if payload is not None and not isinstance(payload, dict):
        reason = f"{reason} (payload was a {type(payload).__name__})"
    await asyncio.to_thread(ctx.store.record_dead_letter, job_id or message_id(), reason, job_id=job_id or None)
    logger.warning("job %s dead-lettered: %s", job_id or "(no id)", reason)


def _is_infrastructure(exc: BaseException) -> bool:
    """Redis or the job store failing (not the model, not a bug in the request)."""
    import redis.exceptions
    import sqlalchemy.exc

    return isinstance(exc, (redis.exceptions.RedisError, sqlalchemy.exc.OperationalError))


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "(payload)"
    return f"{where}: {error['msg']}"


def _last_user(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return message["content"]
    return ""
