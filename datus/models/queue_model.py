"""`QueueModel`: a model whose every call is a job on the fleet (``type: queue`` in agent.yml).

An agent switches a model to the fleet with one change of its agent.yml entry::

    agent:
      models:
        sql-writer:
          type: queue           # was: type: openai, api_key: ${OPENAI_API_KEY}, ...
          model: openai         # a model the fleet's workers serve (a name in the fleet's agent.yml)

``create_model(config, "sql-writer")`` then returns this class: the same methods, arguments,
return values, streamed ``ActionHistory`` steps and `ModelError` subclasses as the in-process
model, with every call submitted through the job system's `JobClient` (Redis and the job store
from the usual ``DQ_`` settings, ``datus_queue.tasks.settings``) and answered by a ``dq worker``.
The caller holds no provider key; the fleet's limits, retries, durability and metrics apply.

How each call maps onto a job:

- ``generate`` / ``acomplete`` — a ``generate`` job (not streamed); ``astream`` /
  ``agenerate_stream`` — a streamed ``generate`` job, its ``assistant_delta`` events as
  `StreamDelta`s; ``generate_with_json_output`` — a ``json`` job with the response format's
  schema (a pydantic model is validated again here, as in-process);
- ``generate_with_tools`` / ``generate_with_tools_stream`` — a ``tool_run`` job. MCP servers
  named (a name, a list of names, a dict keyed by name) are the fleet's: the workers run the
  servers its agent.yml defines under those names. MCP server *objects* (openai-agents
  ``MCPServerStdio`` and the like, `datus.models.agents_mcp`) are the caller's: connected here
  for the run as in-process (their ``tool_filter`` applied), their tools declared to the job and
  run here like the caller's own tools, their steps as in-process. The steps come from
  the job's Redis events; without ``live_steps`` the job system's own steps (``user_input``,
  text deltas, tool calls under way, ``retry``, ``resumed``...) are left out, so the caller sees
  the in-process model's steps. ``session`` (an id or a session object) is the id of a session
  in the fleet's shared store (``DQ_SESSION_URL`` for the workers and the caller alike);
- a failed job raises the `ModelError` subclass the worker's model raised (the stored error's
  type and code), with ``details["job_id"]``; the job system's own failures map to the nearest
  class (`_JOB_CODES`);
- usage and cost come from the job's result and are recorded (``track_usage``) as one record
  per call (a tool run's is the sum over its turns, as ``generate_with_tools`` returns it);
- a caller that closes the stream early, or whose call is cancelled, cancels the job.

The caller's own tools (``tools=``: Python functions, openai-agents ``FunctionTool`` objects) run
here, in the caller: the job carries their declarations (``caller_tools``: name, description,
JSON schema), the model is offered them next to the MCP tools, and when it calls them the job
hands the turn's calls back together (one ``caller_tool_request`` step; the job holds no worker
slot meanwhile, `datus_queue.tasks.caller_tools`). This model runs them (concurrently) and sends
the answers with `JobClient.send_tool_results` (capped like any tool result, stored once per call
id), which sends the job on. A tool that raises answers the model with the error, as in-process.
While it follows such a job this model beats a heartbeat (every sixth of
``DQ_CALLER_LIVENESS_S``), so a caller that dies is noticed within that window (``caller_gone``).

openai-agents ``hooks`` are called here, in the caller: ``on_start`` before the job,
``on_tool_start``/``on_tool_end`` around each of the caller's tools and, for the workers' tools,
from their steps (start when the step comes out under way, end with its ``raw_output``),
``on_end`` with the answer; what a hook raises ends the call as it is and cancels the job. Not
called: ``on_llm_start``/``on_llm_end`` (the model turns happen on the worker); a start hook of
a workers' tool cannot keep it from running (it already runs there). ``save_llm_trace`` traces
(and Datus's trajectory trace under ``set_context``) are written here: one per call, a traced
``generate`` submitted as a streamed job for the reasoning its deltas carry; a tool run's one, at
its end, records the conversation as sent (no session history, no per-turn records).
Not carried over: ``journal`` and ``mcp_pool`` (the fleet's own journal makes the run durable;
its pool lends the servers). Token counting is the served model's offline tokenizer
(``token_count``: no job).

The job system (``datus_queue``) is imported when a queue model is first used, so
``datus.models`` imports without it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from pydantic import ValidationError

from datus.models.base import LLMBaseModel
from datus.models.errors import (
    BadRequestError,
    ModelConfigError,
    ModelConnectionError,
    ModelError,
    ModelOutputError,
    ModelTimeoutError,
    RateLimitError,
    ServerError,
    error_from_dict,
)
from datus.models.generation import CallOptions, Generation, ModelRequest, StreamDelta
from datus.models.json_output import JsonOutputInvalid, normalize_response_format, parse_json_output
from datus.models.messages import Prompt, to_messages
from datus.models.queue_tool_runs import QueueToolRuns
from datus.models.usage import Usage, record_usage

__all__ = ["QueueModel"]

logger = logging.getLogger(__name__)

# what the job system's own error codes (not a model's) become for the caller
_JOB_CODES: dict[str, type[ModelError]] = {
    "rate_limit_wait_exceeded": RateLimitError,
    "deadline_exceeded": ModelTimeoutError,
    "infrastructure_error": ModelConnectionError,
    "dead_letter": ServerError,
    "model_not_allowed": ModelConfigError,
    "invalid_request": BadRequestError,
    "invalid_message": BadRequestError,
    "invalid_payload": BadRequestError,
    "caller_gone": ModelTimeoutError,
    "caller_tool_timeout": ModelTimeoutError,
}


class QueueModel(QueueToolRuns, LLMBaseModel):
    """An `LLMBaseModel` whose calls are jobs; see the module's docstring."""

    REQUIRES_API_KEY = False
    UNUSED_CONFIG_KEYS = frozenset({"api_key", "base_url"})  # the workers hold the keys

    def __init__(self, model_config: Any, **kwargs: Any) -> None:
        self._caller_config: Any = None
        self._setup_lock = threading.Lock()
        self._fleet: tuple[Any, Any] | None = None  # (settings, the fleet's AgentConfig)
        self._jobs: Any = None  # the JobClient, made on the first call
        self.recent_jobs: collections.deque[str] = collections.deque(maxlen=100)  # the latest calls' job ids
        self._served_config: Any = None  # the served model as the caller may know it (tasks.catalog.CatalogEntry)
        super().__init__(model_config, **kwargs)
        self.entry = self.model_config  # this agent.yml entry, as written ({type: queue, model: NAME, ...})
        self.served = self.entry.model  # the name the fleet serves
        self._resolve_quietly()

    # agent_config (set by create_model after __init__): the caller's config; the fleet's is
    # read from DQ_CONFIG when set, else the caller's is taken as the fleet's
    @property  # type: ignore[override]
    def agent_config(self) -> Any:
        return self._caller_config

    @agent_config.setter
    def agent_config(self, value: Any) -> None:
        self._caller_config = value
        if getattr(self, "served", None) is not None and self._fleet is None:
            self._resolve_quietly()

    def __repr__(self) -> str:
        return f"QueueModel(served={self.served!r}, provider={self.provider!r}, model={self.model_name!r})"

    # ---- the fleet ------------------------------------------------------------------------

    def _resolve_quietly(self) -> None:
        """Learn the served model's provider and name now if the configuration allows (for
        ``model_name``, token counts, context length); errors wait for the first call."""
        with contextlib.suppress(ModelError):
            self._resolve()

    def _resolve(self) -> tuple[Any, Any]:
        """(the ``DQ_`` settings, the fleet's `AgentConfig`), read once; the served model's
        config adopted."""
        fleet = self._fleet
        if fleet is not None:
            return fleet
        with self._setup_lock:
            if self._fleet is None:
                try:
                    from datus_queue.tasks.settings import Settings
                except ImportError as exc:
                    raise ModelConfigError(
                        f"model type 'queue' needs the job system (the datus_queue package of datus-queue): {exc}",
                        provider="queue", model=self.served) from None
                settings = Settings()  # read now: the DQ_ variables as they are when the model is first used
                config = self._fleet_config(settings)
                config, served = self._served(config, settings)
                self._served_config = served
                self._adopt(served)
                self._fleet = (settings, config)
            return self._fleet

    def _job_client(self) -> Any:
        """The `JobClient` of this model, made on the first call."""
        client = self._jobs
        if client is not None:
            return client
        settings, config = self._resolve()
        with self._setup_lock:
            if self._jobs is None:
                from datus_queue.tasks.app import create_app
                from datus_queue.tasks.client import JobClient

                # an app of this model's own: the module's default app has the settings of import time
                self._jobs = JobClient(settings=settings, agent_config=config, app=create_app(settings))
            return self._jobs

    def _fleet_config(self, settings: Any) -> Any:
        from datus.models.config import AgentConfig, ModelConfig

        if settings.config:
            return AgentConfig.from_file(settings.config)
        caller = self._caller_config
        if isinstance(caller, AgentConfig):
            return caller
        from pathlib import Path

        if Path("conf/agent.yml").is_file():
            return AgentConfig.from_file("conf/agent.yml")
        config = AgentConfig()
        for name, model in (getattr(caller, "models", None) or {}).items():  # Datus-agent's AgentConfig
            with contextlib.suppress(Exception):
                config.models[name] = ModelConfig.coerce(model)
        return config

    def _served(self, fleet: Any, settings: Any) -> tuple[Any, Any]:
        """(the fleet's config, knowing this model's name; the served model as the caller may
        know it, a `CatalogEntry`): from the fleet's agent.yml, else from the catalogue the
        workers publish in Redis (`datus_queue.tasks.catalog`)."""
        from datus.models.config import ModelConfig
        from datus_queue.tasks.catalog import entry_of

        name = self.served
        if name in fleet.models:
            config = fleet.models[name]
        elif name in ("", "default") and fleet.target:
            config = fleet.models[fleet.target]
        elif ":" in name:
            provider, _, model = name.partition(":")
            config = ModelConfig(type=provider, model=model)
        elif (published := self._published(settings)) is not None:
            import copy

            fleet = copy.copy(fleet)  # the caller's own config, maybe: the name is added to a copy
            fleet.models = {**fleet.models, name: ModelConfig(type=published.type, model=published.model)}
            return fleet, published
        else:
            configured = ", ".join(sorted(fleet.models)) or "(none)"
            raise ModelConfigError(
                f"queue model {name!r}: the fleet's agent.yml (DQ_CONFIG) has no model of that name, nor has a "
                f"worker published one (is a dq worker serving it running?); it has {configured} (or name one as "
                "provider:model)", provider="queue", model=name)
        if str(config.type) == "queue":
            raise ModelConfigError(f"queue model {name!r} names another queue model: name a model the workers "
                                   "serve with a provider type", provider="queue", model=name)
        return fleet, entry_of(config)

    def _published(self, settings: Any) -> Any:
        """The catalogue's entry of this model's name, or None (none published, Redis away)."""
        from datus_queue.tasks.catalog import read
        from datus_queue.tasks.redis_connect import connect

        try:
            redis = connect(settings)
            try:
                return read(redis, self.served)
            finally:
                redis.close()
        except Exception as exc:  # noqa: BLE001 - Redis away: the name alone, errors at the first call
            logger.debug("queue model %r: the fleet's catalogue is unreadable: %s: %s", self.served,
                         type(exc).__name__, exc)
            return None

    def _adopt(self, served: Any) -> None:
        """Take the served model's identity: ``provider``, ``model_name`` and a ``model_config``
        as Datus reads it — the served provider, model id, vendor, window and base URL (one
        without credentials), and what this queue entry sets itself — holding no key. The
        entry as written stays in ``entry``."""
        from datus.models.config import ModelConfig
        from datus.models.pricing import find_pricing
        from datus.models.profiles import find_profile

        self.provider = str(served.type)
        self.model_name = served.model
        self.profile = find_profile(self.provider, self.model_name)
        own = {key: getattr(self.entry, key) for key in self.entry.model_fields_set
               if key not in ("type", "model", "vendor", "api_key", "base_url", "missing_env", "missing_env_keys")}
        self.model_config = ModelConfig(**{**served.model_dump(exclude_none=True), **own})
        self.pricing = self.model_config.pricing or find_pricing(self.provider, self.model_name)

    # ---- what the in-process model computes locally ------------------------------------------

    def token_count(self, prompt: str) -> int:
        """The served model's offline tokenizer (no job): the same count as in-process."""
        from datus.models.tokens import count_tokens

        return int(count_tokens(prompt, self.provider, self.model_name))

    def context_length(self) -> int | None:
        served = self._served_config
        return (served.context_length if served is not None else None) or self.profile.context_length

    def max_tokens(self) -> int:
        window = self.context_length() or 32_768
        served = self._served_config
        room = (served.max_tokens if served is not None else None) or self.entry.max_tokens or 4_096
        return max(window - room, window // 2)

    # ---- the abstract hooks: a queue model sends no provider request itself ------------------

    def _create_client(self) -> Any:
        """An async Redis client for the running loop (the job's events are read with it)."""
        from datus_queue.tasks.redis_connect import async_client

        return async_client(self._resolve()[0])

    @staticmethod
    async def _close_client(client: Any) -> None:
        await client.aclose()

    async def _complete(self, client: Any, request: ModelRequest) -> Generation:
        raise NotImplementedError("a queue model's requests are jobs")

    def _stream(self, client: Any, request: ModelRequest) -> AsyncIterator[StreamDelta | Generation]:
        raise NotImplementedError("a queue model's requests are jobs")

    def _map_error(self, exc: Exception) -> ModelError:
        return exc if isinstance(exc, ModelError) else ModelError(str(exc), provider=self.provider,
                                                                  model=self.model_name)

    # ---- jobs -------------------------------------------------------------------------------

    def _job_options(self, kwargs: dict[str, Any], enable_thinking: bool | None = None) -> dict[str, Any]:
        """The call's options as the in-process model takes them (unknown ones are a TypeError);
        defaults are the served model's, on the worker, except what this queue entry sets itself."""
        from datus.models.base import _CONFIG_DEFAULTS

        unknown = sorted(set(kwargs) - set(CallOptions.model_fields))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(map(repr, unknown))}; "
                            f"known: {', '.join(CallOptions.model_fields)}")
        options = {key: getattr(self.entry, key) for key in _CONFIG_DEFAULTS
                   if key in self.entry.model_fields_set}
        if enable_thinking is not None:
            options["enable_thinking"] = enable_thinking
        options.update({key: value for key, value in kwargs.items() if value is not None})
        if options.get("extra_body"):
            raise ModelConfigError("extra_body cannot be sent to the fleet (a job carries no raw provider fields)",
                                   provider=self.provider, model=self.model_name)
        options.pop("extra_body", None)
        try:
            CallOptions(**options)  # the in-process model's checks, before anything is sent
        except ValidationError as exc:
            raise ValueError(f"invalid option: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}") from None
        return {key: value for key, value in options.items() if value is not None}

    @staticmethod
    def _prompt_fields(prompt: Prompt) -> dict[str, Any]:
        if isinstance(prompt, str):
            return {"prompt": prompt}
        return {"messages": [message.model_dump(exclude_none=True) for message in to_messages(prompt)]}

    async def _submit(self, request: dict[str, Any], job_id: str) -> None:
        """Submit the job under ``job_id``. Cancelled meanwhile, the submit (in a thread) is let
        finish and the job cancelled, so no job runs for a caller that is gone."""
        client = self._job_client()
        from datus_queue.tasks.client import InvalidJob

        submit = asyncio.ensure_future(asyncio.to_thread(client.submit, {"model": self.served, **request}, job_id))
        try:
            await asyncio.shield(submit)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await submit
            if submit.done() and not submit.cancelled() and submit.exception() is None:
                self._cancel(job_id)
            raise
        except InvalidJob as exc:
            text = str(exc)
            cls = ModelConfigError if any(word in text for word in ("unknown model", "not allowed", "unknown MCP",
                                                                     "unknown provider")) else BadRequestError
            raise cls(text, provider=self.provider, model=self.model_name) from None

    def _cancel(self, job_id: str) -> None:
        """Cancel the job (the caller went away): a queued one never runs, a running one stops at
        its next step. Synchronous, so it also runs where nothing can be awaited any more."""
        try:
            self._job_client().cancel(job_id)
        except Exception as exc:  # noqa: BLE001 - the caller is leaving; say so, do not mask why
            logger.warning("could not cancel job %s: %s: %s", job_id, type(exc).__name__, exc)

    async def _job(self, request: dict[str, Any], end: _End, beat: bool = False) -> AsyncIterator[Any]:
        """Submit a job and yield its steps (``ActionHistory``) as they are published, all but
        the terminal one, which goes into ``end`` with the job's status; the job is cancelled if
        this generator is closed or cancelled before the job is final. ``beat`` (a job with
        caller tools): this caller's heartbeat goes with the job from before its submit to its
        end, so a waiting job notices within ``DQ_CALLER_LIVENESS_S`` that the caller died."""
        from datus.schemas.action_history import ActionHistory
        from datus_queue.tasks.events import afollow

        job_id = uuid.uuid4().hex
        client = self._job_client()
        beating = None
        if beat:
            from datus_queue.tasks.caller_tools import heartbeat

            await heartbeat(self._client(), job_id, client.settings)  # alive before the job can ask anything
            beating = asyncio.ensure_future(self._heartbeat(job_id))
        try:
            await self._submit(request, job_id)
        except BaseException:
            if beating is not None:
                beating.cancel()
            raise
        end.job_id = job_id
        self.recent_jobs.append(job_id)
        final = False
        try:
            async with contextlib.aclosing(afollow(
                    self._client(), job_id,
                    is_final=lambda job: asyncio.to_thread(client._is_final, job))) as events:
                async for event in events:
                    if event.terminal:
                        end.step, end.status = event.step, event.status
                        final = True
                        break
                    yield ActionHistory.model_validate(event.step)
            if not final or end.step.get("truncated") or (end.step.get("output") or {}).get("truncated"):
                end.result = await asyncio.to_thread(client.get, job_id)  # the store has it whole
                final = end.result.final
        finally:
            if beating is not None:
                beating.cancel()
            if not final:
                self._cancel(job_id)

    async def _heartbeat(self, job_id: str) -> None:
        """Beat for ``job_id`` until cancelled (`tasks.caller_tools.heartbeat`); a beat that fails
        (Redis away a moment) is tried again at the next one."""
        from datus_queue.tasks.caller_tools import beat_interval, heartbeat

        settings = self._job_client().settings
        while True:
            await asyncio.sleep(beat_interval(settings))
            try:
                await heartbeat(self._client(), job_id, settings)
            except Exception as exc:  # noqa: BLE001 - the next beat may get through; the window allows a few
                logger.debug("heartbeat of job %s failed: %s: %s", job_id, type(exc).__name__, exc)

    async def _run(self, request: dict[str, Any]) -> tuple[_End, Any]:
        """A job to its end: (its end, the output); raises the job's error."""
        end = _End()
        async with contextlib.aclosing(self._job(request, end)) as steps:
            async for step in steps:  # a streamed job's reasoning, for the trace; an attempt retried starts anew
                if step.action_type == "assistant_delta" and isinstance(step.output, dict):
                    end.reasoning += step.output.get("reasoning") or ""
                elif step.action_type == "retry":
                    end.reasoning = ""
        return end, self._outcome(end)

    async def _traced_run(self, request: dict[str, Any], prompt: Prompt, schema: Any = None) -> tuple[_End, Any]:
        """`_run`, its trace written when ``save_llm_trace`` is on (the answer, or the error)."""
        if not self.model_config.save_llm_trace:
            return await self._run(request)
        started = time.perf_counter()
        messages = self._prompt_messages(prompt)
        try:
            end, output = await self._run(request)
        except ModelError as exc:
            self._trace(started, messages, request["options"], schema=schema, error=exc)
            raise
        import json

        self._trace(started, messages, request["options"], schema=schema, usage=end.usage, reasoning=end.reasoning,
                    text=output if isinstance(output, str) else json.dumps(output))
        return end, output

    def _outcome(self, end: _End, steps: list[Any] | None = None) -> Any:
        """The job's output, its usage recorded; or its error raised."""
        from datus_queue.tasks.schemas import JobStatus

        result = end.result
        status = result.status if result is not None else JobStatus(end.status) if end.status else None
        if status is JobStatus.SUCCEEDED:
            if result is not None:
                output, usage = result.output, result.usage
            else:
                data = end.step.get("output") or {}
                output, usage = data.get("content"), data.get("usage")
            end.usage = Usage.model_validate(usage) if usage else Usage(provider=self.provider, model=self.model_name)
            record_usage(end.usage)
            return output
        error = result.error.model_dump() if result is not None and result.error is not None else (
            end.step.get("output") if isinstance(end.step.get("output"), dict) else None)
        raise self._error(end.job_id, status, error, steps)

    def _error(self, job_id: str | None, status: Any, error: Mapping[str, Any] | None,
               steps: list[Any] | None) -> ModelError:
        details: dict[str, Any] = {"job_id": job_id}
        if steps is not None:
            details["steps"] = [step.model_dump(mode="json") for step in steps]
        if error is None:
            what = getattr(status, "value", status) or "gone"
            return ModelError(f"job {job_id} ended {what}", provider=self.provider, model=self.model_name,
                              details=details)
        details["job_error_code"] = error.get("code")
        if error.get("type") and error_from_dict({"type": error["type"]}).__class__.__name__ == error["type"]:
            return error_from_dict({"type": error["type"], "message": error.get("message", ""),
                                    "provider": error.get("provider") or self.provider, "model": self.model_name,
                                    "status_code": error.get("status_code"), "details": details})
        cls = _JOB_CODES.get(str(error.get("code")), ModelError)
        return cls(str(error.get("message") or error.get("code")), provider=error.get("provider") or self.provider,
                   model=self.model_name, status_code=error.get("status_code"), details=details)

    # ---- traces (save_llm_trace), written here as the in-process model writes them ----------

    @staticmethod
    def _prompt_messages(prompt: Prompt, instruction: str | None = None) -> list[dict[str, Any]]:
        """The conversation this caller sent, as a trace records it (a tool run's session
        history and its later turns stay on the worker)."""
        return [message.model_dump(exclude_defaults=True) for message in to_messages(prompt, instruction or None)]

    def _trace(self, started: float, messages: list[dict[str, Any]], options: Mapping[str, Any], *,
               text: str | None = None, reasoning: str = "", usage: Usage | None = None,
               schema: Any = None, tools: list[str] | None = None, error: ModelError | None = None) -> None:
        """``save_llm_trace``: the call's JSON trace and, under Datus's ``set_context``, the
        node's trajectory trace (`datus.models.trace`), once per call (a tool run's: one, at
        its end, with its final answer)."""
        from datus.models.trace import write_node_trace, write_trace

        record: dict[str, Any] = {
            "provider": self.provider, "model": self.model_name,
            "duration_ms": round((time.perf_counter() - started) * 1000.0, 3),
            "messages": messages, "options": dict(options), "json_schema": schema, "tools": list(tools or []),
            "job_id": self.recent_jobs[-1] if self.recent_jobs else None,
        }
        if error is not None:
            record["error"] = error.to_dict()
        else:
            record.update(text=text or "", reasoning=reasoning or None, tool_calls=[], finish_reason="stop",
                          usage=usage.model_dump() if usage is not None else None)
        write_trace(self.model_config.trace_dir, self.provider, record)
        if error is None and self.workflow is not None and self.current_node is not None:
            write_node_trace(self.workflow, self.current_node, messages, text or "", reasoning or None)

    # ---- the public interface ------------------------------------------------------------

    async def acomplete(self, prompt: Prompt, enable_thinking: bool | None = None, **kwargs: Any) -> Generation:
        """The answer as a `Generation` (text, usage; ``finish_reason`` "stop": the job keeps
        only the text)."""
        # traced, the job streams: its deltas carry the reasoning, which the answer's text does not
        request = {"kind": "generate", "stream": bool(self.model_config.save_llm_trace),
                   "options": self._job_options(kwargs, enable_thinking), **self._prompt_fields(prompt)}
        end, output = await self._traced_run(request, prompt)
        return Generation(text=output if isinstance(output, str) else str(output), finish_reason="stop",
                          usage=end.usage or Usage())

    async def agenerate_with_json_output(self, prompt: Prompt, response_format: Any = None,
                                         **kwargs: Any) -> dict[str, Any]:
        json_format = normalize_response_format(response_format)
        if json_format.schema is None:
            schema = None
        elif isinstance(response_format, dict):
            schema = response_format
        else:  # a pydantic model: its schema, validated by the worker; the model checks it again here
            schema = {"type": "json_schema", "json_schema": {"name": json_format.name, "schema": json_format.schema}}
        request = {"kind": "json", "options": self._job_options(kwargs), "output_schema": schema,
                   **self._prompt_fields(prompt)}
        _, output = await self._traced_run(request, prompt, schema)
        if json_format.pydantic_model is not None and isinstance(output, dict):
            import json

            try:
                return parse_json_output(json.dumps(output), json_format)
            except JsonOutputInvalid as exc:
                raise ModelOutputError(str(exc), provider=self.provider, model=self.model_name) from None
        return output

    async def astream(self, prompt: Prompt, enable_thinking: bool | None = None,
                      **kwargs: Any) -> AsyncIterator[StreamDelta | Generation]:
        """The job's text deltas as `StreamDelta`s, then the final `Generation` with usage."""
        request = {"kind": "generate", "stream": True, "options": self._job_options(kwargs, enable_thinking),
                   **self._prompt_fields(prompt)}
        end = _End()
        emitted = False
        started = time.perf_counter()
        async with contextlib.aclosing(self._job(request, end)) as steps:
            async for step in steps:
                if step.action_type == "assistant_delta" and isinstance(step.output, dict):
                    emitted = True
                    end.reasoning += step.output.get("reasoning") or ""
                    yield StreamDelta(text=step.output.get("text") or "", reasoning=step.output.get("reasoning") or "")
                elif step.action_type == "retry" and emitted and isinstance(step.output, dict):
                    # as in-process: an error after a delta is raised, since what the caller saw cannot be
                    # taken back (the job would stream its next attempt from the start); the job is cancelled
                    raise self._error(end.job_id, None, step.output.get("error") or {}, None)
        output = self._outcome(end)
        if self.model_config.save_llm_trace:
            self._trace(started, self._prompt_messages(prompt), request["options"], usage=end.usage,
                        text=output if isinstance(output, str) else str(output), reasoning=end.reasoning)
        yield Generation(text=output if isinstance(output, str) else str(output), finish_reason="stop",
                         usage=end.usage or Usage())

class _End:
    """How a job ended: its terminal step and status, its stored result when the step was not
    enough, its usage, and a tool run's result dict."""

    __slots__ = ("job_id", "raw_text", "reasoning", "result", "result_dict", "status", "step", "usage")

    def __init__(self) -> None:
        self.job_id: str | None = None
        self.step: dict[str, Any] = {}
        self.status: Any = None
        self.result: Any = None
        self.usage: Usage | None = None
        self.result_dict: dict[str, Any] = {}
        self.raw_text: str | None = None  # a tool run's final answer as the model wrote it
        self.reasoning: str = ""  # a streamed job's reasoning deltas, joined (for the trace)
