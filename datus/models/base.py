"""`LLMBaseModel`: the one interface over every provider, its factory and its registry.

An adapter (one per wire format) implements five hooks: ``_create_client``, ``_complete``,
``_stream``, ``_map_error`` and ``token_count``. Everything else — options, retries, timeouts,
JSON output, usage and cost, traces, the sync twins, the request limiter around every
request (``datus.models.limiter``) — lives here once.

A model object holds configuration and one SDK client per event loop, never per-call
state: one object serves many concurrent calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import logging
import os
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import ValidationError

from datus.models import _clients, observe
from datus.models._portal import run_sync
from datus.models.errors import (
    InvalidResponseError,
    ModelConfigError,
    ModelError,
    ModelOutputError,
    ModelTimeoutError,
)
from datus.models.generation import CallOptions, Generation, JsonFormat, ModelRequest, StreamDelta, ToolSpec
from datus.models.json_output import JsonOutputInvalid, normalize_response_format, parse_json_output
from datus.models.limiter import PlannedRequest, RequestLimiter, RequestOutcome
from datus.models.messages import ChatMessage, Prompt, to_messages
from datus.models.pricing import cost_usd, find_pricing
from datus.models.profiles import find_profile
from datus.models.retry import Retries, RetryPolicy
from datus.models.trace import write_node_trace, write_trace
from datus.models.usage import record_usage

if TYPE_CHECKING:
    from datus.models.config import AgentConfig, ModelConfig

__all__ = ["PROVIDERS", "LLMBaseModel"]

logger = logging.getLogger(__name__)

# Settings a model config supplies as defaults for every call.
_CONFIG_DEFAULTS = ("temperature", "top_p", "max_tokens", "enable_thinking", "thinking_budget", "timeout_s")


class LLMBaseModel(ABC):
    # The one provider registry: provider (a model's ``type:``; Datus's `LLMProvider` values, and
    # "fake", the scripted model) -> class name in datus/models/<provider>_model.py.
    MODEL_TYPE_MAP: ClassVar[dict[str, str]] = {
        "openai": "OpenAIModel",
        "claude": "ClaudeModel",
        "deepseek": "DeepSeekModel",
        "qwen": "QwenModel",
        "gemini": "GeminiModel",
        "fake": "FakeModel",
        "queue": "QueueModel",  # not a provider: every call is a job on the fleet (datus/models/queue_model.py)
    }

    # Where the key comes from when the config has none (first set variable wins); providers
    # that need no key (the scripted fake) set REQUIRES_API_KEY = False.
    API_KEY_ENVS: ClassVar[tuple[str, ...]] = ()
    REQUIRES_API_KEY: ClassVar[bool] = True
    # config keys this class never reads: an unset ${VAR} there is no error (the queue model's
    # api_key and base_url, kept in a Datus user's entry)
    UNUSED_CONFIG_KEYS: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model_config: Any, **kwargs: Any) -> None:
        from datus.models.config import ModelConfig

        # this layer's ModelConfig, or Datus-agent's (fields it lacks take their defaults)
        model_config = ModelConfig.coerce(model_config)
        self._require_env(model_config)
        self.model_config = model_config
        self.model_name = model_config.model
        self.provider = str(model_config.type)
        self.profile = find_profile(self.provider, self.model_name)
        self.pricing = model_config.pricing or find_pricing(self.provider, self.model_name)
        self.retry_policy = RetryPolicy.from_config(model_config)
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
        self._clients_lock = threading.Lock()
        self._client_users: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = weakref.WeakKeyDictionary()
        # a model dropped while its loop lives on (the sync portal's): close its clients there
        weakref.finalize(self, _clients.close_soon, self._clients, type(self)._close_client)
        self.agent_config: AgentConfig | None = None
        # set by whoever runs this model for many callers (the job system): see datus.models.limiter
        self.request_limiter: RequestLimiter | None = None
        self._key_fingerprint: str | None = None
        # Datus-agent's workflow and node (``set_context``), for its trajectory traces
        self.workflow: Any = None
        self.current_node: Any = None
        if self.REQUIRES_API_KEY:
            self._get_api_key()  # a missing key is an error now, not a 401 later

    def __repr__(self) -> str:
        return f"{type(self).__name__}(provider={self.provider!r}, model={self.model_name!r})"

    # ---- factory -------------------------------------------------------------------------

    @classmethod
    def create_model(cls, agent_config: AgentConfig | Any | None, model_name: str | None = None,
                     **kwargs: Any) -> LLMBaseModel:
        """``None``, ``""`` or ``"default"``: the target model; a name under ``agent.models``; or
        a plain ``"provider:model"`` string (keys then come from the environment).
        ``agent_config`` is this layer's `AgentConfig` or Datus-agent's (its ``models`` and
        ``active_model()``); ``kwargs`` are accepted as Datus's factory accepts them."""
        from datus.models.config import ModelConfig

        known = getattr(agent_config, "models", None) or {}
        if model_name and model_name not in known and ":" in model_name:
            provider, _, name = model_name.partition(":")
            config = ModelConfig(type=provider, model=name)
        elif agent_config is None:
            raise ModelConfigError("create_model needs an AgentConfig, or a 'provider:model' string")
        elif model_name in (None, "", "default"):
            config = ModelConfig.coerce(agent_config.active_model())
        elif model_name in known:
            config = ModelConfig.coerce(known[model_name])
        else:
            raise ModelConfigError(
                f"unknown model {model_name!r}; configured models: {', '.join(sorted(known)) or '(none)'}"
                " (or pass 'provider:model', e.g. 'openai:gpt-4o-mini')")
        model_class = cls.model_class(config.type)
        model_class._require_env(config, model_name or "default")
        model = model_class(model_config=config)
        model.agent_config = agent_config  # MCP servers by name, SQL function table, sessions
        return model

    @classmethod
    def _require_env(cls, config: Any, where: str = "") -> None:
        """`ModelConfig.require_env`, but for unset variables only in keys this class never reads."""
        keys = set(config.missing_env_keys)
        if not (keys and keys <= cls.UNUSED_CONFIG_KEYS):
            config.require_env(where)

    @classmethod
    def model_class(cls, provider: str) -> type[LLMBaseModel]:
        class_name = cls.MODEL_TYPE_MAP.get(provider)
        if class_name is None:
            raise ModelConfigError(
                f"unknown model type {provider!r}; known types: {', '.join(str(p) for p in cls.MODEL_TYPE_MAP)}"
            )
        module = importlib.import_module(f"datus.models.{provider}_model")
        return getattr(module, class_name)

    # ---- adapter hooks -------------------------------------------------------------------

    def _get_api_key(self) -> str:
        key = self.model_config.api_key or next(
            (os.environ[name] for name in self.API_KEY_ENVS if os.environ.get(name)), None
        )
        if not key:
            where = " or ".join(self.API_KEY_ENVS) or "api_key"
            raise ModelConfigError(
                f"{self.provider} needs an API key: set {where}, or api_key in the model's config",
                provider=self.provider, model=self.model_name,
            )
        from datus.models.redact import remember_secret

        remember_secret(key)  # masked wherever a provider's error or a log line would echo it
        return key

    @abstractmethod
    def _create_client(self) -> Any:
        """A new async SDK client (with ``max_retries=0``) for the running event loop."""

    @abstractmethod
    async def _complete(self, client: Any, request: ModelRequest) -> Generation:
        """One request, no retries; usage tokens filled in."""

    @abstractmethod
    def _stream(self, client: Any, request: ModelRequest) -> AsyncIterator[StreamDelta | Generation]:
        """One streamed request: deltas as they arrive, then the final ``Generation``."""

    @abstractmethod
    def _map_error(self, exc: Exception) -> ModelError:
        """The one place where this adapter's SDK exceptions become ``ModelError``s."""

    def token_count(self, prompt: str) -> int:
        from datus.models.tokens import estimate_tokens

        return estimate_tokens(prompt)

    @property
    def key_fingerprint(self) -> str:
        """A short hash that identifies this model's API key without revealing it (provider
        budgets belong to a key); ``"nokey"`` for a provider that needs none."""
        if self._key_fingerprint is None:
            key = self._get_api_key() if self.REQUIRES_API_KEY else ""
            self._key_fingerprint = (hashlib.sha256(b"datus-api-key:" + key.encode()).hexdigest()[:16]
                                     if key else "nokey")
        return self._key_fingerprint

    def _max_output_tokens(self, request: ModelRequest) -> int | None:
        """The most output tokens the request may use, as the provider will count it (an
        adapter that sends a default ``max_tokens`` says so here)."""
        return request.options.max_tokens

    def _count_input_tokens(self, request: ModelRequest) -> int:
        """The request's prompt in tokens, offline: messages, reasoning replayed, tool calls and
        tool specs, counted at once with the provider's tokenizer (an estimate where there is
        none), plus a few tokens of framing per message."""
        from datus.models.tokens import count_tokens

        texts: list[str] = []
        for message in request.messages:
            texts.append(message.content)
            if message.reasoning:
                texts.append(message.reasoning)
            texts += [call.arguments for call in message.tool_calls]
        if request.tools:
            import json

            texts.append(json.dumps([[tool.name, tool.description, tool.parameters] for tool in request.tools]))
        return int(count_tokens("\n".join(texts), self.provider, self.model_name)) + 4 * len(request.messages)

    def _planned(self, request: ModelRequest) -> PlannedRequest:
        return PlannedRequest(self.provider, self.model_name, self._max_output_tokens(request),
                              lambda: self._reserved_input_tokens(request))

    def _reserved_input_tokens(self, request: ModelRequest) -> int:
        """What a rate limiter reserves for the prompt before the call: the tokenizer's count or
        a character estimate (four characters a token), whichever is larger. Providers' limiters
        count their own way — OpenAI documents counting a request against its token limit by an
        estimate "based on the character count of your request" (platform.openai.com/docs/guides/
        rate-limits) — and the limiter reconciles the reservation with the provider's count only
        after the answer: an estimate that errs high is given back then, one that errs low has
        already let requests out early."""
        chars = sum(len(message.content or "") + len(message.reasoning or "")
                    + sum(len(call.arguments) for call in message.tool_calls) for message in request.messages)
        return max(self._count_input_tokens(request), -(-chars // 4) + 4 * len(request.messages))

    async def _after_request(self, limiter: RequestLimiter, permit: Any, outcome: RequestOutcome) -> None:
        try:
            await limiter.after(permit, outcome)
        except Exception as exc:  # noqa: BLE001 - a limiter's trouble never loses an answer
            logger.warning("%s/%s: the request limiter failed after a request: %s: %s", self.provider,
                           self.model_name, type(exc).__name__, exc)

    def context_length(self) -> int | None:
        return self.model_config.context_length or self.profile.context_length

    def max_tokens(self) -> int:
        """The most tokens a prompt may take and still leave the answer room in the context
        window (Datus's nodes split work that counts more, ``token_count(...) > max_tokens()``):
        the context window less ``max_tokens`` of the config (4,096 when unset)."""
        window = self.context_length() or 32_768
        room = self.model_config.max_tokens or 4_096
        return max(window - room, window // 2)

    def set_context(self, workflow: Any = None, current_node: Any = None) -> None:
        """Datus-agent's workflow and node this model works for: with ``save_llm_trace`` each
        call also writes the node's trajectory trace (``{trajectory_dir}/{task}/{node}.yml``)."""
        self.workflow = workflow
        self.current_node = current_node

    def to_dict(self) -> dict[str, str]:
        return {"model_name": self.model_name}

    # ---- clients -------------------------------------------------------------------------

    def _client(self) -> Any:
        loop = asyncio.get_running_loop()
        with self._clients_lock:
            client = self._clients.get(loop)
            if client is None:
                client = self._clients[loop] = self._create_client()
                if client is not None:
                    _clients.register(client, type(self)._close_client)
            return client

    @staticmethod
    async def _close_client(client: Any) -> None:
        """Close one SDK client (providers whose client closes differently override this)."""
        result = client.close()
        if asyncio.iscoroutine(result):
            await result

    async def aclose(self) -> None:
        """Close the SDK client of the running loop (the worker runtime calls this)."""
        with self._clients_lock:
            client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await _clients.close(client, type(self)._close_client)

    @contextlib.contextmanager
    def _using_client(self) -> Iterator[None]:
        """Counts the calls and tool runs using this model's client on the running loop."""
        loop = asyncio.get_running_loop()
        with self._clients_lock:
            self._client_users[loop] = self._client_users.get(loop, 0) + 1
        try:
            yield
        finally:
            with self._clients_lock:
                self._client_users[loop] -= 1

    @contextlib.asynccontextmanager
    async def _tool_run_clients(self) -> AsyncIterator[None]:
        """Around a tool run. On a loop nobody keeps (`datus.models._clients.keep`: the sync
        portal's, a worker's runtime), the client is closed when the last call or run using it
        there ends: Datus's web UI runs each turn on a new loop it closes with ``loop.close()``
        alone, which would leave the client and its connection open."""
        loop = asyncio.get_running_loop()
        with self._using_client():
            yield
        if not _clients.kept(loop) and not self._client_users.get(loop):
            await self.aclose()
            await _clients.forget_loop_guard()

    # ---- requests ------------------------------------------------------------------------

    def _options(self, kwargs: dict[str, Any], enable_thinking: bool | None = None) -> CallOptions:
        merged = {key: getattr(self.model_config, key) for key in _CONFIG_DEFAULTS}
        if enable_thinking is not None:  # None keeps the config's setting; False turns it off
            merged["enable_thinking"] = enable_thinking
        unknown = sorted(set(kwargs) - set(CallOptions.model_fields))
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(CallOptions.model_fields)}"
            )
        merged.update({key: value for key, value in kwargs.items() if value is not None})
        try:
            return CallOptions(**merged)
        except ValidationError as exc:
            raise ValueError(f"invalid option: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}") from None

    def _request(
        self,
        prompt: Prompt,
        kwargs: dict[str, Any],
        *,
        enable_thinking: bool | None = None,
        json_format: JsonFormat | None = None,
        tools: tuple[ToolSpec, ...] = (),
        instruction: str | None = None,
    ) -> ModelRequest:
        return ModelRequest(
            messages=to_messages(prompt, instruction),
            options=self._options(kwargs, enable_thinking),
            json_format=json_format,
            tools=tools,
        )

    async def _call(self, request: ModelRequest) -> Generation:
        """One logical request under the retry policy and the timeout; usage recorded."""
        started = time.perf_counter()
        timeout = request.options.timeout_s or self.model_config.timeout_s
        limiter = self.request_limiter
        planned = self._planned(request) if limiter is not None else None

        async def attempt() -> Generation:
            try:
                client = self._client()  # outside the timeout: a first call imports and sets up the SDK
                async with asyncio.timeout(timeout):
                    return await self._complete(client, request)
            except ModelError:
                raise
            except TimeoutError as exc:
                raise ModelTimeoutError(
                    f"no answer within {timeout:g}s", provider=self.provider, model=self.model_name
                ) from exc
            except Exception as exc:  # the adapter's boundary
                raise self._map_error(exc) from exc

        async def once() -> Generation:
            if limiter is None:
                return await attempt()
            permit = await limiter.before(planned)  # type: ignore[arg-type]
            outcome = RequestOutcome()  # cancelled, unless one of these replaces it
            try:
                generation = await attempt()
                outcome = RequestOutcome(usage=generation.usage, budget=generation.rate_limits)
                return generation
            except ModelError as exc:
                outcome = RequestOutcome(budget=exc.rate_limits, error=exc)
                raise
            finally:
                await self._after_request(limiter, permit, outcome)

        with self._using_client(), observe.model_call(self.provider, self.model_name, request) as spans:
            try:
                generation, attempts = await self.retry_policy.run(
                    once, wait=limiter.wait if limiter is not None else None,
                    describe=f"{self.provider}/{self.model_name}")
            except ModelError as exc:
                self._trace(request, None, exc, started)
                raise
            self._finish(generation, attempts, started, spans)
        self._trace(request, generation, None, started)
        return generation

    def _finish(self, generation: Generation, attempts: int, started: float, spans: Any = None) -> None:
        """The one place a finished call's `Usage` is completed and recorded (``record_usage``)
        and its observers hear of it (``spans``: `datus.models.observe`)."""
        usage = generation.usage
        update: dict[str, Any] = {
            "provider": self.provider,
            "model": self.model_name,
            "latency_ms": (time.perf_counter() - started) * 1000.0,
            "attempts": attempts,
            "requests": attempts,
            "priced": self.pricing is not None,
        }
        if self.pricing is not None:
            update["cost_usd"] = cost_usd(
                self.pricing,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cached_tokens=usage.cached_tokens,
                cache_write_tokens=usage.cache_write_tokens,
            )
        generation.usage = usage.model_copy(update=update)
        record_usage(generation.usage)
        if spans is not None:
            spans.end(generation)

    def _trace(self, request: ModelRequest, generation: Generation | None, error: ModelError | None,
               started: float) -> None:
        if not self.model_config.save_llm_trace:
            return
        record: dict[str, Any] = {
            "provider": self.provider,
            "model": self.model_name,
            "duration_ms": round((time.perf_counter() - started) * 1000.0, 3),
            "messages": [message.model_dump(exclude_defaults=True) for message in request.messages],
            "options": request.options.model_dump(exclude_none=True),
            "json_schema": request.json_format.schema if request.json_format else None,
            "tools": [tool.name for tool in request.tools],
        }
        if generation is not None:
            record.update(text=generation.text, reasoning=generation.reasoning,
                          tool_calls=[call.model_dump() for call in generation.tool_calls],
                          finish_reason=generation.finish_reason, usage=generation.usage.model_dump())
        if error is not None:
            record["error"] = error.to_dict()
        write_trace(self.model_config.trace_dir, self.provider, record)
        if generation is not None and self.workflow is not None and self.current_node is not None:
            write_node_trace(self.workflow, self.current_node, record["messages"], generation.text,
                             generation.reasoning)

    # ---- the public interface ------------------------------------------------------------

    async def acomplete(self, prompt: Prompt, enable_thinking: bool | None = None, **kwargs: Any) -> Generation:
        """The whole answer: text, reasoning, tool calls, finish reason and usage."""
        return await self._call(self._request(prompt, kwargs, enable_thinking=enable_thinking))

    def complete(self, prompt: Prompt, enable_thinking: bool | None = None, **kwargs: Any) -> Generation:
        return run_sync(self.acomplete(prompt, enable_thinking, **kwargs))

    async def agenerate(self, prompt: Prompt, enable_thinking: bool | None = None, **kwargs: Any) -> str:
        return (await self.acomplete(prompt, enable_thinking, **kwargs)).text

    def generate(self, prompt: Prompt, enable_thinking: bool | None = None, **kwargs: Any) -> str:
        return run_sync(self.agenerate(prompt, enable_thinking, **kwargs))

    async def agenerate_with_json_output(self, prompt: Prompt, response_format: Any = None,
                                         **kwargs: Any) -> dict[str, Any]:
        """A dict, validated against the schema or pydantic model when one is given. Broken
        output is repaired, then re-asked ``json_repair_attempts`` times with the reason;
        after that ``ModelOutputError`` is raised (never an ``{"error": ...}`` dict)."""
        json_format = normalize_response_format(response_format)
        request = self._request(prompt, kwargs, json_format=json_format)
        messages = list(request.messages)
        last_text, reason = "", ""
        for _ in range(self.model_config.json_repair_attempts + 1):
            generation = await self._call(ModelRequest(messages, request.options, json_format))
            last_text = generation.text
            try:
                return parse_json_output(generation.text, json_format)
            except JsonOutputInvalid as exc:
                reason = str(exc)
                logger.info("%s/%s: JSON output invalid (%s); asking again", self.provider, self.model_name, reason)
                messages = [
                    *messages,
                    ChatMessage(role="assistant", content=generation.text),
                    ChatMessage(role="user", content=f"That answer is unusable: {reason}. "
                                "Reply again with only the corrected JSON object, no other text."),
                ]
        raise ModelOutputError(
            f"no valid JSON after {self.model_config.json_repair_attempts + 1} answer(s): {reason}",
            provider=self.provider, model=self.model_name, details={"last_answer": last_text[:2000]},
        )

    def generate_with_json_output(self, prompt: Prompt, response_format: Any = None, **kwargs: Any) -> dict[str, Any]:
        return run_sync(self.agenerate_with_json_output(prompt, response_format, **kwargs))

    async def agenerate_stream(self, prompt: Prompt, enable_thinking: bool | None = None, **kwargs: Any) -> AsyncIterator[str]:
        """Text deltas as they arrive (see ``astream`` for reasoning deltas and usage)."""
        async with contextlib.aclosing(self.astream(prompt, enable_thinking, **kwargs)) as stream:
            async for item in stream:
                if isinstance(item, StreamDelta) and item.text:
                    yield item.text

    async def astream(self, prompt: Prompt, enable_thinking: bool | None = None,
                      **kwargs: Any) -> AsyncIterator[StreamDelta | Generation]:
        """Deltas (text and reasoning), then the final ``Generation`` with usage."""
        # aclosing: a caller that stops early closes the request now (limiter, observers), not at GC
        async with contextlib.aclosing(self._stream_call(self._request(prompt, kwargs,
                                                                       enable_thinking=enable_thinking))) as stream:
            async for item in stream:
                yield item

    async def _stream_call(self, request: ModelRequest) -> AsyncIterator[StreamDelta | Generation]:
        """A streamed request under the retry policy and the timeout: a failure before the first
        delta (a timeout too) is retried like any request; after a delta has been handed out it
        is raised, since what the caller saw cannot be taken back. ``timeout_s`` bounds each
        attempt as it bounds a whole answer in `_call` (`_StreamDeadline`)."""
        started = time.perf_counter()
        retries = Retries(self.retry_policy)
        limiter = self.request_limiter
        planned = self._planned(request) if limiter is not None else None
        timeout = request.options.timeout_s or self.model_config.timeout_s
        with self._using_client(), observe.model_call(self.provider, self.model_name, request, stream=True) as spans:
            while True:
                retries.attempts += 1
                emitted = False
                permit = await limiter.before(planned) if limiter is not None else None  # type: ignore[arg-type]
                unreported: RequestOutcome | None = RequestOutcome()  # None once the limiter has heard
                try:
                    client = self._client()  # outside the deadline: a first call imports and sets up the SDK
                    deadline = _StreamDeadline(timeout, self)
                    # aclosing: the response is released as soon as the answer is complete
                    async with contextlib.aclosing(self._stream(client, request)) as stream:
                        while True:
                            try:
                                item = await deadline.next(stream)
                            except StopAsyncIteration:
                                raise InvalidResponseError("the stream ended without a final answer",
                                                           provider=self.provider, model=self.model_name) from None
                            if isinstance(item, Generation):
                                if limiter is not None:
                                    unreported = None
                                    await self._after_request(limiter, permit, RequestOutcome(
                                        usage=item.usage, budget=item.rate_limits))
                                self._finish(item, retries.attempts, started, spans)
                                self._trace(request, item, None, started)
                                yield item
                                return
                            emitted = True
                            yield item  # no deadline spans this: the caller's time is its own
                except Exception as exc:
                    error = exc if isinstance(exc, ModelError) else self._map_error(exc)
                    if limiter is not None and unreported is not None:
                        unreported = None
                        await self._after_request(limiter, permit, RequestOutcome(budget=error.rate_limits, error=error))
                    if emitted:
                        error.details["attempts"] = retries.attempts
                        delay = None
                    else:
                        delay = retries.delay(error)
                    if delay is None:
                        self._trace(request, None, error, started)
                        if error is exc:
                            raise
                        raise error from exc
                    await (limiter.wait(delay, error) if limiter is not None else asyncio.sleep(delay))
                finally:
                    if limiter is not None and unreported is not None:  # closed early, or cancelled
                        await self._after_request(limiter, permit, unreported)

    # ---- tool runs -----------------------------------------------------------------------

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
        """Run the tool loop to its final answer: ``content`` (validated into ``output_type``
        when that is a pydantic model), ``sql_contexts`` (`SQLContext` objects), ``usage`` (a
        dict, summed over turns: `Usage.to_dict`), ``turns_used`` and ``model``.

        ``prompt``: a string or a list of message dicts. ``tools``: Python functions, `Tool` objects or
        openai-agents ``FunctionTool`` objects. ``mcp_servers``: names under
        ``agent.mcp_servers``, our specs, or openai-agents server objects (connected for the run;
        `datus.models.agents_mcp`). ``hooks``: openai-agents ``AgentHooks`` (`datus.models.hooks`);
        what a hook raises is raised. ``action_history_manager`` receives the finished steps;
        ``agent_name`` names the agent hooks see; other keywords are call options
        (``temperature``, ``max_tokens``, ...). ``journal`` (a `datus.models.run_journal.RunJournal`)
        makes the run durable: it records each step and resumes from what the journal holds.
        ``mcp_pool`` (a `datus.models.mcp.pool.MCPPool`) lends running servers instead of
        starting them for this run. Raises `MaxTurnsExceededError` when no answer comes within
        ``max_turns``."""
        from datus.models.tool_runs import prepared_run

        async with self._tool_run_clients(), prepared_run(
                self, prompt, tools=tools, mcp_servers=mcp_servers, instruction=instruction, output_type=output_type,
                max_turns=max_turns, manager=action_history_manager, session=session, kwargs=kwargs, stream=False,
                journal=journal, mcp_pool=mcp_pool, hooks=hooks, agent_name=agent_name) as run:
            async for _ in run.run_steps():
                pass
        assert run.result is not None
        return run.result.as_dict()

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
        """The tool loop, yielding each finished ``ActionHistory`` step as it happens (and adding
        it to ``action_history_manager``) and raising what `generate_with_tools` raises. With
        ``live_steps`` also the user's step, the text as it streams (``assistant_delta``), each
        tool call as it starts (PROCESSING) and an ``error`` step before an error is raised: what
        the job system publishes. See ``datus.models.tool_loop`` for the steps and
        `generate_with_tools` for the other arguments."""
        from datus.models.tool_runs import prepared_run

        final = None
        async with self._tool_run_clients(), prepared_run(
                self, prompt, tools=tools, mcp_servers=mcp_servers, instruction=instruction, output_type=output_type,
                max_turns=max_turns, manager=action_history_manager, session=session, kwargs=kwargs, stream=True,
                journal=journal, mcp_pool=mcp_pool, hooks=hooks, agent_name=agent_name, live_steps=live_steps) as run:
            async for step in run.run_steps():
                if step.action_type == "final_response":
                    final = step  # handed out after the run is closed and its session saved
                    continue
                yield step
        if final is not None:
            yield final

    # ---- sessions ------------------------------------------------------------------------

    @property
    def session_manager(self) -> Any:
        """The process's `SessionManager` for the current store, shared by every model: one
        SQLite file per session in Datus's sessions directory (``{agent.home}/sessions``, else
        ``~/.datus/sessions``), or the database ``DQ_SESSION_URL`` names."""
        from datus.models.session_manager import shared_session_manager

        return shared_session_manager()

    def create_session(self, session_id: str | None = None) -> Any:
        """The session with this id, made if new: pass it back as ``session=``."""
        return self.session_manager.create_session(session_id)

    def list_sessions(self) -> list[str]:
        """The session ids, the most recently updated first."""
        return self.session_manager.list_sessions()

    def session_exists(self, session_id: str) -> bool:
        return self.session_manager.session_exists(session_id)

    def get_session_info(self, session_id: str) -> dict[str, Any]:
        """``{"exists": False, "session_id": ...}``, or ``{"exists": True, ...}`` with Datus's
        keys (``item_count``, ``total_tokens``, ``latest_user_message``, ...)."""
        return self.session_manager.get_session_info(session_id)

    def clear_session(self, session_id: str) -> None:
        """Drop the session's messages; a missing session is only logged, as Datus does."""
        self.session_manager.clear_session(session_id)

    def delete_session(self, session_id: str) -> None:
        """Delete the session from any process; a missing one is nothing to do."""
        self.session_manager.delete_session(session_id)


# Every provider a model config may name, in the registry's order ("queue" is a model type, not a
# provider: no queue, key or limits of its own).
PROVIDERS: tuple[str, ...] = tuple(name for name in LLMBaseModel.MODEL_TYPE_MAP if name != "queue")


_Item = TypeVar("_Item")


class _StreamDeadline:
    """``timeout_s`` for one attempt of a streamed request, as `LLMBaseModel._call` has it for a
    whole answer: the time spent waiting on the provider — for the response, then for each next
    item — adds up to at most ``timeout_s``, whether the provider is silent or trickles.

    Each wait gets what is left, and the clock runs only while waiting: no timeout spans the
    ``yield`` of an item, since a timeout cancels the task, and during a ``yield`` the task runs
    the caller's code (publishing a delta, say). The caller's time between items neither counts
    against the provider nor is ever cancelled."""

    __slots__ = ("left", "model", "timeout_s")

    def __init__(self, timeout_s: float | None, model: LLMBaseModel) -> None:
        self.timeout_s = self.left = timeout_s
        self.model = model

    async def next(self, stream: AsyncIterator[_Item]) -> _Item:
        if self.left is None:
            return await anext(stream)
        loop = asyncio.get_running_loop()
        began = loop.time()
        scope = asyncio.timeout(max(self.left, 0.0))  # an item already buffered still arrives at 0
        try:
            async with scope:
                return await anext(stream)
        except Exception as exc:
            # an SDK may turn the cancellation into an error of its own: the expired scope says why
            if scope.expired():
                raise ModelTimeoutError(f"no answer within {self.timeout_s:g}s", provider=self.model.provider,
                                        model=self.model.model_name) from exc
            raise
        finally:
            self.left -= loop.time() - began
