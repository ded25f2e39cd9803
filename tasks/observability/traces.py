"""Traces of jobs: LangSmith run trees and OpenTelemetry spans, both opt-in and off by default.

- **LangSmith** (`langsmith_trace`) when ``LANGSMITH_TRACING=true``, with ``LANGSMITH_API_KEY``,
  ``LANGSMITH_PROJECT`` (default ``datus-queue``) and ``LANGSMITH_ENDPOINT``: a run tree per job
  run — the job (chain) → each model call (llm: messages in, answer out, token usage) and each
  tool call (tool). ``LANGSMITH_HIDE_INPUTS`` / ``LANGSMITH_HIDE_OUTPUTS`` are the SDK's own.
- **OpenTelemetry** (`otel_trace`) when ``DQ_OTEL_TRACING=true``: spans over OTLP/HTTP to
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT`` as
  ``OTEL_SERVICE_NAME``: the job's span (its parent the submitter's span, from the message's
  W3C ``traceparent``) → ``chat <model>`` and ``execute_tool <name>`` spans (GenAI conventions).

The model layer reports calls to observers (`datus.models.observe`); `traced_job` installs a
job's observers around it in `tasks.jobs.execute`. Off, a job pays one check of a per-process
tuple, a model call one context-variable read, and nothing here imports langsmith or
opentelemetry. Exporters send from background threads, so a trace backend that is down or
slow never slows or fails a job; bad settings are one warning at the first job, naming what to
fix, and tracing stays off for that backend.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

__all__ = ["TRACE_HEADERS", "JobInfo", "carried_headers", "job_error", "job_output", "outgoing_headers",
           "shutdown", "traced_job", "tracers"]

logger = logging.getLogger("datus_queue.tasks.observability.traces")
TRACE_HEADERS = ("traceparent", "tracestate")  # W3C trace context, the only headers a job message gets from here


@dataclass(frozen=True)
class JobInfo:
    """What a trace says about the job run it covers (no secret: a `JobRequest` holds none)."""

    job_id: str
    provider: str
    run: int  # the store's run number of this delivery (jobs.runs)
    request: Any  # the JobRequest: a trace's inputs, and what follows, come from it

    @property
    def task(self) -> str:
        """dq.generate / dq.tool_run"""
        from datus_queue.tasks.client import TASK_NAMES

        return TASK_NAMES[self.request.kind]

    @property
    def kind(self) -> str:
        return self.request.kind.value

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def batch_id(self) -> str | None:
        return self.request.batch_id


class JobSpan(Protocol):
    """A backend's trace of one job run; also an observer (`datus.models.observe`) of its calls."""

    def model_call(self, call: Any) -> Any: ...

    def tool_call(self, call: Any) -> Any: ...

    def finish(self, status: str, output: Any, error: Any) -> None: ...


class Backend(Protocol):
    def start_job(self, job: JobInfo, carrier: Mapping[str, Any] | None) -> JobSpan: ...

    def shutdown(self, timeout_s: float) -> None: ...


# ---- sending side: the submitter's trace context into the message headers ---------------------


def outgoing_headers() -> dict[str, str]:
    """The running span's W3C trace context (``traceparent``, ``tracestate``), as headers for a
    job message; empty when there is no valid span. Only called with DQ_OTEL_TRACING on."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier


def carried_headers(request: Mapping[str, Any] | None) -> dict[str, str]:
    """The trace headers a delivered message carries, for its retry message to carry on."""
    if not request:
        return {}
    return {name: request[name] for name in TRACE_HEADERS if isinstance(request.get(name), str)}


# ---- the worker side: which backends this process has ---------------------------------------


_lock = threading.Lock()
_backends: tuple[Backend, ...] | None = None
_pid: int | None = None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _endpoint_problem(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "not an http(s) URL"
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return "a URL whose port is not a number"
    return None


def _langsmith(environ: Mapping[str, str]) -> Backend | None:
    if not _truthy(environ.get("LANGSMITH_TRACING")):
        return None
    key = environ.get("LANGSMITH_API_KEY", "").strip()
    if not key:
        logger.warning("LANGSMITH_TRACING=true but LANGSMITH_API_KEY is not set: LangSmith tracing is off "
                       "(set LANGSMITH_API_KEY, or unset LANGSMITH_TRACING)")
        return None
    endpoint = environ.get("LANGSMITH_ENDPOINT", "").strip() or None
    if endpoint is not None and (problem := _endpoint_problem(endpoint)):
        logger.warning("LANGSMITH_ENDPOINT is %s: LangSmith tracing is off (set it to the API's URL, e.g. "
                       "https://api.smith.langchain.com)", problem)
        return None
    try:
        from datus_queue.tasks.observability.langsmith_trace import LangSmithBackend
    except ImportError as exc:
        logger.warning("LANGSMITH_TRACING=true but %s: LangSmith tracing is off (pip install 'datus-queue[traces]')",
                       exc)
        return None
    project = environ.get("LANGSMITH_PROJECT", "").strip() or "datus-queue"
    return LangSmithBackend(api_key=key, endpoint=endpoint, project=project)


def _otel(settings: Any, environ: Mapping[str, str]) -> Backend | None:
    if not settings.otel_tracing:
        return None
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        value = environ.get(name, "").strip()
        if value and (problem := _endpoint_problem(value)):
            logger.warning("%s is %s: OpenTelemetry tracing is off (set it to the collector's OTLP/HTTP URL, "
                           "e.g. http://127.0.0.1:4318)", name, problem)
            return None
    try:
        from datus_queue.tasks.observability.otel_trace import OtelBackend
    except ImportError as exc:
        logger.warning("DQ_OTEL_TRACING=true but %s: OpenTelemetry tracing is off "
                       "(pip install 'datus-queue[traces]')", exc)
        return None
    return OtelBackend()


def tracers(settings: Any = None) -> tuple[Backend, ...]:
    """This process's trace backends, set up once (again after a fork); empty when both are off."""
    global _backends, _pid
    backends, pid = _backends, os.getpid()
    if backends is not None and _pid == pid:
        return backends
    with _lock:
        if _backends is None or _pid != pid:
            if settings is None:
                from datus_queue.tasks.settings import get_settings

                settings = get_settings()
            found = []
            for make in (lambda: _langsmith(os.environ), lambda: _otel(settings, os.environ)):
                try:
                    backend = make()
                except Exception as exc:  # noqa: BLE001 - tracing never stops the worker
                    logger.warning("could not set up tracing: %s: %s; that backend is off", type(exc).__name__, exc)
                    backend = None
                if backend is not None:
                    found.append(backend)
            _backends, _pid = tuple(found), pid
        return _backends


def shutdown(timeout_s: float = 5.0) -> None:
    """Send what the backends still hold (the worker's shutdown)."""
    global _backends
    with _lock:
        backends, _backends = (_backends or ()), None
    for backend in backends:
        try:
            backend.shutdown(timeout_s)
        except Exception as exc:  # noqa: BLE001
            logger.warning("tracing shutdown: %s: %s", type(exc).__name__, exc)


# ---- one job ------------------------------------------------------------------------------------


class _JobTrace:
    def __init__(self, spans: list[JobSpan]) -> None:
        self.spans = spans
        self.output: Any = None
        self.error: Any = None


_current: contextvars.ContextVar[_JobTrace | None] = contextvars.ContextVar("dq_job_trace", default=None)


def job_output(output: Any) -> None:
    """The running job's output (its trace shows it)."""
    trace = _current.get()
    if trace is not None:
        trace.output = output


def job_error(error: Any) -> None:
    """The running job's `JobError` (its trace shows it)."""
    trace = _current.get()
    if trace is not None:
        trace.error = error


@contextlib.contextmanager
def traced_job(job: JobInfo, carrier: Mapping[str, Any] | None, settings: Any = None) -> Iterator[Any]:
    """Trace the job run inside the block with every backend on; yields a handle whose
    ``finish(outcome)`` records how it ended (`tasks.jobs.execute` calls it), or None when
    tracing is off."""
    backends = tracers(settings)
    if not backends:
        yield None
        return
    from datus.models.observe import observing

    spans: list[JobSpan] = []
    for backend in backends:
        try:
            spans.append(backend.start_job(job, carrier))
        except Exception as exc:  # noqa: BLE001 - tracing never fails a job
            logger.warning("job %s: could not start its trace: %s: %s", job.job_id, type(exc).__name__, exc)
    trace = _JobTrace(spans)
    token = _current.set(trace)
    finished = _Finisher(trace)
    try:
        with observing(*spans):
            yield finished
    except BaseException as exc:
        finished.finish(None, exc)
        raise
    finally:
        _current.reset(token)
        finished.finish(None)


class _Finisher:
    def __init__(self, trace: _JobTrace) -> None:
        self.trace, self.done = trace, False

    def finish(self, outcome: Any, exc: BaseException | None = None) -> None:
        """``outcome``: what `execute` returned (a `tasks.outcomes` type)."""
        if self.done:
            return
        self.done = True
        status, error = _status(outcome, exc, self.trace.error)
        for span in self.trace.spans:
            try:
                span.finish(status, self.trace.output if status == "succeeded" else None, error)
            except Exception as exc2:  # noqa: BLE001 - tracing never fails a job
                logger.warning("could not finish a job's trace: %s: %s", type(exc2).__name__, exc2)


def _status(outcome: Any, exc: BaseException | None, error: Any) -> tuple[str, Any]:
    """The span's status and error for a delivery's `tasks.outcomes` type."""
    from datus_queue.tasks.outcomes import ComeBack, Dropped, Finished, Retry

    if exc is not None:
        return "error", {"code": "internal_error", "type": type(exc).__name__, "message": str(exc)}
    if isinstance(outcome, Retry):
        return "retrying", _plain(outcome.error)
    if isinstance(outcome, ComeBack):
        return "running", _plain(error)
    if isinstance(outcome, Dropped):
        return outcome.reason.value, _plain(error)
    if isinstance(outcome, Finished):
        status = outcome.status.value
        if status in ("failed", "dead") and error is None:
            error = {"code": outcome.error_code or status}
        return status, _plain(error)
    return "unknown", _plain(error)


def _plain(error: Any) -> Any:
    return error.model_dump() if hasattr(error, "model_dump") else error
