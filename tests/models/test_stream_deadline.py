"""``timeout_s`` holds for streamed calls as it does for whole answers: through the real SDKs
(OpenAI, Anthropic, Gemini) over HTTP to the fake provider.

A provider that trickles — a frame now and then, never quiet for a whole timeout, so no read of
the SDK ever times out — is cut off once the time spent waiting on it passes ``timeout_s``:
before the first delta that is a retryable `ModelTimeoutError` like any other, after it the
error is raised (what the caller saw cannot be taken back). The caller's own time between
items is not the provider's and is never cancelled.

Every test shortens ``timeout_s`` (120 s by default) to a fraction of a second, since the
behaviour under test is what happens when it passes; the provider's gaps are shorter than it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from starlette.responses import Response, StreamingResponse

from datus.models.base import LLMBaseModel
from datus.models.config import ModelConfig
from datus.models.errors import ModelTimeoutError
from datus.models.generation import Generation, StreamDelta
from datus.models.scripted import Fault, Reply, ScriptedRequest, ScriptedToolCall
from datus.testing.fake_server import FakeProviderServer
from datus.testing.protocols import WireProtocol

TIMEOUT_S = 0.6
GAP_S = 0.15  # well under TIMEOUT_S: no single read of an SDK times out
MODELS = {"openai": "gpt-4o-mini", "claude": "claude-sonnet-4-5", "gemini": "gemini-2.5-flash"}


class _Trickle(StreamingResponse):
    def __init__(self, frames: list[bytes], gap_s: float) -> None:
        async def body() -> AsyncIterator[bytes]:
            for index, frame in enumerate(frames):
                if index:
                    await asyncio.sleep(gap_s)
                yield frame

        super().__init__(body(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


class TricklingServer(FakeProviderServer):
    """The fake provider, sending its next ``slow`` streamed answers one frame every ``gap_s``.
    (The shipped fake's faults are a hang before the answer and a cut stream; this stands in
    for a slow-stream fault it does not have yet.)"""

    def __init__(self, gap_s: float) -> None:
        super().__init__()
        self.gap_s = gap_s
        self.slow = 0

    def _reply(self, protocol: WireProtocol, reply: Reply, scripted: ScriptedRequest) -> Response:
        if not scripted.stream or self.slow <= 0:
            return super()._reply(protocol, reply, scripted)
        self.slow -= 1
        return _Trickle(protocol.stream_frames(reply, scripted), self.gap_s)


@pytest.fixture
def trickling() -> Iterator[TricklingServer]:
    with TricklingServer(GAP_S) as server:
        yield server


def make_model(provider: str, server: FakeProviderServer, **overrides: Any) -> LLMBaseModel:
    base_url = server.openai_base_url if provider == "openai" else server.url
    config = ModelConfig(type=provider, model=MODELS[provider], api_key="sk-test", base_url=base_url,
                         retry_base_delay_s=0.0, retry_max_delay_s=0.05, **overrides)
    return LLMBaseModel.model_class(provider)(model_config=config)


async def warmed(provider: str, server: FakeProviderServer, **overrides: Any) -> LLMBaseModel:
    """A model whose SDK has made its first request (a process's first call imports the SDK's
    resources, inside that call's time), with the server's record cleared after it."""
    model = make_model(provider, server, **overrides)
    await model.agenerate("warm up", timeout_s=120)
    server.clear_requests()
    return model


def generation_requests(server: FakeProviderServer) -> int:
    return sum(1 for request in server.requests if not request.path.startswith("/_fake"))


@pytest.mark.parametrize("provider", list(MODELS))
@pytest.mark.parametrize("where", ["config", "per_call"])
async def test_a_stream_that_trickles_past_the_deadline_is_cut_off_after_its_deltas(
        trickling: TricklingServer, provider: str, where: str) -> None:
    model = await warmed(provider, trickling, **({"timeout_s": TIMEOUT_S} if where == "config" else {}))
    options = {"timeout_s": TIMEOUT_S} if where == "per_call" else {}
    # six deltas and more frames, one each GAP_S: the whole answer takes several times TIMEOUT_S
    trickling.script.add(Reply(reasoning="let me think about it", text="the answer is forty-two, of course"))
    trickling.slow = 1
    deltas: list[StreamDelta] = []
    try:
        with pytest.raises(ModelTimeoutError) as caught:
            async for item in model.astream("hi", **options):
                assert not isinstance(item, Generation), "the trickle was answered whole: no deadline"
                deltas.append(item)
    finally:
        await model.aclose()
    assert deltas, "cut off before the first delta: the deadline counted more than the waits"
    assert caught.value.retryable  # a job may retry it; the call itself does not, having handed out deltas
    assert caught.value.details["attempts"] == 1 and generation_requests(trickling) == 1


@pytest.mark.parametrize("provider", list(MODELS))
async def test_a_deadline_passed_before_the_first_delta_is_retried(trickling: TricklingServer, provider: str) -> None:
    model = await warmed(provider, trickling, timeout_s=TIMEOUT_S)
    # tool calls only: no delta in the whole answer, a frame each GAP_S (several per call but
    # Gemini's): the deadline passes before anything is handed out; the retry is answered at once
    calls = [ScriptedToolCall("lookup", {"table": f"t{index}", "why": "to see"}, id=f"c{index}") for index in range(8)]
    trickling.script.add(Reply(tool_calls=calls), Reply(text="fine"))
    trickling.slow = 1
    try:
        items = [item async for item in model.astream("hi")]
    finally:
        await model.aclose()
    final = items[-1]
    assert isinstance(final, Generation) and final.text == "fine"
    assert final.usage.attempts == 2 and generation_requests(trickling) == 2


@pytest.mark.parametrize("provider", list(MODELS))
async def test_a_hang_before_the_answer_is_a_retryable_timeout(fake_server: FakeProviderServer, provider: str) -> None:
    model = await warmed(provider, fake_server, timeout_s=TIMEOUT_S, max_retries=0)
    fake_server.script.add(Fault("hang", seconds=30))
    try:
        with pytest.raises(ModelTimeoutError) as caught:
            async for _ in model.astream("hi"):
                pass
        assert caught.value.retryable
        # the same with a retry allowed: the hang is asked again and answered
        retrying = make_model(provider, fake_server, timeout_s=TIMEOUT_S, max_retries=1)
        fake_server.script.add(Fault("hang", seconds=30), Reply(text="second time"))
        final = [item async for item in retrying.astream("hi")][-1]
        await retrying.aclose()
    finally:
        await model.aclose()
    assert isinstance(final, Generation) and final.text == "second time" and final.usage.attempts == 2


@pytest.mark.parametrize("provider", list(MODELS))
async def test_a_slow_caller_is_neither_cancelled_nor_timed_out(fake_server: FakeProviderServer, provider: str) -> None:
    model = await warmed(provider, fake_server, timeout_s=TIMEOUT_S)
    fake_server.script.add(Reply(reasoning="let me think about it", text="the answer is forty-two, of course"))
    handled: list[StreamDelta | Generation] = []
    try:
        async for item in model.astream("hi"):
            # each item takes the caller most of the timeout: together far more than all of it
            await asyncio.sleep(TIMEOUT_S * 0.5)
            handled.append(item)
    finally:
        await model.aclose()
    assert len(handled) >= 3, "too few items to add up past the timeout"
    assert isinstance(handled[-1], Generation) and handled[-1].text == "the answer is forty-two, of course"
    assert handled[-1].usage.attempts == 1 and generation_requests(fake_server) == 1
