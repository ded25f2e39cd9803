"""Wire protocols spoken by the fake provider server.

The server owns everything protocol-neutral (routing, recording, latency, the script, hangs,
cut connections); a protocol module owns one provider's spelling: where its endpoints live,
how it authenticates, how a request body becomes a `ScriptedRequest`, and how a `Reply` or a
`Fault` looks on the wire. Adding a provider (Anthropic messages, Gemini generateContent) is
one module with a `WireProtocol` subclass plus one line in `default_protocols`.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from datus.models.scripted import Fault, Reply, ScriptedRequest
from datus.testing.limits import Admission

__all__ = [
    "ProtocolError",
    "Usage",
    "WireProtocol",
    "default_protocols",
    "estimate_usage",
    "format_duration",
    "retry_after_header",
    "split_text",
    "sse",
]


class ProtocolError(Exception):
    """Raised by `parse`/`authenticate` helpers to answer with a ready, provider-shaped error."""

    def __init__(self, response: Response) -> None:
        super().__init__(f"protocol error {response.status_code}")
        self.response = response


class WireProtocol(ABC):
    """One provider's wire format. Instances are stateless and shared by all requests."""

    name: ClassVar[str]
    #: Generation endpoints as starlette path templates; all take POST.
    paths: ClassVar[tuple[str, ...]]

    def extra_routes(self) -> list[BaseRoute]:
        """Secondary endpoints (model listings and the like); they are not scripted. The key
        the server expects is `request.app.state.api_key`."""
        return []

    @abstractmethod
    def authenticate(self, request: Request, api_key: str | None) -> Response | None:
        """None when the caller may proceed, else the provider's 401/403 response.
        `api_key=None` accepts any non-empty key."""

    @abstractmethod
    def parse(self, request: Request, body: Any) -> ScriptedRequest:
        """The neutral view of a decoded JSON body; raise `ProtocolError` for a bad request."""

    @abstractmethod
    def invalid_json(self) -> Response:
        """The provider's answer to a body that is not JSON."""

    @abstractmethod
    def render_json(self, reply: Reply, request: ScriptedRequest) -> Response:
        """A complete non-streaming answer."""

    @abstractmethod
    def stream_frames(self, reply: Reply, request: ScriptedRequest) -> list[bytes]:
        """The whole SSE stream, one encoded frame per element, terminator included, so the
        server can cut it after any frame."""

    @abstractmethod
    def render_fault(self, fault: Fault, request: ScriptedRequest) -> Response:
        """An error-status fault (rate_limit, quota, status, overloaded, context_length,
        content_filter) as the provider's status code, headers and error body."""

    def budget_headers(self, admission: Admission) -> dict[str, str]:
        """The provider's rate-limit headers for the buckets in ``admission`` (the server's
        `ProviderLimits`), sent on every answer while limits are set. None by default (Gemini
        sends none)."""
        return {}

    def malformed_body(self, request: ScriptedRequest) -> bytes:
        """A body that starts like a real answer and stops being JSON."""
        return b'{"id": "broken", "object": '

    def malformed_frame(self, request: ScriptedRequest) -> bytes:
        """An SSE frame whose data is not JSON."""
        return sse('{"id": "broken", "choices": [')


@dataclass(frozen=True)
class Usage:
    """Token counts in neutral terms; `cached` and `reasoning` are subsets of input/output."""

    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


_LABEL_KEYS = frozenset({"role", "type", "id", "tool_call_id"})  # structure, not text


def _text_chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_chars(item) for key, item in value.items() if key not in _LABEL_KEYS)
    if isinstance(value, (list, tuple)):
        return sum(_text_chars(item) for item in value)
    return 0


def _tokens(chars: int) -> int:
    return max(1, math.ceil(chars / 4))


def estimate_usage(request: ScriptedRequest, reply: Reply, extra_input: Any = None) -> Usage:
    """Roughly four characters per token, like the providers' rule of thumb; the `Reply`
    overrides any count it sets. `extra_input` is input outside `messages`/`tools` (e.g. a
    system prompt kept beside the messages)."""
    input_tokens = reply.input_tokens
    if input_tokens is None:
        input_tokens = _tokens(_text_chars(request.messages) + _text_chars(request.tools) + _text_chars(extra_input))
    reasoning_tokens = reply.reasoning_tokens or (_tokens(len(reply.reasoning)) if reply.reasoning else 0)
    output_tokens = reply.output_tokens
    if output_tokens is None:
        call_chars = sum(len(call.name) + len(call.arguments_json()) for call in reply.tool_calls)
        output_tokens = _tokens(len(reply.text) + call_chars) + reasoning_tokens
    return Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_tokens=min(reply.cached_tokens, input_tokens),
        cache_write_tokens=reply.cache_write_tokens,
        reasoning_tokens=reasoning_tokens,
    )


def split_text(text: str, pieces: int = 3) -> list[str]:
    """Cut text into a few deltas, as a real stream delivers it; empty text gives none."""
    if not text:
        return []
    size = max(1, math.ceil(len(text) / pieces))
    return [text[start : start + size] for start in range(0, len(text), size)]


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event frame; non-string data is JSON-encoded."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def retry_after_header(fault: Fault) -> dict[str, str]:
    """`Retry-After` as given: seconds (a number) or an HTTP date (a string); none if unset."""
    value = fault.retry_after
    if value is None:
        return {}
    if isinstance(value, (int, float)):
        return {"retry-after": str(int(value)) if float(value).is_integer() else str(value)}
    return {"retry-after": value}


def format_duration(seconds: float) -> str:
    """OpenAI's spelling of a reset time: ``"20ms"``, ``"1.5s"``, ``"6m0s"``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60.0)
    rest_text = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{rest_text}s" if minutes else f"{rest_text}s"


def default_protocols() -> list[WireProtocol]:
    """Every protocol the server speaks by default; their routes must not overlap."""
    from datus.testing.protocols.anthropic_messages import AnthropicMessagesProtocol
    from datus.testing.protocols.gemini import GeminiProtocol
    from datus.testing.protocols.openai_chat import OpenAIChatProtocol
    from datus.testing.protocols.openai_responses import OpenAIResponsesProtocol

    return [OpenAIChatProtocol(), OpenAIResponsesProtocol(), AnthropicMessagesProtocol(), GeminiProtocol()]
