"""The tool result cap (issue 19, every output is bounded): a tool's answer of 5 MB — an MCP
tool of a real server process and a Python function tool — reaches the model cut to the cap
with a marker the model can act on, in every provider's wire format, plain and streamed; the
tool step says it was truncated and holds no more than the model read; the run finishes; and
a run resumed from its journal replays the same truncated text."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from datus.models.base import LLMBaseModel
from datus.models.config import AgentConfig, ModelConfig
from datus.models.errors import TransientModelError
from datus.models.output_bounds import cap_text, json_bytes, shrink_json
from datus.models.scripted import Fault, Reply
from datus.models.scripted import ScriptedToolCall as Call
from datus.schemas.action_history import ActionHistory, ActionHistoryManager, ActionRole, ActionStatus
from datus.testing.fake_server import FakeProviderServer
from tests.models.test_tool_runs import (
    PROTOCOL,
    PROVIDERS,
    MakeModel,
    StoredJournal,
    agent_config,
    bodies,
    wire_tool_results,
)

FAKE_TOOLS = Path(__file__).resolve().parents[1] / "fakes" / "mcp_tool_server.py"
BIG = 5_000_000  # characters of each tool's answer
CAP = 65_536  # the default cap
MARKER = f"[truncated: {CAP} of {BIG} characters; narrow the query]"


@pytest.fixture
async def make_model() -> AsyncIterator[MakeModel]:
    """``make_model(provider, config)``; the SDK clients are closed on the test's own loop."""
    made: list[LLMBaseModel] = []

    def make(provider: str, config: AgentConfig) -> LLMBaseModel:
        made.append(LLMBaseModel.create_model(config, provider))
        return made[-1]

    yield make
    for model in made:
        await model.aclose()


def big_rows() -> dict[str, Any]:
    """Datus's read_query shape, 5 MB of CSV."""
    return {"success": 1, "error": None,
            "result": {"original_rows": 500_000, "compressed_data": ("a,b\n" * (BIG // 4))[:BIG - 64]}}


def config(server: FakeProviderServer, **model: Any) -> AgentConfig:
    base = agent_config(server)
    models = {name: {**cfg.model_dump(exclude={"missing_env"}, exclude_none=True), **model}
              for name, cfg in base.models.items()}
    servers = {"tools": {"command": sys.executable, "args": [str(FAKE_TOOLS)]}}
    return AgentConfig.from_dict({"agent": {"target": "openai", "models": models, "mcp_servers": servers}})


def exchange() -> list[Reply]:
    return [Reply(text="Fetching both.", tool_calls=[Call("blob", {"size": BIG}, id="call_mcp"),
                                                     Call("big_rows", {}, id="call_fn")]),
            Reply(text="Both were too big; I will narrow the query.")]


def tool_steps(steps: list[ActionHistory]) -> list[ActionHistory]:
    return [s for s in steps if s.role == ActionRole.TOOL and s.status == ActionStatus.SUCCESS]


def assert_bounded_step(step: ActionHistory, limit: int = CAP) -> None:
    output = step.output
    assert output["truncated"] is True and output["original_chars"] >= BIG - 64
    assert output["success"] is True
    assert json_bytes(output) < 3 * limit  # the raw value kept no more than about what the model read


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
async def test_a_5mb_tool_answer_reaches_the_model_bounded_and_marked(
        provider: str, stream: bool, fake_server: FakeProviderServer, make_model: MakeModel) -> None:
    model = make_model(provider, config(fake_server))
    fake_server.script.add(*exchange())
    if stream:
        steps = [s async for s in model.generate_with_tools_stream(
            "Fetch everything.", tools=[big_rows], mcp_servers=["tools"], live_steps=True)]
        final = steps[-1]
        assert final.action_type == "final_response"
        content = final.output["content"]
    else:
        manager = ActionHistoryManager()
        result = await model.generate_with_tools("Fetch everything.", tools=[big_rows], mcp_servers=["tools"],
                                                 action_history_manager=manager)
        steps, content = manager.get_actions(), result["content"]
    assert content == "Both were too big; I will narrow the query."  # the run finished

    # on the wire, in the provider's own shape: each result cut to the cap, marked at its end
    _, second = bodies(fake_server)
    results = dict(wire_tool_results(PROTOCOL[provider], second))
    if PROTOCOL[provider] == "gemini":  # Gemini's functionResponse may carry no call id: in order
        results = dict(zip(["call_mcp", "call_fn"], [text for _, text in wire_tool_results("gemini", second)]))
    mcp_text, fn_text = results["call_mcp"], results["call_fn"]
    assert mcp_text == "x" * CAP + "\n" + MARKER
    original_fn = json.dumps(big_rows(), ensure_ascii=False)
    assert fn_text.startswith(original_fn[:CAP]) and fn_text.endswith(
        f"[truncated: {CAP} of {len(original_fn)} characters; narrow the query]")
    assert len(json.dumps(second)) < 4 * CAP  # the whole request stays small

    # the steps say so, and hold no more than the model read
    mcp_step, fn_step = tool_steps(steps)
    assert_bounded_step(mcp_step)
    assert_bounded_step(fn_step)
    assert mcp_step.output["raw_output"] == mcp_text  # a text: exactly what the model read
    raw = fn_step.output["raw_output"]  # a structured value keeps its shape, its long parts cut
    assert raw["success"] == 1 and raw["result"]["original_rows"] == 500_000
    assert "[truncated:" in raw["result"]["compressed_data"]
    assert fn_step.output["summary"] == "500000 rows"


async def test_the_cap_comes_from_the_model_config_or_the_call(fake_server: FakeProviderServer,
                                                               make_model: MakeModel) -> None:
    assert ModelConfig(type="openai", model="gpt-4o").max_tool_result_chars == CAP  # the default
    model = make_model("openai", config(fake_server, max_tool_result_chars=1000))
    fake_server.script.add(*exchange())
    await model.generate_with_tools("Fetch everything.", tools=[big_rows], mcp_servers=["tools"])
    texts = [text for _, text in wire_tool_results("openai", bodies(fake_server)[1])]
    assert texts[0] == "x" * 1000 + f"\n[truncated: 1000 of {BIG} characters; narrow the query]"
    assert all(len(text) < 1100 for text in texts)

    fake_server.reset()
    fake_server.script.add(*exchange())
    await model.generate_with_tools("Fetch everything.", tools=[big_rows], mcp_servers=["tools"],
                                    max_tool_result_chars=50)
    texts = [text for _, text in wire_tool_results("openai", bodies(fake_server)[1])]
    assert texts[0] == "x" * 50 + f"\n[truncated: 50 of {BIG} characters; narrow the query]"

    # a small answer is untouched, and its step says nothing of truncation
    fake_server.reset()
    fake_server.script.add(Reply(tool_calls=[Call("blob", {"size": 10}, id="c")]), Reply(text="ok"))
    manager = ActionHistoryManager()
    await model.generate_with_tools("small", mcp_servers=["tools"], action_history_manager=manager)
    [step] = tool_steps(manager.get_actions())
    assert step.output["raw_output"] == "x" * 10 and "truncated" not in step.output
    assert wire_tool_results("openai", bodies(fake_server)[1]) == [("c", "x" * 10)]


class SmallJournal(StoredJournal):
    """A journal that keeps results under a smaller cap than the model's (as the job store's does)."""

    max_tool_result_chars = 2000


@pytest.mark.parametrize("provider", ["openai", "claude", "gemini"])
async def test_a_resumed_run_replays_the_truncated_text_the_model_read(
        provider: str, fake_server: FakeProviderServer, make_model: MakeModel) -> None:
    model = make_model(provider, config(fake_server))
    model.retry_policy = model.retry_policy.__class__(max_attempts=1, base_delay_s=0)
    journal = SmallJournal(f"cap-{provider}")
    first, answer = exchange()
    fake_server.script.add(first, Fault("status", status=503))
    with pytest.raises(TransientModelError):
        await model.generate_with_tools("Fetch everything.", tools=[big_rows], mcp_servers=["tools"],
                                        journal=journal)
    seen = wire_tool_results(PROTOCOL[provider], bodies(fake_server)[1])
    assert seen[0][1].endswith(f"[truncated: 2000 of {BIG} characters; narrow the query]")
    # the journal holds exactly what the model read
    recorded = [step.message.content for step in journal.steps if step.kind == "tool"]
    assert recorded == [text for _, text in seen]
    assert all(step.action["output"]["truncated"] for step in journal.steps if step.kind == "tool")

    fake_server.clear_requests()
    fake_server.script.add(answer)
    result = await model.generate_with_tools("Fetch everything.", tools=[big_rows], mcp_servers=["tools"],
                                             journal=journal)
    assert result["content"] == answer.text
    [resent] = bodies(fake_server)  # only the turn never answered, with the same truncated results
    assert wire_tool_results(PROTOCOL[provider], resent) == seen


def test_cap_text_and_shrink_json_bound_any_value() -> None:
    assert cap_text("abc", 3) == ("abc", None)
    assert cap_text("abcd", 3) == ("abc\n[truncated: 3 of 4 characters; narrow the query]", 4)
    assert cap_text("abcd", None) == ("abcd", None)
    values = [
        "ü" * 1_000_000,
        ["x" * 100] * 100_000,
        {f"k{i}": i for i in range(100_000)},
        {"a": [{"b": "c" * 10_000} for _ in range(1000)], "n": 1},
        [[[[["deep" * 1000]]]]] * 500,
    ]
    for value in values:
        small, truncated = shrink_json(value, 10_000)
        assert truncated and json_bytes(small) <= 10_000
        assert "truncated" in json.dumps(small, ensure_ascii=False)
    assert shrink_json({"a": 1}, 100) == ({"a": 1}, False)
    shaped, _ = shrink_json({"success": 1, "result": {"rows": 10, "data": "z" * 100_000}}, 5000)
    assert shaped["success"] == 1 and shaped["result"]["rows"] == 10


class ToolSpans:
    """An observer keeping what each tool span was ended with (what a tracer exports)."""

    def __init__(self) -> None:
        self.ended: list[Any] = []

    def model_call(self, call: Any) -> None:
        return None

    def tool_call(self, call: Any) -> Any:
        spans = self

        class Span:
            def end(self, result: Any, error: BaseException | None) -> None:
                spans.ended.append(result)

        return Span()


async def test_a_trace_of_the_tool_call_shows_the_cut_text(fake_server: FakeProviderServer,
                                                           make_model: MakeModel) -> None:
    from datus.models.observe import observing

    model = make_model("openai", config(fake_server))
    fake_server.script.add(*exchange())
    spans = ToolSpans()
    with observing(spans):
        await model.generate_with_tools("Fetch everything.", tools=[big_rows], mcp_servers=["tools"])
    mcp, fn = spans.ended  # in the order of the calls
    assert mcp.text == "x" * CAP + "\n" + MARKER
    assert "[truncated:" in fn.text[-80:] and len(fn.text) < CAP + 100
