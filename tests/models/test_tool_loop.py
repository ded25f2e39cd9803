"""The tool loop on the scripted model with Python function tools (MCP servers and the
wire formats are covered by test_tool_runs.py and the provider tests)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from datus.models.config import ModelConfig
from datus.models.errors import MaxTurnsExceededError, RateLimitError
from datus.models.fake_model import FakeModel
from datus.models.run_journal import MemoryJournal, step_id, turn_id
from datus.models.scripted import Fault, Reply
from datus.models.scripted import ScriptedToolCall as Call
from datus.schemas.action_history import ActionHistoryManager

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
    assert result["usage"]["requests"] == 3 and result["usage"]["total_tokens"] > 0

    manager = ActionHistoryManager()
    streamed = [s async for s in model(exchange()).generate_with_tools_stream(
        "sum it", tools=[add, explode], output_type=Total, action_history_manager=manager, live_steps=True)]
    assert any(s.action_type == "assistant_delta" for s in streamed)
    final = streamed[-1]
    assert final.action_type == "final_response" and final.output["content"] == {"total": 3}
    # the manager holds each step once, tool steps in their final state
    recorded = manager.get_actions()
    assert comparable(recorded) == comparable([s for s in streamed if s.status != "processing"
                                               or s.role != "tool"])
    tool_steps = [s for s in recorded if s.role == "tool"]
    # every tool step is done; whether the tool worked is in its output (the model read the failures)
    assert [(s.action_type, s.status, s.output["success"]) for s in tool_steps] == [
        ("add", "success", True), ("missing", "success", False), ("add", "success", False),
        ("explode", "success", False)]
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
    assert result["usage"]["attempts"] == 4  # 1 + (1 failed + 1 failed + 1 ok)


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
        async for step in m.generate_with_tools_stream("x", tools=[add], live_steps=True):
            steps.append(step)
    assert steps[-1].action_type == "error" and steps[-1].status == "failed"
    assert steps[-1].output["code"] == "model_authentication_error"
    # by default the error is only raised: Datus's nodes add their own failed step
    quiet = model([Fault("status", status=401, message="bad key")])
    manager = ActionHistoryManager()
    with pytest.raises(Exception, match="bad key"):
        async for step in quiet.generate_with_tools_stream("x", tools=[add], action_history_manager=manager):
            steps.append(step)
    assert manager.get_actions() == []


async def test_bad_output_type_answer_is_re_asked_within_turns() -> None:
    m = model([Reply(text="three"), Reply(text='{"total": 3}')])
    result = await m.generate_with_tools("x", tools=[add], output_type=Total)
    assert result["content"].total == 3 and result["turns_used"] == 2


async def test_retry_of_rate_limit_error_type() -> None:
    m = model([Fault("rate_limit", retry_after=0.01)] * 10)
    m.retry_policy = m.retry_policy.__class__(max_attempts=2, base_delay_s=0)
    with pytest.raises(RateLimitError):
        await m.generate_with_tools("x", tools=[add])


# -- durable runs: a journal records each step, a run on it resumes ---------------------------


def durable_exchange() -> list:
    return [Reply(text="adding", reasoning="plan", tool_calls=[Call("add", {"a": 1, "b": 2}, id="c1")]),
            Reply(tool_calls=[Call("add", {"a": 3, "b": 4}, id="c2")]),
            Reply(text='{"total": 10}')]


def once(replies) -> FakeModel:
    m = model(replies)
    m.retry_policy = m.retry_policy.__class__(max_attempts=1, base_delay_s=0)
    return m


async def steps_of(m: FakeModel, journal: MemoryJournal | None, **kwargs):
    return [s async for s in m.generate_with_tools_stream("sum it", tools=[add], output_type=Total, journal=journal,
                                                          live_steps=True, **kwargs)]


async def test_a_run_resumed_from_its_journal_asks_no_turn_and_runs_no_tool_again() -> None:
    RAN.clear()
    uninterrupted = await steps_of(once(durable_exchange()), MemoryJournal("other-run"))
    RAN.clear()
    journal = MemoryJournal("run-1")
    first = once([*durable_exchange()[:2], Fault("rate_limit", retry_after=0.01)])
    seen_first: list = []
    with pytest.raises(RateLimitError):
        async for step in first.generate_with_tools_stream("sum it", tools=[add], output_type=Total, journal=journal,
                                                           live_steps=True):
            seen_first.append(step)
    assert RAN == [(1, 2), (3, 4)]
    assert [(s.kind, s.turn, s.call) for s in journal.steps] == [("turn", 1, None), ("tool", 1, 0), ("turn", 2, None),
                                                                  ("tool", 2, 0)]
    assert journal.steps[0].message.reasoning == "plan" and journal.steps[0].start is not None

    asked: list = []
    second = FakeModel(ModelConfig(type="fake", model="s"), handler=lambda r: asked.append(r) or Reply(text='{"total": 10}'))
    resumed = await steps_of(second, journal)
    assert RAN == [(1, 2), (3, 4)]  # no tool ran again
    assert len(asked) == 1  # only the turn that had not been answered
    assert [m["role"] for m in asked[0].messages] == ["system", "user", "assistant", "tool", "assistant", "tool"]
    # the same steps under the same ids: a reader drops the ones it saw before the resume
    before = {(s.action_id, s.status) for s in seen_first if s.action_type not in ("assistant_delta", "error")}
    after = [(s.action_id, s.status) for s in resumed if s.action_type != "assistant_delta"]
    assert before <= set(after)
    final, whole = resumed[-1], uninterrupted[-1]
    assert final.output["content"] == whole.output["content"] == {"total": 10}
    assert final.output["turns_used"] == whole.output["turns_used"] == 3
    assert final.output["sql_contexts"] == whole.output["sql_contexts"]
    usage, whole_usage = final.output["usage"], whole.output["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (whole_usage["input_tokens"], whole_usage["output_tokens"])
    assert not any(s.output.get("resumed") for s in resumed if s.role == "tool" and s.status != "processing")


class Crash(BaseException):
    """The process dying: nothing in the run catches it."""


async def test_a_tool_call_under_way_when_the_run_stopped_runs_again_marked_resumed() -> None:
    RAN.clear()
    journal = MemoryJournal("run-2")
    first = once(durable_exchange())

    def add_and_die(a: int, b: int) -> int:
        """Add two integers."""
        RAN.append((a, b))
        raise Crash  # the run dies with its first tool call under way (it did run)

    add_and_die.__name__ = "add"
    with pytest.raises(Crash):
        async for _ in first.generate_with_tools_stream("sum it", tools=[add_and_die], output_type=Total,
                                                         journal=journal, live_steps=True):
            pass
    assert [(s.kind, s.turn) for s in journal.steps] == [("turn", 1)]
    assert step_id("run-2", "t1c0") in journal.started  # announced before it was called
    second = once(durable_exchange()[1:])
    steps = await steps_of(second, journal)
    tools = [s for s in steps if s.role == "tool" and s.status != "processing"]
    assert [s.output.get("resumed", False) for s in tools] == [True, False]
    assert RAN == [(1, 2), (1, 2), (3, 4)]  # the call under way is the one thing made twice


class ListeningJournal(MemoryJournal):
    """A MemoryJournal that writes what it hears into ``log``."""

    def __init__(self, run_id: str, log: list) -> None:
        super().__init__(run_id)
        self.log = log

    async def record(self, step) -> None:
        self.log.append(("record", step.kind, step.turn))
        await super().record(step)

    async def starting(self, action_id: str) -> None:
        self.log.append(("starting", action_id))
        await super().starting(action_id)


async def test_each_request_and_call_is_announced_once_every_step_before_it_was_handled() -> None:
    """What the job system's journal relies on to know, from the store alone, which steps it
    published: a step is recorded before it is handed out, and every step handed out is handled
    before the next request or call is announced."""
    log: list = []
    journal = ListeningJournal("run-3", log)
    async for step in once(durable_exchange()).generate_with_tools_stream(
            "sum it", tools=[add], output_type=Total, journal=journal, live_steps=True):
        if step.action_type != "assistant_delta":  # the deltas of an answer: never replayed, not tracked
            log.append(("handled", step.action_type, step.status))
    turn, call = (lambda t: ("starting", turn_id("run-3", t))), (lambda t: ("starting", step_id("run-3", f"t{t}c0")))
    assert log == [
        ("handled", "user_input", "success"),
        turn(1), ("record", "turn", 1), ("handled", "message", "success"), ("handled", "add", "processing"),
        call(1), ("record", "tool", 1), ("handled", "add", "success"),
        turn(2), ("record", "turn", 2), ("handled", "add", "processing"),
        call(2), ("record", "tool", 2), ("handled", "add", "success"),
        turn(3), ("record", "turn", 3), ("handled", "final_response", "success"),
    ]


async def test_without_a_journal_nothing_changes_and_ids_are_fresh() -> None:
    a = await steps_of(once(durable_exchange()), None)
    b = await steps_of(once(durable_exchange()), None)
    assert {s.action_id for s in a}.isdisjoint({s.action_id for s in b})
