"""The caller's own tools (``JobRequest.caller_tools``): declared by the caller, offered to the
model by the worker next to the MCP tools, run by the caller.

A call of one, on the worker (`CallerTool.call`, inside the durable tool loop):

1. the tool loop has written the call's start row (`tasks.checkpoints`: the call is in the
   run's journal) and published its tool step (PROCESSING);
2. the answer is looked up in the job's caller hash (`keys.job_caller`, field ``result:ID``,
   ID = the call's action id, stable across deliveries): there, it is the tool's outcome and
   the run goes on — the call is never handed out again;
3. not there: the first time the worker asks is kept (``asked:ID``, set once; all times are
   Redis's clock, so the caller's and the workers' clocks may differ). The wait ends when
   - the caller stopped beating: it beats (``beat``) every sixth of ``DQ_CALLER_LIVENESS_S``
     while it follows the job, from before the submit; a beat older than that window means
     it died (or lost Redis): `CallerGone`, the job fails ``caller_gone``;
   - the call is older than ``DQ_CALLER_TOOL_TIMEOUT_S`` (the bound on one tool's run while
     the caller is alive; the only bound for a caller that never beats): `CallerToolTimeout`,
     ``caller_tool_timeout``;
   - the job's ``deadline`` passed: `DeadlineExceeded`, ``deadline_exceeded``.
   Otherwise `CallerToolWait` stops the run. The tool loop first asks the turn's later calls of
   caller tools too (`CallerToolWait.merge`), so every call of the turn goes to the caller in
   one hand-back: the delivery hands the job back (`tasks.jobs._caller_wait`: the row to
   ``retrying``, counted in ``caller_waits``, not an attempt), publishes one
   ``caller_tool_request`` step (WORKFLOW, PROCESSING; ``output["calls"]``: call id, tool,
   arguments of each call not requested before; ``sent:ID`` then marks them), and the job comes
   back after the shortest of the bounds above (for a live caller: about the liveness window),
   to look again. The wait holds no worker slot.

The caller (`datus.models.queue_model.QueueModel`, following the events) runs the calls
(concurrently), caps each answer (`bounded_result`, as any tool result), and sends them with
`JobClient.send_tool_results`: stored once per call id (``HSETNX``: a second answer is
ignored), then the job is sent again at once, as its next run. That run resumes from the
journal (no model turn asked again), finds the answers, and goes on. A worker that dies while
the caller's tool runs holds nothing of the job: the caller's re-send (or the delayed message,
or the sweeper) starts the next run on any worker. A caller that closes its stream cancels the
job (a retrying job is cancelled at once).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from datus.models.function_tools import ToolOutcome
from datus.models.generation import ToolSpec
from datus.models.output_bounds import DEFAULT_TOOL_RESULT_CHARS, json_bytes, shrink_json
from datus_queue.tasks import keys
from datus_queue.tasks.ratelimit import DeadlineExceeded, current_job

if TYPE_CHECKING:
    from collections.abc import Iterable

    from datus_queue.tasks.context import JobContext
    from datus_queue.tasks.schemas import CallerToolSpec
    from datus_queue.tasks.settings import Settings

__all__ = ["BEATS_PER_WINDOW", "REQUEST_STEP", "SERVER", "CallerGone", "CallerTool", "CallerToolResult",
           "CallerToolTimeout", "CallerToolWait", "PendingCall", "all_answered", "beat_interval", "bounded_result",
           "caller_tools", "hash_ttl", "heartbeat", "mark_sent"]

REQUEST_STEP = "caller_tool_request"  # the action_type of the step that hands calls to the caller
SERVER = "caller"  # a caller tool's ``server`` in its tool step's input
BEATS_PER_WINDOW = 6  # a caller beats this often per DQ_CALLER_LIVENESS_S: a few late beats are no death

# Redis's clock as "seconds.micros" (a Lua number would come back as an integer)
_NOW = "local t = redis.call('TIME') local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))"
# KEYS[1] the job's caller hash; ARGV[1] the hash's TTL (s). The caller is alive now.
_BEAT = _NOW + """
redis.call('HSET', KEYS[1], 'beat', now)
redis.call('EXPIRE', KEYS[1], ARGV[1])
return now"""
# KEYS[1] the job's caller hash; ARGV[1] the call id, ARGV[2] the hash's TTL (s). The answer, or
# when the call was first asked, the caller's last beat, whether the call was requested.
_LOOK = _NOW + """
local result = redis.call('HGET', KEYS[1], 'result:' .. ARGV[1])
if result then return {now, result} end
redis.call('HSETNX', KEYS[1], 'asked:' .. ARGV[1], now)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {now, false, redis.call('HGET', KEYS[1], 'asked:' .. ARGV[1]), redis.call('HGET', KEYS[1], 'beat'),
        redis.call('HGET', KEYS[1], 'sent:' .. ARGV[1])}"""


@dataclass(frozen=True)
class PendingCall:
    """A call of a caller tool that waits for the caller's answer."""

    call_id: str
    name: str
    arguments: dict[str, Any]
    sent: bool  # a caller_tool_request step already carried it (this is a later look)

    def asked(self) -> dict[str, Any]:
        return {"call_id": self.call_id, "name": self.name, "arguments": self.arguments}


@dataclass(frozen=True)
class CallerToolResult:
    """The caller's answer to one call (`JobClient.send_tool_results`)."""

    call_id: str
    text: str
    is_error: bool = False
    raw: Any = None  # the tool's return value, for the step's raw_output (JSON, or dropped)


class CallerToolWait(Exception):
    """The run waits for the caller's answers to ``calls``: the job is handed back for at most
    ``wait_s`` (then it looks again)."""

    suspends_run = True  # the tool loop lets it through instead of making it a failed tool result

    def __init__(self, calls: list[PendingCall], wait_s: float) -> None:
        super().__init__()
        self.calls, self.wait_s = list(calls), wait_s

    def __str__(self) -> str:
        names = ", ".join(f"{call.name} (call {call.call_id})" for call in self.calls)
        return f"waiting for the caller to run its tool(s) {names}"

    def merge(self, other: BaseException) -> BaseException:
        """Another call of the same turn asked (`datus.models.tool_loop`): a wait joins this one,
        so the turn's calls go to the caller together; anything else (the caller is gone, the
        deadline passed) ends the run instead."""
        if not isinstance(other, CallerToolWait):
            return other
        self.calls.extend(other.calls)
        self.wait_s = min(self.wait_s, other.wait_s)
        return self


class CallerGone(Exception):
    """The caller stopped beating for ``DQ_CALLER_LIVENESS_S``: it died; the job fails
    (``caller_gone``)."""

    suspends_run = True


class CallerToolTimeout(CallerGone):
    """No answer to a call within ``DQ_CALLER_TOOL_TIMEOUT_S`` of its request, the caller alive
    or silent (one that never beats): the job fails (``caller_tool_timeout``)."""


def bounded_result(text: str, is_error: bool, raw: Any, max_chars: int | None) -> dict[str, Any]:
    """A caller tool's answer as it is stored and sent: ``text`` cut to its first ``max_chars``
    characters (``original_chars``: how long it was; the worker's tool loop marks the cut as it
    marks any tool's answer, `datus.models.tool_loop`), ``raw`` (the return value, for the
    step's ``raw_output``) shrunk to about as much JSON (a string unlike the text, such as an
    MCP tool's content item, cut like it), ``is_error``."""
    limit = max_chars or DEFAULT_TOOL_RESULT_CHARS
    result: dict[str, Any] = {"text": text[:limit], "is_error": bool(is_error)}
    total = len(text) if len(text) > limit else None
    if isinstance(raw, str):  # an MCP tool's content item as JSON text (Datus's CLI parses it); else text is all
        if raw != text:
            result["raw"] = raw[:limit]
    elif raw is not None:
        try:
            json.dumps(raw, allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            raw = None  # not JSON: the text is all there is
        if raw is not None:
            result["raw"], _ = shrink_json(raw, limit) if json_bytes(raw) > limit else (raw, False)
    if total is not None:
        result["original_chars"] = total
    return result


class CallerTool:
    """One of the caller's tools as the worker's tool loop sees it: its declaration, and a
    ``call`` that answers from the caller's stored result or stops the run to ask for it."""

    answers_once = True  # a resumed call's answer is the stored one: the tool ran once, in the caller

    def __init__(self, ctx: JobContext, job_id: str, spec: CallerToolSpec) -> None:
        self.ctx, self.job_id = ctx, job_id
        self.spec = ToolSpec(name=spec.name, description=spec.description, parameters=spec.parameters)
        self.meta = {"tool": spec.name, "server": SERVER}

    @property
    def name(self) -> str:
        return self.spec.name

    async def call(self, arguments: dict[str, Any], ctx: Any = None) -> ToolOutcome:
        from datus.models.tool_loop import CURRENT_CALL

        call_id = CURRENT_CALL.get() or getattr(ctx, "tool_call_id", None) or self.spec.name
        settings, name = self.ctx.settings, self.spec.name
        looked = await self.ctx.aredis.eval(_LOOK, 1, keys.job_caller(self.job_id), call_id, hash_ttl(settings))
        now = _seconds(looked[0], 0.0)
        if looked[1] is not None:
            answer = json.loads(looked[1])
            whole = answer.get("original_chars")
            return ToolOutcome(str(answer.get("text", "")), is_error=bool(answer.get("is_error")),
                               raw=answer.get("raw"),
                               meta={"cut_from_chars": whole} if isinstance(whole, int) else {})
        asked, beat, sent = _seconds(looked[2], now), looked[3], looked[4] is not None
        job = current_job.get()
        deadline = job.deadline if job is not None else None
        if deadline is not None and now >= deadline:
            passed = DeadlineExceeded(f"the job's deadline passed while it waited for the caller's tool {name!r} "
                                      f"(call {call_id})")
            passed.suspends_run = True  # type: ignore[attr-defined]  # it ends the run, not this call
            raise passed
        liveness, timeout = float(settings.caller_liveness_s), float(settings.caller_tool_timeout_s)
        left = [timeout - (now - asked)]
        if beat is not None:  # the caller beats: its silence is its death
            silent = now - _seconds(beat, now)
            if silent > liveness:
                raise CallerGone(f"the caller went away: no heartbeat for {silent:.0f}s (DQ_CALLER_LIVENESS_S="
                                 f"{liveness:g}) while its tool {name!r} (call {call_id}) was due; it died or lost "
                                 "its connection to Redis")
            left.append(liveness - silent)
        if left[0] < 0:
            raise CallerToolTimeout(f"the caller did not answer its tool {name!r} (call {call_id}) within "
                                    f"{timeout:g}s of the request (DQ_CALLER_TOOL_TIMEOUT_S)")
        if deadline is not None:
            left.append(deadline - now)
        raise CallerToolWait([PendingCall(call_id, name, arguments, sent)], min(left))


def caller_tools(ctx: JobContext, job_id: str, specs: list[CallerToolSpec] | None) -> list[CallerTool] | None:
    """The run's caller tools, or None (no ``caller_tools``: the run is as it always was)."""
    if not specs:
        return None
    return [CallerTool(ctx, job_id, spec) for spec in specs]


def hash_ttl(settings: Settings) -> int:
    """How long the job's caller hash lives after its last write: past any wait for an answer."""
    return max(int(settings.event_ttl_s), int(settings.caller_tool_timeout_s * 2) + 60)


def beat_interval(settings: Settings) -> float:
    """How often a caller that follows a job with caller tools beats."""
    return max(0.2, min(float(settings.caller_liveness_s) / BEATS_PER_WINDOW, 10.0))


def heartbeat(redis: Any, job_id: str, settings: Settings) -> Any:
    """The caller of ``job_id`` is alive (Redis's clock). A sync client answers, an async one
    returns the awaitable."""
    return redis.eval(_BEAT, 1, keys.job_caller(job_id), hash_ttl(settings))


async def mark_sent(ctx: JobContext, job_id: str, calls: Iterable[PendingCall]) -> None:
    """These calls went out in a ``caller_tool_request`` step: a later look does not send them again."""
    fields = {f"sent:{call.call_id}": "1" for call in calls}
    if fields:
        await ctx.aredis.hset(keys.job_caller(job_id), mapping=fields)


async def all_answered(ctx: JobContext, job_id: str, calls: list[PendingCall]) -> bool:
    """Whether the caller has answered every one of ``calls`` (meanwhile: its re-send may have
    found the job still running, and sent nothing)."""
    stored = await ctx.aredis.hmget(keys.job_caller(job_id), [f"result:{call.call_id}" for call in calls])
    return bool(calls) and all(value is not None for value in stored)


def _seconds(value: Any, default: float) -> float:
    try:
        return float(value.decode() if isinstance(value, bytes) else value)
    except (TypeError, ValueError, AttributeError):
        return default
