"""Running one claimed job's request on the model layer, publishing each step as it comes.

`JobRunner.run` returns the output and the SQL contexts; what the delivery does with them (the
store write, the terminal event) and with what the run raises (cancelled, superseded, a model
error, a limiter's hand-back) is `tasks.jobs`'. A tool run is durable: its journal
(`tasks.checkpoints.StoreJournal`) records every step, and a step an earlier delivery published
is not published again.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import TYPE_CHECKING, Any

from datus.models.messages import to_messages
from datus.models.run_journal import step_id
from datus.models.usage import Usage
from datus.schemas.action_history import ActionHistory, ActionRole, ActionStatus
from datus_queue.tasks import keys
from datus_queue.tasks.checkpoints import StoreJournal
from datus_queue.tasks.redis_batch import RedisBatch
from datus_queue.tasks.schemas import DATABASE_SERVER, JobKind, JobRequest

if TYPE_CHECKING:
    from datus_queue.tasks.context import JobContext

__all__ = ["JobCancelled", "JobRunner", "cancel_flag_set", "last_user", "servers"]


class JobCancelled(Exception):
    pass


async def cancel_flag_set(ctx: JobContext, job_id: str) -> bool:
    """Whether the job's cancel flag is set: read in the loop turn's pipeline (one per job start
    and at most one per 100 ms of a run; alone, each was a round trip of its own)."""
    return bool(await RedisBatch.of(ctx.aredis).command("EXISTS", keys.job_cancel(job_id)))


class JobRunner:
    """Runs one request on the model layer, publishing each step."""

    def __init__(self, ctx: JobContext, job_id: str, request: JobRequest, cancel_requested: bool, run: int = 1,
                 resuming: bool = False) -> None:
        self.ctx, self.job_id, self.request = ctx, job_id, request
        self.final_step: ActionHistory | None = None
        self.usage: Usage | None = None  # a tool run's, summed over all its turns
        self.cancel_requested = cancel_requested  # read when the job started
        self.journal = StoreJournal(ctx, job_id, run, resuming) if request.kind is JobKind.TOOL_RUN else None
        self.run_number = run  # the store's run number (`run` is the coroutine below)
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
        if await cancel_flag_set(self.ctx, self.job_id):
            raise JobCancelled(self.job_id)

    async def run(self) -> tuple[Any, list[dict[str, Any]]]:
        request = self.request
        if self.cancel_requested:
            raise JobCancelled(self.job_id)
        prompt = request.prompt if request.prompt is not None else request.messages
        text = request.prompt if request.prompt is not None else last_user(request.messages or [])
        options = request.options.model_dump(exclude_none=True, exclude={"extra_body"})
        if request.kind is JobKind.TOOL_RUN:
            return await self._tool_run(prompt, options)
        await self.publish(ActionHistory(
            action_id=step_id(self.job_id, "user_input"), role=ActionRole.USER, action_type="user_input",
            messages=text, input={"prompt": text}, status=ActionStatus.SUCCESS))
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
        self.final_step = self.final_response(output)
        return output, []

    def final_response(self, output: Any) -> ActionHistory:
        """The step that announces ``output`` as the answer (the job's terminal event).

        A generate job's two steps are named from its id (as a tool run's are, `step_id`): the
        same in every run of the job, and no ``uuid4`` — a system call, which lets go of the GIL
        on the worker's busiest thread twice per job."""
        return ActionHistory(
            action_id=step_id(self.job_id, "final_response"), role=ActionRole.ASSISTANT, action_type="final_response",
            messages=output if isinstance(output, str) else json.dumps(output), output={"content": output},
            status=ActionStatus.SUCCESS)

    async def _tool_run(self, prompt: Any, options: dict[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
        request = self.request
        model = self.ctx.model(request.model, in_process_retries=True)
        extra: dict[str, Any] = {}
        if request.caller_tools:  # the caller's own tools: each call is handed back to the caller
            from datus_queue.tasks.caller_tools import caller_tools

            extra["tools"] = caller_tools(self.ctx, self.job_id, request.caller_tools)
        steps = model.generate_with_tools_stream(
            prompt, **extra, mcp_servers=servers(request, self.ctx.agent_config, await self._database_url()),
            instruction=request.instruction,
            output_type=request.output_schema or str, max_turns=request.max_turns,
            session=request.session_id, db_type=request.db_type, journal=self.journal, mcp_pool=self.ctx.mcp_pool,
            live_steps=True, **options)  # live: every step is published, deltas and tool calls under way included
        # aclosing: a cancelled or failed job closes the run (and its MCP servers) in this task
        async with contextlib.aclosing(steps):
            return await self._follow_tool_run(steps)

    async def _database_url(self) -> str | None:
        """The URL to open for ``request.database``, checked again right before it is opened."""
        if not self.request.database:
            return None
        from datus_queue.tasks.databases import resolve_on_worker

        return await resolve_on_worker(self.ctx, self.request)

    async def _follow_tool_run(self, steps: Any) -> tuple[Any, list[dict[str, Any]]]:
        request = self.request
        announced = False
        async for step in steps:
            if not announced and self.journal is not None and self.journal.replayed_steps:
                announced = True  # tell readers why the run goes on from the middle
                await self.ctx.publisher.publish(self.job_id, ActionHistory.create_action(
                    ActionRole.WORKFLOW, "resumed", f"resumed after {self.journal.replayed_steps} recorded step(s)",
                    None, {"run": self.run_number, "steps_recorded": self.journal.replayed_steps},
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


def servers(request: JobRequest, agent_config: Any, database_url: str | None = None) -> dict[str, Any] | None:
    """The tool run's MCP servers: those it names from agent.mcp_servers, and the shipped SQL
    server opened on ``request.database`` — on ``database_url``, what the operator's allow-list
    made of it (`tasks.databases.resolve_on_worker`); without one it is resolved here, with no
    batch registrations."""
    from datus.mcp_servers.sql_server import stdio_config
    from datus.models.mcp_utils import resolve_mcp_servers

    found: dict[str, Any] = dict(resolve_mcp_servers(request.mcp_servers, agent_config)) if request.mcp_servers else {}
    if request.database:
        if database_url is None:
            from datus_queue.tasks.databases import resolve_database
            from datus_queue.tasks.settings import get_settings

            database_url = resolve_database(request.database, agent_config, get_settings())
        found[DATABASE_SERVER] = stdio_config(database_url)
    return found or None


def last_user(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return message["content"]
    return ""
