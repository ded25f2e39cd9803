"""Provider-neutral scripts for the fake providers.

A script says *what* a model answers (`Reply`) or *how* the provider misbehaves (`Fault`),
never how that is spelled on the wire: the same `Reply` is rendered as an OpenAI chat
completion, an Anthropic message or a Gemini response by the protocol modules of the fake
server, and returned directly by the in-process `FakeModel`.

A `Script` hands out one answer per request: scripted entries first (optionally matched
against the request, or firing on every n-th request: a fault mix), then the fallback
handler.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Fault", "Reply", "Script", "ScriptedRequest", "ScriptedToolCall", "echo_handler"]


@dataclass(frozen=True)
class ScriptedToolCall:
    name: str
    arguments: dict[str, Any] | str = field(default_factory=dict)
    id: str | None = None

    def arguments_json(self) -> str:
        return self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments)


@dataclass(frozen=True)
class Reply:
    """What the model says. `usage` overrides the computed token counts when given."""

    text: str = ""
    reasoning: str | None = None
    tool_calls: tuple[ScriptedToolCall, ...] = ()
    finish_reason: str | None = None  # default: "tool_calls" when tool_calls, else "stop"
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "tool_calls", tuple(self.tool_calls))


FaultKind = Literal[
    "rate_limit",  # 429 with Retry-After
    "quota",  # 429 insufficient_quota: permanent
    "status",  # any HTTP status with a provider-shaped error body
    "overloaded",  # 529 (Anthropic) / 503 elsewhere
    "hang",  # accept the request, answer nothing for `seconds`
    "malformed_json",  # 200 with a body that is not JSON
    "cut_stream",  # start an SSE stream, then drop the connection after `after_chunks`
    "context_length",  # 400 context length exceeded
    "content_filter",  # the provider's content filter refusal
]


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    status: int | None = None
    retry_after: float | str | None = None
    seconds: float = 30.0
    after_chunks: int = 1
    message: str | None = None


@dataclass(frozen=True)
class ScriptedRequest:
    """The neutral view of one incoming request that matchers and handlers see."""

    protocol: str  # "openai" | "anthropic" | "gemini" | "inprocess"
    model: str
    messages: list[dict[str, Any]]
    stream: bool
    tools: list[dict[str, Any]]
    body: dict[str, Any]

    @property
    def last_user_text(self) -> str:
        for message in reversed(self.messages):
            if message.get("role") == "user":
                content = message.get("content")
                return content if isinstance(content, str) else json.dumps(content)
        return ""


Answer = Reply | Fault
Handler = Callable[[ScriptedRequest], Answer]
Matcher = Callable[[ScriptedRequest], bool]


def echo_handler(request: ScriptedRequest) -> Reply:
    """The default answer: echo the last user message, so an unscripted call still works."""
    return Reply(text=f"echo: {request.last_user_text}")


@dataclass
class _Entry:
    answer: Answer | Handler
    match: Matcher | None
    times: int | None  # None: forever
    every: int | None = None  # fires on requests number every, 2*every, ... (counted from 1)


class Script:
    """Thread-safe queue of answers; the fallback handler answers when nothing matches."""

    def __init__(self, fallback: Handler = echo_handler) -> None:
        self._lock = threading.Lock()
        self._entries: list[_Entry] = []
        self._count = 0  # requests answered since the last reset
        self.fallback: Handler = fallback

    def add(
        self,
        *answers: Answer | Handler,
        match: str | Matcher | None = None,
        times: int | None = 1,
        every: int | None = None,
    ) -> Script:
        """Queue answers in order. `match` is a substring of the last user message or a
        predicate; `times=None` keeps the entry forever. `every=n` makes an entry answer only
        the n-th, 2n-th, ... request since the last reset (with ``times=None``: a fault mix,
        e.g. every 4th request a 429, every 7th a 500; the first entry listed wins a tie)."""
        if every is not None and every < 1:
            raise ValueError("every must be at least 1")
        matcher = _as_matcher(match)
        with self._lock:
            for answer in answers:
                self._entries.append(_Entry(answer, matcher, times, every))
        return self

    def reset(self, fallback: Handler | None = None) -> None:
        with self._lock:
            self._entries.clear()
            self._count = 0
            if fallback is not None:
                self.fallback = fallback

    def next_answer(self, request: ScriptedRequest) -> Answer:
        with self._lock:
            self._count += 1
            for index, entry in enumerate(self._entries):
                if entry.every is not None and self._count % entry.every:
                    continue
                if entry.match is not None and not entry.match(request):
                    continue
                if entry.times is not None:
                    entry.times -= 1
                    if entry.times <= 0:
                        del self._entries[index]
                answer = entry.answer
                break
            else:
                answer = self.fallback
        return answer(request) if callable(answer) else answer

    def pending(self) -> int:
        with self._lock:
            return len(self._entries)


def _as_matcher(match: str | Matcher | None) -> Matcher | None:
    if match is None or callable(match):
        return match
    needle = match
    return lambda request: needle in request.last_user_text
