"""The OpenAI chat-completions wire format (also spoken by DeepSeek and Qwen/DashScope).

Shapes follow the official API as the `openai` SDK parses them (`ChatCompletion`,
`ChatCompletionChunk`, `CompletionUsage`, the `{"error": {...}}` envelope), so the SDK under
test takes the same code paths it takes against the real service. Reasoning is sent as
`reasoning_content`, the DeepSeek/Qwen spelling; OpenAI itself never returns it.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from datus.models.scripted import Fault, Reply, ScriptedRequest
from datus.testing.limits import Admission
from datus.testing.protocols import (
    ProtocolError,
    Usage,
    WireProtocol,
    estimate_usage,
    format_duration,
    retry_after_header,
    split_text,
    sse,
)

__all__ = ["OpenAIChatProtocol"]

_FINGERPRINT = "fp_fake0000"
_MODELS = ("gpt-4o", "gpt-4o-mini", "o3-mini", "deepseek-chat", "deepseek-reasoner", "qwen-plus")
_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank "
    "username) if you're accessing the API from your browser and are prompted for a username and "
    "password. You can obtain an API key from https://platform.openai.com/account/api-keys."
)
_STATUS_TEXT: dict[int, tuple[str, str | None, str]] = {  # status -> (type, code, message)
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: (
        "invalid_request_error",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported",
    ),
    404: ("invalid_request_error", "model_not_found", "The model does not exist or you do not have access to it."),
    409: ("invalid_request_error", None, "Conflict."),
    422: ("invalid_request_error", None, "Unprocessable entity."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The server is overloaded or not ready yet."),
    504: ("server_error", None, "Gateway timeout."),
}
# kind -> (status, error type, error code, param, message); upstream's texts, abridged.
_FAULTS: dict[str, tuple[int, str | None, str | None, str | None, str]] = {
    "rate_limit": (
        429,
        "requests",
        "rate_limit_exceeded",
        None,
        ("Rate limit reached for {model} in organization org-fake on requests per min (RPM): Limit 3, "
        "Used 3, Requested 1. Please try again in 20s. Visit https://platform.openai.com/account/rate-limits "
        "to learn more."),
    ),
    "quota": (
        429,
        "insufficient_quota",
        "insufficient_quota",
        None,
        ("You exceeded your current quota, please check your plan and billing details. For more information "
        "on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors."),
    ),
    "overloaded": (503, "server_error", None, None, "The server is overloaded or not ready yet."),
    "context_length": (
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
        ("This model's maximum context length is 128000 tokens. However, your messages resulted in 131072 "
        "tokens. Please reduce the length of the messages."),
    ),
    "content_filter": (  # Azure OpenAI's prompt filter; OpenAI itself has no such 400
        400,
        None,
        "content_filter",
        "prompt",
        ("The response was filtered due to the prompt triggering Azure OpenAI's content management policy. "
        "Please modify your prompt and retry."),
    ),
}
_CONTENT_FILTER_EXTRA: dict[str, Any] = {
    "status": 400,
    "innererror": {
        "code": "ResponsibleAIPolicyViolation",
        "content_filter_result": {"violence": {"filtered": True, "severity": "high"}},
    },
}


def _error(
    status: int,
    message: str,
    type_: str | None,
    code: str | None = None,
    param: str | None = None,
    /,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    error = {"message": message, "type": type_, "param": param, "code": code, **extra}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


class OpenAIChatProtocol(WireProtocol):
    name = "openai"
    paths = ("/v1/chat/completions", "/chat/completions")

    def extra_routes(self) -> list[BaseRoute]:
        return [Route(path, self._list_models, methods=["GET"]) for path in ("/v1/models", "/models")]

    async def _list_models(self, request: Request) -> Response:
        denied = self.authenticate(request, request.app.state.api_key)
        if denied is not None:
            return denied
        data = [{"id": name, "object": "model", "created": 1700000000, "owned_by": "fake"} for name in _MODELS]
        return JSONResponse({"object": "list", "data": data})

    # -- requests -----------------------------------------------------------------------

    def authenticate(self, request: Request, api_key: str | None) -> Response | None:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return _error(401, _NO_KEY, "invalid_request_error")
        if api_key is not None and key != api_key:
            shown = f"{key[:3]}*****{key[-4:]}" if len(key) > 8 else "*****"
            message = (
                f"Incorrect API key provided: {shown}. You can find your API key at "
                "https://platform.openai.com/account/api-keys."
            )
            return _error(401, message, "invalid_request_error", "invalid_api_key")
        return None

    def invalid_json(self) -> Response:
        message = (
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
            "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
            "sent was not valid JSON.)"
        )
        return _error(400, message, "invalid_request_error")

    def parse(self, request: Request, body: Any) -> ScriptedRequest:
        if not isinstance(body, dict):
            raise ProtocolError(_error(400, "Request body must be a JSON object.", "invalid_request_error"))
        if not body.get("model"):
            raise ProtocolError(_error(400, "you must provide a model parameter", "invalid_request_error"))
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            missing = messages is None
            message = "Missing required parameter: 'messages'." if missing else "Invalid 'messages': expected a list."
            code = "missing_required_parameter" if missing else "invalid_type"
            raise ProtocolError(_error(400, message, "invalid_request_error", code, "messages"))
        return ScriptedRequest(
            protocol=self.name,
            model=str(body["model"]),
            messages=messages,
            stream=bool(body.get("stream")),
            tools=list(body.get("tools") or []),
            body=body,
        )

    # -- answers --------------------------------------------------------------------------

    def render_json(self, reply: Reply, request: ScriptedRequest) -> Response:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": reply.text if reply.text or not reply.tool_calls else None,
            "refusal": None,
            "annotations": [],
        }
        if reply.reasoning:
            message["reasoning_content"] = reply.reasoning
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments_json()},
                }
                for call, call_id in zip(reply.tool_calls, _call_ids(reply))
            ]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": _finish_reason(reply)}
        body = {
            **_envelope("chat.completion", request),
            "choices": [choice],
            "usage": _usage(estimate_usage(request, reply)),
            "service_tier": "default",
        }
        return JSONResponse(body, headers={"x-request-id": _new_id("req_")})

    def stream_frames(self, reply: Reply, request: ScriptedRequest) -> list[bytes]:
        envelope = _envelope("chat.completion.chunk", request)
        options = request.body.get("stream_options") or {}
        include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
        if include_usage:
            envelope["usage"] = None  # the real API sends an explicit null on every chunk

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return sse({**envelope, "choices": [choice]})

        first: dict[str, Any] = {"role": "assistant", "content": "" if reply.text else None, "refusal": None}
        frames = [chunk(first)]
        reasoning = split_text(reply.reasoning or "")
        frames += [chunk({"content": None, "reasoning_content": piece}) for piece in reasoning]
        frames += [chunk({"content": piece}) for piece in split_text(reply.text)]
        for index, (call, call_id) in enumerate(zip(reply.tool_calls, _call_ids(reply))):
            function = {"name": call.name, "arguments": ""}
            opening = {"index": index, "id": call_id, "type": "function", "function": function}
            frames.append(chunk({"tool_calls": [opening]}))
            for piece in split_text(call.arguments_json()):
                frames.append(chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}))
        frames.append(chunk({}, _finish_reason(reply)))
        if include_usage:
            frames.append(sse({**envelope, "choices": [], "usage": _usage(estimate_usage(request, reply))}))
        frames.append(sse("[DONE]"))
        return frames

    def budget_headers(self, admission: Admission) -> dict[str, str]:
        headers: dict[str, str] = {}
        for kind, state in (("requests", admission.requests), ("tokens", admission.input_tokens)):
            if state is not None:
                headers.update({f"x-ratelimit-limit-{kind}": str(int(state.limit)),
                                f"x-ratelimit-remaining-{kind}": str(int(state.remaining)),
                                f"x-ratelimit-reset-{kind}": format_duration(state.reset_s)})
        if not admission.admitted:
            headers["retry-after-ms"] = str(max(1, round(admission.retry_after_s * 1000)))
        return headers

    def render_fault(self, fault: Fault, request: ScriptedRequest) -> Response:
        headers = {"x-request-id": _new_id("req_"), **retry_after_header(fault)}
        if fault.kind in _FAULTS:
            status, type_, code, param, template = _FAULTS[fault.kind]
        else:  # "status"
            status, param = 500, None
            fallback = ("server_error" if (fault.status or 500) >= 500 else "invalid_request_error", None, "Error.")
            type_, code, template = _STATUS_TEXT.get(fault.status or 500, fallback)
        extra = _CONTENT_FILTER_EXTRA if fault.kind == "content_filter" else {}
        message = fault.message or template.format(model=request.model)
        return _error(fault.status or status, message, type_, code, param, headers=headers, **extra)


def _envelope(obj: str, request: ScriptedRequest) -> dict[str, Any]:
    return {
        "id": _new_id("chatcmpl-"),
        "object": obj,
        "created": int(time.time()),
        "model": request.model,
        "system_fingerprint": _FINGERPRINT,
    }


def _call_ids(reply: Reply) -> list[str]:
    return [call.id or _new_id("call_") for call in reply.tool_calls]


def _finish_reason(reply: Reply) -> str:
    return reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")


def _usage(usage: Usage) -> dict[str, Any]:
    prompt_details: dict[str, int] = {"cached_tokens": usage.cached_tokens, "audio_tokens": 0}
    if usage.cache_write_tokens:
        prompt_details["cache_write_tokens"] = usage.cache_write_tokens
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": prompt_details,
        "completion_tokens_details": {
            "reasoning_tokens": usage.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
