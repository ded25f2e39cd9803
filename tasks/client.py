"""`JobClient`: submit jobs, wait for results, stream their steps, cancel them.

Everything is validated before anything is sent: an unknown model, provider or MCP server
name, or a model the operator does not allow (``agent.allowed_models``), is an error that says
what to fix, and nothing is queued. Batch jobs (``batch_id``) go out at a lower broker
priority (``DQ_BATCH_PRIORITY``), so an interactive job is not queued behind a batch.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from pydantic import ValidationError

from datus.models.base import PROVIDERS
from datus.models.config import AgentConfig
from datus.schemas.action_history import ActionHistory, ActionRole, ActionStatus
from datus_queue.tasks import keys
from datus_queue.tasks.context import load_agent_config
from datus_queue.tasks.routing import queue_for
from datus_queue.tasks.schemas import JobKind, JobRequest, JobResult, JobStatus, TaskPayload
from datus_queue.tasks.settings import Settings, get_settings

__all__ = ["InvalidJob", "JobClient", "JobNotFound", "publish_job", "resolve_provider"]

TASK_NAMES = {JobKind.GENERATE: "dq.generate", JobKind.JSON: "dq.generate", JobKind.TOOL_RUN: "dq.tool_run"}


class InvalidJob(ValueError):
    """The request cannot run; the message says what to fix."""


class JobNotFound(KeyError):
    """No job with this id in the job store."""

    def __init__(self, job_id: str, what: str = "job") -> None:
        super().__init__(job_id)
        self.job_id, self.what = job_id, what

    def __str__(self) -> str:  # KeyError would show the repr of its argument
        return f"no {self.what} {self.job_id!r}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.job_id, self.what))


def resolve_provider(model: str, agent_config: AgentConfig) -> str:
    if model in agent_config.models:
        return str(agent_config.models[model].type)
    if model == "default" and agent_config.target:
        return str(agent_config.models[agent_config.target].type)
    provider, sep, name = model.partition(":")
    known = ", ".join(PROVIDERS)
    if not sep:
        configured = ", ".join(sorted(agent_config.models)) or "(none)"
        raise InvalidJob(f"unknown model {model!r}: configured models are {configured}; or use provider:model")
    if provider not in PROVIDERS or not name:
        raise InvalidJob(f"unknown provider {provider!r} in {model!r}; known providers: {known}")
    return provider


def publish_job(app: Any, producer: Any, job_id: str, request: JobRequest, provider: str, retries: int = 0,
                batch_priority: int | None = None, trace: bool | None = None) -> None:
    """Send a job's message: the job's task, ``task_id = job_id``, on its provider's queue. The
    one way a job is sent — by `JobClient`, by the sweeper, by a replay (``retries``, the job's
    runs before this one, tells the worker which run it is). A batch job (``batch_id``) goes at
    ``batch_priority`` (default ``DQ_BATCH_PRIORITY``): 0 is the highest on the Redis transport, whose list for
    it is popped first, so interactive jobs are never queued behind a batch. With ``trace``
    (default ``DQ_OTEL_TRACING``) the running OpenTelemetry span's W3C ``traceparent`` /
    ``tracestate`` go in the message headers, so the job's span continues the caller's trace."""
    if batch_priority is None or trace is None:
        settings = get_settings()
        batch_priority = settings.batch_priority if batch_priority is None else batch_priority
        trace = settings.otel_tracing if trace is None else trace
    headers = None
    if trace:
        from datus_queue.tasks.observability.traces import outgoing_headers

        headers = outgoing_headers() or None
    priority = batch_priority if request.batch_id is not None else 0
    # no prompt, no URL, no metadata: the message carries what routing and operators need (the
    # provider, the kind, the model's name); the worker reads the request from the job's row,
    # written before this message is sent (`JobStore.create_job`). So `celery inspect
    # active|reserved`, Flower's worker page and the raw message in Redis show nothing private.
    payload = TaskPayload(provider=provider, kind=request.kind.value, model=request.model).model_dump(
        mode="json", exclude_none=True)
    # ignore_result: results live in the job store; without it every submit leaves the client
    # subscribed to a Celery result channel (memory grows with the batch).
    # argsrepr/kwargsrepr: what Celery shows of the arguments (task events, Flower), short.
    app.send_task(TASK_NAMES[request.kind], args=(job_id, payload), task_id=job_id, queue=queue_for(provider),
                  ignore_result=True, producer=producer, retries=retries, priority=priority,
                  argsrepr=f"({job_id!r}, <{request.kind.value} request for {request.model}>)", kwargsrepr="{}",
                  headers=headers)


def _cut(part: Any, limit: int = 40) -> str:
    text = str(part)
    return text if len(text) <= limit else f"{text[:limit]}…"


class JobClient:
    def __init__(self, settings: Settings | None = None, agent_config: AgentConfig | None = None,
                 app: Any = None, store: Any = None) -> None:
        self.settings = settings or get_settings()
        self.agent_config = agent_config if agent_config is not None else load_agent_config(self.settings)
        if app is None:
            from datus_queue.tasks.app import app as default_app

            app = default_app
        self.app = app
        if store is None:
            from datus_queue.tasks.store import JobStore

            store = JobStore(self.settings.database_url)
        self.store = store
        self._databases_allowed: set[str] = set()  # fingerprints of URLs `allow_database` was given
        from datus_queue.tasks.redis_connect import connect

        self.redis = connect(self.settings)

    # ---- submitting ----------------------------------------------------------------------

    def validate(self, request: JobRequest | dict[str, Any]) -> tuple[JobRequest, str]:
        try:
            job = request if isinstance(request, JobRequest) else JobRequest.model_validate(request)
        except ValidationError as exc:  # the fields and what is wrong, never the values (a URL can hold a secret)
            errors = exc.errors()
            # a field's path can hold a key of the request's own (metadata): cut, and at most 10 problems
            problems = "; ".join(f"{'.'.join(_cut(p) for p in e['loc']) or 'request'}: "
                                 f"{e['msg'].removeprefix('Value error, ')}" for e in errors[:10])
            more = f"; and {len(errors) - 10} more" if len(errors) > 10 else ""
            raise InvalidJob(f"invalid job request: {problems}{more}") from None
        try:  # what holds only when a job is made: a deadline ahead, the operator's DQ_MAX_PROMPT_BYTES
            job.check_submit(max_prompt_bytes=self.settings.max_prompt_bytes)
        except ValueError as exc:
            raise InvalidJob(f"invalid job request: {exc}") from None
        provider = resolve_provider(job.model, self.agent_config)
        if not self.agent_config.is_model_allowed(job.model):
            allowed = ", ".join(self.agent_config.allowed_model_patterns()) or "(none)"
            raise InvalidJob(f"model {job.model!r} is not allowed: agent.allowed_models allows {allowed} "
                             "(provider:model names only where an operator lists them)")
        unknown = [name for name in job.mcp_servers if name not in self.agent_config.mcp_servers]
        if unknown:
            configured = ", ".join(sorted(self.agent_config.mcp_servers)) or "(none)"
            raise InvalidJob(f"unknown MCP server(s) {', '.join(unknown)}; configured in agent.mcp_servers: {configured}")
        if job.database is not None:  # the operator's databases only (tasks/databases.py); again on the worker
            from datus_queue.tasks.databases import DatabaseNotAllowed, resolve_database

            try:
                resolve_database(job.database, self.agent_config, self.settings,
                                 getattr(self, "_databases_allowed", ()))
            except DatabaseNotAllowed as exc:
                raise InvalidJob(f"invalid job request: {exc}") from None
        return job, provider

    def allow_database(self, url: str, batch_id: str | None = None) -> None:
        """The operator's own database for this client's jobs (``dq batch --db URL``: the CLI is
        the operator): accepted at submit from now on, and on the workers for ``batch_id``'s jobs
        (registered in Redis, as a fingerprint). Never the job store."""
        from datus_queue.tasks.databases import (
            DatabaseNotAllowed,
            fingerprint,
            refuse_stores,
            register_for_batch,
        )

        try:
            refuse_stores(url, self.settings)
            allowed = fingerprint(url)
        except DatabaseNotAllowed as exc:
            raise InvalidJob(str(exc)) from None
        except Exception:  # noqa: BLE001 - not a URL: the request's own check says so, naming the field
            return
        self._databases_allowed.add(allowed)
        if batch_id is not None:
            register_for_batch(self.redis, batch_id, url)

    def submit(self, request: JobRequest | dict[str, Any], job_id: str | None = None) -> str:
        """Queue a job; returns its id. The same idempotency key returns the same job."""
        job, provider = self.validate(request)
        job_id, created = self.store.create_job(job_id or uuid.uuid4().hex, job, provider)
        if created:
            self._send([(job_id, job, provider)])
        return job_id

    def submit_many(self, requests: Iterable[JobRequest | dict[str, Any]]) -> list[str]:
        """Queue many jobs at once: every request is checked first (nothing is queued if one is
        invalid), the rows go in one transaction and the messages through one producer. The
        job ids, in order; an idempotency key already used returns that job's id."""
        checked = [self.validate(request) for request in requests]
        made = self.store.create_jobs([(uuid.uuid4().hex, job, provider) for job, provider in checked])
        self._send([(job_id, job, provider) for (job_id, created), (job, provider) in zip(made, checked) if created])
        return [job_id for job_id, _ in made]

    def _send(self, jobs: list[tuple[str, JobRequest, str]]) -> None:
        sent = 0
        batch_priority, trace = self.settings.batch_priority, self.settings.otel_tracing
        try:
            with self.app.producer_or_acquire() as producer:
                for job_id, job, provider in jobs:
                    publish_job(self.app, producer, job_id, job, provider, batch_priority=batch_priority, trace=trace)
                    sent += 1
        except Exception as exc:  # the rows not sent must not stay queued forever
            from datus_queue.tasks.jobs import job_error

            for job_id, _, _ in jobs[sent:]:
                self.store.finish(job_id, JobStatus.FAILED, error=job_error(exc), run=0)
            raise

    # ---- reading -------------------------------------------------------------------------

    def get(self, job_id: str) -> JobResult:
        result = self.store.get(job_id)
        if result is None:
            raise JobNotFound(job_id)
        return result

    def status(self, job_id: str) -> JobStatus:
        return self.get(job_id).status

    def result(self, job_id: str, timeout: float | None = None) -> JobResult:
        """Wait until the job is final. Polls the store with backoff; TimeoutError after
        ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.01
        while True:
            result = self.get(job_id)
            if result.final:
                return result
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {result.status.value} after {timeout}s")
            time.sleep(delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic())))
            delay = min(delay * 1.5, 0.25)

    def stream(self, job_id: str, after_seq: int = 0, timeout: float | None = None) -> Iterator[ActionHistory]:
        """The job's steps: what was missed since ``after_seq``, then live, each exactly once,
        ending with the terminal step."""
        from datus_queue.tasks.events import follow

        self.get(job_id)
        for event in follow(self.redis, job_id, after_seq=after_seq, timeout_s=timeout, is_final=self._is_final):
            yield ActionHistory.model_validate(event.step)

    async def astream(self, job_id: str, after_seq: int = 0, timeout: float | None = None
                      ) -> AsyncIterator[ActionHistory]:
        import asyncio

        from datus_queue.tasks.events import afollow
        from datus_queue.tasks.redis_connect import async_client

        client = async_client(self.settings)
        try:
            async for event in afollow(client, job_id, after_seq=after_seq, timeout_s=timeout,
                                       is_final=lambda job: asyncio.to_thread(self._is_final, job)):
                yield ActionHistory.model_validate(event.step)
        finally:
            await client.aclose()

    def events(self, job_id: str, after_seq: int = 0, timeout: float | None = None) -> Iterator[Any]:
        """Like ``stream`` but yields the numbered `JobEvent`s (for resuming with after_seq)."""
        from datus_queue.tasks.events import follow

        yield from follow(self.redis, job_id, after_seq=after_seq, timeout_s=timeout, is_final=self._is_final)

    def _is_final(self, job_id: str) -> bool:
        result = self.store.get(job_id)
        return result is None or result.final

    # ---- the caller's own tools (tasks/caller_tools.py) ------------------------------------

    def send_tool_result(self, job_id: str, call_id: str, text: str, is_error: bool = False, raw: Any = None) -> bool:
        """One answer (`send_tool_results`); False if the call had one already."""
        from datus_queue.tasks.caller_tools import CallerToolResult

        return self.send_tool_results(job_id, [CallerToolResult(call_id, text, is_error, raw)])[call_id]

    def send_tool_results(self, job_id: str, results: Iterable[Any]) -> dict[str, bool]:
        """The answers of the caller's tools (`tasks.caller_tools.CallerToolResult`) to the calls
        of job ``job_id`` (a ``caller_tool_request`` step's ``output["calls"]``): each cut like any
        tool's answer (``DQ_MAX_TOOL_RESULT_CHARS``, else 65,536 characters; marked) and stored
        once per call id in the job's Redis hash (a second answer is ignored: False), then the job
        is sent again, once, so its next run resumes with them at once. Raises `JobNotFound` for an
        unknown job."""
        import json

        from datus_queue.tasks.caller_tools import bounded_result, hash_ttl

        answers = list(results)
        for answer in answers:
            if not isinstance(answer.call_id, str) or not 0 < len(answer.call_id) <= 255:
                raise InvalidJob("a tool call's id is a string of 1-255 characters")
        key = keys.job_caller(job_id)
        with self.redis.pipeline(transaction=False) as pipe:
            for answer in answers:
                text = answer.text if isinstance(answer.text, str) else str(answer.text)
                result = bounded_result(text, answer.is_error, answer.raw, self.settings.max_tool_result_chars)
                pipe.hsetnx(key, f"result:{answer.call_id}", json.dumps(result, ensure_ascii=False))
            pipe.expire(key, hash_ttl(self.settings))
            stored = pipe.execute()[:-1]
        self.resume(job_id)
        return {answer.call_id: bool(done) for answer, done in zip(answers, stored, strict=True)}

    def caller_heartbeat(self, job_id: str) -> None:
        """The caller of ``job_id`` is alive. A caller that follows a job with caller tools calls
        this every sixth of ``DQ_CALLER_LIVENESS_S`` (`tasks.caller_tools.beat_interval`), from
        before the submit: once it has beaten, a wait with no beat for that long fails the job
        (``caller_gone``)."""
        from datus_queue.tasks.caller_tools import heartbeat

        heartbeat(self.redis, job_id, self.settings)

    def resume(self, job_id: str) -> bool:
        """Send a job that waits (``retrying``) again now, as its next run; True if it was sent.
        A job that is running or final is left as it is (a running one finds the answer itself)."""
        stored = self.store.get(job_id)
        if stored is None:
            raise JobNotFound(job_id)
        if stored.status is not JobStatus.RETRYING:
            return False
        request = self.store.get_request(job_id)
        if request is None:
            return False
        with self.app.producer_or_acquire() as producer:
            publish_job(self.app, producer, job_id, request, stored.provider or "", retries=stored.runs,
                        batch_priority=self.settings.batch_priority, trace=self.settings.otel_tracing)
        return True

    # ---- cancelling ----------------------------------------------------------------------

    def cancel(self, job_id: str) -> JobStatus:
        """A queued job never runs; a running one stops at its next step."""
        status = self.store.cancel(job_id)
        if status is None:
            raise JobNotFound(job_id)
        if status is JobStatus.CANCELLED:
            self.app.control.revoke(job_id)
            from datus_queue.tasks.events import EventPublisher

            EventPublisher(self.redis, self.settings.event_ttl_s, self.settings.event_maxlen).publish(
                job_id,
                ActionHistory.create_action(ActionRole.WORKFLOW, "cancelled", "cancelled before it ran", None,
                                            None, ActionStatus.FAILED),
                terminal=True, status=JobStatus.CANCELLED)
        elif status in (JobStatus.RUNNING, JobStatus.RETRYING, JobStatus.QUEUED):
            self.redis.set(keys.job_cancel(job_id), "1", ex=self.settings.event_ttl_s)
        return status

    def close(self) -> None:
        self.redis.close()
