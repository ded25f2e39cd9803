"""The queue model's tool runs (`datus.models.queue_model.QueueModel`): ``generate_with_tools``
and ``generate_with_tools_stream`` as a ``tool_run`` job, the caller's own tools (Python
functions, openai-agents ``FunctionTool``s, MCP server *objects*) run here in the caller when
the job hands their calls back, ``hooks`` called as in-process, and the job's steps turned into
the ones the in-process model yields (the module docstring of `queue_model` has the whole
picture; `datus_queue.tasks.caller_tools` the worker's side).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from datus.models.errors import ModelConfigError
from datus.models.json_output import normalize_response_format
from datus.models.messages import Prompt
from datus.models.usage import Usage

if TYPE_CHECKING:
    from datus.models.queue_model import _End

__all__ = ["QueueToolRuns"]

# the steps a live tool run publishes that the in-process model does not yield without live_steps
_LIVE_ONLY = frozenset({"user_input", "assistant_delta", "error", "resumed", "retry", "rate_limit_wait", "cancelled",
                        "caller_tool_request"})
# keyword arguments of the tool methods that are the model layer's, not call options
_RUN_KEYWORDS = ("db_type", "sql_functions", "max_tool_result_chars")


class QueueToolRuns:
    """`QueueModel`'s tool methods (a mixin: the job, its options and its outcome are
    `QueueModel`'s own ``_job``, ``_job_options``, ``_prompt_fields``, ``_outcome``, ``_trace``)."""

    async def generate_with_tools(
        self,
        prompt: Prompt,
        mcp_servers: Any = None,
        tools: Any = None,
        instruction: str = "",
        output_type: Any = str,
        max_turns: int = 10,
        session: Any = None,
        journal: Any = None,
        mcp_pool: Any = None,
        hooks: Any = None,
        action_history_manager: Any = None,
        agent_name: str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """A ``tool_run`` job: ``content``, ``sql_contexts`` (`SQLContext`), ``usage``,
        ``turns_used``, ``model`` — what the in-process model returns."""
        from datus.models.queue_model import _End

        end = _End()
        async with contextlib.aclosing(self._tool_run(
                prompt, tools=tools, mcp_servers=mcp_servers, instruction=instruction, output_type=output_type,
                max_turns=max_turns, session=session, hooks=hooks, manager=action_history_manager,
                live_steps=False, kwargs=kwargs, end=end, agent_name=agent_name)) as steps:
            async for _ in steps:
                pass
        return end.result_dict

    async def generate_with_tools_stream(
        self,
        prompt: Prompt,
        tools: Any = None,
        mcp_servers: Any = None,
        instruction: str = "",
        output_type: Any = str,
        max_turns: int = 10,
        action_history_manager: Any = None,
        session: Any = None,
        journal: Any = None,
        mcp_pool: Any = None,
        hooks: Any = None,
        agent_name: str | None = None,
        live_steps: bool = False,
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        """The job's steps as the in-process model yields them (``live_steps``: every step the
        job publishes); closing it early cancels the job."""
        from datus.models.queue_model import _End

        end = _End()
        async with contextlib.aclosing(self._tool_run(
                prompt, tools=tools, mcp_servers=mcp_servers, instruction=instruction, output_type=output_type,
                max_turns=max_turns, session=session, hooks=hooks, manager=action_history_manager,
                live_steps=live_steps, kwargs=kwargs, end=end, agent_name=agent_name)) as steps:
            async for step in steps:
                yield step

    async def _tool_run(self, prompt: Prompt, *, tools: Any, mcp_servers: Any, instruction: str, output_type: Any,
                        max_turns: int, session: Any, hooks: Any, manager: Any, live_steps: bool,
                        kwargs: dict[str, Any], end: _End, agent_name: str | None = None) -> AsyncIterator[Any]:
        from datus.models.agents_compat import DEFAULT_AGENT_NAME, AgentInfo, RunContext
        from datus.models.agents_mcp import server_object_tools, split_servers
        from datus.models.hooks import RunHooks
        from datus.models.tool_runs import _enabled

        named, objects = split_servers(mcp_servers)  # server objects are the caller's: connected and run here
        run_context = RunContext()
        agent = AgentInfo(name=agent_name or DEFAULT_AGENT_NAME, instructions=instruction or "",
                          tools=list(tools) if isinstance(tools, (list, tuple)) else [] if tools is None else [tools],
                          mcp_servers=list(objects.values()), output_type=output_type)
        run_hooks = RunHooks(hooks, run_context, agent)
        function_tools = self._function_tools(tools)
        function_tools = [tool for tool in function_tools if await _enabled(tool, run_context, agent)]
        async with server_object_tools(objects, run_context, agent) as object_tools:
            local_tools: dict[str, Any] = {}
            for tool in [*function_tools, *object_tools]:
                if tool.spec.name in local_tools:  # as in-process
                    raise ValueError(f"two tools are named {tool.spec.name!r}; rename one of them")
                local_tools[tool.spec.name] = tool
            self._check_tool_names(local_tools)
            request = self._tool_run_request(prompt, local_tools, named, instruction, output_type, max_turns,
                                             session, kwargs)
            started = time.perf_counter()
            await run_hooks.start()  # before the job: what it raises sends nothing
            async with contextlib.aclosing(self._tool_run_steps(
                    request, local_tools, run_hooks, manager, live_steps, end)) as steps:
                async for step in steps:
                    yield step
            if self.model_config.save_llm_trace:
                self._trace(started, self._prompt_messages(prompt, request.get("instruction")),
                            request["options"], text=end.raw_text or "", usage=end.usage,
                            schema=request.get("output_schema"), tools=list(local_tools))

    def _function_tools(self, tools: Any) -> list[Any]:
        from datus.models.function_tools import as_tools

        try:
            return as_tools(tools)
        except (TypeError, ValueError) as exc:
            raise ModelConfigError(f"a queue model's tools=: {exc}", provider=self.provider,
                                   model=self.model_name) from None

    def _check_tool_names(self, local_tools: Mapping[str, Any]) -> None:
        import re

        bad = [name for name in local_tools if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name)]
        if bad:  # a lambda's name, say: the job declares each tool to the model by its name
            raise ModelConfigError(
                f"a queue model declares the caller's own Python tools (tools=, and MCP server objects' tools) to the "
                f"fleet by name: "
                f"{', '.join(map(repr, bad))} is not a tool name (1-64 letters, digits, _ or -)",
                provider=self.provider, model=self.model_name)

    def _tool_run_request(self, prompt: Prompt, local_tools: Mapping[str, Any], named: Any, instruction: str,
                          output_type: Any, max_turns: int, session: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        db_type = kwargs.pop("db_type", None)
        for name in _RUN_KEYWORDS[1:]:
            kwargs.pop(name, None)  # the workers' agent.yml and model config decide these
        output_format = None if output_type in (str, None) else normalize_response_format(output_type)
        request: dict[str, Any] = {
            "kind": "tool_run", "instruction": instruction or "", "max_turns": max_turns,
            "options": self._job_options(kwargs), "mcp_servers": _server_names(named),
            **self._prompt_fields(prompt)}
        if output_format is not None and output_format.schema is not None:
            request["output_schema"] = output_format.schema
        elif output_format is not None:
            request["output_schema"] = {"type": "object"}
        if db_type:
            request["db_type"] = db_type
        if local_tools:
            request["caller_tools"] = [{"name": tool.spec.name, "description": tool.spec.description or "",
                                        "parameters": tool.spec.parameters or {"type": "object", "properties": {}}}
                                       for tool in local_tools.values()]
        session_id = session if isinstance(session, str) or session is None else getattr(session, "session_id", None)
        if session is not None and not session_id:
            raise ModelConfigError("a queue model's session is a session id (or a session object with one)",
                                   provider=self.provider, model=self.model_name)
        if session_id:
            request["session_id"] = session_id
        request["_output_format"] = output_format
        return request

    async def _tool_run_steps(self, request: dict[str, Any], local_tools: Mapping[str, Any], hooks: Any,
                              manager: Any, live_steps: bool, end: _End) -> AsyncIterator[Any]:
        """The job's steps as the in-process run yields them; the caller's tools run as asked,
        ``hooks`` called for every tool as in-process (the workers' tools from their steps)."""
        from datus.schemas.action_history import ActionHistory, ActionRole, ActionStatus

        output_format = request.pop("_output_format")
        seen: list[Any] = []
        answered: set[str] = set()
        calls: dict[str, dict[str, Any]] = {}  # action id -> a tool step's input, as the worker published it
        hooked: dict[str, Any] = {}  # action id -> the ToolContext of a worker's tool whose start hook ran
        async with contextlib.aclosing(self._job(request, end, beat=bool(local_tools))) as steps:
            async for step in steps:
                if step.role == ActionRole.TOOL and isinstance(step.input, dict):
                    _as_in_process(step, local_tools)
                    calls.setdefault(step.action_id, dict(step.input))
                    if hooks and step.action_type not in local_tools and not step.input.get("hosted"):
                        await _worker_tool_hooks(hooks, step, hooked)
                if step.action_type == "caller_tool_request" and isinstance(step.output, dict):
                    await self._run_caller_tools(end.job_id, step.output, local_tools, answered, hooks, calls)
                if not live_steps and not _in_process_step(step):
                    continue
                if step.action_type not in _LIVE_ONLY:
                    seen.append(step)
                if manager is not None:
                    _add_to(manager, step, live_steps)
                yield step
        content = self._outcome(end, seen)
        final_output = dict(end.step.get("output") or {}) if end.result is None else {}
        if end.result is not None:  # read from the store: the terminal event was cut
            final_output = {"success": True, "raw_output": content if isinstance(content, str) else "",
                            "content": content, "sql_contexts": end.result.sql_contexts,
                            "turns_used": None, "model": self.model_name}
        usage = (end.usage or Usage()).to_dict(self.context_length())
        final_output["usage"] = usage
        if output_format is not None and output_format.pydantic_model is not None and isinstance(content, dict):
            content = output_format.pydantic_model.model_validate(content)
        from datus.schemas.node_models import SQLContext

        end.result_dict = {
            "content": content,
            "sql_contexts": [SQLContext.model_validate(item) for item in final_output.get("sql_contexts") or []],
            "usage": usage,
            "turns_used": final_output.get("turns_used"),
            "model": final_output.get("model") or self.model_name,
        }
        final = ActionHistory.model_validate({**end.step, "output": final_output}) if end.step else \
            ActionHistory.create_action(ActionRole.ASSISTANT, "final_response", str(content), None, final_output,
                                        ActionStatus.SUCCESS)
        if hooks:
            if end.usage is not None:
                hooks.run_context.usage.set(end.usage)
            await hooks.end(content)  # as in-process: before the final step is handed out
        end.raw_text = final_output.get("raw_output") if isinstance(final_output.get("raw_output"), str) else None
        if manager is not None:
            manager.add_action(final)
        yield final

    async def _run_caller_tools(self, job_id: str | None, asked: Mapping[str, Any], tools: Mapping[str, Any],
                                answered: set[str], hooks: Any = None,
                                calls: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Run the calls of the caller's tools the job asks for (a turn's calls together,
        concurrently; one after the other between their hooks when there are ``hooks``, as
        in-process: a hook that raises stops the run before the later calls), each once per
        call id, and send their answers back in one go (which sends the job on). Calls asked
        again (the job came back before it read the answers) are only sent on again."""
        from datus_queue.tasks.caller_tools import CallerToolResult

        asked_calls = [call for call in asked.get("calls") or [] if isinstance(call, Mapping) and call.get("call_id")]
        if not job_id or not asked_calls:
            return
        client = self._job_client()
        new = [call for call in asked_calls if str(call["call_id"]) not in answered]
        if not new:
            await asyncio.to_thread(client.resume, job_id)
            return
        known = calls or {}
        if hooks:
            results = [await self._caller_tool(call, tools, hooks, known.get(str(call["call_id"]))) for call in new]
        else:
            results = list(await asyncio.gather(*(self._caller_tool(call, tools, None, known.get(str(call["call_id"])))
                                                  for call in new)))
        answered.update(str(call["call_id"]) for call in new)
        await asyncio.to_thread(client.send_tool_results, job_id,
                                [CallerToolResult(str(call["call_id"]), *result) for call, result in zip(new, results)])

    @staticmethod
    async def _caller_tool(asked: Mapping[str, Any], tools: Mapping[str, Any], hooks: Any = None,
                           step_input: Mapping[str, Any] | None = None) -> tuple[str, bool, Any]:
        """One call of the caller's tools, between its hooks: (text, is_error, raw JSON value or
        None). What a hook raises is raised (the run stops, as in-process)."""
        import json

        from pydantic_core import to_jsonable_python

        from datus.models.agents_compat import RunContext
        from datus.models.function_tools import ToolOutcome
        from datus.models.hooks import hook_tool

        call_id, name = str(asked.get("call_id")), str(asked.get("name") or "")
        arguments = asked.get("arguments") if isinstance(asked.get("arguments"), dict) else {}
        tool = tools.get(name)
        # the model's call id, as the tool step carries it (the job's call id is the step's id)
        model_call_id = str((step_input or {}).get("call_id") or call_id)
        run_context = hooks.run_context if hooks else RunContext()
        ctx = run_context.for_call(name, model_call_id, json.dumps(arguments))
        if tool is None:
            outcome = ToolOutcome(f"there is no tool named {name!r}; available: {', '.join(tools) or 'none'}",
                                  is_error=True)
        else:
            target = hook_tool(tool, name) if hooks else None
            if hooks:
                await hooks.tool_start(ctx, target)
            try:
                outcome = await tool.call(arguments, ctx)
            except Exception as exc:  # noqa: BLE001 - a tool's failure is an answer for the model, as in-process
                outcome = ToolOutcome(f"{type(exc).__name__}: {exc}", is_error=True)
            if hooks:
                await hooks.tool_end(ctx, target, outcome.raw if outcome.raw is not None else outcome.text)
        try:
            raw = None if outcome.raw is None else to_jsonable_python(outcome.raw, fallback=str)
        except Exception:  # noqa: BLE001 - not JSON: the text is all the job gets
            raw = None
        return outcome.text, outcome.is_error, raw


def _as_in_process(step: Any, local_tools: Mapping[str, Any]) -> None:
    """A step of one of the caller's tools as the in-process loop makes it: the worker marks
    its ``server`` "caller"; in-process it is the tool's own (None for a function, the server
    object's name for its MCP tools) and ``tool`` the MCP tool's own name."""
    tool = local_tools.get(step.action_type)
    if tool is None or step.input.get("server") != "caller":
        return
    meta = getattr(tool, "meta", None) or {}
    step.input = {**step.input, "tool": meta.get("tool", step.action_type), "server": meta.get("server")}


async def _worker_tool_hooks(hooks: Any, step: Any, hooked: dict[str, Any]) -> None:
    """``on_tool_start`` / ``on_tool_end`` for a tool the worker runs (an MCP server of the
    fleet), from its steps: the start when its step comes out under way (the tool already runs
    there: a start hook that raises stops the run, not that call), the end, with the step's
    ``raw_output``, when it comes out finished. Once each per step."""
    import json

    from datus.models.agents_compat import ToolRef

    state = hooked.get(step.action_id)
    if state is None:
        arguments = step.input.get("arguments")
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        ctx = hooks.run_context.for_call(step.action_type, str(step.input.get("call_id") or ""), text)
        ref = ToolRef(name=step.action_type, server=step.input.get("server"))
        state = hooked[step.action_id] = [ctx, ref, False]
        await hooks.tool_start(ctx, ref)
    if step.status != "processing" and not state[2]:
        state[2] = True
        output = step.output if isinstance(step.output, dict) else {}
        await hooks.tool_end(state[0], state[1], output.get("raw_output"))


def _in_process_step(step: Any) -> bool:
    """Whether the in-process model (``live_steps=False``) yields this step: finished steps only,
    no job-system steps, no ``message`` of reasoning alone."""
    if step.action_type in _LIVE_ONLY or step.status == "processing":
        return False
    return not (step.action_type == "message" and not (step.messages or "").strip())


def _add_to(manager: Any, step: Any, live: bool) -> None:
    """As the tool loop does: a step once; a live tool step again, finished, under its id."""
    if live and step.status != "processing":
        existing = getattr(manager, "find_action_by_id", None)
        if callable(existing) and existing(step.action_id) is not None:
            manager.update_action_by_id(step.action_id, status=step.status, output=step.output,
                                        end_time=step.end_time)
            return
    manager.add_action(step)


def _server_names(mcp_servers: Any) -> list[str]:
    """The names of the MCP servers a run asks of the fleet (its agent.yml defines them);
    server objects are split off before (`datus.models.agents_mcp.split_servers`)."""
    if mcp_servers is None:
        return []
    if isinstance(mcp_servers, str):
        return [mcp_servers]
    if isinstance(mcp_servers, Mapping):
        return [str(name) for name in mcp_servers]
    items = mcp_servers if isinstance(mcp_servers, (list, tuple, set, frozenset)) else [mcp_servers]
    names = []
    for item in items:
        name = item if isinstance(item, str) else getattr(item, "name", None)
        if not isinstance(name, str) or not name:
            raise ModelConfigError("a queue model names its MCP servers (names from the fleet's agent.yml); "
                                   f"got {type(item).__name__}")
        names.append(name)
    return names
