"""The tool loop: ask the model, run the tools it calls, feed the results back, until it
answers — each step an `ActionHistory`, yielded as it happens.

Each model request is retried on its own under the retry policy (``LLMBaseModel._call`` /
``_stream_call``); tool results are kept in the conversation, so a tool that already ran is
never run again because a later request failed. A tool that fails (raises, or answers
``{"success": 0, ...}``), a tool that does not exist and malformed arguments all go back to the
model as failed tool results. What a hook raises (`datus.models.hooks`) ends the run as it is.

Steps (``action_type``), shaped as Datus-agent's callers read them:

- ``user_input`` (USER) — live runs only;
- ``assistant_delta`` (PROCESSING; one ``action_id`` per model answer) — live streamed runs only;
- ``message`` (ASSISTANT): text that came with tool calls (live runs: or reasoning alone);
  ``output`` holds ``success``, ``raw_output`` (the text), ``reasoning`` and ``tool_calls``;
- one per tool call, named after the tool (TOOL): ``messages`` is ``Tool call: name('args...')``,
  ``input`` holds ``function_name``, ``arguments``, ``tool``, ``server``, ``call_id``; ``output``
  holds ``success``, ``raw_output`` (the tool's raw return value: a Datus function tool's dict,
  an MCP tool's text), ``summary``, ``status_message``, ``error`` when it failed, and
  ``truncated`` (with ``original_chars``) when the answer was over the run's cap; SUCCESS
  once the tool answered, whatever it answered (a tool's failure goes back to the model, and
  ``output["success"]`` says it failed), ``end_time`` set. Live runs yield it first as
  PROCESSING, then again finished under the same ``action_id``;
- one per call of a tool the provider ran inside the answer (OpenAI's hosted ``web_search``,
  ``file_search``, ``code_interpreter``; TOOL, SUCCESS, before the answer's other steps):
  ``input`` holds ``function_name``, ``arguments`` (e.g. the search action), ``call_id`` and
  ``hosted: true``; ``output`` holds ``success``, ``raw_output`` (e.g. the sources) and
  ``hosted: true``;
- ``final_response`` (ASSISTANT, SUCCESS): ``output`` holds ``success``, ``raw_output`` (the
  answer's text), ``content`` (validated into the output type), ``sql_contexts``, ``usage``
  (`Usage.to_dict`: ``total_tokens`` and the other keys Datus reads), ``turns_used``, ``model``;
- ``error`` (WORKFLOW, FAILED) — live runs only — just before a model error is raised.

A tool's answer longer than ``max_tool_result_chars`` (the model config's, or a run's
keyword; a journal's ``max_tool_result_chars`` lowers it) reaches the model cut to that many
characters and marked ``[truncated: N of M characters; narrow the query]`` — MCP tools and
Python function tools alike, plain and streamed, for every provider (the cut is made on the
tool message every provider's message builder reads). The step's ``raw_output`` is bounded
the same way (a text: exactly what the model read; a structured value: shrunk in place,
`datus.models.output_bounds.shrink_json`), and the journal records what the model read, so a
resumed run replays the same truncated text.

A live run (``live_steps``: the job system's) yields every step; otherwise only finished steps
are yielded, as Datus-agent's own model layer does. Every yielded step is added to the
``ActionHistoryManager`` (a live tool step once, then updated in place).

Durable runs (``journal``, see `datus.models.run_journal`): each completed turn and each tool
result is recorded before the next step starts, and each model request and each tool call is
announced (``journal.starting``) before it is made; a run on a journal that already holds
steps replays them — yielding their steps again, with the same action ids, but asking no
model, calling no tool and no hook — then goes on. A tool call an earlier run had started is
made again and its result says ``resumed: true``. A tool server that dies mid-call is then a
retryable `ToolServerLostError` (the run is resumed later) instead of a failed result. A tool
whose answer comes from elsewhere (the job system's caller tools) may stop the run with an
exception that ``suspends_run``; one that can also ``merge`` has the turn's later calls of such
tools asked first, so one stop hands out all the calls of the turn.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from datus.models import observe
from datus.models.agents_compat import AgentInfo, RunContext
from datus.models.errors import MaxTurnsExceededError, ModelError, ToolServerLostError
from datus.models.function_tools import Tool, ToolOutcome, reported_failure
from datus.models.generation import CallOptions, Generation, ModelRequest, StreamDelta
from datus.models.hooks import RunHooks, hook_tool
from datus.models.json_output import JsonOutputInvalid, normalize_response_format, parse_json_output
from datus.models.mcp_result_extractors import extract_sql_contexts
from datus.models.messages import ChatMessage, ToolCall
from datus.models.output_bounds import DEFAULT_TOOL_RESULT_CHARS, cap_text, shrink_json, truncation_marker
from datus.models.run_journal import ResumeState, RunJournal, RunStart, RunStep, step_id, turn_id
from datus.models.usage import Usage
from datus.schemas.action_history import ActionHistory, ActionHistoryManager, ActionRole, ActionStatus

if TYPE_CHECKING:
    from datus.models.base import LLMBaseModel

__all__ = ["CURRENT_CALL", "ToolRun", "ToolRunResult"]

# the action id of the tool call under way (stable in a durable run): a tool that answers from
# elsewhere (the job system's caller tools) keys the call's answer by it
CURRENT_CALL: ContextVar[str | None] = ContextVar("datus_tool_call", default=None)

_PREVIEW_CHARS = 80


@dataclass
class ToolRunResult:
    content: Any
    sql_contexts: list[Any]
    usage: Usage
    turns_used: int
    model: str
    steps: list[ActionHistory] = field(default_factory=list)
    context_length: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """What ``generate_with_tools`` returns; ``usage`` is the dict Datus reads."""
        return {
            "content": self.content,
            "sql_contexts": self.sql_contexts,
            "usage": self.usage.to_dict(self.context_length),
            "turns_used": self.turns_used,
            "model": self.model,
        }


class ToolRun:
    """One run; iterate ``run_steps()``, then read ``result``."""

    def __init__(
        self,
        model: LLMBaseModel,
        messages: list[ChatMessage],
        tools: Mapping[str, Tool],
        options: CallOptions,
        *,
        output_type: Any = str,
        max_turns: int = 10,
        stream: bool = False,
        live_steps: bool = False,
        manager: ActionHistoryManager | None = None,
        db_type: str = "datus_sql",
        sql_functions: Mapping[str, Mapping[str, str]] | None = None,
        user_text: str = "",
        journal: RunJournal | None = None,
        session_messages: int = 0,
        hooks: RunHooks | None = None,
        max_tool_result_chars: int | None = DEFAULT_TOOL_RESULT_CHARS,
    ) -> None:
        if max_turns < 1:
            raise ValueError("max_turns must be at least 1")
        # a journal that keeps results under a smaller cap lowers the model's: what the model
        # reads is exactly what the journal holds, so a resumed run replays it faithfully
        journal_cap = getattr(journal, "max_tool_result_chars", None)
        caps = [int(cap) for cap in (max_tool_result_chars, journal_cap) if cap is not None]
        self.max_tool_result_chars: int | None = min(caps) if caps else None
        self.model = model
        self.messages = list(messages)
        self.new_messages: list[ChatMessage] = []
        self.tools = dict(tools)
        self.options = options
        self.output_format = None if output_type in (str, None) else normalize_response_format(output_type)
        self.max_turns = max_turns
        self.stream = stream
        self.live_steps = live_steps
        self.manager = manager if manager is not None else ActionHistoryManager()
        self.db_type = db_type
        self.sql_functions = sql_functions
        self.steps: list[ActionHistory] = []
        self.usage = Usage(provider=model.provider, model=model.model_name)
        self.result: ToolRunResult | None = None
        self.user_text = user_text
        self.journal = journal
        self.session_messages = session_messages  # how many of ``messages`` came from the session
        self.replayed = 0  # steps taken from the journal instead of a model or a tool
        self.hooks = hooks if hooks is not None else RunHooks(None, RunContext(), AgentInfo())
        self._replay: deque[RunStep] = deque()
        self._started: frozenset[str] = frozenset()

    def _id(self, place: str) -> str:
        # a journal's run has stable ids, so a resumed run's steps can be matched with the first run's
        return step_id(self.journal.run_id, place) if self.journal is not None else str(uuid.uuid4())

    async def _resume(self) -> None:
        if self.journal is None:
            return
        state: ResumeState = await self.journal.load()
        self._replay = deque(state.steps)
        self._started = frozenset(state.started)
        start = state.steps[0].start if state.steps else None
        if start is not None:  # the conversation the first run began with
            self.messages = list(start.messages)
            self.session_messages = start.session_messages

    def _replayed(self, kind: str, turn: int, call: int | None = None) -> RunStep | None:
        if not self._replay:
            return None
        step = self._replay[0]
        if (step.kind, step.turn, step.call) != (kind, turn, call):
            raise ValueError(f"the run's journal does not match the run: it holds a {step.kind} step of turn "
                             f"{step.turn} where the run is at a {kind} step of turn {turn}")
        self.replayed += 1
        return self._replay.popleft()

    async def _checkpoint(self, step: RunStep) -> None:
        if self.journal is not None:
            await self.journal.record(step)

    # ---- recording -----------------------------------------------------------------------

    def _record(self, action: ActionHistory) -> ActionHistory:
        """A step that is handed out now: kept, added to the manager, yielded (live runs yield
        a copy, since a live tool step is yielded again once finished)."""
        self.steps.append(action)
        self.manager.add_action(action)
        return action.model_copy() if self.live_steps else action

    def _start_tool_step(self, action: ActionHistory) -> ActionHistory | None:
        """A tool step under way: handed out only by live runs."""
        if self.live_steps:
            return self._record(action)
        self.steps.append(action)
        return None

    def _finish_step(self, action: ActionHistory, status: ActionStatus, output: Any,
                     end: datetime | None = None) -> ActionHistory:
        end = end or datetime.now()
        # the plain value, as ActionHistory (use_enum_values) stores what its constructor gets
        action.status, action.output, action.end_time = status.value, output, end
        if not self.live_steps:
            self.manager.add_action(action)  # its first appearance
            return action
        self.manager.update_action_by_id(action.action_id, status=status.value, output=output, end_time=end)
        return action.model_copy()

    # ---- the loop ------------------------------------------------------------------------

    async def run_steps(self) -> AsyncIterator[ActionHistory]:
        await self._resume()
        user = ActionHistory.create_action(
            ActionRole.USER, "user_input", self.user_text, {"prompt": self.user_text}, status=ActionStatus.SUCCESS)
        user.action_id = self._id("user")
        if self.live_steps:
            yield self._record(user)
        else:
            self.steps.append(user)
        specs = tuple(tool.spec for tool in self.tools.values())
        await self.hooks.start()
        try:
            for turn in range(1, self.max_turns + 1):
                replayed = self._replayed("turn", turn)
                if replayed is not None:
                    generation: Generation | None = replayed.generation()
                else:
                    start = RunStart(messages=list(self.messages), session_messages=self.session_messages) \
                        if turn == 1 else None
                    request = ModelRequest(self.messages, self.options, None, specs)
                    if self.hooks:
                        await self.hooks.llm_start(*_llm_input(self.messages))
                    if self.journal is not None:  # before the request, as before a tool call
                        await self.journal.starting(turn_id(self.journal.run_id, turn))
                    generation = None
                    if self.stream:
                        # not a stable id: an answer cut off by a stop is never finished, and a
                        # resumed run streams its new answer under a new id
                        answer_id = str(uuid.uuid4())
                        async for item in self.model._stream_call(request):
                            if isinstance(item, StreamDelta):
                                if self.live_steps:
                                    yield _delta_step(answer_id, item)
                            else:
                                generation = item
                    else:
                        generation = await self.model._call(request)
                    assert generation is not None
                    await self._checkpoint(RunStep(
                        kind="turn", turn=turn, message=generation.message(), usage=generation.usage,
                        finish_reason=generation.finish_reason, start=start))
                    if self.hooks:
                        await self.hooks.llm_end(generation)
                assert generation is not None
                self.usage = self.usage + generation.usage
                self.hooks.run_context.usage.set(self.usage)
                self._append(generation.message())
                for index, hosted in enumerate(_hosted_calls(generation)):  # run by the provider, in the answer
                    yield self._record(self._hosted_step(turn, index, hosted))
                if generation.tool_calls:
                    # reasoning alone is a step of live runs only: Datus's CLI shows each step as a line of text
                    if generation.text.strip() or (self.live_steps and generation.reasoning):
                        said = ActionHistory.create_action(
                            ActionRole.ASSISTANT, "message", generation.text, None,
                            {"success": True, "raw_output": generation.text, "reasoning": generation.reasoning,
                             "tool_calls": [call.model_dump() for call in generation.tool_calls]},
                            ActionStatus.SUCCESS,
                        )
                        said.action_id = self._id(f"t{turn}m")
                        said.end_time = said.start_time
                        yield self._record(said)
                    suspended: BaseException | None = None
                    for index, call in enumerate(generation.tool_calls):
                        if suspended is not None:  # the run stops after this turn: gather what else it waits for
                            suspended = await self._ask_ahead(turn, index, call, suspended)
                            continue
                        try:
                            async for step in self._run_tool(turn, index, call):
                                yield step
                        except Exception as exc:
                            if not callable(getattr(exc, "merge", None)):
                                raise
                            suspended = exc
                    if suspended is not None:
                        raise suspended
                    continue
                content, problem = self._final_content(generation.text)
                if problem is not None and turn < self.max_turns:
                    self._append(ChatMessage(role="user", content=(
                        f"Your final answer is unusable: {problem}. Reply with only the corrected JSON object.")))
                    continue
                if problem is not None:
                    raise MaxTurnsExceededError(f"the final answer never matched the output type: {problem}",
                                                provider=self.model.provider, model=self.model.model_name)
                yield await self._final(turn, generation, content)
                return
            raise MaxTurnsExceededError(
                f"no final answer within max_turns={self.max_turns}",
                provider=self.model.provider, model=self.model.model_name,
            )
        except ModelError as exc:
            exc.details.setdefault("steps", [_json_safe(step) for step in self.steps])
            exc.details.setdefault("usage", self.usage.model_dump())
            if self.live_steps:
                yield self._record(ActionHistory.create_action(
                    ActionRole.WORKFLOW, "error", str(exc), None, exc.to_dict() | {"details": {}},
                    ActionStatus.FAILED,
                ))
            raise

    async def _final(self, turn: int, generation: Generation, content: Any) -> ActionHistory:
        final = ActionHistory.create_action(ActionRole.ASSISTANT, "final_response", generation.text, None,
                                            None, ActionStatus.SUCCESS)
        final.action_id = self._id("final")
        # the final answer explains the SQL that ran last
        sql_contexts = extract_sql_contexts([*self.steps, final], self.db_type, self.sql_functions)
        context_length = self.model.context_length()
        final.output = {
            "success": True,
            "raw_output": generation.text,
            "content": content.model_dump(mode="json") if isinstance(content, BaseModel) else content,
            "sql_contexts": [context.model_dump() for context in sql_contexts],
            "usage": self.usage.to_dict(context_length), "turns_used": turn, "model": self.model.model_name,
        }
        final.end_time = datetime.now()
        await self.hooks.end(content)
        self.result = ToolRunResult(content, sql_contexts, self.usage, turn, self.model.model_name, self.steps,
                                    context_length)
        return self._record(final)

    def _hosted_step(self, turn: int, index: int, hosted: Mapping[str, Any]) -> ActionHistory:
        name = str(hosted.get("name") or "hosted_tool")
        arguments = hosted.get("input") or {}
        succeeded = hosted.get("status") in (None, "completed")
        output = {"success": succeeded, "raw_output": hosted.get("output"), "hosted": True,
                  "status_message": str(hosted.get("status") or "completed")}
        step = ActionHistory.create_action(
            ActionRole.TOOL, name, _call_message(name, arguments, json.dumps(arguments)),
            {"function_name": name, "tool": name, "server": None, "arguments": arguments,
             "call_id": hosted.get("call_id"), "hosted": True}, output, ActionStatus.SUCCESS)
        step.action_id = self._id(f"t{turn}h{index}")
        step.end_time = step.start_time
        return step

    def _append(self, message: ChatMessage) -> None:
        self.messages.append(message)
        self.new_messages.append(message)

    async def _run_tool(self, turn: int, index: int, call: ToolCall) -> AsyncIterator[ActionHistory]:
        replayed = self._replayed("tool", turn, index)
        if replayed is not None and replayed.action is not None:
            done = ActionHistory.model_validate(replayed.action)
            action = done.model_copy(update={"status": ActionStatus.PROCESSING, "output": None, "end_time": None})
            started = self._start_tool_step(action)
            if started is not None:
                yield started
            yield self._finish_step(action, ActionStatus(done.status), done.output, done.end_time)
            self._append(replayed.message)
            return
        tool = self.tools.get(call.name)
        meta = getattr(tool, "meta", {}) if tool is not None else {}
        try:
            arguments: dict[str, Any] | None = call.parsed_arguments()
            problem = None
        except ValueError as exc:
            arguments, problem = None, str(exc)
        action = ActionHistory.create_action(
            ActionRole.TOOL, call.name, _call_message(call.name, arguments, call.arguments),
            {"function_name": call.name, "tool": meta.get("tool", call.name), "server": meta.get("server"),
             "arguments": arguments if arguments is not None else call.arguments, "call_id": call.id},
        )
        action.action_id = self._id(f"t{turn}c{index}")
        resumed = action.action_id in self._started  # an earlier run started this call: it may have run
        started = self._start_tool_step(action)
        if started is not None:
            yield started
        if tool is None:
            outcome = ToolOutcome(f"there is no tool named {call.name!r}; available: {', '.join(self.tools) or 'none'}",
                                  is_error=True)
        elif problem is not None:
            outcome = ToolOutcome(problem, is_error=True)
        else:
            outcome = await self._call_tool(tool, call, arguments or {}, action.action_id)
        text, total = _capped(outcome, self.max_tool_result_chars)
        output = _tool_output(outcome)
        if total is not None:
            _mark_truncated(output, outcome, text, total, self.max_tool_result_chars or 0)
        if resumed and not getattr(tool, "answers_once", False):  # such a tool's answer is kept: it ran once
            output["resumed"] = True
        # the step is done either way: a tool's failure is an answer the model reads and works
        # with, not a failed run (Datus's API turns every FAILED step into an error event)
        status = ActionStatus.SUCCESS
        message = ChatMessage(role="tool", tool_call_id=call.id, name=call.name, content=text)
        finished = self._finish_step(action, status, output)
        await self._checkpoint(RunStep(kind="tool", turn=turn, call=index, message=message,
                                       action=_json_safe(finished)))
        yield finished
        self._append(message)

    async def _ask_ahead(self, turn: int, index: int, call: ToolCall, suspended: BaseException) -> BaseException:
        """A later call of a turn whose run stops at an earlier call that waits for an answer from
        elsewhere (an exception that ``suspends_run`` and can ``merge``: the job system's caller
        tools). A call of such a tool (``answers_once``) is asked now, so one hand-back carries
        all the turn's calls; its wait merges into ``suspended``. It records nothing: the next
        run makes each call in order (an answer already there is read then), other tools included."""
        tool = self.tools.get(call.name)
        merge = getattr(suspended, "merge", None)
        if tool is None or not getattr(tool, "answers_once", False) or not callable(merge):
            return suspended
        try:
            arguments = call.parsed_arguments()
        except ValueError:
            return suspended  # answered as a failed call when the run comes to it
        token = CURRENT_CALL.set(self._id(f"t{turn}c{index}"))
        try:
            await tool.call(arguments, self.hooks.run_context.for_call(call.name, call.id, call.arguments))
        except Exception as exc:  # noqa: BLE001 - sorted below: a stop merges, a failure waits its turn
            if not getattr(exc, "suspends_run", False):
                return suspended  # the tool's own failure: the run meets it when it comes to the call
            return merge(exc)
        finally:
            CURRENT_CALL.reset(token)
        return suspended

    async def _call_tool(self, tool: Tool, call: ToolCall, arguments: dict[str, Any], action_id: str) -> ToolOutcome:
        """Run one tool between its hooks. The tool's own failures become a failed outcome; what
        a hook raises is raised."""
        meta = getattr(tool, "meta", {}) or {}
        ctx = self.hooks.run_context.for_call(call.name, call.id, call.arguments)
        target = hook_tool(tool, call.name) if self.hooks else None
        if self.hooks:
            await self.hooks.tool_start(ctx, target)
        if self.journal is not None:  # before the call: a resumed run knows it may have been made
            await self.journal.starting(action_id)
        try:
            with observe.tool_call(call.name, arguments, call.id, meta.get("server")) as spans:
                token = CURRENT_CALL.set(action_id)
                try:
                    outcome = await tool.call(arguments, ctx)
                finally:
                    CURRENT_CALL.reset(token)
                if spans is not None:  # a trace shows what the model reads, cut as it is
                    text, total = cap_text(outcome.text, self.max_tool_result_chars)
                    spans.end(outcome if total is None else dataclasses.replace(outcome, text=text))
        except Exception as exc:
            if getattr(exc, "suspends_run", False):  # the run stops here and is resumed later (caller tools)
                raise
            if self.journal is not None and getattr(exc, "server_lost", False):
                # a durable run resumes once the server is back, and makes this call again
                raise ToolServerLostError(f"tool {call.name!r}: {exc}", provider=self.model.provider,
                                          model=self.model.model_name) from exc
            outcome = ToolOutcome(f"{type(exc).__name__}: {exc}", is_error=True)  # goes back to the model
        if self.hooks:
            await self.hooks.tool_end(ctx, target, outcome.raw if outcome.raw is not None else outcome.text)
        return outcome

    def _final_content(self, text: str) -> tuple[Any, str | None]:
        if self.output_format is None:
            return text, None
        try:
            value = parse_json_output(text, self.output_format)
        except JsonOutputInvalid as exc:
            return None, str(exc)
        model_cls = self.output_format.pydantic_model
        return (model_cls.model_validate(value) if model_cls else value), None


def _hosted_calls(generation: Generation) -> list[Mapping[str, Any]]:
    """The calls of tools the provider ran within the answer (OpenAI's web search, …): entries
    of ``reasoning_details`` of type ``hosted_tool_call`` with ``name``, ``call_id``, ``status``,
    ``input`` and ``output``; their steps are TOOL steps with ``input["hosted"]``."""
    return [detail for detail in generation.reasoning_details or () if detail.get("type") == "hosted_tool_call"]


def _capped(outcome: ToolOutcome, limit: int | None) -> tuple[str, int | None]:
    """`cap_text` of the tool's answer; an answer that arrives cut already (``meta["cut_from_chars"]``:
    the first characters of an answer that long, as the job system's caller tools send it) is cut
    and marked as the whole answer would have been."""
    whole = outcome.meta.get("cut_from_chars") if outcome.meta else None
    if not isinstance(whole, int) or whole <= len(outcome.text):
        return cap_text(outcome.text, limit)
    keep = len(outcome.text) if limit is None else min(len(outcome.text), max(0, int(limit)))
    return f"{outcome.text[:keep]}\n{truncation_marker(keep, whole)}", whole


def _tool_output(outcome: ToolOutcome) -> dict[str, Any]:
    """A finished tool step's ``output``: Datus's keys, ``raw_output`` the tool's own value."""
    raw = outcome.raw if outcome.raw is not None else outcome.text
    reported = reported_failure(outcome.raw) if outcome.raw is not None else None
    failed = outcome.is_error or reported is not None
    summary = _summary(raw, failed, reported or outcome.text)
    output: dict[str, Any] = {"success": not failed, "raw_output": raw, "summary": summary, "status_message": summary}
    if failed:
        output["error"] = reported or outcome.text
    return output


def _mark_truncated(output: dict[str, Any], outcome: ToolOutcome, text: str, total: int, limit: int) -> None:
    """A tool step whose answer was cut to ``text`` for the model: ``raw_output`` (and ``error``)
    bounded alike, and the step says so."""
    if outcome.raw is None or isinstance(outcome.raw, str):
        output["raw_output"] = text  # exactly what the model read
    else:  # keep a structured value's shape (Datus's read_query dict): its long parts are cut
        output["raw_output"], _ = shrink_json(to_jsonable_python(outcome.raw, fallback=str), limit)
    if "error" in output and isinstance(output["error"], str):
        output["error"] = cap_text(output["error"], limit)[0]
    output["truncated"] = True
    output["original_chars"] = total


def _summary(raw: Any, failed: bool, error: str) -> str:
    """A few words on a tool's answer, for one line of a CLI."""
    if failed:
        return f"Failed: {_preview(error, 100)}"
    value = raw.get("result", raw) if isinstance(raw, Mapping) and "success" in raw else raw
    if isinstance(value, Mapping) and isinstance(value.get("original_rows"), int):
        return f"{value['original_rows']} rows"
    if isinstance(value, (list, tuple)):
        return f"{len(value)} items"
    if value in (None, "", {}, []):
        return "Empty result"
    if isinstance(value, str):
        return _preview(value, 100)
    return "Success"


def _preview(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else f"{text[:limit]}..."


def _call_message(name: str, arguments: dict[str, Any] | None, raw: str) -> str:
    """``Tool call: name('{"sql": "SELECT ...'...)``, as Datus's CLI shows a tool call."""
    shown = json.dumps(arguments, ensure_ascii=False, default=str) if arguments is not None else raw
    return f"Tool call: {name}('{shown[:_PREVIEW_CHARS]}...')"


def _llm_input(messages: list[ChatMessage]) -> tuple[str | None, list[dict[str, Any]]]:
    """(system prompt, the other messages as dicts): what ``on_llm_start`` gets."""
    system = next((m.content for m in messages if m.role == "system"), None)
    return system, [m.model_dump(exclude_defaults=True) for m in messages if m.role != "system"]


def _json_safe(step: ActionHistory) -> dict[str, Any]:
    """A step as JSON (journals, error details): a tool's raw value that JSON cannot hold is
    kept as its ``str``."""
    return to_jsonable_python(step, fallback=str)


def _delta_step(answer_id: str, delta: StreamDelta) -> ActionHistory:
    kind = "reasoning" if delta.reasoning and not delta.text else "text"
    return ActionHistory(
        action_id=answer_id, role=ActionRole.ASSISTANT, action_type="assistant_delta",
        messages=delta.text or delta.reasoning, output={"kind": kind, "text": delta.text, "reasoning": delta.reasoning},
        status=ActionStatus.PROCESSING,
    )


def output_hint(output_format: Any) -> str:
    schema = getattr(output_format, "schema", None)
    base = "When you give your final answer, reply with only a JSON object"
    return f"{base} matching this JSON schema:\n{json.dumps(schema, ensure_ascii=False)}" if schema else f"{base}."
