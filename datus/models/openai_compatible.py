"""The adapter for OpenAI-style chat-completions APIs (OpenAI, DeepSeek, Qwen, and any
provider written as the contributor guide shows).

A provider on this adapter only says where its key and endpoint come from
(``API_KEY_ENVS``/``DEFAULT_BASE_URL``, or the ``_get_api_key``/``_get_base_url`` hooks);
what a model family can do comes from its profile (``datus.models.profiles``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from datus.models.base import LLMBaseModel
from datus.models.errors import (
    ContentFilterError,
    InvalidResponseError,
    ModelConnectionError,
    ModelError,
    ModelTimeoutError,
    error_from_status,
    transport_error,
)
from datus.models.generation import Generation, ModelRequest, StreamDelta
from datus.models.messages import ChatMessage, ToolCall
from datus.models.rate_limit_headers import openai_budget
from datus.models.usage import Usage

__all__ = ["OpenAICompatibleModel"]


class OpenAICompatibleModel(LLMBaseModel):
    DEFAULT_BASE_URL: ClassVar[str | None] = None

    # ---- provider hooks (``_get_api_key`` comes from LLMBaseModel) ------------------------

    def _get_base_url(self) -> str | None:
        return self.model_config.base_url or self.DEFAULT_BASE_URL

    def token_count(self, prompt: str) -> int:
        from datus.models.tokens import count_tokens

        return count_tokens(prompt, self.provider, self.model_name)

    # ---- adapter -------------------------------------------------------------------------

    def _create_client(self) -> Any:
        import openai

        from datus.models.http_clients import async_http_client

        return openai.AsyncOpenAI(
            api_key=self._get_api_key(),
            base_url=self._get_base_url(),
            max_retries=0,
            timeout=self.model_config.timeout_s,
            http_client=async_http_client(openai, self.model_config.http_client),
        )

    def _params(self, request: ModelRequest) -> dict[str, Any]:
        options, profile = request.options, self.profile
        messages = [self._wire_message(message) for message in request.messages]
        params: dict[str, Any] = {"model": self.model_name, "messages": messages}
        extra_body: dict[str, Any] = {}
        if profile.temperature:
            if options.temperature is not None:
                params["temperature"] = options.temperature
            if options.top_p is not None:
                params["top_p"] = options.top_p
        if options.max_tokens is not None:
            params[profile.max_tokens_param] = options.max_tokens
        if options.stop:
            params["stop"] = options.stop
        if options.seed is not None:
            params["seed"] = options.seed
        if options.timeout_s is not None:
            params["timeout"] = options.timeout_s
        if profile.thinking_param:
            extra_body[profile.thinking_param] = options.enable_thinking
            if options.enable_thinking and options.thinking_budget:
                extra_body["thinking_budget"] = options.thinking_budget
        fmt = request.json_format
        if fmt is not None:
            if fmt.schema is not None and profile.json_schema:
                params["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": _schema_name(fmt.name), "schema": fmt.schema, "strict": fmt.strict},
                }
            else:
                params["response_format"] = {"type": "json_object"}
                _add_system_hint(messages, _json_hint(fmt.schema))
        if request.tools:
            params["tools"] = [
                {"type": "function",
                 "function": {"name": tool.name, "description": tool.description, "parameters": tool.parameters}}
                for tool in request.tools
            ]
            if options.tool_choice in ("auto", "none", "required"):
                params["tool_choice"] = options.tool_choice
            elif options.tool_choice:
                params["tool_choice"] = {"type": "function", "function": {"name": options.tool_choice}}
        if options.extra_body:
            extra_body.update(options.extra_body)
        if extra_body:
            params["extra_body"] = extra_body
        return params

    def _wire_message(self, message: ChatMessage) -> dict[str, Any]:
        if message.role == "tool":
            return {"role": "tool", "tool_call_id": message.tool_call_id or "", "content": message.content}
        wire: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.role == "assistant":
            if message.tool_calls:
                wire["content"] = message.content or None
                wire["tool_calls"] = [
                    {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                    for call in message.tool_calls
                ]
            if message.reasoning and self.profile.replay_reasoning and self.profile.reasoning_field:
                wire[self.profile.reasoning_field] = message.reasoning
        return wire

    async def _complete(self, client: Any, request: ModelRequest) -> Generation:
        # the raw response: the same parse, plus the headers (the provider's rate-limit budget)
        raw = await client.chat.completions.with_raw_response.create(**self._params(request))
        response = raw.parse()
        if not getattr(response, "choices", None):
            raise InvalidResponseError("the response has no choices", provider=self.provider, model=self.model_name)
        choice = response.choices[0]
        message = choice.message
        self._check_finish(choice.finish_reason)
        return Generation(
            text=message.content or "",
            reasoning=self._reasoning_of(message),
            tool_calls=[
                ToolCall(id=call.id, name=call.function.name, arguments=call.function.arguments or "{}")
                for call in (message.tool_calls or [])
            ],
            finish_reason=choice.finish_reason,
            usage=_usage_of(response.usage),
            response_id=response.id,
            rate_limits=openai_budget(raw.headers),
        )

    async def _stream(self, client: Any, request: ModelRequest) -> AsyncIterator[StreamDelta | Generation]:
        stream = await client.chat.completions.create(
            **self._params(request), stream=True, stream_options={"include_usage": True}
        )
        text: list[str] = []
        reasoning: list[str] = []
        calls: dict[int, dict[str, str]] = {}
        finish_reason: str | None = None
        usage = Usage()
        response_id: str | None = None
        try:
            async for chunk in stream:
                response_id = response_id or chunk.id
                if chunk.usage is not None:
                    usage = _usage_of(chunk.usage)
                for choice in chunk.choices or []:
                    delta = choice.delta
                    piece = self._reasoning_of(delta) or ""
                    if piece:
                        reasoning.append(piece)
                    if delta.content:
                        text.append(delta.content)
                    if piece or delta.content:
                        yield StreamDelta(text=delta.content or "", reasoning=piece)
                    for call in delta.tool_calls or []:
                        slot = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                        if call.id:
                            slot["id"] = call.id
                        if call.function is not None:
                            slot["name"] += call.function.name or ""
                            slot["arguments"] += call.function.arguments or ""
                    if choice.finish_reason:
                        finish_reason = choice.finish_reason
        finally:
            await stream.close()
        if finish_reason is None:
            raise InvalidResponseError("the stream ended before a finish reason",
                                       provider=self.provider, model=self.model_name)
        self._check_finish(finish_reason)
        yield Generation(
            text="".join(text),
            reasoning="".join(reasoning) or None,
            tool_calls=[ToolCall(id=slot["id"], name=slot["name"], arguments=slot["arguments"] or "{}")
                        for _, slot in sorted(calls.items())],
            finish_reason=finish_reason,
            usage=usage,
            response_id=response_id,
            rate_limits=openai_budget(getattr(getattr(stream, "response", None), "headers", None)),
        )

    def _reasoning_of(self, message: Any) -> str | None:
        field = self.profile.reasoning_field or "reasoning_content"
        value = getattr(message, field, None)
        if value is None and getattr(message, "model_extra", None):
            value = message.model_extra.get(field)
        return value or None

    def _check_finish(self, finish_reason: str | None) -> None:
        if finish_reason == "content_filter":
            raise ContentFilterError("the provider's content filter stopped the answer",
                                     provider=self.provider, model=self.model_name)

    def _map_error(self, exc: Exception) -> ModelError:
        import openai

        where = {"provider": self.provider, "model": self.model_name}
        if isinstance(exc, openai.APIStatusError):
            body = exc.body if isinstance(exc.body, dict) else {}
            error = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
            message = error.get("message") or exc.message
            codes = (exc.code, exc.type, error.get("code"), error.get("type"), body.get("code"))
            mapped = error_from_status(exc.status_code, str(message), codes=tuple(map(_str_or_none, codes)),
                                       headers=exc.response.headers, **where)
            mapped.rate_limits = openai_budget(exc.response.headers)
            return mapped
        if isinstance(exc, openai.APITimeoutError):
            from datus.models.http_clients import connect_failure

            if (failure := connect_failure(exc)) is not None:
                return ModelConnectionError(f"connection failed: {failure}", **where)
            return ModelTimeoutError(f"request timed out: {exc}", **where)
        if isinstance(exc, openai.APIConnectionError):
            return ModelConnectionError(f"connection failed: {exc.__cause__ or exc}", **where)
        if (mapped := transport_error(exc, self.provider, self.model_name)) is not None:
            return mapped
        if isinstance(exc, (openai.APIResponseValidationError, json.JSONDecodeError)):
            return InvalidResponseError(f"the provider's answer is not valid: {exc}", **where)
        return ModelError(f"{type(exc).__name__}: {exc}", **where)


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _usage_of(usage: Any) -> Usage:
    if usage is None:
        return Usage()
    extra = getattr(usage, "model_extra", None) or {}
    prompt_details = getattr(usage, "prompt_tokens_details", None)
    completion_details = getattr(usage, "completion_tokens_details", None)
    cached = getattr(prompt_details, "cached_tokens", None) or extra.get("prompt_cache_hit_tokens") or 0
    return Usage(
        input_tokens=usage.prompt_tokens or 0,
        output_tokens=usage.completion_tokens or 0,
        cached_tokens=cached,
        reasoning_tokens=getattr(completion_details, "reasoning_tokens", None) or 0,
    )


def _schema_name(name: str) -> str:
    cleaned = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in name)[:64]
    return cleaned or "response"


def _json_hint(schema: dict[str, Any] | None) -> str:
    if schema is None:
        return "Reply with a single JSON object and nothing else."
    return ("Reply with a single JSON object and nothing else. It must match this JSON schema:\n"
            + json.dumps(schema, ensure_ascii=False))


def _add_system_hint(messages: list[dict[str, Any]], hint: str) -> None:
    if messages and messages[0].get("role") == "system":  # a Responses item may have no role
        messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{hint}".strip()}
    else:
        messages.insert(0, {"role": "system", "content": hint})
