"""GeminiModel through the official google-genai SDK, over HTTP to the fake Gemini server.

Cases marked ``acceptance`` also run against the live API with ``DQ_LIVE=1`` and
``GEMINI_API_KEY`` (or ``GOOGLE_API_KEY``) set; ``DQ_GEMINI_MODEL`` picks the model.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from datus.models.base import LLMBaseModel
from datus.models.config import ModelConfig
from datus.models.errors import (
    AuthenticationError,
    BadRequestError,
    ContentFilterError,
    ContextLengthExceededError,
    InvalidResponseError,
    ModelConfigError,
    ModelConnectionError,
    ModelOutputError,
    ModelTimeoutError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
)
from datus.models.gemini_contents import SIGNATURE_DETAIL, ResponseFolder
from datus.models.gemini_model import GeminiModel
from datus.models.generation import Generation, StreamDelta, ToolSpec
from datus.models.messages import ChatMessage, ToolCall
from datus.models.scripted import Fault, Reply, ScriptedToolCall
from datus.testing.fake_server import FakeProviderServer, RecordedRequest
from datus.testing.protocols import default_protocols
from datus.testing.protocols.gemini import GeminiProtocol

KEY = "gemini-test-key"
MODEL = "gemini-2.5-flash"
LIVE_KEY = os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")
LIVE = os.environ.get("DQ_LIVE") == "1" and bool(LIVE_KEY)
SQL_TOOL = ToolSpec("run_sql", "Run one SQL query and return its rows.",
                    {"type": "object", "properties": {"sql": {"type": "string"}}, "required": ["sql"]})


class SqlAnswer(BaseModel):
    sql: str
    tables: list[str]


def _protocols() -> list[Any]:
    # Until GeminiProtocol is registered in default_protocols, add it here (never twice).
    protocols = default_protocols()
    return protocols if any(p.name == "gemini" for p in protocols) else [*protocols, GeminiProtocol()]


@pytest.fixture
def server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer(protocols=_protocols(), api_key=KEY) as fake:
        yield fake


def make_model(server: FakeProviderServer | None, **overrides: Any) -> GeminiModel:
    settings: dict[str, Any] = {"type": "gemini", "model": MODEL, "api_key": KEY, "retry_base_delay_s": 0.01,
                                "retry_max_delay_s": 0.05}
    if server is not None:
        settings["base_url"] = server.url
    settings.update(overrides)
    return GeminiModel(ModelConfig(**settings))


@dataclass
class Target:
    """The fake server, or the live API (then scripting is a no-op and ``server`` is None)."""

    server: FakeProviderServer | None

    @property
    def live(self) -> bool:
        return self.server is None

    def model(self, **overrides: Any) -> GeminiModel:
        if self.live:
            return make_model(None, model=os.environ.get("DQ_GEMINI_MODEL", MODEL), api_key=LIVE_KEY, **overrides)
        return make_model(self.server, **overrides)

    def script(self, *answers: Reply | Fault) -> None:
        if self.server is not None:
            self.server.script.add(*answers)


@pytest.fixture(params=["fake", pytest.param("live", marks=pytest.mark.skipif(
    not LIVE, reason="live Gemini: set DQ_LIVE=1 and GEMINI_API_KEY"))])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    if request.param == "live":
        yield Target(None)
        return
    with FakeProviderServer(protocols=_protocols(), api_key=KEY) as fake:
        yield Target(fake)


def generations(server: FakeProviderServer) -> list[RecordedRequest]:
    return [r for r in server.requests if r.protocol == "gemini"]


def pick(mapping: dict[str, Any], camel: str) -> Any:
    """A request field in the SDK's camelCase or the snake_case it uses for some fields."""
    snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)
    return mapping.get(camel, mapping.get(snake))


def generation_config(request: RecordedRequest) -> dict[str, Any]:
    return pick(request.body, "generationConfig") or {}


def strip_volatile(generation: Generation) -> dict[str, Any]:
    usage = generation.usage.model_dump(exclude={"latency_ms", "cost_usd"})
    return {"text": generation.text, "reasoning": generation.reasoning, "details": generation.reasoning_details,
            "calls": generation.tool_calls, "finish": generation.finish_reason, "usage": usage}


async def collect(model: GeminiModel, prompt: Any, **kwargs: Any) -> tuple[list[StreamDelta], Generation]:
    deltas: list[StreamDelta] = []
    async for item in model.astream(prompt, **kwargs):
        if isinstance(item, Generation):
            return deltas, item
        deltas.append(item)
    raise AssertionError("the stream ended without a Generation")


# ---- acceptance: the interface ---------------------------------------------------------------


@pytest.mark.acceptance
def test_generate_sync(target: Target) -> None:
    target.script(Reply(text="pong"))
    assert "pong" in target.model().generate("Reply with exactly the word pong, nothing else.").lower()


@pytest.mark.acceptance
async def test_agenerate_async(target: Target) -> None:
    target.script(Reply(text="pong"))
    assert "pong" in (await target.model().agenerate("Reply with exactly the word pong, nothing else.")).lower()


@pytest.mark.acceptance
def test_json_output_pydantic_model(target: Target) -> None:
    target.script(Reply(text='{"sql": "SELECT name FROM users", "tables": ["users"]}'))
    result = target.model().generate_with_json_output(
        "Write SQL listing the names in table users. Answer as JSON with keys sql and tables.", SqlAnswer)
    assert SqlAnswer.model_validate(result).tables == ["users"]
    if target.server is not None:
        config = generation_config(generations(target.server)[-1])
        assert pick(config, "responseMimeType") == "application/json"
        assert pick(config, "responseJsonSchema") == SqlAnswer.model_json_schema()


@pytest.mark.acceptance
async def test_json_output_dict_schema(target: Target) -> None:
    schema = {"type": "object", "properties": {"count": {"type": "integer"}}, "required": ["count"]}
    target.script(Reply(text='{"count": 3}'))
    result = await target.model().agenerate_with_json_output("How many sides has a triangle? JSON key count.", schema)
    assert result == {"count": 3}
    if target.server is not None:
        config = generation_config(generations(target.server)[-1])
        assert pick(config, "responseMimeType") == "application/json"
        assert pick(config, "responseJsonSchema") == schema


@pytest.mark.acceptance
async def test_stream_text_and_final_generation(target: Target) -> None:
    target.script(Reply(text="one two three four"))
    deltas, final = await collect(target.model(), "Count from one to four in words, separated by spaces.")
    assert len(deltas) > 1 or target.live
    assert "".join(d.text for d in deltas) == final.text
    assert final.finish_reason == "stop"
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0


@pytest.mark.acceptance
async def test_thinking_comes_back_as_reasoning(target: Target) -> None:
    target.script(Reply(text="391", reasoning="17 * 23 = 17 * 20 + 17 * 3 = 391", reasoning_tokens=20))
    generation = await target.model().acomplete("What is 17 * 23? Think it through, then answer with the number.",
                                                enable_thinking=True, thinking_budget=1024)
    assert "391" in generation.text
    assert generation.reasoning and generation.usage.reasoning_tokens > 0
    assert generation.usage.output_tokens > generation.usage.reasoning_tokens


@pytest.mark.acceptance
async def test_tool_call_comes_back_with_json_arguments(target: Target) -> None:
    target.script(Reply(tool_calls=(ScriptedToolCall("run_sql", {"sql": "SELECT COUNT(*) FROM users"}),)))
    model = target.model()
    generation = await model._call(model._request("How many users are there? Use the run_sql tool.", {},
                                                  tools=(SQL_TOOL,)))
    assert generation.finish_reason == "tool_calls"
    [call] = generation.tool_calls
    assert call.name == "run_sql" and call.id
    assert "users" in call.parsed_arguments()["sql"].lower()


def count_rows(table: str) -> int:
    """Count the rows of a table."""
    return 42 if table == "users" else 0


@pytest.mark.acceptance
async def test_tool_run_round_trip(target: Target) -> None:
    target.script(Reply(reasoning="Count them.", tool_calls=(ScriptedToolCall("count_rows", {"table": "users"}),)),
                  Reply(text="There are 42 users."))
    result = await target.model().generate_with_tools(
        "How many rows has the table users? Call count_rows, then answer in one sentence.",
        tools=[count_rows], enable_thinking=True)
    assert "42" in result["content"] and result["turns_used"] == 2
    if target.server is not None:
        model_turn, tool_turn = generations(target.server)[-1].body["contents"][1:]
        call = model_turn["parts"][0]
        assert call["functionCall"]["name"] == "count_rows" and call["thoughtSignature"]
        assert tool_turn["parts"][0]["functionResponse"] == {
            "id": call["functionCall"]["id"], "name": "count_rows", "response": {"output": "42"}}


@pytest.mark.acceptance
def test_usage_and_cost(target: Target) -> None:
    target.script(Reply(text="ok", input_tokens=1200, output_tokens=340, cached_tokens=1000, reasoning_tokens=40))
    usage = target.model().complete("Say ok.").usage
    assert (usage.provider, usage.attempts, usage.priced) == ("gemini", 1, True)
    if target.live:
        assert usage.input_tokens > 0 and usage.cost_usd > 0
        return
    assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens, usage.reasoning_tokens) == (1200, 340, 1000, 40)
    # gemini-2.5-flash: $0.30 / MTok input, $0.075 cached, $2.50 output (thinking included).
    assert usage.cost_usd == pytest.approx((200 * 0.30 + 1000 * 0.075 + 340 * 2.50) / 1e6)


@pytest.mark.acceptance
def test_token_count_is_exact(target: Target) -> None:
    count = target.model().token_count("数据库查询")
    assert not count.estimated and count.method == "gemini:countTokens"
    if not target.live:
        assert count == 2  # the fake counts 4 characters a token; the offline estimate says 5


# ---- streaming and non-streaming agree -------------------------------------------------------


async def test_stream_equals_non_stream(server: FakeProviderServer) -> None:
    reply = Reply(text="Here is the query.", reasoning="Need the users table.", reasoning_tokens=6,
                  tool_calls=(ScriptedToolCall("run_sql", {"sql": "SELECT 1"}, id="call_a"),
                              ScriptedToolCall("run_sql", {"sql": "SELECT 2"}, id="call_b")),
                  input_tokens=50, output_tokens=30, cached_tokens=20)
    server.script.add(reply, reply)
    model = make_model(server)
    request = model._request("q", {}, enable_thinking=True, tools=(SQL_TOOL,))
    whole = await model._call(request)
    items = [item async for item in model._stream_call(request)]
    deltas, streamed = items[:-1], items[-1]
    assert isinstance(streamed, Generation)
    assert strip_volatile(streamed) == strip_volatile(whole)
    assert whole.tool_calls == [ToolCall(id="call_a", name="run_sql", arguments='{"sql": "SELECT 1"}'),
                                ToolCall(id="call_b", name="run_sql", arguments='{"sql": "SELECT 2"}')]
    assert whole.reasoning_details == [{"type": SIGNATURE_DETAIL, "signature": whole.reasoning_details[0]["signature"],
                                        "tool_call_id": "call_a"}]
    assert "".join(d.reasoning for d in deltas) == whole.reasoning
    assert "".join(d.text for d in deltas) == whole.text
    assert [r.path.rsplit(":", 1)[1] for r in generations(server)] == ["generateContent", "streamGenerateContent"]


async def test_tool_call_ids_are_made_when_gemini_gives_none(server: FakeProviderServer) -> None:
    server.script.add(Reply(tool_calls=(ScriptedToolCall("a"), ScriptedToolCall("b"))))
    model = make_model(server)
    generation = await model._call(model._request("q", {}, tools=(SQL_TOOL,)))
    ids = [call.id for call in generation.tool_calls]
    assert all(ids) and len(set(ids)) == 2


# ---- what goes on the wire -------------------------------------------------------------------


def test_options_and_thinking_on_the_wire(server: FakeProviderServer) -> None:
    model = make_model(server, temperature=0.2, max_tokens=256)
    model.generate("plain")
    model.generate("tuned", enable_thinking=True, thinking_budget=512, temperature=0.7, top_p=0.9,
                   stop=["END"], seed=7, max_tokens=1000)
    plain, tuned = (generation_config(r) for r in generations(server))
    assert pick(plain, "temperature") == 0.2 and pick(plain, "maxOutputTokens") == 256
    assert pick(plain, "thinkingConfig") is None
    assert pick(tuned, "temperature") == 0.7 and pick(tuned, "topP") == 0.9
    assert pick(tuned, "maxOutputTokens") == 1000
    assert pick(tuned, "stopSequences") == ["END"] and pick(tuned, "seed") == 7
    thinking = pick(tuned, "thinkingConfig")
    assert pick(thinking, "includeThoughts") is True and pick(thinking, "thinkingBudget") == 512


def test_key_base_url_version_and_timeout_on_the_wire(server: FakeProviderServer) -> None:
    make_model(server, timeout_s=42).generate("hi")
    [request] = generations(server)
    assert request.path == f"/v1beta/models/{MODEL}:generateContent"
    assert request.headers["x-goog-api-key"] == KEY
    assert request.headers["x-server-timeout"] == "42"


def test_google_api_key_is_accepted(server: FakeProviderServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.setenv("GOOGLE_API_KEY", KEY)
    assert make_model(server, api_key=None).generate("hi") == "echo: hi"


def test_missing_key_is_a_config_error_naming_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(ModelConfigError, match="GEMINI_API_KEY or GOOGLE_API_KEY"):
        make_model(None, api_key=None)
    with pytest.raises(ModelConfigError, match="GEMINI_API_KEY"):
        LLMBaseModel.create_model(None, f"gemini:{MODEL}")
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    assert isinstance(LLMBaseModel.create_model(None, f"gemini:{MODEL}"), GeminiModel)


def test_conversation_is_converted(server: FakeProviderServer) -> None:
    signature = "c2lnbmVk"  # base64 of b"signed"
    messages = [
        ChatMessage(role="system", content="You write SQL."),
        ChatMessage(role="user", content="How many users?"),
        ChatMessage(role="assistant", content="", tool_calls=[ToolCall(id="c1", name="run_sql",
                                                                      arguments='{"sql": "SELECT COUNT(*) FROM u"}')],
                    reasoning_details=[{"type": SIGNATURE_DETAIL, "signature": signature, "tool_call_id": "c1"},
                                       {"type": "thinking", "thinking": "from another provider"}]),
        ChatMessage(role="tool", tool_call_id="c1", content="[[42]]"),
        ChatMessage(role="user", content="And in words?"),
    ]
    make_model(server).generate(messages)
    body = generations(server)[-1].body
    assert pick(body, "systemInstruction")["parts"] == [{"text": "You write SQL."}]
    contents = body["contents"]
    assert [c["role"] for c in contents] == ["user", "model", "user"]
    [call_part] = contents[1]["parts"]
    assert call_part["functionCall"] == {"id": "c1", "name": "run_sql", "args": {"sql": "SELECT COUNT(*) FROM u"}}
    assert call_part["thoughtSignature"] == signature
    response_part, text_part = contents[2]["parts"]  # the tool result and the next question, merged
    assert response_part["functionResponse"] == {"id": "c1", "name": "run_sql", "response": {"output": "[[42]]"}}
    assert text_part == {"text": "And in words?"}


async def test_reasoning_signature_is_replayed(server: FakeProviderServer) -> None:
    server.script.add(Reply(text="It is 42.", reasoning="Count them."))
    model = make_model(server)
    first = await model.acomplete("How many?", enable_thinking=True)
    await model.acomplete([ChatMessage(role="user", content="How many?"), first.message(),
                           ChatMessage(role="user", content="Sure?")])
    model_turn = generations(server)[-1].body["contents"][1]
    assert model_turn["role"] == "model"
    [part] = model_turn["parts"]
    assert part["text"] == "It is 42."
    # the SDK writes bytes as url-safe base64; the bytes are what must survive
    sent = base64.urlsafe_b64decode(part["thoughtSignature"])
    assert sent == base64.b64decode(first.reasoning_details[0]["signature"])


# ---- JSON repair -----------------------------------------------------------------------------


def test_json_output_is_repaired_locally_then_reasked(server: FakeProviderServer) -> None:
    server.script.add(Reply(text='```json\n{"sql": "SELECT 1", "tables": ["t"],}\n```'))
    model = make_model(server)
    assert model.generate_with_json_output("q", SqlAnswer) == {"sql": "SELECT 1", "tables": ["t"]}
    assert len(generations(server)) == 1
    server.script.add(Reply(text='{"sql": "SELECT 1"}'), Reply(text='{"sql": "SELECT 2", "tables": []}'))
    assert model.generate_with_json_output("q", SqlAnswer) == {"sql": "SELECT 2", "tables": []}
    retry = generations(server)[-1].body["contents"]
    assert [c["role"] for c in retry] == ["user", "model", "user"]
    assert "tables" in retry[-1]["parts"][0]["text"]  # the reason goes back to the model


def test_json_output_gives_up_with_model_output_error(server: FakeProviderServer) -> None:
    server.script.add(Reply(text="no json here"), times=None)
    with pytest.raises(ModelOutputError, match="no valid JSON after 2"):
        make_model(server, json_repair_attempts=1).generate_with_json_output("q", SqlAnswer)


# ---- safety ----------------------------------------------------------------------------------


def test_prompt_block_is_content_filter_error(server: FakeProviderServer) -> None:
    server.script.add(Fault("content_filter"))
    with pytest.raises(ContentFilterError, match="blocked the prompt.*SAFETY"):
        make_model(server).generate("something bad")
    assert len(generations(server)) == 1  # permanent: not retried


async def test_prompt_block_while_streaming_is_content_filter_error(server: FakeProviderServer) -> None:
    server.script.add(Fault("content_filter"))
    with pytest.raises(ContentFilterError, match="SAFETY"):
        await collect(make_model(server), "something bad")


@pytest.mark.parametrize("stream", [False, True])
async def test_safety_finish_is_content_filter_error(server: FakeProviderServer, stream: bool) -> None:
    server.script.add(Reply(text="partial", finish_reason="content_filter"))
    model = make_model(server)
    with pytest.raises(ContentFilterError, match="stopped the answer for SAFETY"):
        await (collect(model, "q") if stream else model.agenerate("q"))


def test_no_candidates_is_content_filter_error() -> None:
    from google.genai import types

    folder = ResponseFolder("gemini", MODEL)
    folder.add(types.GenerateContentResponse(candidates=[]))
    with pytest.raises(ContentFilterError, match="no candidates"):
        folder.result()


# ---- errors ----------------------------------------------------------------------------------


def test_rate_limit_is_retried_after_the_delay(server: FakeProviderServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="datus.models.retry")
    server.script.add(Fault("rate_limit", retry_after=1))
    started = time.perf_counter()
    generation = make_model(server).complete("hi")
    waited = time.perf_counter() - started
    assert generation.text == "echo: hi" and generation.usage.attempts == 2
    assert any("retrying in 1.00s" in r.getMessage() for r in caplog.records if r.name == "datus.models.retry")
    assert waited >= 1.0  # the wait happened (a lower bound cannot flake)
    assert len(generations(server)) == 2


def test_retry_info_delay_is_used_without_retry_after_header() -> None:
    from google.genai import errors

    body = {"error": {"code": 429, "message": "slow down", "status": "RESOURCE_EXHAUSTED", "details": [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2.5s"}]}}
    mapped = make_model(None)._map_error(errors.ClientError(429, body, None))
    assert isinstance(mapped, RateLimitError) and mapped.retry_after == 2.5 and mapped.status_code == 429


def test_unavailable_is_retried_then_succeeds(server: FakeProviderServer) -> None:
    server.script.add(Fault("overloaded"), Fault("status", status=500))
    assert make_model(server).complete("hi").usage.attempts == 3


def test_sdk_does_not_retry_on_its_own(server: FakeProviderServer) -> None:
    server.script.add(Fault("overloaded"))
    with pytest.raises(OverloadedError) as caught:  # 503 UNAVAILABLE: "the model is overloaded"
        make_model(server, max_retries=0).generate("hi")
    assert caught.value.status_code == 503 and caught.value.retryable
    assert len(generations(server)) == 1


@pytest.mark.parametrize(("fault", "error"), [
    (Fault("status", status=400), BadRequestError),
    (Fault("status", status=401), AuthenticationError),
    (Fault("status", status=403), PermissionDeniedError),
    (Fault("status", status=404), NotFoundError),
    (Fault("quota"), QuotaExceededError),
    (Fault("context_length"), ContextLengthExceededError),
])
def test_permanent_errors_are_not_retried(server: FakeProviderServer, fault: Fault, error: type) -> None:
    server.script.add(fault)
    with pytest.raises(error) as caught:
        make_model(server).generate("hi")
    assert type(caught.value) is error and not caught.value.retryable
    assert caught.value.reason  # Google's own message, not an empty string
    assert len(generations(server)) == 1


def test_wrong_key_is_authentication_error(server: FakeProviderServer) -> None:
    with pytest.raises(AuthenticationError, match="API key not valid"):
        make_model(server, api_key="wrong").generate("hi")


def test_hang_is_timeout(server: FakeProviderServer) -> None:
    server.script.add(Fault("hang", seconds=5))
    with pytest.raises(ModelTimeoutError):
        make_model(server, timeout_s=0.3, max_retries=0).generate("hi")


@pytest.mark.parametrize("stream", [False, True])
async def test_malformed_body_is_invalid_response(server: FakeProviderServer, stream: bool) -> None:
    server.script.add(Fault("malformed_json"))
    model = make_model(server, max_retries=0)
    with pytest.raises(InvalidResponseError):
        await (collect(model, "hi") if stream else model.agenerate("hi"))


@pytest.mark.parametrize("stream", [False, True])
async def test_cut_connection_is_connection_error(server: FakeProviderServer, stream: bool) -> None:
    server.script.add(Fault("cut_stream", after_chunks=1))
    model = make_model(server, max_retries=0)
    with pytest.raises(ModelConnectionError) as caught:
        await (collect(model, "hello there, a longer prompt") if stream else model.agenerate("hello there"))
    assert caught.value.retryable


def test_connection_refused_is_connection_error() -> None:
    with FakeProviderServer(protocols=_protocols()) as gone:
        url = gone.url
    with pytest.raises(ModelConnectionError):
        make_model(None, base_url=url, max_retries=0).generate("hi")


# ---- token counting --------------------------------------------------------------------------


def test_token_count_is_a_flagged_estimate_when_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    with FakeProviderServer(protocols=_protocols()) as gone:
        url = gone.url
    with caplog.at_level(logging.WARNING, logger="datus.models.gemini_model"):
        count = make_model(None, base_url=url).token_count("数据库查询")
    assert count == 5 and count.estimated and count.method.startswith("estimate")
    assert "offline estimate" in caplog.text


async def test_atoken_count_in_async_code(server: FakeProviderServer) -> None:
    count = await make_model(server).atoken_count("x" * 40)
    assert count == 10 and not count.estimated


async def test_aclose_closes_the_loops_client(server: FakeProviderServer) -> None:
    model = make_model(server)
    await model.agenerate("hi")
    client = model._client()
    await model.aclose()
    assert model._client() is not client
    await asyncio.sleep(0)


# ---- the fake server's Gemini spelling -------------------------------------------------------


def test_fake_takes_the_key_as_query_parameter_and_wants_one(server: FakeProviderServer) -> None:
    url = f"{server.url}/v1beta/models/{MODEL}:generateContent"
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    answer = httpx.post(url, params={"key": KEY}, json=body).json()
    assert answer["candidates"][0]["content"]["parts"] == [{"text": "echo: hi"}]
    assert answer["candidates"][0]["finishReason"] == "STOP"
    missing = httpx.post(url, json=body)
    assert missing.status_code == 403 and missing.json()["error"]["status"] == "PERMISSION_DENIED"


def test_fake_rate_limit_looks_like_google(server: FakeProviderServer) -> None:
    server.script.add(Fault("rate_limit", retry_after=2))
    url = f"{server.url}/v1beta/models/{MODEL}:streamGenerateContent"
    answer = httpx.post(url, params={"alt": "sse"}, headers={"x-goog-api-key": KEY},
                        json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
    assert answer.status_code == 429 and answer.headers["retry-after"] == "2"
    error = answer.json()["error"]
    assert (error["code"], error["status"]) == (429, "RESOURCE_EXHAUSTED")
    assert {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2s"} in error["details"]
