"""OpenAI's Responses API (`datus.models.openai_responses`): every case through the official
`openai` SDK over HTTP to the fake server's ``POST /v1/responses`` (non-streamed and SSE), which
checks — as the real service does with ``store: false`` — that a replayed reasoning item carries
the ``encrypted_content`` it issued, intact."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from datus.models.base import LLMBaseModel
from datus.models.config import AgentConfig, ModelConfig
from datus.models.errors import (
    AuthenticationError,
    BadRequestError,
    ContentFilterError,
    ContextLengthExceededError,
    QuotaExceededError,
    RateLimitError,
    TransientModelError,
)
from datus.models.generation import Generation, StreamDelta
from datus.models.openai_model import OpenAIModel
from datus.models.openai_responses import generation_of, needs_responses_api, response_error, wire_input
from datus.models.scripted import Fault, Reply
from datus.models.scripted import ScriptedToolCall as Call
from datus.schemas.action_history import ActionStatus
from datus.testing.fake_server import FakeProviderServer, RecordedRequest
from datus.testing.limits import ProviderLimits
from datus.testing.protocols.openai_responses import decrypt
from tests.mcp_servers.conftest import make_shop_db
from tests.models.test_tool_runs import (
    ANSWER,
    CITY_SQL,
    SQL_TOOLS,
    StoredJournal,
    comparable,
    plain_steps,
    sql_exchange,
    streamed,
)

KEY = "sk-fake-responses-0123456789"
REASONING = "Counting per city needs the customers table."  # sql_exchange's first turn thinks this


class Answer(BaseModel):
    sql: str
    tables: list[str]


def responses(server: FakeProviderServer) -> list[RecordedRequest]:
    return [r for r in server.requests if r.protocol == "openai_responses"]


def model_of(server: FakeProviderServer, model: str = "o3-pro", **overrides: Any) -> OpenAIModel:
    settings: dict[str, Any] = {"type": "openai", "model": model, "api_key": KEY, "base_url": server.openai_base_url,
                                "retry_base_delay_s": 0.0, "retry_max_delay_s": 0.05, **overrides}
    return OpenAIModel(model_config=ModelConfig(**settings))


def agent_config(server: FakeProviderServer, db: Path, **models: dict[str, Any]) -> AgentConfig:
    common = {"type": "openai", "api_key": KEY, "base_url": server.openai_base_url,
              "retry_base_delay_s": 0.0, "retry_max_delay_s": 0.05, "timeout_s": 30}
    return AgentConfig.from_dict({"agent": {
        "target": next(iter(models)),
        "models": {name: {**common, **entry} for name, entry in models.items()},
        "mcp_servers": {"sql": {"command": __import__("sys").executable,
                                "args": ["-m", "datus.mcp_servers.sql_server", "--url", f"sqlite:///{db}"]}}}})


@pytest.fixture
async def made() -> AsyncIterator[Callable[[AgentConfig, str], LLMBaseModel]]:
    models: list[LLMBaseModel] = []

    def make(config: AgentConfig, name: str) -> LLMBaseModel:
        models.append(LLMBaseModel.create_model(config, name))
        return models[-1]

    yield make
    for model in models:
        await model.aclose()


@pytest.fixture
def shop_db(tmp_path: Path) -> Path:
    return make_shop_db(tmp_path / "shop.db")


@pytest.fixture
def sessions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'sessions.db'}"
    monkeypatch.setenv("DQ_SESSION_URL", url)
    return url


def reasoning_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [item for item in body["input"] if item.get("type") == "reasoning"]


# ---------------------------------------------------------------- which API


@pytest.mark.parametrize(("name", "expected"), [
    ("o1-pro", True), ("o3-pro", True), ("o3-pro-2025-06-10", True), ("gpt-5-pro", True), ("gpt-5-codex", True),
    ("codex-mini-latest", True), ("gpt-4o", False), ("gpt-4o-mini", False), ("o3", False), ("o3-mini", False),
    ("gpt-5", False), ("gpt-5-chat-latest", False),
])
def test_the_models_that_answer_only_on_the_responses_api_use_it_by_default(name: str, expected: bool) -> None:
    assert needs_responses_api(name) is expected
    model = OpenAIModel(model_config=ModelConfig(type="openai", model=name, api_key=KEY))
    assert model.api == ("responses" if expected else "chat_completions")


def test_the_config_switch_wins_both_ways_and_is_checked() -> None:
    assert OpenAIModel(model_config=ModelConfig(type="openai", model="gpt-4o", api_key=KEY,
                                                api="responses")).api == "responses"
    assert OpenAIModel(model_config=ModelConfig(type="openai", model="o3-pro", api_key=KEY,
                                                api="chat_completions")).api == "chat_completions"
    with pytest.raises(ValueError):
        ModelConfig(type="openai", model="gpt-4o", api="assistants")
    config = AgentConfig.from_dict({"agent": {"models": {"m": {"type": "openai", "model": "gpt-4o", "api_key": KEY,
                                                               "api": "responses"}}}})
    assert LLMBaseModel.create_model(config, "m").api == "responses"


async def test_chat_completions_stays_the_default(fake_server: FakeProviderServer) -> None:
    model = model_of(fake_server, "gpt-4o")
    try:
        assert await model.agenerate("hi") == "echo: hi"
    finally:
        await model.aclose()
    [request] = fake_server.requests
    assert request.path == "/v1/chat/completions" and request.protocol == "openai"


# ---------------------------------------------------------------- generate, JSON, usage, cost


async def test_generate_on_the_responses_api(fake_server: FakeProviderServer) -> None:
    model = model_of(fake_server)
    fake_server.script.add(Reply(text="Berlin.", reasoning="Think.", input_tokens=1000, output_tokens=300,
                                 cached_tokens=400, reasoning_tokens=200))
    try:
        generation = await model.acomplete([{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Which city?"}], max_tokens=500)
    finally:
        await model.aclose()
    [request] = fake_server.requests
    assert request.path == "/v1/responses" and request.protocol == "openai_responses"
    body = request.body
    assert body["model"] == "o3-pro" and body["store"] is False
    assert body["include"] == ["reasoning.encrypted_content"]
    assert body["input"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which city?"}]
    assert body["max_output_tokens"] == 500 and "temperature" not in body and "reasoning" not in body
    assert generation.text == "Berlin." and generation.finish_reason == "stop"
    assert generation.reasoning is None  # no summary asked for (enable_thinking off)
    [detail] = generation.reasoning_details or []
    assert detail["type"] == "reasoning" and detail["id"].startswith("rs_")
    assert decrypt(detail["encrypted_content"]) == {"model": "o3-pro", "reasoning": "Think."}

    usage = generation.usage
    assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens, usage.reasoning_tokens) == (1000, 300, 400,
                                                                                                       200)
    assert usage.priced and usage.cost_usd == pytest.approx((1000 * 20 + 300 * 80) / 1e6)  # o3-pro: no cache rate
    assert usage.attempts == 1 and (generation.response_id or "").startswith("resp_")


async def test_usage_and_cost_with_cached_and_reasoning_tokens_on_a_cached_rate(fake_server: FakeProviderServer
                                                                              ) -> None:
    model = model_of(fake_server, "gpt-5-codex")  # gpt-5's prices: 1.25 in, 0.125 cached, 10 out
    fake_server.script.add(Reply(text="ok", input_tokens=10_000, output_tokens=2_000, cached_tokens=8_000,
                                 reasoning_tokens=1_500))
    try:
        usage = (await model.acomplete("q")).usage
    finally:
        await model.aclose()
    assert (usage.cached_tokens, usage.reasoning_tokens) == (8_000, 1_500)
    assert usage.cost_usd == pytest.approx((2_000 * 1.25 + 8_000 * 0.125 + 2_000 * 10) / 1e6)


async def test_enable_thinking_asks_for_a_summary_and_gets_it_as_reasoning(fake_server: FakeProviderServer) -> None:
    model = model_of(fake_server, "gpt-5-pro")
    fake_server.script.add(Reply(text="Yes.", reasoning="Because."))
    try:
        generation = await model.acomplete("q", enable_thinking=True)
    finally:
        await model.aclose()
    assert fake_server.requests[0].body["reasoning"] == {"summary": "auto"}
    assert generation.reasoning == "Because." and generation.text == "Yes."


async def test_json_output_with_a_schema_uses_structured_outputs(fake_server: FakeProviderServer) -> None:
    model = model_of(fake_server)
    fake_server.script.add(Reply(text=json.dumps({"sql": "SELECT 1", "tables": ["t"]})))
    try:
        result = await model.agenerate_with_json_output("Write SQL", response_format=Answer)
        fake_server.script.add(Reply(text='{"a": 1}'))
        plain = await model.agenerate_with_json_output("Any JSON")
    finally:
        await model.aclose()
    assert result == {"sql": "SELECT 1", "tables": ["t"]} and plain == {"a": 1}
    schema_body, mode_body = (r.body for r in fake_server.requests)
    fmt = schema_body["text"]["format"]
    assert fmt["type"] == "json_schema" and fmt["name"] == "Answer"
    assert set(fmt["schema"]["properties"]) == {"sql", "tables"} and "strict" in fmt
    assert mode_body["text"] == {"format": {"type": "json_object"}}
    assert "JSON" in mode_body["input"][0]["content"] and mode_body["input"][0]["role"] == "system"


async def test_an_answer_cut_at_max_tokens_and_a_filtered_one(fake_server: FakeProviderServer) -> None:
    model = model_of(fake_server)
    fake_server.script.add(Reply(text="Half", finish_reason="length"), Reply(text="", finish_reason="content_filter"))
    try:
        assert (await model.acomplete("q")).finish_reason == "length"
        with pytest.raises(ContentFilterError):
            await model.acomplete("q")
    finally:
        await model.aclose()


async def test_token_counting(fake_server: FakeProviderServer) -> None:
    model = model_of(fake_server)
    chat = model_of(fake_server, "o3-pro", api="chat_completions")
    text = "SELECT name, COUNT(*) FROM users GROUP BY name;"
    assert model.token_count(text) == chat.token_count(text) > 0
    request = model._request([{"role": "user", "content": text}], {})
    assert model._count_input_tokens(request) == chat._count_input_tokens(request)
    # replayed encrypted reasoning is reserved for too (it is input the provider counts)
    from datus.models.messages import ChatMessage

    replay = ChatMessage(role="assistant", content="x", reasoning_details=[
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "A" * 4000}])
    longer = model._request([ChatMessage(role="user", content=text), replay,
                             ChatMessage(role="user", content="more")], {})
    assert model._count_input_tokens(longer) >= chat._count_input_tokens(longer) + 1000


# ---------------------------------------------------------------- streaming


async def test_streaming_gives_the_deltas_and_the_same_generation(fake_server: FakeProviderServer) -> None:
    model = model_of(fake_server)
    reply = Reply(text="Berlin has fifteen.", reasoning="Count them.", input_tokens=50, output_tokens=20,
                  cached_tokens=10, reasoning_tokens=5)
    fake_server.script.add(reply, reply)
    try:
        items = [item async for item in model.astream("q", enable_thinking=True)]
        whole = await model.acomplete("q", enable_thinking=True)
    finally:
        await model.aclose()
    assert fake_server.requests[0].body["stream"] is True
    deltas = [item for item in items if isinstance(item, StreamDelta)]
    final = items[-1]
    assert isinstance(final, Generation)
    assert "".join(d.text for d in deltas) == "Berlin has fifteen." and "".join(d.reasoning for d in deltas) == \
        "Count them."
    assert (final.text, final.reasoning, final.finish_reason) == (whole.text, whole.reasoning, whole.finish_reason)
    assert final.usage.model_dump(include={"input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens"}) == \
        whole.usage.model_dump(include={"input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens"})
    assert decrypt(final.reasoning_details[0]["encrypted_content"]) == {"model": "o3-pro", "reasoning": "Count them."}


async def test_a_streamed_tool_call_arrives_whole(fake_server: FakeProviderServer) -> None:
    model = model_of(fake_server)
    fake_server.script.add(Reply(tool_calls=[Call("read_query", {"query": CITY_SQL}, id="call_9")]))
    try:
        items = [item async for item in model.astream("q")]
    finally:
        await model.aclose()
    final = items[-1]
    assert isinstance(final, Generation) and final.finish_reason == "tool_calls"
    [call] = final.tool_calls
    assert (call.id, call.name, json.loads(call.arguments)) == ("call_9", "read_query", {"query": CITY_SQL})


# ---------------------------------------------------------------- errors, retries, rate-limit headers


@pytest.mark.parametrize("stream", [False, True])
async def test_errors_map_to_the_same_tree_and_429_is_retried(stream: bool, fake_server: FakeProviderServer) -> None:
    async def ask(model: OpenAIModel) -> Generation:
        if stream:
            return [item async for item in model.astream("q")][-1]
        return await model.acomplete("q")

    model = model_of(fake_server)
    wrong_key = model_of(fake_server, api_key="sk-wrong-key-000000")
    fake_server.api_key = KEY
    try:
        with pytest.raises(AuthenticationError) as denied:
            await ask(wrong_key)
        assert denied.value.status_code == 401

        fake_server.script.add(Fault("rate_limit", retry_after=0), Reply(text="after the wait"))
        generation = await ask(model)
        assert generation.text == "after the wait" and generation.usage.attempts == 2

        model.retry_policy = model.retry_policy.__class__(max_attempts=1, base_delay_s=0)
        fake_server.script.add(Fault("rate_limit", retry_after=0))
        with pytest.raises(RateLimitError):
            await ask(model)
        fake_server.script.add(Fault("quota"))
        with pytest.raises(QuotaExceededError):
            await ask(model)
    finally:
        await model.aclose()
        await wrong_key.aclose()
    assert all(r.path == "/v1/responses" for r in fake_server.requests)


async def test_rate_limit_headers_are_read(fake_server: FakeProviderServer) -> None:
    fake_server.set_limits(ProviderLimits(requests_per_minute=600, input_tokens_per_minute=100_000, window_s=60))
    model = model_of(fake_server)
    try:
        plain = await model.acomplete("q")
        streamed_final = [item async for item in model.astream("q")][-1]
    finally:
        await model.aclose()
    for generation in (plain, streamed_final):
        budget = generation.rate_limits
        assert budget is not None and budget.requests is not None and budget.requests.limit == 600
        assert budget.requests.remaining is not None and budget.requests.remaining < 600


# ---------------------------------------------------------------- tool runs: reasoning replayed


async def test_a_tool_run_with_an_mcp_server_replays_the_reasoning_item_on_every_later_turn(
        fake_server: FakeProviderServer, shop_db: Path, made: Callable[[AgentConfig, str], LLMBaseModel]) -> None:
    config = agent_config(fake_server, shop_db, pro={"model": "o3-pro"})
    model = made(config, "pro")
    fake_server.script.add(*sql_exchange())
    result = await model.generate_with_tools("How many customers per city?", mcp_servers=["sql"])
    assert result["content"] == ANSWER and result["turns_used"] == 3
    usage = result["usage"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["requests"]) == (600, 60, 3)

    first, second, third = (r.body for r in responses(fake_server))
    for body in (first, second, third):
        assert body["store"] is False and body["include"] == ["reasoning.encrypted_content"]
        assert {tool["name"] for tool in body["tools"]} == SQL_TOOLS
        assert all(tool["type"] == "function" and tool["strict"] is False for tool in body["tools"])
    assert reasoning_items(first) == []
    # turn 2 carries turn 1's reasoning item, its encrypted content intact, before its call
    [replayed] = reasoning_items(second)
    assert decrypt(replayed["encrypted_content"]) == {"model": "o3-pro", "reasoning": REASONING}
    kinds = [item.get("type") or item["role"] for item in second["input"]]
    assert kinds == ["user", "reasoning", "assistant", "function_call", "function_call_output"]
    call, output = second["input"][3], second["input"][4]
    assert (call["call_id"], call["name"], output["call_id"]) == ("call_1", "list_tables", "call_1")
    assert json.loads(output["output"])["tables"] == ["customers", "orders"]
    # turn 3 still carries it (the later turns of a run keep every earlier reasoning item)
    assert reasoning_items(third) == [replayed]
    assert [item["call_id"] for item in third["input"] if item.get("type") == "function_call_output"] == [
        "call_1", "call_2"]


async def test_streamed_tool_run_steps_have_the_shape_of_chat_completions_steps(
        fake_server: FakeProviderServer, shop_db: Path, made: Callable[[AgentConfig, str], LLMBaseModel]) -> None:
    config = agent_config(fake_server, shop_db, chat={"model": "gpt-5", "api": "chat_completions"},
                          responses={"model": "gpt-5", "api": "responses"})
    steps: dict[str, list[Any]] = {}
    for name in ("chat", "responses"):
        fake_server.reset()
        fake_server.script.add(*sql_exchange())
        steps[name] = await streamed(made(config, name), "How many customers per city?", mcp_servers=["sql"],
                                     live_steps=True, enable_thinking=True)
        paths = {r.path for r in fake_server.requests}
        assert paths == {"/v1/chat/completions" if name == "chat" else "/v1/responses"}
    assert comparable(steps["responses"]) == comparable(steps["chat"])
    deltas = [s for s in steps["responses"] if s.action_type == "assistant_delta"]
    assert "".join(s.output["reasoning"] or "" for s in deltas if s.action_id == deltas[0].action_id) == REASONING
    final = steps["responses"][-1]
    assert final.action_type == "final_response" and final.status == ActionStatus.SUCCESS
    assert final.output["content"] == ANSWER

    # and the plain run takes the same finished steps
    fake_server.reset()
    fake_server.script.add(*sql_exchange())
    result, plain = await plain_steps(made(config, "responses"), "How many customers per city?", mcp_servers=["sql"],
                                      enable_thinking=True)
    finished = [s for s in steps["responses"] if s.action_type != "user_input" and s.status != ActionStatus.PROCESSING]
    assert comparable(finished) == comparable(plain) and result["content"] == ANSWER


async def test_a_resumed_run_and_a_session_replay_the_reasoning_items(
        sessions: str, fake_server: FakeProviderServer, shop_db: Path,
        made: Callable[[AgentConfig, str], LLMBaseModel]) -> None:
    config = agent_config(fake_server, shop_db, pro={"model": "o3-pro"})
    model = made(config, "pro")
    model.retry_policy = model.retry_policy.__class__(max_attempts=1, base_delay_s=0)
    journal = StoredJournal("resume-responses")  # steps through JSON, as the job store keeps them
    session = model.create_session()
    first, second, answer = sql_exchange()
    fake_server.script.add(first, second, Fault("status", status=503))
    with pytest.raises(TransientModelError):
        await model.generate_with_tools("How many customers per city?", mcp_servers=["sql"], session=session,
                                        journal=journal)
    assert [(s.kind, s.turn) for s in journal.steps] == [("turn", 1), ("tool", 1), ("turn", 2), ("tool", 2)]
    [recorded] = journal.steps[0].message.reasoning_details or []
    assert decrypt(recorded["encrypted_content"])["reasoning"] == REASONING

    # resumed: one request, the turn never answered, carrying turn 1's reasoning item intact
    fake_server.clear_requests()
    fake_server.script.add(answer)
    result = await model.generate_with_tools("How many customers per city?", mcp_servers=["sql"], session=session,
                                             journal=journal)
    assert result["content"] == ANSWER and result["turns_used"] == 3
    assert (result["usage"]["input_tokens"], result["usage"]["output_tokens"]) == (600, 60)
    [sent] = [r.body for r in responses(fake_server)]
    assert reasoning_items(sent) == [{key: recorded[key] for key in ("type", "id", "summary", "encrypted_content")}]

    # the session kept the item: the next question in it replays it (a fresh model object too)
    [kept] = [m for m in session.get_messages() if m.reasoning_details]
    assert kept.reasoning_details == [recorded]
    fake_server.clear_requests()
    fake_server.script.add(Reply(text="Thirty in all."))
    again = made(config, "pro")
    followup = await again.generate_with_tools("And in total?", mcp_servers=["sql"], session=session)
    assert followup["content"] == "Thirty in all."
    [body] = [r.body for r in responses(fake_server)]
    assert [decrypt(item["encrypted_content"])["reasoning"] for item in reasoning_items(body)] == [REASONING]
    assert body["input"][-1] == {"role": "user", "content": "And in total?"}


async def test_a_reasoning_item_replayed_without_its_encrypted_content_is_refused(
        fake_server: FakeProviderServer) -> None:
    """The fake holds the line the real service holds with store off: so the tests above prove
    the replay is faithful."""
    model = model_of(fake_server)
    model.retry_policy = model.retry_policy.__class__(max_attempts=1, base_delay_s=0)
    broken = [{"role": "user", "content": "q"},
              {"role": "assistant", "content": "a",
               "reasoning_details": [{"type": "reasoning", "id": "rs_x", "summary": [], "encrypted_content": "zz"}]},
              {"role": "user", "content": "q2"}]
    try:
        with pytest.raises(BadRequestError, match="could not be verified"):
            await model.acomplete(broken)
    finally:
        await model.aclose()


async def test_reasoning_another_model_wrote_is_not_replayed(fake_server: FakeProviderServer) -> None:
    """A conversation continued on a different model (a session moved from o3-pro to gpt-5-pro)
    sends the other model's encrypted reasoning to nobody."""
    first, second = model_of(fake_server, "o3-pro"), model_of(fake_server, "gpt-5-pro")
    fake_server.script.add(Reply(text="a", reasoning="mine"), Reply(text="b", reasoning="theirs"), Reply(text="c"))
    try:
        answer = await first.acomplete("q1")
        history = [{"role": "user", "content": "q1"}, answer.message().model_dump(), {"role": "user", "content": "q2"}]
        assert (await second.acomplete(history)).text == "b"
        assert (await first.acomplete(history)).text == "c"
    finally:
        await first.aclose()
        await second.aclose()
    _, to_other, to_same = (r.body for r in fake_server.requests)
    assert reasoning_items(to_other) == []
    assert [decrypt(item["encrypted_content"])["reasoning"] for item in reasoning_items(to_same)] == ["mine"]


@pytest.mark.parametrize(("code", "expected"), [
    ("rate_limit_exceeded", RateLimitError), ("server_error", TransientModelError),
    ("insufficient_quota", QuotaExceededError), ("invalid_prompt", BadRequestError),
    ("context_length_exceeded", ContextLengthExceededError),
])
def test_a_failed_response_or_an_error_event_maps_by_its_code(code: str, expected: type[Exception]) -> None:
    failed = {"id": "resp_1", "status": "failed", "output": [], "error": {"code": code, "message": "no"}}
    with pytest.raises(expected):
        generation_of(failed, provider="openai", model="o3-pro")
    assert isinstance(response_error({"type": "error", "code": code, "message": "no"}, provider="openai",
                                     model="o3-pro"), expected)


@pytest.mark.parametrize("fault", [Fault("cut_stream", after_chunks=4), Fault("malformed_json")])
async def test_a_broken_stream_is_retried_like_any_request(fault: Fault, fake_server: FakeProviderServer) -> None:
    model = model_of(fake_server)
    fake_server.script.add(fault, Reply(text="whole this time"))
    try:
        items = [item async for item in model.astream("q")]
    finally:
        await model.aclose()
    final = items[-1]
    assert isinstance(final, Generation) and final.text == "whole this time" and final.usage.attempts == 2


def test_reasoning_items_go_back_where_they_were_among_the_answers_items() -> None:
    """An answer that reasoned again between its calls (rs, fc, rs, fc) is replayed in that
    order: each reasoning item before the item that followed it."""
    answer = {"id": "resp_1", "status": "completed", "output": [
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "e1"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Looking."}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "reasoning", "id": "rs_2", "summary": [], "encrypted_content": "e2"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
    ]}
    message = generation_of(answer, provider="openai", model="o3-pro").message()
    items = wire_input([message], "o3-pro")
    assert [item.get("id") or item.get("call_id") or item["role"] for item in items] == [
        "rs_1", "assistant", "c1", "rs_2", "c2"]
    assert items[0] == {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "e1"}
    assert [item.get("id") for item in wire_input([message], "gpt-5-pro") if item.get("type") == "reasoning"] == []
