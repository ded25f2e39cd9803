"""The Gemini API wire format (generativelanguage.googleapis.com), as google-genai speaks it.

    POST /v1beta/models/{model}:generateContent
    POST /v1beta/models/{model}:streamGenerateContent?alt=sse   SSE of GenerateContentResponse
    POST /v1beta/models/{model}:countTokens                     not scripted: counts the text
    (and the same under /v1, the SDK's default version)

The key comes as ``x-goog-api-key`` or ``?key=``. Reasoning is sent as ``thought: true`` text
parts, with a ``thoughtSignature`` on the first function call (or the last text part), as
Gemini does when thinking. Errors use Google's envelope ``{"error": {"code", "message",
"status", "details"}}``; a content filter is a 200 with ``promptFeedback.blockReason`` and
no candidates. The SDK writes some request fields in snake_case (``thinking_config`` keys,
``parameters_json_schema``), which the real API accepts as well, so both spellings are read.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from datus.models.scripted import Fault, Reply, ScriptedRequest
from datus.testing.protocols import (
    ProtocolError,
    Usage,
    WireProtocol,
    estimate_usage,
    retry_after_header,
    split_text,
    sse,
)

__all__ = ["GeminiProtocol"]

_VERSIONS = ("v1beta", "v1")
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}
_STATUS_TEXT = {
    400: "Request contains an invalid argument.",
    401: "Request had invalid authentication credentials.",
    403: "The caller does not have permission",
    404: "models/{model} is not found for API version v1beta, or is not supported for generateContent.",
    500: "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
    503: "The model is overloaded. Please try again later.",
    504: "The request timed out. Please try again.",
}
_QUOTA_TEXT = (
    "You exceeded your current quota, please check your plan and billing details. For more information on "
    "this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits."
)
_NO_KEY = (
    "Method doesn't allow unregistered callers (callers without established identity). Please use API Key "
    "or other form of API consumer identity to call this API."
)
_FINISH = {"stop": "STOP", "tool_calls": "STOP", "length": "MAX_TOKENS", "content_filter": "SAFETY"}


def _error(status: int, message: str, details: list[dict[str, Any]] | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    error: dict[str, Any] = {"code": status, "message": message, "status": _STATUS_NAMES.get(status, "UNKNOWN")}
    if details:
        error["details"] = details
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def _quota_details(quota_id: str, metric: str, retry_after: float | str | None) -> list[dict[str, Any]]:
    details: list[dict[str, Any]] = [
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
         "violations": [{"quotaMetric": f"generativelanguage.googleapis.com/{metric}", "quotaId": quota_id,
                         "quotaDimensions": {"location": "global", "model": "gemini-2.5-flash"}, "quotaValue": "10"}]},
        {"@type": "type.googleapis.com/google.rpc.Help",
         "links": [{"description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
    ]
    if isinstance(retry_after, (int, float)):
        details.append({"@type": _RETRY_INFO, "retryDelay": f"{retry_after:g}s"})
    return details


def _get(mapping: dict[str, Any], camel: str, snake: str, default: Any = None) -> Any:
    return mapping.get(camel, mapping.get(snake, default))


def _text_of(parts: list[dict[str, Any]]) -> str:
    return "".join(str(part.get("text", "")) for part in parts if isinstance(part, dict) and not part.get("thought"))


def _neutral_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Gemini contents in the OpenAI-like shape the script's matchers read."""
    messages: list[dict[str, Any]] = []
    system = _get(body, "systemInstruction", "system_instruction")
    if isinstance(system, dict):
        messages.append({"role": "system", "content": _text_of(system.get("parts") or [])})
    for content in body.get("contents") or []:
        parts = [part for part in content.get("parts") or [] if isinstance(part, dict)]
        role = "assistant" if content.get("role") == "model" else "user"
        for part in parts:
            response = _get(part, "functionResponse", "function_response")
            if isinstance(response, dict):
                messages.append({"role": "tool", "name": response.get("name"), "tool_call_id": response.get("id"),
                                 "content": json.dumps(response.get("response"))})
        calls = [_get(part, "functionCall", "function_call") for part in parts]
        calls = [call for call in calls if isinstance(call, dict)]
        text = _text_of(parts)
        if text or (role == "assistant" and calls):
            message: dict[str, Any] = {"role": role, "content": text}
            if calls:
                message["tool_calls"] = [{"id": call.get("id"), "function": {
                    "name": call.get("name"), "arguments": json.dumps(call.get("args") or {})}} for call in calls]
            messages.append(message)
    return messages


def _declarations(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [declaration for tool in body.get("tools") or [] if isinstance(tool, dict)
            for declaration in _get(tool, "functionDeclarations", "function_declarations", [])]


def _signature(reply: Reply) -> str:
    """A stable stand-in for Gemini's opaque thought signature (same answer, same bytes)."""
    return base64.b64encode(hashlib.sha256((reply.reasoning or "").encode()).digest()).decode()


def _call_part(call: Any) -> dict[str, Any]:
    if isinstance(call.arguments, str):
        try:
            args = json.loads(call.arguments)
        except ValueError:
            args = {"raw": call.arguments}
    else:
        args = call.arguments
    function_call: dict[str, Any] = {"name": call.name, "args": args}
    if call.id:  # the Gemini API mostly sends none; the adapter must cope
        function_call["id"] = call.id
    return {"functionCall": function_call}


def _usage(usage: Usage) -> dict[str, Any]:
    candidates = usage.output_tokens - usage.reasoning_tokens
    metadata: dict[str, Any] = {
        "promptTokenCount": usage.input_tokens,
        "candidatesTokenCount": candidates,
        "totalTokenCount": usage.total_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": usage.input_tokens}],
    }
    if usage.cached_tokens:
        metadata["cachedContentTokenCount"] = usage.cached_tokens
        metadata["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": usage.cached_tokens}]
    if usage.reasoning_tokens:
        metadata["thoughtsTokenCount"] = usage.reasoning_tokens
    return metadata


class GeminiProtocol(WireProtocol):
    name = "gemini"
    paths = tuple(f"/{version}/models/{{model}}:{action}"
                  for version in _VERSIONS for action in ("generateContent", "streamGenerateContent"))

    def extra_routes(self) -> list[BaseRoute]:
        return [Route(f"/{version}/models/{{model}}:countTokens", self._count_tokens, methods=["POST"])
                for version in _VERSIONS]

    async def _count_tokens(self, request: Request) -> Response:
        denied = self.authenticate(request, request.app.state.api_key)
        if denied is not None:
            return denied
        try:
            body = json.loads(await request.body())
        except ValueError:
            return self.invalid_json()
        inner = _get(body, "generateContentRequest", "generate_content_request") or body
        scripted = self._scripted(request, inner if isinstance(inner, dict) else {})
        tokens = estimate_usage(scripted, Reply(), extra_input=None).input_tokens
        return JSONResponse({"totalTokens": tokens, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": tokens}]})

    # -- requests -----------------------------------------------------------------------

    def authenticate(self, request: Request, api_key: str | None) -> Response | None:
        key = request.headers.get("x-goog-api-key") or request.query_params.get("key") or ""
        if not key:
            return _error(403, _NO_KEY, [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                         "reason": "CONSUMER_INVALID", "domain": "googleapis.com"}])
        if api_key is not None and key != api_key:
            details = [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                 "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}},
                {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US",
                 "message": "API key not valid. Please pass a valid API key."},
            ]
            return _error(400, "API key not valid. Please pass a valid API key.", details)
        return None

    def invalid_json(self) -> Response:
        return _error(400, 'Invalid JSON payload received. Unexpected token.\n{"contents": \n ^')

    def parse(self, request: Request, body: Any) -> ScriptedRequest:
        if not isinstance(body, dict):
            raise ProtocolError(_error(400, "Invalid JSON payload received. Expected an object."))
        if not body.get("contents"):
            raise ProtocolError(_error(400, "* GenerateContentRequest.contents: contents is not specified\n"))
        stream = request.url.path.endswith(":streamGenerateContent")
        if stream and request.query_params.get("alt") != "sse":
            # The real API then streams one JSON array; the fake speaks only SSE, as the SDK asks.
            raise ProtocolError(_error(400, "the fake Gemini server streams only with alt=sse"))
        return self._scripted(request, body, stream)

    def _scripted(self, request: Request, body: dict[str, Any], stream: bool = False) -> ScriptedRequest:
        return ScriptedRequest(protocol=self.name, model=request.path_params.get("model", ""),
                               messages=_neutral_messages(body), stream=stream, tools=_declarations(body), body=body)

    # -- answers --------------------------------------------------------------------------

    def render_json(self, reply: Reply, request: ScriptedRequest) -> Response:
        parts: list[dict[str, Any]] = []
        if reply.reasoning:
            parts.append({"text": reply.reasoning, "thought": True})
        if reply.text or not reply.tool_calls:
            parts.append({"text": reply.text})
        parts += [_call_part(call) for call in reply.tool_calls]
        if reply.reasoning:  # Gemini signs the first function call, else the last part
            signed = next((part for part in parts if "functionCall" in part), parts[-1])
            signed["thoughtSignature"] = _signature(reply)
        body = _envelope(request, _response_id(), parts, _finish(reply))
        body["usageMetadata"] = _usage(estimate_usage(request, reply))
        return JSONResponse(body)

    def stream_frames(self, reply: Reply, request: ScriptedRequest) -> list[bytes]:
        response_id = _response_id()  # one id for every chunk of a stream, as Gemini does
        frames = [sse(_envelope(request, response_id, [{"text": piece, "thought": True}]))
                  for piece in split_text(reply.reasoning or "")]
        frames += [sse(_envelope(request, response_id, [{"text": piece}])) for piece in split_text(reply.text)]
        calls = [_call_part(call) for call in reply.tool_calls]  # a function call comes whole
        if calls and reply.reasoning:
            calls[0]["thoughtSignature"] = _signature(reply)
        frames += [sse(_envelope(request, response_id, [part])) for part in calls]
        last: dict[str, Any] = {"text": ""}
        if reply.reasoning and not calls:
            last["thoughtSignature"] = _signature(reply)
        final = _envelope(request, response_id, [last], _finish(reply))
        final["usageMetadata"] = _usage(estimate_usage(request, reply))
        frames.append(sse(final))
        return frames

    def render_fault(self, fault: Fault, request: ScriptedRequest) -> Response:
        headers = retry_after_header(fault)
        if fault.kind == "content_filter":
            prompt_tokens = estimate_usage(request, Reply()).input_tokens
            rating = {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}
            body = {"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": [rating]},
                    "usageMetadata": {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens},
                    "modelVersion": request.model, "responseId": _response_id()}
            if request.stream:
                return Response(sse(body), media_type="text/event-stream")
            return JSONResponse(body)
        if fault.kind == "rate_limit":
            details = _quota_details("GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                                     "generate_content_free_tier_requests", fault.retry_after)
            return _error(429, fault.message or _QUOTA_TEXT, details, headers)
        if fault.kind == "quota":
            details = _quota_details("GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                                     "generate_content_free_tier_requests", None)
            return _error(429, fault.message or _QUOTA_TEXT, details, headers)
        if fault.kind == "overloaded":
            return _error(503, fault.message or _STATUS_TEXT[503], headers=headers)
        if fault.kind == "context_length":
            message = "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576)."
            return _error(400, fault.message or message, headers=headers)
        status = fault.status or 500
        template = _STATUS_TEXT.get(status, "Error.")
        return _error(status, fault.message or template.format(model=request.model), headers=headers)

    def malformed_body(self, request: ScriptedRequest) -> bytes:
        return b'{"candidates": [{"content": {"parts": [{"text": '

    def malformed_frame(self, request: ScriptedRequest) -> bytes:
        return sse('{"candidates": [{"content": ')



def _envelope(request: ScriptedRequest, response_id: str, parts: list[dict[str, Any]],
              finish: str | None = None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish is not None:
        candidate["finishReason"] = finish
    return {"candidates": [candidate], "modelVersion": request.model, "responseId": response_id}
def _finish(reply: Reply) -> str:
    if reply.finish_reason is None:
        return "STOP"
    return _FINISH.get(reply.finish_reason, reply.finish_reason.upper())


def _response_id() -> str:
    return secrets.token_urlsafe(16)
