"""`ClaudeModel` through the official `anthropic` SDK, over HTTP to the fake Anthropic server.

The `acceptance` cases take a backend: the fake server by default, the live API with
``DQ_LIVE=1`` and ``ANTHROPIC_API_KEY`` (model: ``DQ_LIVE_CLAUDE_MODEL``). Wire checks and
scripted numbers apply to the fake only; what a user notices is asserted either way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from datus.models import errors
from datus.models._portal import run_sync
from datus.models.claude_model import ClaudeModel
from datus.models.config import ModelConfig
from datus.models.generation import Generation, StreamDelta, ToolSpec
from datus.models.messages import ChatMessage, ToolCall
from datus.models.scripted import Fault, Reply, ScriptedRequest, ScriptedToolCall
from datus.models.usage import track_usage
from datus.testing.fake_server import FakeProviderServer
from datus.testing.protocols.anthropic_messages import fake_signature

FAKE_MODEL = "claude-sonnet-4-6"  # priced as claude-sonnet-4: $3 in, $15 out, $0.30 read, $3.75 write
KEY = "sk-ant-test"
LIVE = os.environ.get("DQ_LIVE") == "1"


class SQLAnswer(BaseModel):
    sql: str
    tables: list[str]


@dataclasses.dataclass
class Backend:
    config: ModelConfig
    server: FakeProviderServer | None
    models: list[ClaudeModel] = dataclasses.field(default_factory=list)

    def model(self, **overrides: Any) -> ClaudeModel:
        self.models.append(ClaudeModel(self.config.model_copy(update=overrides)))
        return self.models[-1]

    async def close(self) -> None:
        """Close the SDK clients of the test's loop and of the sync portal's loop, so none is
        left to be collected after its loop has closed."""
        for model in self.models:
            await model.aclose()
            await asyncio.to_thread(run_sync, model.aclose())

    def script(self, *answers: Any) -> None:
        if self.server is not None:
            self.server.script.add(*answers)

    def bodies(self) -> list[dict[str, Any]]:
        assert self.server is not None
        return [r.body for r in self.server.requests if r.protocol == "anthropic"]


def fake_config(server: FakeProviderServer, **overrides: Any) -> ModelConfig:
    settings: dict[str, Any] = {"type": "claude", "model": FAKE_MODEL, "api_key": KEY, "base_url": server.url,
                                "retry_base_delay_s": 0.01, "max_retries": 2, "timeout_s": 10}
    return ModelConfig(**{**settings, **overrides})


@pytest.fixture
def server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as fake:
        yield fake


@pytest.fixture
async def fake(server: FakeProviderServer) -> AsyncIterator[Backend]:
    backend = Backend(fake_config(server), server)
    yield backend
    await backend.close()


@pytest.fixture
async def backend(server: FakeProviderServer) -> AsyncIterator[Backend]:
    """The fake server, or with DQ_LIVE=1 the live API (skipped without a key)."""
    if LIVE:
        if not os.environ.get("ANTHROPIC_API_KEY"):
            pytest.skip("DQ_LIVE=1 needs ANTHROPIC_API_KEY")
        model = os.environ.get("DQ_LIVE_CLAUDE_MODEL", "claude-haiku-4-5")
        chosen = Backend(ModelConfig(type="claude", model=model, max_retries=2), None)
    else:
        chosen = Backend(fake_config(server), server)
    yield chosen
    await chosen.close()


def without_timing(generation: Generation) -> dict[str, Any]:
    data = dataclasses.asdict(dataclasses.replace(generation, response_id=None))
    data["usage"] = generation.usage.model_dump(exclude={"latency_ms"})
    return data


# ---- acceptance: the core cases, fake or live ----------------------------------------------


@pytest.mark.acceptance
def test_generate_sync_and_usage(backend: Backend) -> None:
    backend.script(Reply(text="pong"))
    with track_usage() as calls:
        text = backend.model().generate("Reply with exactly the word pong and nothing else.")
    assert "pong" in text.lower()
    usage = calls[0]
    assert usage.provider == "claude" and usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.priced and usage.cost_usd > 0


@pytest.mark.acceptance
async def test_agenerate(backend: Backend) -> None:
    backend.script(Reply(text="4"))
    assert "4" in await backend.model().agenerate("What is 2 + 2? Answer with the digit only.")


@pytest.mark.acceptance
def test_json_output_with_pydantic_model_goes_through_a_forced_tool(backend: Backend) -> None:
    backend.script(Reply(text='{"sql": "SELECT * FROM orders", "tables": ["orders"]}'))
    result = backend.model().generate_with_json_output(
        "Write a SQL query that reads every row of the table orders.", SQLAnswer)
    assert "orders" in result["sql"].lower() and "orders" in result["tables"]
    if backend.server is not None:
        body = backend.bodies()[-1]
        assert body["tool_choice"] == {"type": "tool", "name": "SQLAnswer"}
        assert body["tools"][-1]["name"] == "SQLAnswer"
        assert body["tools"][-1]["input_schema"] == SQLAnswer.model_json_schema()


@pytest.mark.acceptance
async def test_json_output_with_dict_schema(backend: Backend) -> None:
    schema = {"title": "capital", "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    backend.script(Reply(text='{"city": "Paris"}'))
    result = await backend.model().agenerate_with_json_output("What is the capital of France?", schema)
    assert result["city"] == "Paris"
    if backend.server is not None:
        body = backend.bodies()[-1]
        assert body["tool_choice"] == {"type": "tool", "name": "capital"}
        assert body["tools"] == [{"name": "capital", "description": body["tools"][0]["description"],
                                  "input_schema": schema, "cache_control": {"type": "ephemeral"}}]


@pytest.mark.acceptance
async def test_stream_deltas_add_up_to_the_final_answer(backend: Backend) -> None:
    backend.script(Reply(text="one, two, three"))
    items = [item async for item in backend.model().astream("Count from one to three, in words.")]
    final = items[-1]
    assert isinstance(final, Generation)
    deltas = [item for item in items[:-1] if isinstance(item, StreamDelta)]
    assert deltas and "".join(d.text for d in deltas) == final.text
    if backend.server is not None:
        assert len(deltas) == 3  # the fake sends the text in three pieces
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0 and final.finish_reason == "stop"


@pytest.mark.acceptance
def test_thinking_is_returned_and_replayed_with_its_signature(backend: Backend) -> None:
    model = backend.model(enable_thinking=True, thinking_budget=1024, temperature=0.3)
    backend.script(Reply(text="391", reasoning="17 * 23 = 17 * 20 + 17 * 3 = 340 + 51 = 391"), Reply(text="782"))
    first = model.complete("What is 17 * 23? Answer with the number only.")
    assert "391" in first.text and first.reasoning
    details = first.reasoning_details
    assert details and details[0]["type"] == "thinking" and details[0]["signature"]
    second = model.complete([{"role": "user", "content": "What is 17 * 23? Answer with the number only."},
                             first.message(), {"role": "user", "content": "Double it. The number only."}])
    assert "782" in second.text
    if backend.server is not None:
        first_body, second_body = backend.bodies()
        assert first_body["thinking"] == {"type": "enabled", "budget_tokens": 1024}
        assert first_body["max_tokens"] == 4096 + 1024
        assert "temperature" not in first_body and "top_p" not in first_body
        replayed = second_body["messages"][1]["content"]
        assert replayed[0] == {"type": "thinking", "thinking": first.reasoning,
                               "signature": fake_signature(first.reasoning)}
        assert replayed[1]["type"] == "text"


@pytest.mark.acceptance
def test_token_count_is_exact_from_the_endpoint(backend: Backend) -> None:
    text = "你好世界" * 10  # 40 CJK characters: the offline estimate says 40, the fake server 10
    count = backend.model().token_count(text)
    assert count > 0 and not count.estimated and count.method == "anthropic:count_tokens"
    if backend.server is not None:
        assert count == 10


# ---- the wire: what is sent --------------------------------------------------------------


def test_messages_are_converted_both_ways(fake: Backend) -> None:
    seen: list[ScriptedRequest] = []
    fake.script(lambda request: seen.append(request) or Reply(text="done"))
    conversation = [
        ChatMessage(role="system", content="You write SQL."),
        ChatMessage(role="user", content="How many orders?"),
        ChatMessage(role="user", content="Use the orders table."),
        ChatMessage(role="assistant", content="Let me look.", tool_calls=[
            ToolCall(id="toolu_a", name="run_sql", arguments='{"sql": "SELECT count(*) FROM orders"}'),
            ToolCall(id="toolu_b", name="list_tables", arguments="{}")]),
        ChatMessage(role="tool", tool_call_id="toolu_a", name="run_sql", content="42"),
        ChatMessage(role="tool", tool_call_id="toolu_b", name="list_tables", content="orders"),
        ChatMessage(role="user", content="Answer now."),
    ]
    assert fake.model(prompt_cache="off").generate(conversation) == "done"
    body = fake.bodies()[-1]
    assert body["system"] == [{"type": "text", "text": "You write SQL."}]
    assert [turn["role"] for turn in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][0]["content"] == [{"type": "text", "text": "How many orders?"},
                                              {"type": "text", "text": "Use the orders table."}]
    assert body["messages"][1]["content"] == [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_a", "name": "run_sql", "input": {"sql": "SELECT count(*) FROM orders"}},
        {"type": "tool_use", "id": "toolu_b", "name": "list_tables", "input": {}},
    ]
    assert body["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_a", "content": "42"},
        {"type": "tool_result", "tool_use_id": "toolu_b", "content": "orders"},
        {"type": "text", "text": "Answer now."},
    ]
    roles = [message["role"] for message in seen[0].messages]  # the fake's neutral view
    assert roles == ["system", "user", "assistant", "tool", "tool", "user"]
    assert seen[0].last_user_text == "Answer now."


def test_redacted_thinking_is_replayed_first_and_intact(fake: Backend) -> None:
    redacted = {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4a"}
    thought = {"type": "thinking", "thinking": "check the schema", "signature": fake_signature("check the schema")}
    answer = ChatMessage(role="assistant", content="SELECT 1", reasoning="check the schema",
                         reasoning_details=[redacted, thought, {"type": "reasoning.summary", "summary": "other"}])
    conversation = [{"role": "user", "content": "q"}, answer, {"role": "user", "content": "again"}]
    fake.model(prompt_cache="off").generate(conversation)
    assert fake.bodies()[-1]["messages"][1]["content"] == [redacted, thought, {"type": "text", "text": "SELECT 1"}]


def test_redacted_thinking_in_an_answer_is_kept_for_replay(fake: Backend) -> None:
    content = [{"type": "redacted_thinking", "data": "opaque"}, {"type": "text", "text": "hi", "citations": None}]
    generation = fake.model()._generation({"id": "msg_1", "content": content, "stop_reason": "end_turn"}, None)
    assert generation.reasoning is None and generation.reasoning_details == [content[0]]


async def test_tool_specs_and_tool_calls(fake: Backend) -> None:
    # No public method takes tools yet (tool runs live above this layer): use the base's path.
    spec = ToolSpec("run_sql", "Run a query", {"type": "object", "properties": {"sql": {"type": "string"}}})
    fake.script(Reply(tool_calls=[ScriptedToolCall("run_sql", {"sql": "SELECT 1"}, id="toolu_1")]))
    model = fake.model()
    result = await model._call(model._request("Run SELECT 1", {"tool_choice": "required"}, tools=(spec,)))
    assert result.tool_calls == [ToolCall(id="toolu_1", name="run_sql", arguments='{"sql": "SELECT 1"}')]
    assert result.finish_reason == "tool_calls"
    body = fake.bodies()[-1]
    assert body["tools"][0]["input_schema"] == spec.parameters and body["tool_choice"] == {"type": "any"}


def test_max_tokens_and_sampling_settings_are_sent(fake: Backend) -> None:
    fake.model(max_tokens=1000, temperature=0.2, top_p=0.9).generate("hi", stop=["END"])
    fake.model().generate("hi")
    tuned, default = fake.bodies()
    assert (tuned["max_tokens"], tuned["temperature"], tuned["top_p"]) == (1000, 0.2, 0.9)
    assert tuned["stop_sequences"] == ["END"]
    assert default["max_tokens"] == 4096 and "temperature" not in default and "thinking" not in default


def test_thinking_needs_room_above_its_budget(fake: Backend) -> None:
    with pytest.raises(errors.ModelConfigError, match="max_tokens"):
        fake.model(enable_thinking=True, thinking_budget=2048, max_tokens=2048).generate("hi")
    assert fake.bodies() == []


def test_json_with_thinking_falls_back_to_a_system_hint(fake: Backend) -> None:
    fake.script(Reply(text='Here: {"sql": "SELECT 1", "tables": []}', reasoning="simple"))
    result = fake.model(enable_thinking=True).generate_with_json_output("SELECT one", SQLAnswer)
    assert result == {"sql": "SELECT 1", "tables": []}
    body = fake.bodies()[-1]
    assert "tool_choice" not in body and "tools" not in body
    assert "JSON schema" in body["system"][0]["text"] and '"tables"' in body["system"][0]["text"]


def test_json_repair_asks_again_with_the_reason(fake: Backend) -> None:
    fake.script(Reply(text='{"sql": 5, "tables": []}'), Reply(text='{"sql": "SELECT 5", "tables": []}'))
    assert fake.model().generate_with_json_output("five", SQLAnswer) == {"sql": "SELECT 5", "tables": []}
    retry = fake.bodies()[-1]["messages"]
    assert retry[1]["role"] == "assistant" and retry[1]["content"][0]["text"] == '{"sql": 5, "tables": []}'
    assert "unusable" in retry[2]["content"][0]["text"]


# ---- prompt caching ------------------------------------------------------------------------


def cache_marks(body: dict[str, Any]) -> list[str]:
    marks = [f"system[{i}]" for i, b in enumerate(body.get("system") or []) if "cache_control" in b]
    marks += [f"tools[{i}]" for i, t in enumerate(body.get("tools") or []) if "cache_control" in t]
    for i, turn in enumerate(body["messages"]):
        marks += [f"messages[{i}][{j}]" for j, b in enumerate(turn["content"]) if "cache_control" in b]
    return marks


async def test_cache_breakpoints_on_system_tools_and_the_last_stable_turn(fake: Backend) -> None:
    model = fake.model()
    tools = tuple(ToolSpec(name, "", {"type": "object", "properties": {}}) for name in ("a", "b"))
    history = [{"role": "system", "content": "schema: ..."}, {"role": "user", "content": "q1"},
               {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    await model._call(model._request(history, {}, tools=tools))
    await model.agenerate("only one question")
    thought = {"type": "thinking", "thinking": "hm", "signature": fake_signature("hm")}
    await model.agenerate([{"role": "user", "content": "q"},
                    ChatMessage(role="assistant", reasoning_details=[thought],
                                tool_calls=[ToolCall(id="toolu_1", name="a")]),
                    {"role": "tool", "tool_call_id": "toolu_1", "content": "r"}])
    multi, single, tool_loop = fake.bodies()
    assert cache_marks(multi) == ["system[0]", "tools[1]", "messages[1][0]"]  # not the final question
    assert multi["messages"][1]["content"][0]["cache_control"] == {"type": "ephemeral"}
    assert cache_marks(single) == ["messages[0][0]"]
    assert cache_marks(tool_loop) == ["messages[1][1]"]  # the tool_use block, never the thinking block


def test_prompt_cache_off_sends_no_breakpoints(fake: Backend) -> None:
    fake.model(prompt_cache="off").generate([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}])
    assert "cache_control" not in json.dumps(fake.bodies()[-1])


def test_cache_tokens_are_reported_and_priced_at_their_own_rates(fake: Backend) -> None:
    fake.script(Reply(text="ok", input_tokens=10_000, output_tokens=500, cached_tokens=6_000, cache_write_tokens=2_000))
    usage = fake.model().complete("hi").usage
    assert (usage.input_tokens, usage.cached_tokens, usage.cache_write_tokens, usage.output_tokens) == (
        10_000, 6_000, 2_000, 500)
    # 2,000 uncached at $3 + 6,000 read at $0.30 + 2,000 written at $3.75 + 500 out at $15, per million
    expected = (2_000 * 3.00 + 6_000 * 0.30 + 2_000 * 3.75 + 500 * 15.00) / 1_000_000
    assert usage.cost_usd == pytest.approx(expected) == pytest.approx(0.0228)


async def test_streaming_equals_non_streaming(fake: Backend) -> None:
    reply = Reply(text="I will run it.", reasoning="The user wants one row.", input_tokens=900, cached_tokens=600,
                  cache_write_tokens=100, reasoning_tokens=6,
                  tool_calls=[ScriptedToolCall("run_sql", {"sql": "SELECT 1", "limit": 1}, id="toolu_x")])
    fake.script(reply, reply)
    model = fake.model(enable_thinking=True)
    whole = await model.acomplete("run it")
    items = [item async for item in model.astream("run it")]
    streamed = items[-1]
    assert isinstance(streamed, Generation)
    assert without_timing(streamed) == without_timing(whole)
    assert whole.reasoning_details[0]["signature"] == fake_signature(reply.reasoning)
    assert whole.usage.input_tokens == 900 and whole.usage.reasoning_tokens == 6
    deltas = [item for item in items[:-1] if isinstance(item, StreamDelta)]
    assert "".join(d.reasoning for d in deltas) == whole.reasoning and "".join(d.text for d in deltas) == whole.text


# ---- errors --------------------------------------------------------------------------------


def test_missing_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(errors.ModelConfigError, match="ANTHROPIC_API_KEY"):
        ClaudeModel(ModelConfig(type="claude", model=FAKE_MODEL))


def test_the_key_is_accepted_as_x_api_key_or_bearer(server: FakeProviderServer) -> None:
    body = {"model": FAKE_MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    version = {"anthropic-version": "2023-06-01"}
    for auth in ({"x-api-key": KEY}, {"authorization": f"Bearer {KEY}"}):
        answer = httpx.post(server.url + "/v1/messages", json=body, headers={**version, **auth})
        assert answer.status_code == 200 and answer.json()["content"][0]["text"] == "echo: hi"
    refused = httpx.post(server.url + "/v1/messages", json=body, headers=version)
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "authentication_error" and refused.json()["type"] == "error"


def test_an_error_event_inside_a_stream_maps_by_its_type(fake: Backend) -> None:
    import anthropic

    # The SDK raises an `event: error` frame as a status error of the stream's 200 response (an
    # httpx2 one in current SDKs, an httpx one in 0.51; the error only reads its status and headers).
    response = httpx.Response(200, request=httpx.Request("POST", "https://api.anthropic.com/v1/messages"))
    body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    error = fake.model()._map_error(anthropic.APIStatusError(str(body), response=response, body=body))
    assert type(error) is errors.OverloadedError and error.status_code == 529 and error.retryable


def test_rate_limit_waits_for_retry_after(fake: Backend, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="datus.models.retry")
    fake.script(Fault("rate_limit", retry_after=1), Reply(text="ok"))
    started = time.perf_counter()
    generation = fake.model().complete("hi")
    assert generation.text == "ok" and generation.usage.attempts == 2
    assert time.perf_counter() - started >= 1.0
    assert any("RateLimitError" in r.getMessage() and "retrying in 1.00s" in r.getMessage() for r in caplog.records)


def test_rate_limit_error_carries_retry_after(fake: Backend) -> None:
    fake.script(Fault("rate_limit", retry_after=7))
    with pytest.raises(errors.RateLimitError) as caught:
        fake.model(max_retries=0).generate("hi")
    assert caught.value.retry_after == 7 and caught.value.status_code == 429 and caught.value.retryable


def test_overloaded_529_is_retried_then_succeeds(fake: Backend) -> None:
    fake.script(Fault("overloaded"), Reply(text="ok"))
    generation = fake.model().complete("hi")
    assert generation.text == "ok" and generation.usage.attempts == 2 and len(fake.bodies()) == 2


@pytest.mark.parametrize(
    ("fault", "expected", "status"),
    [
        (Fault("overloaded"), errors.OverloadedError, 529),
        (Fault("status", status=500), errors.ServerError, 500),
        (Fault("context_length"), errors.ContextLengthExceededError, 400),
        (Fault("quota"), errors.QuotaExceededError, 402),
        (Fault("status", status=403), errors.PermissionDeniedError, 403),
        (Fault("status", status=404), errors.NotFoundError, 404),
        (Fault("status", status=413), errors.RequestTooLargeError, 413),
        (Fault("status", status=400, message="messages: roles must alternate"), errors.BadRequestError, 400),
        (Fault("content_filter"), errors.ContentFilterError, None),
        (Fault("malformed_json"), errors.InvalidResponseError, None),
    ],
)
def test_error_kinds_map(fake: Backend, fault: Fault, expected: type[errors.ModelError], status: int | None) -> None:
    fake.script(fault)
    with pytest.raises(expected) as caught:
        fake.model(max_retries=0).generate("hi")
    assert type(caught.value) is expected and caught.value.status_code == status
    assert caught.value.provider == "claude"


@pytest.mark.parametrize("fault", [Fault("context_length"), Fault("content_filter"), Fault("status", status=403)])
def test_permanent_errors_are_not_retried(fake: Backend, fault: Fault) -> None:
    fake.script(fault, Reply(text="never"))
    with pytest.raises(errors.PermanentModelError):
        fake.model(max_retries=3).generate("hi")
    assert len(fake.bodies()) == 1


def test_wrong_key_is_permanent(fake: Backend, server: FakeProviderServer) -> None:
    server.app.state.api_key = "sk-ant-right"  # what FakeProviderServer(api_key=...) sets
    with pytest.raises(errors.AuthenticationError) as caught:
        fake.model(max_retries=3).generate("hi")
    assert caught.value.status_code == 401 and "x-api-key" in caught.value.reason
    assert len(server.requests) == 1


async def test_refusal_while_streaming_is_a_content_filter_error(fake: Backend) -> None:
    fake.script(Fault("content_filter", message="declined"))
    with pytest.raises(errors.ContentFilterError, match="declined"):
        async for _ in fake.model().astream("hi"):
            pass


async def test_a_stream_cut_before_any_delta_is_retried(fake: Backend) -> None:
    fake.script(Fault("cut_stream", after_chunks=2), Reply(text="whole"))
    items = [item async for item in fake.model().astream("hi")]
    assert isinstance(items[-1], Generation) and items[-1].text == "whole" and items[-1].usage.attempts == 2


def test_a_hang_is_a_timeout(fake: Backend) -> None:
    fake.script(Fault("hang", seconds=5))
    with pytest.raises(errors.ModelTimeoutError):
        fake.model(max_retries=0, timeout_s=0.3).generate("hi")


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_no_server_is_a_connection_error(fake: Backend) -> None:
    with pytest.raises(errors.ModelConnectionError):
        fake.model(base_url=dead_url(), max_retries=0).generate("hi")


def test_token_count_is_an_estimate_when_the_endpoint_is_down(fake: Backend, caplog: pytest.LogCaptureFixture) -> None:
    text = "你好世界" * 10
    with caplog.at_level(logging.WARNING, logger="datus.models.claude_model"):
        count = fake.model(base_url=dead_url()).token_count(text)
    assert count == 40 and count.estimated
    assert any("estimate" in record.getMessage() for record in caplog.records)
