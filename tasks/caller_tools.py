"""The caller's own tools (``JobRequest.caller_tools``): declared by the caller, offered to the
model by the worker next to the MCP tools, run by the caller.

A call of one, on the worker (`CallerTool.call`, inside the durable tool loop):

1. the tool loop has written the call's start row (`tasks.checkpoints`: the call is in the
   run's journal) and published its tool step (PROCESSING);
2. the answer is looked up in the job's caller hash (`keys.job_caller`, field ``result:ID``,
   ID = the call's action id, stable across deliveries): there, it is the tool's outcome and
   the run goes on — the call is never handed out again;
3. not there: the first time the worker asks is kept (``asked:ID``, set once). When neither the
   request nor the caller's last heartbeat (``beat``) is younger than
   ``DQ_CALLER_TOOL_TIMEOUT_S``, the caller is gone: the job fails with ``caller_gone``
   (`CallerGone`). Otherwise `CallerToolWait` stops the run: the delivery hands the job back
   (`tasks.jobs`: the row to ``retrying``, not an attempt, like a limiter's hand-back), then
   publishes a ``caller_tool_request`` step (WORKFLOW, PROCESSING: call id, tool, arguments)
   on the job's stream, and the job's message comes back when the wait is over. The wait holds
   no worker slot.

The caller (`datus.models.queue_model.QueueModel`, following the events) runs the tool,
caps its answer (`bounded_result`, as any tool result), and sends it with
`JobClient.send_tool_result`: stored once per call id (``HSETNX``: a second answer is
ignored), then the job is sent again at once, as its next run. That run resumes from the
journal (no model turn asked again), finds the answer, and goes on. A worker that dies while
the caller's tool runs holds nothing of the job: the caller's re-send (or the delayed message,
or the sweeper) starts the next run on any worker. A caller that closes its stream cancels the
job (a retrying job is cancelled at once).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from datus.models.function_tools import ToolOutcome
from datus.models.generation import ToolSpec
from datus.models.output_bounds import DEFAULT_TOOL_RESULT_CHARS, json_bytes, shrink_json
from datus_queue.tasks import keys

if TYPE_CHECKING:
    from datus_queue.tasks.context import JobContext
    from datus_queue.tasks.schemas import CallerToolSpec

__all__ = ["REQUEST_STEP", "SERVER", "CallerGone", "CallerTool", "CallerToolWait", "bounded_result", "caller_tools"]

REQUEST_STEP = "caller_tool_request"  # the action_type of the step that hands a call to the caller
SERVER = "caller"  # a caller tool's ``server`` in its tool step's input


class CallerToolWait(Exception):
    """The run waits for the caller's answer to call ``call_id``: the job is handed back."""

    suspends_run = True  # the tool loop lets it through instead of making it a failed tool result

    def __init__(self, call_id: str, name: str, arguments: dict[str, Any], wait_s: float, timeout_s: float) -> None:
        super().__init__(f"waiting for the caller to run its tool {name!r} (call {call_id})")
        self.call_id, self.name, self.arguments = call_id, name, arguments
        self.wait_s, self.timeout_s = wait_s, timeout_s


class CallerGone(Exception):
    """No answer from the caller within ``DQ_CALLER_TOOL_TIMEOUT_S``: the job fails (``caller_gone``)."""

    suspends_run = True


def bounded_result(text: str, is_error: bool, raw: Any, max_chars: int | None) -> dict[str, Any]:
    """A caller tool's answer as it is stored and sent: ``text`` cut to its first ``max_chars``
    characters (``original_chars``: how long it was; the worker's tool loop marks the cut as it
    marks any tool's answer, `datus.models.tool_loop`), ``raw`` (the return value, for the
    step's ``raw_output``) shrunk to about as much JSON, ``is_error``."""
    limit = max_chars or DEFAULT_TOOL_RESULT_CHARS
    result: dict[str, Any] = {"text": text[:limit], "is_error": bool(is_error)}
    total = len(text) if len(text) > limit else None
    if raw is not None and not isinstance(raw, str):
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
        key, redis = keys.job_caller(self.job_id), self.ctx.aredis
        stored = await redis.hget(key, f"result:{call_id}")
        if stored is not None:
            answer = json.loads(stored)
            whole = answer.get("original_chars")
            return ToolOutcome(str(answer.get("text", "")), is_error=bool(answer.get("is_error")),
                               raw=answer.get("raw"),
                               meta={"cut_from_chars": whole} if isinstance(whole, int) else {})
        settings = self.ctx.settings
        timeout = float(settings.caller_tool_timeout_s)
        now = time.time()
        await redis.hsetnx(key, f"asked:{call_id}", repr(now))
        await redis.expire(key, max(int(settings.event_ttl_s), int(timeout * 2) + 60))
        asked, beat = await redis.hmget(key, [f"asked:{call_id}", "beat"])
        since = max(_seconds(asked, now), _seconds(beat, 0.0))
        if now - since > timeout:
            raise CallerGone(f"the caller did not answer its tool {self.spec.name!r} (call {call_id}) within "
                             f"{timeout:g}s (DQ_CALLER_TOOL_TIMEOUT_S): it went away")
        raise CallerToolWait(call_id, self.spec.name, arguments, timeout - (now - since), timeout)


def caller_tools(ctx: JobContext, job_id: str, specs: list[CallerToolSpec] | None) -> list[CallerTool] | None:
    """The run's caller tools, or None (no ``caller_tools``: the run is as it always was)."""
    if not specs:
        return None
    return [CallerTool(ctx, job_id, spec) for spec in specs]


def _seconds(value: Any, default: float) -> float:
    try:
        return float(value.decode() if isinstance(value, bytes) else value)
    except (TypeError, ValueError, AttributeError):
        return default
