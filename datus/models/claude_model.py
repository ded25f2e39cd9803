"""`ClaudeModel`: the native Anthropic Messages API on the official ``anthropic`` SDK.

Not the OpenAI-compatible endpoint, so that what people choose Claude for works: prompt
caching (breakpoints placed as ``datus.models.claude_messages`` documents), extended thinking
replayed with its signatures, schema output forced through a tool, and exact token counts
from the count-tokens endpoint. The SDK is imported on first use only.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from datus.models._portal import run_sync
from datus.models.base import LLMBaseModel
from datus.models.claude_messages import (
    MessageAccumulator,
    add_cache_breakpoints,
    content_parts,
    finish_reason_of,
    json_hint,
    json_tool,
    tool_choice,
    usage_of,
    wire_messages,
    wire_tools,
)
from datus.models.errors import (
    ContentFilterError,
    InvalidResponseError,
    ModelConfigError,
    ModelConnectionError,
    ModelError,
    ModelTimeoutError,
    error_from_status,
    transport_error,
)
from datus.models.generation import Generation, ModelRequest, StreamDelta
from datus.models.rate_limit_headers import ProviderBudget, anthropic_budget
from datus.models.tokens import TokenCount, estimate_tokens

__all__ = ["ClaudeModel"]

logger = logging.getLogger(__name__)

API_KEY_ENV = "ANTHROPIC_API_KEY"
# Anthropic requires max_tokens. 4096 fits every Claude model's output limit; with thinking
# the budget comes on top, since budget_tokens must stay below max_tokens.
DEFAULT_MAX_TOKENS = 4096
DEFAULT_THINKING_BUDGET = 2048
_COUNT_METHOD = "anthropic:count_tokens"
_COUNT_TIMEOUT_S = 30.0
# The status an `event: error` inside a (200) stream stands for, by its error type.
_STATUS_OF_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


class ClaudeModel(LLMBaseModel):
    API_KEY_ENVS = (API_KEY_ENV,)

    def _create_client(self) -> Any:
        import anthropic

        from datus.models.http_clients import async_http_client

        return anthropic.AsyncAnthropic(
            api_key=self._get_api_key(),
            base_url=self.model_config.base_url,
            max_retries=0,  # the retry policy owns retries
            timeout=self.model_config.timeout_s,
            http_client=async_http_client(anthropic, self.model_config.http_client),
        )

    # ---- requests ------------------------------------------------------------------------

    def _params(self, request: ModelRequest) -> tuple[dict[str, Any], str | None]:
        """The ``messages.create`` arguments, and the name of the tool a JSON answer is
        forced through (None when there is none)."""
        options = request.options
        thinking = options.enable_thinking
        budget = options.thinking_budget or DEFAULT_THINKING_BUDGET
        max_tokens = self._max_output_tokens(request)
        assert max_tokens is not None
        if thinking and max_tokens <= budget:
            raise ModelConfigError(
                f"max_tokens ({max_tokens}) must be larger than thinking_budget ({budget}): thinking "
                "tokens count toward max_tokens", provider=self.provider, model=self.model_name,
            )
        system_texts = [message.content for message in request.messages if message.role == "system" and message.content]
        tools = wire_tools(request.tools)
        forced: str | None = None
        fmt = request.json_format
        if fmt is not None:
            # Anthropic refuses a forced tool_choice while thinking; the prompt has to do.
            if fmt.schema is not None and not thinking:
                forced = _tool_name(fmt.name)
                tools.append(json_tool(forced, fmt.schema))
            else:
                system_texts.append(json_hint(fmt.schema))
        system = [{"type": "text", "text": "\n\n".join(system_texts)}] if system_texts else []
        turns = wire_messages(request.messages)
        if self.model_config.prompt_cache == "auto":
            add_cache_breakpoints(system, tools, turns)

        params: dict[str, Any] = {"model": self.model_name, "max_tokens": max_tokens, "messages": turns}
        extra_body: dict[str, Any] = {}
        if system:
            params["system"] = system
        if tools:
            params["tools"] = tools
        choice = {"type": "tool", "name": forced} if forced else tool_choice(options.tool_choice if tools else None)
        if choice:
            params["tool_choice"] = choice
        if thinking:
            params["thinking"] = {"type": "enabled", "budget_tokens": budget}
        else:  # with thinking on, Anthropic rejects sampling settings
            # current SDKs' create() has no sampling parameters (0.51's has); the API takes them either way
            if options.temperature is not None:
                extra_body["temperature"] = options.temperature
            if options.top_p is not None:
                extra_body["top_p"] = options.top_p
        if options.stop:
            params["stop_sequences"] = options.stop
        # options.seed is not sent: the Messages API has no seed.
        if options.timeout_s is not None:
            params["timeout"] = options.timeout_s
        extra_body.update(options.extra_body or {})
        if extra_body:
            params["extra_body"] = extra_body
        return params, forced

    def _max_output_tokens(self, request: ModelRequest) -> int | None:
        options = request.options
        budget = options.thinking_budget or DEFAULT_THINKING_BUDGET
        return options.max_tokens or DEFAULT_MAX_TOKENS + (budget if options.enable_thinking else 0)

    async def _complete(self, client: Any, request: ModelRequest) -> Generation:
        params, forced = self._params(request)
        # the raw response: the same parse, plus the headers (the provider's rate-limit budget)
        raw = await client.messages.with_raw_response.create(**params)
        response = raw.parse()
        if inspect.isawaitable(response):  # current SDKs parse asynchronously; 0.51's legacy response does not
            response = await response
        return self._generation(response.to_dict(), forced, anthropic_budget(raw.headers))

    async def _stream(self, client: Any, request: ModelRequest) -> AsyncIterator[StreamDelta | Generation]:
        params, forced = self._params(request)
        stream = await client.messages.create(**params, stream=True)
        accumulator = MessageAccumulator()
        try:
            async for event in stream:
                try:
                    delta = accumulator.feed(event.to_dict())
                except (ValueError, KeyError, IndexError) as exc:
                    raise InvalidResponseError(f"the stream is out of order: {exc}",
                                               provider=self.provider, model=self.model_name) from exc
                if delta is not None:
                    yield delta
        finally:
            await stream.close()
        if not accumulator.complete or accumulator.message is None:
            raise InvalidResponseError("the stream ended before message_stop", provider=self.provider,
                                       model=self.model_name)
        yield self._generation(accumulator.message, forced,
                               anthropic_budget(getattr(getattr(stream, "response", None), "headers", None)))

    def _generation(self, message: Mapping[str, Any], forced: str | None,
                    rate_limits: ProviderBudget | None = None) -> Generation:
        """The one mapping from a whole message (sent whole or rebuilt from a stream)."""
        stop_reason = message.get("stop_reason")
        if stop_reason == "refusal":
            details = message.get("stop_details") or {}
            why = details.get("explanation") or details.get("category")
            raise ContentFilterError(
                "Claude declined to answer (stop_reason refusal)" + (f": {why}" if why else ""),
                provider=self.provider, model=self.model_name,
            )
        text, reasoning, reasoning_details, calls, by_tool = content_parts(message.get("content") or [], forced)
        return Generation(
            text=text,
            reasoning=reasoning,
            reasoning_details=reasoning_details,
            tool_calls=calls,
            finish_reason=finish_reason_of(stop_reason, by_tool),
            usage=usage_of(message.get("usage")),
            response_id=message.get("id"),
            rate_limits=rate_limits,
        )

    # ---- token counting ------------------------------------------------------------------

    def token_count(self, prompt: str) -> int:
        """Exact, from the count-tokens endpoint; an estimate (``.estimated``, with a
        warning) when the endpoint cannot be reached or fails."""
        if not prompt:
            return TokenCount(0, _COUNT_METHOD)
        try:
            return run_sync(self._acount_tokens(prompt))
        except Exception as exc:  # noqa: BLE001 - any failure: an estimate beats no answer
            logger.warning("%s/%s: count_tokens failed (%s); the token count is an estimate",
                           self.provider, self.model_name, exc)
            return estimate_tokens(prompt)

    async def _acount_tokens(self, prompt: str) -> TokenCount:
        result = await self._client().messages.count_tokens(
            model=self.model_name,
            messages=[{"role": "user", "content": prompt}],
            timeout=min(self.model_config.timeout_s, _COUNT_TIMEOUT_S),
        )
        return TokenCount(result.input_tokens, _COUNT_METHOD)

    # ---- errors --------------------------------------------------------------------------

    def _map_error(self, exc: Exception) -> ModelError:
        import anthropic

        where = {"provider": self.provider, "model": self.model_name}
        if isinstance(exc, anthropic.APIStatusError):
            # read from the body, which every SDK version keeps (newer ones also copy these
            # fields onto the exception as type/api_message/error_code; 0.x does not)
            body = exc.body if isinstance(exc.body, dict) else {}
            error = body.get("error") if isinstance(body.get("error"), dict) else {}
            details = error.get("details") if isinstance(error.get("details"), dict) else {}
            kind = error.get("type")
            message = str(error.get("message") or exc.message)
            status = exc.status_code
            if status < 400:  # an `event: error` inside a stream that began with 200
                status = _STATUS_OF_TYPE.get(str(kind), 500)
            codes = [kind, _str_or_none(details.get("error_code"))]
            # Anthropic has no structured code for these two; translate them to ours.
            if kind == "billing_error":
                codes.append("quota_exceeded")
            if kind == "invalid_request_error" and message.lower().startswith("prompt is too long"):
                codes.append("context_length_exceeded")
            mapped = error_from_status(status, message, codes=tuple(codes), headers=exc.response.headers, **where)
            mapped.rate_limits = anthropic_budget(exc.response.headers)
            return mapped
        if isinstance(exc, anthropic.APITimeoutError):
            from datus.models.http_clients import connect_failure

            if (failure := connect_failure(exc)) is not None:
                return ModelConnectionError(f"connection failed: {failure}", **where)
            return ModelTimeoutError(f"request timed out: {exc}", **where)
        if isinstance(exc, anthropic.APIConnectionError):
            return ModelConnectionError(f"connection failed: {exc.__cause__ or exc}", **where)
        # a stream broken mid-way: httpx's error (anthropic 0.x) or httpx2's (later), unwrapped
        if (mapped := transport_error(exc, self.provider, self.model_name)) is not None:
            return mapped
        if isinstance(exc, (anthropic.APIResponseValidationError, json.JSONDecodeError)):
            return InvalidResponseError(f"the provider's answer is not valid: {exc}", **where)
        return ModelError(f"{type(exc).__name__}: {exc}", **where)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _tool_name(name: str) -> str:
    cleaned = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in name)[:64]
    return cleaned or "response"
