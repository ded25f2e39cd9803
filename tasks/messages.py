"""What a job message on the wire must be, and what becomes of one that is not.

A job message (``dq.generate``, ``dq.tool_run``) is Celery's protocol 2 as
`tasks.client.publish_job` sends it: headers naming the task, its ``id`` (the job's id),
``retries`` (the job's runs before this one) and maybe `INFRA_HEADER` and a W3C trace context;
a JSON body ``[[job_id, payload], {}, {...}]``. Anything may arrive instead — an old client, a
bad producer, a hand-pushed list entry — and no message may stop a worker, so:

- `parse_delivery` / `parse_job` turn what the worker received into a `JobMessage`, or into a
  `Malformed` naming what is wrong and the job the message names, if it plausibly names one.
  They never raise.
- `reject` dead-letters such a message (the reason only, never its content) and fails the job
  it names if that job still waits for its message (queued or retrying: ``invalid_message``,
  replayable from its row with ``dq dead replay``); a job that is running or final is left
  alone — the message was a stray. The caller acknowledges the message.
- `job_strategy` is the job tasks' Celery strategy (the consumer's handler of their messages):
  Celery's own, after `header_problem` has checked the headers Celery reads before any code of
  ours runs (``id``, ``eta``, ``expires``, ``timelimit``, ``priority``, …) and guarded, so a
  message that would make Celery raise — leaving it unacknowledged, or discarding it with its
  body in the log — is dead-lettered and acknowledged here instead.
- `reject_delivered`: a message that never reaches a task's strategy — no task name, a task no
  worker knows, a body that does not decode, headers Celery finds invalid — is dead-lettered by
  the worker's consumer (`workers.consumer.Consumer`, Celery's with those four handlers
  replaced: Celery's logged the body and, for an unknown task without a string ``id``, raised
  before it acknowledged).

`send_again` publishes a `JobMessage` once more — a `Retry` (the next run) or a `ComeBack`
(the same run later) — built from its checked parts, never by copying the delivered headers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from datus.schemas.action_history import ActionHistory, ActionRole, ActionStatus
from datus_queue.tasks.outcomes import INFRA_HEADER, ComeBack, Retry, is_infrastructure
from datus_queue.tasks.schemas import JobError, JobStatus

if TYPE_CHECKING:
    from datus_queue.tasks.context import JobContext

__all__ = ["JobMessage", "Malformed", "error_step", "header_problem", "job_strategy",
           "parse_delivery", "parse_job", "reject", "reject_delivered", "send_again", "valid_id"]

logger = logging.getLogger("datus_queue.tasks.messages")

MAX_RETRIES_HEADER = 1_000_000  # far above any job's runs (rate-limit waits included); below any integer column's end
TRACE_HEADERS = ("traceparent", "tracestate")
_NONE = type(None)
# the headers Celery or this module reads, and what each may hold (absent is always fine)
_HEADER_KINDS: dict[str, tuple[type, ...]] = {
    "id": (str,), "task": (str,), "shadow": (str, _NONE), "eta": (str, _NONE), "expires": (_NONE,),
    "retries": (int, _NONE), INFRA_HEADER: (int, _NONE), "timelimit": (list, tuple, _NONE),
    "argsrepr": (str, _NONE), "kwargsrepr": (str, _NONE), "traceparent": (str,), "tracestate": (str,),
    "group": (str, _NONE), "group_index": (int, _NONE), "root_id": (str, _NONE), "parent_id": (str, _NONE),
    "origin": (str, _NONE), "ignore_result": (bool, _NONE), "replaced_task_nesting": (int, _NONE),
    "stamped_headers": (list, _NONE), "stamps": (dict, _NONE),
}


@dataclass(frozen=True)
class JobMessage:
    """A job message as it arrived, checked: everything the worker uses of it."""

    task_name: str
    task_id: str
    job_id: str
    payload: Any  # as sent: `tasks.jobs.execute` validates it as a TaskPayload
    retries: int = 0  # the job's runs before this one: the store's run number is retries + 1
    infra_retries: int = 0  # infrastructure retries in a row before this run
    trace_headers: Mapping[str, str] | None = None  # a W3C trace context, carried on to a re-send
    priority: int | None = None
    queue: str | None = None  # where it was delivered from: a re-send goes back there
    argsrepr: str = "(job)"  # what task events and Flower show of the arguments (never the request)


@dataclass(frozen=True)
class Malformed:
    """A message that cannot be a job's: why, and the job it names (None: none it could)."""

    reason: str
    job_id: str | None = None
    queue: str | None = None


def valid_id(value: Any) -> str | None:
    """``value`` as a job or task id, or None: a string of 1–255 printable characters (what a job
    row's key holds; anything else names no job, and must not reach a SQL parameter or a log)."""
    if isinstance(value, str) and 0 < len(value) <= 255 and value.isprintable():
        return value
    return None


def header_problem(headers: Any, properties: Mapping[str, Any] | None = None,
                   max_eta_s: float | None = None) -> str | None:
    """What is wrong with a job message's headers (and delivery properties), or None. ``max_eta_s``:
    an ETA further away than this (the visibility timeout) would see the message handed to a
    second worker while the first still holds it."""
    if not isinstance(headers, Mapping):
        return f"the headers are of type {type(headers).__name__}, not a mapping"
    for name, kinds in _HEADER_KINDS.items():
        if name in headers:
            value = headers[name]
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                return f"the {name!r} header is of type {type(value).__name__}"
    if valid_id(headers.get("id")) is None:
        return "the message has no id a job can have (a string of 1-255 printable characters)"
    for name in ("retries", INFRA_HEADER):
        if not 0 <= (headers.get(name) or 0) <= MAX_RETRIES_HEADER:
            return f"the {name!r} header is out of range"
    timelimit = headers.get("timelimit")
    if timelimit is not None and (len(timelimit) != 2 or not all(
            limit is None or (isinstance(limit, (int, float)) and not isinstance(limit, bool)) for limit in timelimit)):
        return "the 'timelimit' header is not [hard, soft]"
    if not all(isinstance(name, str) for name in headers.get("stamped_headers") or ()):
        return "the 'stamped_headers' header is not a list of names"
    eta = headers.get("eta")
    if eta is not None:
        try:
            due = datetime.fromisoformat(eta)
        except ValueError:
            return "the 'eta' header is not an ISO 8601 time"
        if max_eta_s is not None:
            latest = datetime.now(UTC) + timedelta(seconds=max_eta_s)
            if (due if due.tzinfo else due.replace(tzinfo=UTC)) > latest:
                return "the 'eta' header is further away than the visibility timeout"
    priority = (properties or {}).get("priority")
    if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= 255):
        return "the message's priority is not a number from 0 to 255"
    return None


def parse_delivery(task_name: str, task_id: Any, request: Mapping[str, Any], body: Any, content_type: str | None,
                   content_encoding: str | None, accept: Any) -> JobMessage | Malformed:
    """What the worker's pool received: the request (the headers, as Celery hands them over) and
    the body, still encoded unless ``content_type`` is None."""
    try:
        if content_type:
            from kombu.serialization import loads

            raw = body if isinstance(body, (bytes, str)) else bytes(body)  # a buffer from the transport
            decoded = loads(raw, content_type, content_encoding, accept=accept)
        else:
            decoded = body
        if not isinstance(decoded, (list, tuple)) or len(decoded) != 3:
            return Malformed("the body is not [args, kwargs, options]", valid_id(task_id), _queue(request))
        args, kwargs, options = decoded
    except Exception as exc:  # noqa: BLE001 - anything a decoder raises: the message is recorded, not run
        return Malformed(f"undecodable task body: {type(exc).__name__}: {exc}", valid_id(task_id), _queue(request))
    return parse_job(task_name, request, args, kwargs, options)


def parse_job(task_name: str, request: Mapping[str, Any], args: Any, kwargs: Any,
              options: Any = None) -> JobMessage | Malformed:
    """A decoded job message: tasks take ``(job_id, payload)``, positionally or by name."""
    try:
        return _parse_job(task_name, request, args, kwargs, options)
    except Exception as exc:  # noqa: BLE001 - whatever it holds, parsing a message never raises
        return Malformed(f"unreadable message: {type(exc).__name__}: {exc}", valid_id(request.get("id")))


def _parse_job(task_name: str, request: Mapping[str, Any], args: Any, kwargs: Any, options: Any) -> JobMessage | Malformed:
    task_id, queue = valid_id(request.get("id")), _queue(request)
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, Mapping):
        return Malformed(f"the arguments are a {type(args).__name__} and a {type(kwargs).__name__}, "
                         "not a list and a mapping", task_id, queue)
    if options is not None and not isinstance(options, Mapping):
        return Malformed(f"the body's options are a {type(options).__name__}, not a mapping", task_id, queue)
    extra = sorted(str(key) for key in kwargs if key not in ("job_id", "payload"))
    values = [*args, *(kwargs[key] for key in ("job_id", "payload") if key in kwargs)]
    if len(values) != 2 or extra:
        return Malformed(f"job tasks take (job_id, payload); got {len(args)} positional and "
                         f"{sorted(str(key) for key in kwargs)} keyword", _id_of(values) or task_id, queue)
    job_id = valid_id(values[0])
    if job_id is None:
        return Malformed("the job id is missing or not a job id (a string of 1-255 printable characters)",
                         task_id, queue)
    problem = header_problem(request, request.get("delivery_info"))
    if problem is not None or task_id is None:
        return Malformed(problem or "the message has no id", job_id, queue)
    return JobMessage(
        task_name=task_name, task_id=task_id, job_id=job_id, payload=values[1],
        retries=request.get("retries") or 0, infra_retries=request.get(INFRA_HEADER) or 0,
        trace_headers={name: request[name] for name in TRACE_HEADERS if name in request} or None,
        priority=(request.get("delivery_info") or {}).get("priority"), queue=queue,
        argsrepr=request.get("argsrepr") or "(job)")


def _id_of(values: list[Any]) -> str | None:
    return valid_id(values[0]) if values else None


def _queue(request: Mapping[str, Any]) -> str | None:
    info = request.get("delivery_info")
    queue = info.get("routing_key") if isinstance(info, Mapping) else None
    return queue if isinstance(queue, str) and queue else None


# ---- rejecting: the dead letter, and the job that waited for the message -------------------------


def reject(ctx: JobContext, reason: str, job_id: str | None, *, queue: str | None = None,
           code: str = "invalid_message") -> None:
    """Dead-letter a message that cannot run, and fail the job it names if that job waits for
    its message. Synchronous: the consumer thread calls it as it is; the event loop from a
    thread (`tasks.jobs`). Raises what the store raises (the caller acknowledges regardless)."""
    from datus.models.redact import redact
    from datus_queue.tasks.store.dead_letters import message_id

    reason = redact("".join(char if char.isprintable() else "?" for char in reason))[:500]  # dq dead show/list
    dead_id = job_id or message_id()
    ctx.store.record_dead_letter(dead_id, reason, job_id=job_id, queue=queue)
    logger.warning("message %s dead-lettered: %s", dead_id, reason)
    if job_id is not None:
        _fail_waiting_job(ctx, job_id, JobError(code=code, type="InvalidMessage", message=reason))


def _fail_waiting_job(ctx: JobContext, job_id: str, error: JobError) -> None:
    """A queued or retrying job waits for its message: this one was it, so the job fails. The
    claim first (as a delivery would start it) keeps a job that its real message is starting
    meanwhile out of reach."""
    from datus_queue.tasks.events import EventPublisher
    from datus_queue.tasks.observability import metrics

    current = ctx.store.get(job_id)
    if current is None or current.status not in (JobStatus.QUEUED, JobStatus.RETRYING):
        return
    claimed = ctx.store.mark_running(job_id, max(current.runs, 1), ctx.settings.lease_s)
    if claimed is None:
        return
    if ctx.store.finish(job_id, JobStatus.FAILED, error=error, run=current.runs):
        publisher = EventPublisher(ctx.redis, ctx.settings.event_ttl_s, ctx.settings.event_maxlen)
        publisher.publish(job_id, error_step(error), terminal=True, status=JobStatus.FAILED)
        metrics.job_finished(claimed.provider or "unknown", claimed.kind.value if claimed.kind else "unknown",
                             JobStatus.FAILED.value, error.code)


def error_step(error: JobError) -> ActionHistory:
    """The terminal step of a job that failed with ``error``."""
    return ActionHistory.create_action(ActionRole.WORKFLOW, "error", f"{error.type}: {error.message}", None,
                                       error.model_dump(), ActionStatus.FAILED)


def reject_delivered(message: Any, reason: str) -> None:
    """Dead-letter a message Celery handed to us or already rejected; never raises."""
    from datus_queue.tasks.context import get_context

    headers = getattr(message, "headers", None)
    job_id = valid_id(headers.get("id")) if isinstance(headers, Mapping) else None
    info = getattr(message, "delivery_info", None)
    queue = info.get("routing_key") if isinstance(info, Mapping) else None
    try:
        reject(get_context(), reason, job_id, queue=queue if isinstance(queue, str) else None)
    except Exception as exc:  # noqa: BLE001 - recording must never take the consumer down
        logger.error("could not record the dead letter of message %s (%s: %s): %s", job_id or "(no id)",
                     type(exc).__name__, exc, reason)


# ---- Celery's side: the job tasks' strategy, and the messages that never reach it ----------------


def job_strategy(task: Any, app: Any, consumer: Any, **options: Any) -> Callable[..., Any]:
    """Celery's default strategy for a job task, with the headers checked first and its own
    handling guarded: what would make it raise is dead-lettered and acknowledged instead."""
    from celery.worker.strategy import default

    from datus_queue.tasks.context import get_context

    handle = default(task, app, consumer, **options)
    connection_errors = tuple(consumer.connection_errors)
    max_eta_s = float(get_context().settings.visibility_timeout_s)

    def on_message(message: Any, body: Any, ack: Any, reject_: Any, callbacks: Any, **rest: Any) -> Any:
        problem = header_problem(message.headers, message.properties, max_eta_s)
        if problem is None:
            try:
                return handle(message, body, ack, reject_, callbacks, **rest)
            except Exception as exc:
                if is_infrastructure(exc) or isinstance(exc, connection_errors) or message.acknowledged:
                    raise  # Redis failing is not the message's fault: the consumer reconnects
                problem = f"{type(exc).__name__}: {exc}"
        reject_delivered(message, f"invalid job message: {problem}")
        message.ack_log_error(logger, connection_errors)

    return on_message


# ---- sending a job message again -----------------------------------------------------------------


def send_again(app: Any, message: JobMessage, outcome: Retry | ComeBack) -> None:
    """Publish ``message`` once more after the outcome's countdown: a `Retry` as the job's next
    run (``retries + 1``), a `ComeBack` as this same run (same ``retries``, so it is not taken for
    a newer run, which could start next to the running one). Raises what the broker raises."""
    if isinstance(outcome, Retry):
        retries, infra = message.retries + 1, outcome.infra_retries
    else:
        retries, infra = message.retries, message.infra_retries
    app.send_task(message.task_name, args=(message.job_id, _public(message.payload)), task_id=message.task_id,
                  queue=message.queue, retries=retries, countdown=outcome.countdown, priority=message.priority,
                  ignore_result=True, argsrepr=message.argsrepr, kwargsrepr="{}",
                  headers={**(message.trace_headers or {}), INFRA_HEADER: infra})


def _public(payload: Any) -> Any:
    """A payload fit to be sent again: one of the previous format (with the whole request) loses
    the request, keeping its kind and model name (the worker reads the request from the store)."""
    if not isinstance(payload, Mapping) or "request" not in payload:
        return payload
    request = payload.get("request")
    public = {key: value for key, value in payload.items() if key != "request"}
    if isinstance(request, Mapping):
        for name in ("kind", "model"):
            if isinstance(request.get(name), str):
                public.setdefault(name, request[name])
    return public
