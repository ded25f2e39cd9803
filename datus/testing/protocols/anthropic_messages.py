"""The Anthropic Messages wire format (``POST /v1/messages``, ``/v1/messages/count_tokens``).

Shapes follow the official API as the `anthropic` SDK parses them (`Message`, the raw stream
events, `{"type": "error", "error": {...}}`), and the fake enforces the rules an adapter most
easily breaks — a required ``max_tokens``, thinking budgets, no sampling settings or forced
tools while thinking, at most four cache breakpoints, thinking blocks replayed with the
signature this server issued — so a bad request fails here as it would upstream.

Scripted reasoning becomes a thinking block with a signature; scripted tool calls become
``tool_use`` blocks. When a request forces a tool (``tool_choice: {"type": "tool"}``) and the
reply is a JSON object as text, it arrives as that tool's input, as a real model must answer,
so one neutral script serves every provider.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from datus.models.scripted import Fault, Reply, ScriptedRequest, ScriptedToolCall
from datus.testing.limits import Admission
from datus.testing.protocols import (
    ProtocolError,
    Usage,
    WireProtocol,
    estimate_usage,
    retry_after_header,
    split_text,
    sse,
)

__all__ = ["AnthropicMessagesProtocol", "fake_signature"]

_DOCS = "https://docs.claude.com/en/docs/build-with-claude/extended-thinking"
_TYPE_OF_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_STATUS_TEXT = {
    400: "Invalid request.",
    401: "invalid x-api-key",
    402: "Your credit balance is too low to access the Anthropic API.",
    403: "Your API key does not have permission to use the specified resource.",
    404: "The requested resource could not be found.",
    413: "Request exceeds the maximum allowed number of bytes.",
    500: "Internal server error",
    504: "Request timed out",
    529: "Overloaded",
}
# kind -> (status, error type, message)
_FAULTS: dict[str, tuple[int, str, str]] = {
    "rate_limit": (429, "rate_limit_error", (
        "This request would exceed the rate limit for your organization (org-fake) of 50 requests per minute. "
        "For details, refer to: https://docs.claude.com/en/api/rate-limits."
    )),
    "quota": (402, "billing_error", (
        "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or "
        "purchase credits."
    )),
    "overloaded": (529, "overloaded_error", "Overloaded"),
    "context_length": (400, "invalid_request_error", "prompt is too long: 215384 tokens > 200000 maximum"),
}
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}


def fake_signature(thinking: str) -> str:
    """The signature this server puts on a thinking block, so it can check replays."""
    return base64.b64encode(hashlib.sha256(f"fake-signature:{thinking}".encode()).digest()).decode()


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _error(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    request_id = _new_id("req_")
    body = {"type": "error", "error": {"type": type_, "message": message}, "request_id": request_id}
    return JSONResponse(body, status_code=status, headers={"request-id": request_id, **(headers or {})})


def _invalid(message: str) -> ProtocolError:
    return ProtocolError(_error(400, "invalid_request_error", message))


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict) and "text" in part)
    return ""


class AnthropicMessagesProtocol(WireProtocol):
    name = "anthropic"
    paths = ("/v1/messages",)

    def extra_routes(self) -> list[BaseRoute]:
        return [Route("/v1/messages/count_tokens", self._count_tokens, methods=["POST"])]

    async def _count_tokens(self, request: Request) -> Response:
        denied = self.authenticate(request, request.app.state.api_key)
        if denied is not None:
            return denied
        try:
            body = json.loads(await request.body())
        except ValueError:
            return self.invalid_json()
        try:
            scripted = self._scripted(request, body, generate=False)
        except ProtocolError as exc:
            return exc.response
        return JSONResponse({"input_tokens": estimate_usage(scripted, Reply()).input_tokens})

    # -- requests -----------------------------------------------------------------------

    def authenticate(self, request: Request, api_key: str | None) -> Response | None:
        key = request.headers.get("x-api-key", "").strip()
        if not key:  # recent SDKs send the key as a bearer token
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            key = token.strip() if scheme.lower() == "bearer" else ""
        if not key:
            return _error(401, "authentication_error", "x-api-key header is required")
        if api_key is not None and key != api_key:
            return _error(401, "authentication_error", "invalid x-api-key")
        return None

    def invalid_json(self) -> Response:
        return _error(400, "invalid_request_error", "There was an error parsing the body of your request: "
                      "the body is not valid JSON")

    def parse(self, request: Request, body: Any) -> ScriptedRequest:
        return self._scripted(request, body, generate=True)

    def _scripted(self, request: Request, body: Any, *, generate: bool) -> ScriptedRequest:
        if not request.headers.get("anthropic-version"):
            raise _invalid("anthropic-version: header is required")
        if not isinstance(body, dict):
            raise _invalid("The request body must be a JSON object.")
        for field in ("model", "messages") + (("max_tokens",) if generate else ()):
            if body.get(field) is None:
                raise _invalid(f"{field}: Field required")
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise _invalid("messages: at least one message is required")
        _check_thinking(body)
        _check_cache_control(body)
        neutral: list[dict[str, Any]] = []
        if body.get("system"):
            neutral.append({"role": "system", "content": _text_of(body["system"])})
        for index, message in enumerate(messages):
            neutral += _neutral(message, index)
        return ScriptedRequest(
            protocol=self.name,
            model=str(body["model"]),
            messages=neutral,
            stream=bool(body.get("stream")),
            tools=list(body.get("tools") or []),
            body=body,
        )

    # -- answers --------------------------------------------------------------------------

    def render_json(self, reply: Reply, request: ScriptedRequest) -> Response:
        content = _content(reply, request)
        body = {
            **_envelope(request),
            "content": content,
            "stop_reason": _stop_reason(reply, content),
            "stop_sequence": None,
            "usage": _usage(estimate_usage(request, reply)),
        }
        return JSONResponse(body, headers={"request-id": _new_id("req_")})

    def stream_frames(self, reply: Reply, request: ScriptedRequest) -> list[bytes]:
        content = _content(reply, request)
        usage = _usage(estimate_usage(request, reply))
        start = {**_envelope(request), "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": {**usage, "output_tokens": 1}}
        frames = [_event({"type": "message_start", "message": start}), _event({"type": "ping"})]
        for index, block in enumerate(content):
            frames += _block_frames(index, block)
        final = {"stop_reason": _stop_reason(reply, content), "stop_sequence": None}
        frames.append(_event({"type": "message_delta", "delta": final, "usage": usage}))
        frames.append(_event({"type": "message_stop"}))
        return frames

    def budget_headers(self, admission: Admission) -> dict[str, str]:
        headers: dict[str, str] = {}
        now = time.time()
        for kind, state in (("requests", admission.requests), ("input-tokens", admission.input_tokens)):
            if state is not None:
                whole_at = datetime.fromtimestamp(now + state.reset_s, UTC)
                headers.update({f"anthropic-ratelimit-{kind}-limit": str(int(state.limit)),
                                f"anthropic-ratelimit-{kind}-remaining": str(int(state.remaining)),
                                f"anthropic-ratelimit-{kind}-reset": whole_at.isoformat().replace("+00:00", "Z")})
        return headers

    def render_fault(self, fault: Fault, request: ScriptedRequest) -> Response:
        if fault.kind == "content_filter":
            return _refusal(fault, request)
        headers = retry_after_header(fault)
        if fault.kind in _FAULTS:
            status, type_, message = _FAULTS[fault.kind]
        else:  # "status"
            status = fault.status or 500
            type_ = _TYPE_OF_STATUS.get(status, "api_error" if status >= 500 else "invalid_request_error")
            message = _STATUS_TEXT.get(status, f"HTTP {status}")
        return _error(fault.status or status, type_, fault.message or message, headers)

    def malformed_body(self, request: ScriptedRequest) -> bytes:
        return b'{"id": "msg_broken", "type": "message", "content": ['

    def malformed_frame(self, request: ScriptedRequest) -> bytes:
        return sse('{"type": "content_block_delta", "index": 0, "delta": {', event="content_block_delta")


# -- request checks ------------------------------------------------------------------------


def _check_thinking(body: dict[str, Any]) -> None:
    thinking = body.get("thinking") or {}
    if thinking.get("type") != "enabled":
        return
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int) or budget < 1024:
        raise _invalid("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
    if body.get("max_tokens", 0) <= budget:
        raise _invalid(f"`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our "
                       f"documentation at {_DOCS}#max-tokens-and-context-window-size")
    if body.get("temperature") not in (None, 1):
        raise _invalid("`temperature` may only be set to 1 when thinking is enabled or in extended thinking "
                       f"mode. Please consult our documentation at {_DOCS}#feature-compatibility")
    if (body.get("top_p") or 1) < 0.95:
        raise _invalid("`top_p` must be greater than or equal to 0.95 or unset when thinking is enabled.")
    if (body.get("tool_choice") or {}).get("type") in ("any", "tool"):
        raise _invalid("Thinking may not be enabled when tool_choice forces tool use.")


def _check_cache_control(body: dict[str, Any]) -> None:
    places = [body.get("system"), body.get("tools"), [m.get("content") for m in body["messages"]]]
    found = json.dumps(places).count('"cache_control"')
    if found > 4:
        raise _invalid(f"A maximum of 4 blocks with cache_control may be provided. Found {found}.")


def _neutral(message: Any, index: int) -> list[dict[str, Any]]:
    """One Anthropic turn as neutral messages: tool results become role "tool" entries."""
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        raise _invalid(f"messages.{index}.role: Input should be 'user' or 'assistant'")
    role, content = message["role"], message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise _invalid(f"messages.{index}.content: Input should be a valid list")
    out: list[dict[str, Any]] = []
    texts, thoughts, calls = [], [], []
    for position, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "tool_result":
            result = _text_of(block.get("content"))
            out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": result})
        elif kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_use":
            arguments = json.dumps(block.get("input") or {})
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": arguments}})
        elif kind == "thinking":
            if block.get("signature") != fake_signature(block.get("thinking", "")):
                raise _invalid(f"messages.{index}.content.{position}: Invalid `signature` in `thinking` block")
            thoughts.append(block.get("thinking", ""))
    if role == "assistant":
        entry: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
        if calls:
            entry["tool_calls"] = calls
        if thoughts:
            entry["reasoning"] = "".join(thoughts)
        out.append(entry)
    elif texts:
        out.append({"role": "user", "content": "\n".join(texts)})
    return out


# -- answer shapes -------------------------------------------------------------------------


def _envelope(request: ScriptedRequest) -> dict[str, Any]:
    return {"id": _new_id("msg_"), "type": "message", "role": "assistant", "model": request.model}


def _forced_tool(request: ScriptedRequest) -> str | None:
    choice = request.body.get("tool_choice") or {}
    return choice.get("name") if choice.get("type") == "tool" else None


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _content(reply: Reply, request: ScriptedRequest) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if reply.reasoning:
        blocks.append({"type": "thinking", "thinking": reply.reasoning, "signature": fake_signature(reply.reasoning)})
    text, calls = reply.text, reply.tool_calls
    forced = _forced_tool(request)
    answer = _json_object(text) if forced and not calls else None
    if answer is not None:
        text, calls = "", (ScriptedToolCall(str(forced), answer),)
    if text:
        blocks.append({"type": "text", "text": text, "citations": None})
    for call in calls:
        blocks.append({"type": "tool_use", "id": call.id or _new_id("toolu_"), "name": call.name,
                       "input": _json_object(call.arguments_json()) or {}})
    return blocks


def _stop_reason(reply: Reply, content: list[dict[str, Any]]) -> str:
    if reply.finish_reason:
        return _STOP_REASONS.get(reply.finish_reason, reply.finish_reason)
    return "tool_use" if any(block["type"] == "tool_use" for block in content) else "end_turn"


def _usage(usage: Usage) -> dict[str, Any]:
    """Anthropic's `input_tokens` is the uncached rest; reads and writes are beside it."""
    wire: dict[str, Any] = {
        "input_tokens": max(0, usage.input_tokens - usage.cached_tokens - usage.cache_write_tokens),
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation": {"ephemeral_5m_input_tokens": usage.cache_write_tokens, "ephemeral_1h_input_tokens": 0},
        "output_tokens": usage.output_tokens,
        "service_tier": "standard",
    }
    if usage.reasoning_tokens:
        wire["output_tokens_details"] = {"thinking_tokens": usage.reasoning_tokens}
    return wire


def _event(data: dict[str, Any]) -> bytes:
    return sse(data, event=data["type"])


def _block_frames(index: int, block: dict[str, Any]) -> list[bytes]:
    kind = block["type"]
    if kind == "thinking":
        opening = {"type": "thinking", "thinking": "", "signature": ""}
        deltas = [{"type": "thinking_delta", "thinking": piece} for piece in split_text(block["thinking"])]
        deltas.append({"type": "signature_delta", "signature": block["signature"]})
    elif kind == "text":
        opening = {"type": "text", "text": "", "citations": None}
        deltas = [{"type": "text_delta", "text": piece} for piece in split_text(block["text"])]
    else:  # tool_use: the input arrives as JSON text in pieces
        opening = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
        pieces = split_text(json.dumps(block["input"]))
        deltas = [{"type": "input_json_delta", "partial_json": piece} for piece in pieces]
    frames = [_event({"type": "content_block_start", "index": index, "content_block": opening})]
    frames += [_event({"type": "content_block_delta", "index": index, "delta": delta}) for delta in deltas]
    frames.append(_event({"type": "content_block_stop", "index": index}))
    return frames


def _refusal(fault: Fault, request: ScriptedRequest) -> Response:
    """Anthropic's safety refusal is an answer (HTTP 200) with `stop_reason: "refusal"`."""
    details = {"type": "refusal", "category": None, "explanation": fault.message}
    usage = _usage(estimate_usage(request, Reply(output_tokens=1)))
    message = {**_envelope(request), "content": [], "stop_reason": "refusal", "stop_sequence": None,
               "stop_details": details, "usage": usage}
    if not request.stream:
        return JSONResponse(message, headers={"request-id": _new_id("req_")})
    start = {**message, "stop_reason": None, "stop_details": None}
    frames = [
        _event({"type": "message_start", "message": start}),
        _event({"type": "ping"}),
        _event({"type": "message_delta", "delta": {"stop_reason": "refusal", "stop_sequence": None,
                                                   "stop_details": details}, "usage": usage}),
        _event({"type": "message_stop"}),
    ]
    return StreamingResponse(iter(frames), media_type="text/event-stream", headers={"cache-control": "no-cache"})
