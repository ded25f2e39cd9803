"""`FakeModel`: a scripted, offline model for tests and demos (provider ``fake``).

It answers from a `datus.models.scripted.Script` — replies from a list, by matching, or from a
function, tool calls included — with no network. Faults in the script raise the same
``ModelError`` classes a real provider's answer would map to, so retries and error handling
are exercised for real. (The wire-level fake *servers* in ``datus.testing`` are the other
half: they let the real SDKs be tested.)
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from datus.models.base import LLMBaseModel
from datus.models.errors import (
    ContentFilterError,
    ContextLengthExceededError,
    InvalidResponseError,
    ModelConnectionError,
    ModelError,
    ModelTimeoutError,
    OverloadedError,
    QuotaExceededError,
    RateLimitError,
    error_from_status,
)
from datus.models.generation import Generation, ModelRequest, StreamDelta
from datus.models.messages import ToolCall
from datus.models.scripted import Fault, Reply, Script, ScriptedRequest
from datus.models.usage import Usage

__all__ = ["FakeModel"]


class FakeModel(LLMBaseModel):
    REQUIRES_API_KEY = False
    def __init__(
        self,
        model_config: Any,
        replies: Iterable[Reply | Fault | str] | None = None,
        handler: Callable[[ScriptedRequest], Reply | Fault] | None = None,
        script: Script | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model_config, **kwargs)
        self.script = script or (Script(handler) if handler else Script())
        if replies is not None:
            self.script.add(*(Reply(text=r) if isinstance(r, str) else r for r in replies))

    def _create_client(self) -> Any:
        return None

    def _scripted_request(self, request: ModelRequest, stream: bool) -> ScriptedRequest:
        return ScriptedRequest(
            protocol="inprocess",
            model=self.model_name,
            messages=[message.model_dump(exclude_defaults=True) for message in request.messages],
            stream=stream,
            tools=[{"name": tool.name, "description": tool.description, "parameters": tool.parameters}
                   for tool in request.tools],
            body={"options": request.options.model_dump(exclude_none=True)},
        )

    async def _answer(self, request: ModelRequest, stream: bool) -> Reply:
        answer = self.script.next_answer(self._scripted_request(request, stream))
        if isinstance(answer, Fault):
            if answer.kind == "hang":
                await asyncio.sleep(answer.seconds)
            raise self._fault_error(answer)
        if answer.latency_s:
            await asyncio.sleep(answer.latency_s)
        return answer

    def _generation(self, reply: Reply, request: ModelRequest) -> Generation:
        prompt_text = " ".join(message.content for message in request.messages)
        calls = [ToolCall(id=call.id or f"call_{uuid.uuid4().hex[:12]}", name=call.name,
                          arguments=call.arguments_json()) for call in reply.tool_calls]
        output = reply.output_tokens if reply.output_tokens is not None else (
            self.token_count(reply.text) + self.token_count(reply.reasoning or ""))
        return Generation(
            text=reply.text,
            reasoning=reply.reasoning,
            tool_calls=calls,
            finish_reason=reply.finish_reason or ("tool_calls" if calls else "stop"),
            usage=Usage(
                input_tokens=reply.input_tokens if reply.input_tokens is not None else self.token_count(prompt_text),
                output_tokens=output,
                cached_tokens=reply.cached_tokens,
                cache_write_tokens=reply.cache_write_tokens,
                reasoning_tokens=reply.reasoning_tokens,
            ),
        )

    async def _complete(self, client: Any, request: ModelRequest) -> Generation:
        return self._generation(await self._answer(request, stream=False), request)

    async def _stream(self, client: Any, request: ModelRequest) -> AsyncIterator[StreamDelta | Generation]:
        reply = await self._answer(request, stream=True)
        for piece in _pieces(reply.reasoning or ""):
            yield StreamDelta(reasoning=piece)
        for piece in _pieces(reply.text):
            yield StreamDelta(text=piece)
        yield self._generation(reply, request)

    def _map_error(self, exc: Exception) -> ModelError:
        return InvalidResponseError(f"{type(exc).__name__}: {exc}", provider=self.provider, model=self.model_name)

    def _fault_error(self, fault: Fault) -> ModelError:
        where = {"provider": self.provider, "model": self.model_name}
        message = fault.message or f"scripted fault: {fault.kind}"
        retry_after = float(fault.retry_after) if isinstance(fault.retry_after, (int, float)) else None
        simple: dict[str, ModelError] = {
            "rate_limit": RateLimitError(message, status_code=429, retry_after=retry_after, **where),
            "quota": QuotaExceededError(message, status_code=429, **where),
            "overloaded": OverloadedError(message, status_code=529, **where),
            "hang": ModelTimeoutError(message, **where),
            "malformed_json": InvalidResponseError(message, **where),
            "cut_stream": ModelConnectionError(message, **where),
            "context_length": ContextLengthExceededError(message, status_code=400, **where),
            "content_filter": ContentFilterError(message, **where),
        }
        if fault.kind == "status":
            return error_from_status(fault.status or 500, message, **where)
        return simple[fault.kind]


def _pieces(text: str, size: int = 8) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]
