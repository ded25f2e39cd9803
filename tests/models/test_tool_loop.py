"""The tool loop on the scripted model with Python function tools (MCP servers and the
wire formats are covered by test_tool_runs.py and the provider tests)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from datus.configuration.agent_config import ModelConfig
from datus.models.errors import MaxTurnsExceededError, RateLimitError
from datus.models.fake_model import FakeModel
from datus.schemas.action_history import ActionHistoryManager
from datus.testing.script import Fault, Reply
from datus.testing.script import ScriptedToolCall as Call

RAN: list[tuple[int, int]] = []


def add(a: int, b: int) -> int:
    """Add two integers."""
    RAN.append((a, b))
    return a + b


async def explode(reason: str) -> str:
    """Always fails."""
    raise RuntimeError(reason)


class Total(BaseModel):
    total: int


def exchange() -> list:
    return [
        Reply(text="adding", reasoning="plan", tool_calls=[Call("add", {"a": 1, "b": 2}, id="c1"),
                                                           Call("missing", {}, id="c2")]),
        Reply(tool_calls=[Call("add", '{"a": "x"', id="c3"), Call("explode", {"reason": "boom"}, id="c4")]),
        Reply(text='{"total": 3}'),
    ]


def model(replies) -> FakeModel:
    return FakeModel(ModelConfig(type="fake", model="s", retry_base_delay_s=0.0), replies=replies)


def comparable(steps):
    return [(s.role, s.action_type, s.status, s.messages if s.action_type != "user_input" else "",
             {k: v for k, v in (s.output or {}).items() if k != "usage"} if isinstance(s.output, dict) else s.output)
            for s in steps if s.action_type != "assistant_delta"]


async def test_plain_and_streamed_runs_agree() -> None:
    plain_model = model(exchange())
    result = await plain_model.generate_with_tools("sum it", tools=[add, explode], output_type=Total)
    assert result["content"] == Total(total=3)
    assert result["turns_used"] == 3
    assert result["usage"].requests == 3

    manager = ActionHistoryManager()
    streamed = [s async for s in model(exchange()).generate_with_tools_stream(
        "sum it", tools=[add, explode], output_type=Total, action_history_manager=manager)]
    assert any(s.action_type == "assistant_delta" for s in streamed)
    final = streamed[-1]
    assert final.action_type == "final_response" and final.output["content"] == {"total": 3}
    # the manager holds each step once, tool steps in their final state
    recorded = manager.get_actions()
    assert comparable(recorded) == comparable([s for s in streamed if s.status != "processing"
                                               or s.role != "tool"])
    tool_steps = [s for s in recorded if s.role == "tool"]
    assert [(s.action_type, s.status) for s in tool_steps] == [
        ("add", "success"), ("missing", "failed"), ("add", "failed"), ("explode", "failed")]
    assert "no tool named 'missing'" in tool_steps[1].output["raw_output"]
    assert "not JSON" in tool_steps[2].output["raw_output"]
    assert "RuntimeError: boom" in tool_steps[3].output["raw_output"]


async def test_tool_results_go_back_to_the_model() -> None:
    seen = []
    replies = iter(exchange())
    m = FakeModel(ModelConfig(type="fake", model="s"), handler=lambda r: seen.append(r) or next(replies))
    await m.generate_with_tools("sum it", tools=[add, explode], instruction="You add.")
    assert seen[0].messages[0] == {"role": "system", "content": "You add."}
    tool_messages = [msg for msg in seen[1].messages if msg["role"] == "tool"]
    assert [(msg["tool_call_id"], msg["content"]) for msg in tool_messages][0] == ("c1", "3")
    assert [t["name"] for t in seen[0].tools] == ["add", "explode"]
    assert seen[0].tools[0]["parameters"]["required"] == ["a", "b"]


async def test_rate_limited_request_never_reruns_a_tool() -> None:
    RAN.clear()
    m = model([Reply(tool_calls=[Call("add", {"a": 5, "b": 5})]), Fault("rate_limit", retry_after=0.01),
               Fault("status", status=503), Reply(text="ten")])
    result = await m.generate_with_tools("go", tools=[add])
    assert result["content"] == "ten"
    assert RAN == [(5, 5)]
    assert result["usage"].attempts == 4  # 1 + (1 failed + 1 failed + 1 ok)


async def test_max_turns_raises_with_the_steps_so_far() -> None:
    m = model([Reply(tool_calls=[Call("add", {"a": 1, "b": 1})])] * 3)
    with pytest.raises(MaxTurnsExceededError) as info:
        await m.generate_with_tools("loop", tools=[add], max_turns=2)
    steps = info.value.details["steps"]
    assert [s["action_type"] for s in steps].count("add") == 2


async def test_stream_ends_with_a_failed_step_on_error() -> None:
    m = model([Fault("status", status=401, message="bad key")])
    steps = []
    with pytest.raises(Exception, match="bad key"):
        async for step in m.generate_with_tools_stream("x", tools=[add]):
            steps.append(step)
    assert steps[-1].action_type == "error" and steps[-1].status == "failed"
    assert steps[-1].output["code"] == "model_authentication_error"


async def test_bad_output_type_answer_is_re_asked_within_turns() -> None:
    m = model([Reply(text="three"), Reply(text='{"total": 3}')])
    result = await m.generate_with_tools("x", tools=[add], output_type=Total)
    assert result["content"].total == 3 and result["turns_used"] == 2


async def test_retry_of_rate_limit_error_type() -> None:
    m = model([Fault("rate_limit", retry_after=0.01)] * 10)
    m.retry_policy = m.retry_policy.__class__(max_attempts=2, base_delay_s=0)
    with pytest.raises(RateLimitError):
        await m.generate_with_tools("x", tools=[add])
