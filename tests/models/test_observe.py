"""Observers (datus.models.observe) hear every model call and tool call made inside
``observing``, with the same usage record ``track_usage`` collects; an observer that raises
changes nothing; with nobody observing, nothing is asked of anyone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from datus.models import observe
from datus.models.config import ModelConfig
from datus.models.errors import RateLimitError
from datus.models.fake_model import FakeModel
from datus.models.generation import StreamDelta
from datus.models.scripted import Fault, Reply
from datus.models.scripted import ScriptedToolCall as Call
from datus.models.usage import track_usage


class Recorder:
    """Records each span's start and end."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any, Any, BaseException | None]] = []
        self.prompts: list[str] = []

    def model_call(self, call: observe.ModelCall) -> Any:
        self.prompts.append(call.request.messages[-1].content)  # at start: the tool loop appends later
        return _Span(self, "model", call)

    def tool_call(self, call: observe.ToolCallInfo) -> Any:
        return _Span(self, "tool", call)


class _Span:
    def __init__(self, recorder: Recorder, kind: str, call: Any) -> None:
        self.recorder, self.kind, self.call = recorder, kind, call

    def end(self, result: Any, error: BaseException | None) -> None:
        self.recorder.events.append((self.kind, self.call, result, error))


class Broken:
    def model_call(self, call: Any) -> Any:
        raise RuntimeError("observer down")

    def tool_call(self, call: Any) -> Any:
        raise RuntimeError("observer down")


def model(replies: list[Any], **config: Any) -> FakeModel:
    return FakeModel(ModelConfig(type="fake", model="s", retry_base_delay_s=0.0, **config), replies=replies)


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


async def test_model_and_tool_calls_reach_the_observer_with_their_usage() -> None:
    recorder = Recorder()
    fake = model([Reply(tool_calls=[Call("add", {"a": 1, "b": 2}, id="c1")], input_tokens=11, output_tokens=3),
                  Reply(text="3", input_tokens=20, output_tokens=1)])
    with observe.observing(recorder), track_usage() as usage:
        result = await fake.generate_with_tools("sum 1 and 2", tools=[add])
    assert result["content"] == "3"
    kinds = [(kind, getattr(call, "name", None)) for kind, call, _, _ in recorder.events]
    assert kinds == [("model", None), ("tool", "add"), ("model", None)]
    first, tool, second = recorder.events
    assert first[1].provider == "fake" and first[1].model == "s"
    assert recorder.prompts == ["sum 1 and 2", "3"]  # the second turn's last message: the tool's result
    assert [first[2].usage, second[2].usage] == usage  # the same records track_usage got
    assert (first[2].usage.input_tokens, first[2].usage.output_tokens) == (11, 3)
    assert tool[1].arguments == {"a": 1, "b": 2} and tool[1].call_id == "c1"
    assert tool[2].text == "3" and not tool[2].is_error and tool[3] is None


async def test_a_failed_call_ends_its_span_with_the_error_after_its_retries() -> None:
    recorder = Recorder()
    fake = model([Fault(kind="rate_limit", retry_after=0), Fault(kind="quota")], max_retries=3)
    with observe.observing(recorder), pytest.raises(Exception) as raised:
        await fake.agenerate("hi")
    assert len(recorder.events) == 1, "one span for the logical call, its retries included"
    kind, _, result, error = recorder.events[0]
    assert kind == "model" and result is None and error is raised.value
    assert not isinstance(error, RateLimitError)  # the error the call raised, not the retried one


async def test_a_stream_ends_its_span_once_with_the_final_answer() -> None:
    recorder = Recorder()
    fake = model([Reply(text="one two three", input_tokens=5, output_tokens=3)])
    with observe.observing(recorder):
        items = [item async for item in fake.astream("count")]
    assert any(isinstance(item, StreamDelta) for item in items)
    assert len(recorder.events) == 1
    _, call, result, error = recorder.events[0]
    assert call.stream and error is None and result.text == "one two three" and result.usage.output_tokens == 3


async def test_a_stream_closed_early_ends_its_span_with_the_close() -> None:
    recorder = Recorder()
    fake = model([Reply(text="one two three four five six")])
    with observe.observing(recorder):
        stream = fake.astream("count")
        async for _ in stream:
            break
        await stream.aclose()
    assert len(recorder.events) == 1
    assert recorder.events[0][2] is None and isinstance(recorder.events[0][3], GeneratorExit)


async def test_a_broken_observer_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    fake = model(["fine"])
    with observe.observing(Broken(), recorder):
        assert await fake.agenerate("hi") == "fine"
    assert len(recorder.events) == 1, "the other observer still hears the call"
    assert "observer failed" in caplog.text


async def test_observers_follow_the_task_that_installed_them() -> None:
    ours, theirs = Recorder(), Recorder()
    fake = model(["a", "b"])

    async def job(recorder: Recorder, prompt: str) -> None:
        with observe.observing(recorder):
            await asyncio.sleep(0)
            await fake.agenerate(prompt)

    await asyncio.gather(job(ours, "mine"), job(theirs, "yours"))
    assert ours.prompts == ["mine"] and theirs.prompts == ["yours"]


def test_nobody_observing_is_a_no_op_block() -> None:
    block = observe.model_call("fake", "s", None)  # type: ignore[arg-type]
    with block as spans:
        assert spans is None
    assert observe.tool_call("t", {}) is block, "one shared no-op object: nothing is built per call"
