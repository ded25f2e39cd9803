"""The cases every provider on the OpenAI-style adapter must pass (OpenAI, DeepSeek, Qwen).

Each provider's test module subclasses `OpenAIStyleSuite` with its `Provider` and adds what
only that provider does. Every case runs through the official `openai` SDK over HTTP to the
fake server and checks what reached the wire. Cases marked ``acceptance`` take the `target`
fixture: the fake server, or with ``DQ_LIVE=1`` and the provider's key also the live API
(``DQ_<PROVIDER>_MODEL`` and ``DQ_<PROVIDER>_BASE_URL`` pick the model and endpoint).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import openai
import pytest
from pydantic import BaseModel

from datus.models import track_usage
from datus.models.config import ModelConfig
from datus.models.errors import (
    AuthenticationError,
    BadRequestError,
    ContentFilterError,
    ContextLengthExceededError,
    InvalidResponseError,
    ModelConfigError,
    ModelConnectionError,
    ModelError,
    ModelOutputError,
    ModelTimeoutError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    ServerError,
)
from datus.models.generation import Generation, StreamDelta, ToolSpec
from datus.models.messages import ToolCall
from datus.models.openai_compatible import OpenAICompatibleModel
from datus.models.scripted import Fault, Reply, ScriptedToolCall
from datus.testing.fake_server import FakeProviderServer, RecordedRequest
from datus.utils.exceptions import DatusException

KEY = "sk-fake-test-key-0123456789"
SQL_TOOL = ToolSpec("run_sql", "Run one SQL query and return its rows.",
                    {"type": "object", "properties": {"sql": {"type": "string"}}, "required": ["sql"]})
# Plain text, CJK, emoji with a modifier, a special-token lookalike, whitespace runs, SQL.
TOKEN_TEXTS = (
    "",
    "SELECT name, COUNT(*) FROM users u JOIN orders o ON o.user_id = u.id GROUP BY name;",
    "数据库查询：统计每个用户的订单数量，并按数量降序排列。",
    "Hello, world! 👋🏽 naïve café — ünïcödé",
    "text with <|endoftext|> and <|im_start|> inside",
    "   leading spaces\n\n\ttabs and\r\nnewlines   ",
    "def f(x):\n    return {'a': [1, 2.5e-3, None]}\n" * 5,
)


class SqlAnswer(BaseModel):
    sql: str
    tables: list[str]


@dataclass(frozen=True)
class Provider:
    name: str  # the `type:` of the model config
    model_class: type[OpenAICompatibleModel]
    model: str  # the model the cases use (on the fake server, and live unless overridden)
    key_envs: tuple[str, ...]  # where the key comes from, in order of preference
    # USD per million tokens (input, output, cached input), typed from the provider's price
    # page rather than read from datus.models.pricing, so a wrong table is caught.
    prices: tuple[float, float, float]
    native_json_schema: bool  # response_format json_schema; else json_object + schema in the prompt
    reference_count: Callable[[str, str], int]  # the provider's own tokenizer: (text, model) -> count

    @property
    def env(self) -> str:
        return self.name.upper()

    @property
    def live_key(self) -> str | None:
        return next((os.environ[name] for name in self.key_envs if os.environ.get(name)), None)

    @property
    def live(self) -> bool:
        return os.environ.get("DQ_LIVE") == "1" and bool(self.live_key)


def make_model(provider: Provider, server: FakeProviderServer | None, **overrides: Any) -> OpenAICompatibleModel:
    settings: dict[str, Any] = {"type": provider.name, "model": provider.model, "api_key": KEY,
                                "retry_base_delay_s": 0.0, "retry_max_delay_s": 0.05}
    if server is not None:
        settings["base_url"] = server.openai_base_url
    settings.update(overrides)
    return provider.model_class(model_config=ModelConfig(**settings))


@dataclass
class Target:
    """The fake server, or the live API (then scripting does nothing and ``server`` is None)."""

    provider: Provider
    server: FakeProviderServer | None

    @property
    def live(self) -> bool:
        return self.server is None

    def model(self, **overrides: Any) -> OpenAICompatibleModel:
        if not self.live:
            return make_model(self.provider, self.server, **overrides)
        env = self.provider.env
        live: dict[str, Any] = {"model": os.environ.get(f"DQ_{env}_MODEL", self.provider.model),
                                "api_key": self.provider.live_key, "retry_base_delay_s": 0.5,
                                "retry_max_delay_s": 10.0}
        if os.environ.get(f"DQ_{env}_BASE_URL"):
            live["base_url"] = os.environ[f"DQ_{env}_BASE_URL"]
        return make_model(self.provider, None, **{**live, **overrides})

    def script(self, *answers: Reply | Fault) -> None:
        if self.server is not None:
            self.server.script.add(*answers)

    def bodies(self) -> list[dict[str, Any]]:
        assert self.server is not None
        return bodies(self.server)


def retry_waits(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The waits the retry policy scheduled, as it logged them ("retrying in 1.00s")."""
    return [match.group(1) for record in caplog.records if record.name == "datus.models.retry"
            and (match := re.search(r"retrying in ([0-9.]+)s", record.getMessage()))]


def chat_requests(server: FakeProviderServer) -> list[RecordedRequest]:
    return [r for r in server.requests if r.protocol == "openai" and r.path.endswith("/chat/completions")]


def bodies(server: FakeProviderServer) -> list[dict[str, Any]]:
    return [r.body for r in chat_requests(server)]


async def collect(stream: Any) -> tuple[list[StreamDelta], Generation]:
    """The deltas of an ``astream``/``_stream_call``, and its final Generation."""
    deltas: list[StreamDelta] = []
    async for item in stream:
        if isinstance(item, Generation):
            return deltas, item
        deltas.append(item)
    raise AssertionError("the stream ended without a Generation")


def comparable(generation: Generation) -> dict[str, Any]:
    """What must be equal between a streamed and a plain answer (not ids or timings)."""
    usage = generation.usage.model_dump(exclude={"latency_ms"})
    return {"text": generation.text, "reasoning": generation.reasoning, "calls": generation.tool_calls,
            "finish": generation.finish_reason, "usage": usage}


def schema_in_system_message(body: dict[str, Any]) -> Any:
    """The JSON schema the adapter put into the system message (JSON-mode providers)."""
    system = body["messages"][0]
    assert system["role"] == "system", body["messages"]
    content = system["content"]
    value, _ = json.JSONDecoder().raw_decode(content[content.index("{"):])
    return value


PERMANENT_FAULTS = [
    pytest.param(Fault("status", status=400, message="Invalid 'messages[0]'."), BadRequestError, 400, id="400"),
    pytest.param(Fault("status", status=401, message="Incorrect API key provided."), AuthenticationError, 401,
                 id="401"),
    pytest.param(Fault("status", status=403, message="Region not supported."), PermissionDeniedError, 403, id="403"),
    pytest.param(Fault("status", status=404, message="The model does not exist."), NotFoundError, 404, id="404"),
    pytest.param(Fault("context_length", message="maximum context length is 128000 tokens"),
                 ContextLengthExceededError, 400, id="context_length"),
    pytest.param(Fault("content_filter", message="filtered by the content management policy"),
                 ContentFilterError, 400, id="content_filter"),
    pytest.param(Fault("quota", message="You exceeded your current quota."), QuotaExceededError, 429, id="quota"),
]


class OpenAIStyleSuite:
    """Subclass as ``class TestX(OpenAIStyleSuite): provider = ...``."""

    provider: ClassVar[Provider]

    @pytest.fixture
    def server(self, fake_server: FakeProviderServer) -> FakeProviderServer:
        fake_server.api_key = KEY  # the fake checks the key the SDK sends
        return fake_server

    @pytest.fixture(params=["fake", "live"])
    def target(self, request: pytest.FixtureRequest) -> Iterator[Target]:
        if request.param == "live":
            if not self.provider.live:
                pytest.skip(f"live {self.provider.name}: set DQ_LIVE=1 and {' or '.join(self.provider.key_envs)}")
            yield Target(self.provider, None)
            return
        server = request.getfixturevalue("fake_server")
        server.api_key = KEY
        yield Target(self.provider, server)

    @pytest.fixture(scope="class")
    @classmethod
    def warm_sdk(cls, fake_server_session: FakeProviderServer) -> None:
        """One call through the SDK before a test that times a 0.3 s timeout: a process's first
        call imports the SDK's resources and probes the platform for its headers (over a second
        with openai 1.x), all inside that call's timeout."""
        make_model(cls.provider, fake_server_session).generate("warm up")

    def model(self, server: FakeProviderServer | None, **overrides: Any) -> OpenAICompatibleModel:
        return make_model(self.provider, server, **overrides)

    # ---- acceptance: the interface -----------------------------------------------------------

    @pytest.mark.acceptance
    def test_generate_sync_with_a_string_prompt(self, target: Target) -> None:
        prompt = "Reply with exactly the word pong, nothing else."
        target.script(Reply(text="pong"))
        assert "pong" in target.model().generate(prompt).lower()
        if target.live:
            return
        [request] = chat_requests(target.server)
        assert request.path == "/v1/chat/completions"
        assert request.headers["authorization"] == f"Bearer {KEY}"
        assert request.body["model"] == self.provider.model
        assert request.body["messages"] == [{"role": "user", "content": prompt}]
        assert "stream" not in request.body

    @pytest.mark.acceptance
    async def test_agenerate_async_with_a_message_list(self, target: Target) -> None:
        messages = [
            {"role": "system", "content": "You answer with one lowercase word."},
            {"role": "user", "content": "Say ping."},
            {"role": "assistant", "content": "ping"},
            {"role": "user", "content": "Now say pong."},
        ]
        target.script(Reply(text="pong"))
        assert "pong" in (await target.model().agenerate(messages)).lower()
        if not target.live:
            assert target.bodies()[-1]["messages"] == messages

    @pytest.mark.acceptance
    def test_json_output_with_a_pydantic_model(self, target: Target) -> None:
        target.script(Reply(text='{"sql": "SELECT name FROM users", "tables": ["users"]}'))
        result = target.model().generate_with_json_output(
            "Write SQL listing the names in table users. Answer as JSON with keys sql and tables.", SqlAnswer)
        assert SqlAnswer.model_validate(result).tables == ["users"]
        if not target.live:
            self._check_json_request(target.bodies()[-1], SqlAnswer.model_json_schema(), "SqlAnswer")

    @pytest.mark.acceptance
    async def test_json_output_with_a_dict_schema(self, target: Target) -> None:
        schema = {"type": "object", "title": "Sides", "properties": {"count": {"type": "integer"}},
                  "required": ["count"]}
        target.script(Reply(text='{"count": 3}'))
        result = await target.model().agenerate_with_json_output(
            "How many sides has a triangle? Answer as JSON with the key count.", schema)
        assert result == {"count": 3}
        if not target.live:
            self._check_json_request(target.bodies()[-1], schema, "Sides")

    def _check_json_request(self, body: dict[str, Any], schema: dict[str, Any], name: str) -> None:
        if self.provider.native_json_schema:
            assert body["response_format"] == {
                "type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": False}}
            assert [m["role"] for m in body["messages"]] == ["user"]  # no prompt hint needed
        else:
            assert body["response_format"] == {"type": "json_object"}
            assert schema_in_system_message(body) == schema
            assert "JSON" in body["messages"][0]["content"]  # JSON mode wants the word in the prompt

    @pytest.mark.acceptance
    async def test_stream_yields_deltas_then_the_final_generation(self, target: Target) -> None:
        target.script(Reply(text="one two three four"))
        model = target.model()
        deltas, final = await collect(model.astream("Count from one to four in words, separated by spaces."))
        assert "".join(d.text for d in deltas) == final.text and final.text
        assert final.finish_reason == "stop"
        assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0 and final.usage.attempts == 1
        texts = [t async for t in model.agenerate_stream("Count from one to four in words, separated by spaces.")]
        assert all(texts) and "four" in "".join(texts).lower()
        if not target.live:
            assert len(deltas) > 1
            body = target.bodies()[0]
            assert body["stream"] is True and body["stream_options"] == {"include_usage": True}

    @pytest.mark.acceptance
    async def test_tool_call_comes_back_as_generation_tool_calls(self, target: Target) -> None:
        target.script(Reply(tool_calls=(ScriptedToolCall("run_sql", {"sql": "SELECT COUNT(*) FROM users"},
                                                         id="call_1"),)))
        model = target.model()
        generation = await model._call(model._request(
            "How many rows has table users? Call the run_sql tool; do not answer in text.", {}, tools=(SQL_TOOL,)))
        assert generation.finish_reason == "tool_calls"
        [call] = generation.tool_calls
        assert call.name == "run_sql" and call.id
        assert "users" in call.parsed_arguments()["sql"].lower()
        if not target.live:
            body = target.bodies()[-1]
            assert body["tools"] == [{"type": "function", "function": {
                "name": "run_sql", "description": SQL_TOOL.description, "parameters": SQL_TOOL.parameters}}]
            assert "tool_choice" not in body

    @pytest.mark.acceptance
    def test_usage_and_cost(self, target: Target) -> None:
        target.script(Reply(text="ok", input_tokens=1200, output_tokens=340, cached_tokens=1000, reasoning_tokens=40))
        with track_usage() as calls:
            generation = target.model().complete("Say ok.")
        usage = generation.usage
        assert calls == [usage]
        assert (usage.provider, usage.attempts, usage.requests, usage.priced) == (self.provider.name, 1, 1, True)
        assert usage.latency_ms > 0
        if target.live:
            assert usage.input_tokens > 0 and usage.output_tokens > 0 and usage.cost_usd > 0
            return
        assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens, usage.reasoning_tokens) == (
            1200, 340, 1000, 40)
        price_in, price_out, price_cached = self.provider.prices
        # 200 uncached + 1000 cached input tokens; 340 output tokens, the 40 reasoning ones included
        assert usage.cost_usd == pytest.approx((200 * price_in + 1000 * price_cached + 340 * price_out) / 1e6)

    @pytest.mark.acceptance
    def test_token_count_equals_the_reference_tokenizer(self) -> None:
        model = make_model(self.provider, None)
        for text in TOKEN_TEXTS:
            count = model.token_count(text)
            assert count == self.provider.reference_count(text, self.provider.model), text
            assert not getattr(count, "estimated", False)
        assert model.token_count(TOKEN_TEXTS[1]) > 10  # a reference that counts nothing is no reference

    @pytest.mark.acceptance
    def test_wrong_key_is_an_authentication_error(self, target: Target) -> None:
        model = target.model(api_key="sk-wrong-0000000000000000000000000000", max_retries=2)
        with pytest.raises(AuthenticationError) as caught:
            model.generate("hi")
        assert caught.value.status_code == 401 and not caught.value.retryable
        assert caught.value.details["attempts"] == 1
        if not target.live:
            assert len(chat_requests(target.server)) == 1

    # ---- settings on the wire -----------------------------------------------------------------

    @pytest.mark.parametrize("path", ["complete", "stream", "json"])
    async def test_settings_reach_the_wire_config_defaults_then_overrides(
            self, server: FakeProviderServer, path: str) -> None:
        server.script.add(Reply(text='{"ok": true}'), times=None)
        model = self.model(server, temperature=0.2, top_p=0.9, max_tokens=256)

        async def call(**kwargs: Any) -> None:
            if path == "complete":
                await model.acomplete("q", **kwargs)
            elif path == "stream":
                await collect(model.astream("q", **kwargs))
            else:
                await model.agenerate_with_json_output("q", **kwargs)

        await call()
        await call(temperature=0.7, top_p=0.5, max_tokens=1000, stop=["END", ";"], seed=7)
        defaults, overridden = bodies(server)
        assert (defaults["temperature"], defaults["top_p"], defaults["max_tokens"]) == (0.2, 0.9, 256)
        assert "stop" not in defaults and "seed" not in defaults
        assert (overridden["temperature"], overridden["top_p"], overridden["max_tokens"]) == (0.7, 0.5, 1000)
        assert overridden["stop"] == ["END", ";"] and overridden["seed"] == 7
        assert "max_completion_tokens" not in overridden

    def test_unset_settings_stay_off_the_wire(self, server: FakeProviderServer) -> None:
        self.model(server).generate("q")
        [body] = bodies(server)
        assert not {"temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed",
                    "response_format", "tools"} & set(body)

    def test_config_defaults_are_used_by_the_sync_twin(self, server: FakeProviderServer) -> None:
        model = self.model(server, temperature=0.0, max_tokens=64)
        model.generate("first")
        model.generate("second", max_tokens=200, temperature=0.5)
        first, second = bodies(server)
        assert (first["temperature"], first["max_tokens"]) == (0.0, 64)
        assert (second["temperature"], second["max_tokens"]) == (0.5, 200)

    async def test_tool_choice_and_the_conversation_on_the_wire(self, server: FakeProviderServer) -> None:
        messages = [
            {"role": "system", "content": "You write SQL."},
            {"role": "user", "content": "How many users?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "run_sql", "arguments": '{"sql": "SELECT 1"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "[[42]]"},
            {"role": "user", "content": "And in words?"},
        ]
        model = self.model(server)
        await model._call(model._request(messages, {"tool_choice": "run_sql"}, tools=(SQL_TOOL,)))
        body = bodies(server)[-1]
        assert body["messages"] == messages
        assert body["tool_choice"] == {"type": "function", "function": {"name": "run_sql"}}

    # ---- JSON repair --------------------------------------------------------------------------

    def test_json_output_is_repaired_without_asking_again(self, server: FakeProviderServer) -> None:
        server.script.add(Reply(text='Sure:\n```json\n{"sql": "SELECT 1", "tables": ["t"],}\n```'))
        assert self.model(server).generate_with_json_output("q", SqlAnswer) == {"sql": "SELECT 1", "tables": ["t"]}
        assert len(chat_requests(server)) == 1

    def test_json_output_asks_again_with_the_reason(self, server: FakeProviderServer) -> None:
        server.script.add(Reply(text="I would use SELECT 1."), Reply(text='{"sql": "SELECT 1"}'),
                          Reply(text='{"sql": "SELECT 1", "tables": []}'))
        assert self.model(server).generate_with_json_output("q", SqlAnswer) == {"sql": "SELECT 1", "tables": []}
        first, second, third = bodies(server)
        assert second["messages"][:-2] == first["messages"]
        assert second["messages"][-2] == {"role": "assistant", "content": "I would use SELECT 1."}
        assert second["messages"][-1]["role"] == "user" and "not valid JSON" in second["messages"][-1]["content"]
        assert "tables" in third["messages"][-1]["content"]  # the validation error goes back to the model
        assert first["response_format"] == second["response_format"] == third["response_format"]

    def test_json_output_gives_up_with_model_output_error(self, server: FakeProviderServer) -> None:
        server.script.add(Reply(text="no json here"), times=None)
        model = self.model(server, json_repair_attempts=2)
        with pytest.raises(ModelOutputError, match="no valid JSON after 3") as caught:
            model.generate_with_json_output("q", SqlAnswer)
        assert caught.value.details["last_answer"] == "no json here"
        assert len(chat_requests(server)) == 3  # bounded: one answer and two re-asks

    # ---- streaming equals non-streaming -------------------------------------------------------

    async def test_stream_equals_non_stream_with_reasoning_tool_calls_and_usage(
            self, server: FakeProviderServer) -> None:
        reply = Reply(text="Here is the query.", reasoning="The users table has the names.",
                      tool_calls=(ScriptedToolCall("run_sql", {"sql": "SELECT 1"}, id="call_a"),
                                  ScriptedToolCall("run_sql", {"sql": "SELECT 2"}, id="call_b")),
                      input_tokens=50, output_tokens=30, cached_tokens=20, reasoning_tokens=6)
        server.script.add(reply, reply)
        model = self.model(server)
        request = model._request("q", {}, tools=(SQL_TOOL,))
        whole = await model._call(request)
        deltas, streamed = await collect(model._stream_call(request))
        assert comparable(streamed) == comparable(whole)
        assert whole.tool_calls == [ToolCall(id="call_a", name="run_sql", arguments='{"sql": "SELECT 1"}'),
                                    ToolCall(id="call_b", name="run_sql", arguments='{"sql": "SELECT 2"}')]
        assert whole.reasoning == "The users table has the names." and whole.finish_reason == "tool_calls"
        assert "".join(d.reasoning for d in deltas) == whole.reasoning
        assert "".join(d.text for d in deltas) == whole.text
        plain, stream = bodies(server)
        assert "stream" not in plain and stream["stream"] is True
        assert {k: v for k, v in stream.items() if k not in ("stream", "stream_options")} == plain

    async def test_astream_equals_acomplete(self, server: FakeProviderServer) -> None:
        reply = Reply(text="SELECT name FROM users WHERE id = 1", reasoning="one row by key",
                      input_tokens=12, output_tokens=9, cached_tokens=4, reasoning_tokens=3)
        server.script.add(reply, reply)
        model = self.model(server)
        whole = await model.acomplete("q", temperature=0.1)
        deltas, streamed = await collect(model.astream("q", temperature=0.1))
        assert comparable(streamed) == comparable(whole)
        assert "".join(d.text for d in deltas) == whole.text
        assert "".join(d.reasoning for d in deltas) == whole.reasoning == "one row by key"

    # ---- errors through the SDK ---------------------------------------------------------------

    @pytest.mark.parametrize(("fault", "error", "status"), PERMANENT_FAULTS)
    def test_permanent_errors_fail_at_once(self, server: FakeProviderServer, fault: Fault,
                                           error: type[ModelError], status: int) -> None:
        server.script.add(fault, times=None)
        with pytest.raises(ModelError) as caught:
            self.model(server).generate("hi")
        exc = caught.value
        assert type(exc) is error and not exc.retryable
        assert isinstance(exc, DatusException) and exc.code is error.error_code
        assert exc.status_code == status and exc.reason == fault.message  # the provider's words
        assert (exc.provider, exc.model) == (self.provider.name, self.provider.model)
        assert isinstance(exc.__cause__, openai.APIStatusError)  # chained, and no SDK error escapes
        assert exc.details["attempts"] == 1
        assert len(chat_requests(server)) == 1  # exactly one request: permanent means no retry

    @pytest.mark.parametrize("stream", [False, True])
    async def test_content_filter_finish_is_content_filter_error(self, server: FakeProviderServer,
                                                                 stream: bool) -> None:
        server.script.add(Reply(text="partial", finish_reason="content_filter"), times=None)
        model = self.model(server)
        with pytest.raises(ContentFilterError):
            await (collect(model.astream("q")) if stream else model.agenerate("q"))
        assert len(chat_requests(server)) == 1

    def test_rate_limit_waits_the_retry_after(self, server: FakeProviderServer,
                                              caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.INFO, logger="datus.models.retry")
        server.script.add(Fault("rate_limit", retry_after=1))
        started = time.perf_counter()
        generation = self.model(server).complete("hi")
        waited = time.perf_counter() - started
        assert generation.text == "echo: hi" and generation.usage.attempts == 2
        # backoff is 0 here (base delay 0): the one wait scheduled is Retry-After's, and it was waited
        assert retry_waits(caplog) == ["1.00"]
        assert waited >= 1.0, waited
        assert len(chat_requests(server)) == 2

    def test_rate_limit_longer_than_the_wait_budget_is_raised_with_retry_after(
            self, server: FakeProviderServer, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.INFO, logger="datus.models.retry")
        server.script.add(Fault("rate_limit", retry_after=30))
        with pytest.raises(RateLimitError) as caught:
            self.model(server, retry_max_wait_s=5).generate("hi")
        assert retry_waits(caplog) == []  # raised at once: no wait was scheduled
        assert caught.value.retry_after == 30 and caught.value.status_code == 429 and caught.value.retryable
        assert caught.value.details["attempts"] == 1 and len(chat_requests(server)) == 1

    def test_server_errors_are_retried_then_succeed(self, server: FakeProviderServer) -> None:
        server.script.add(Fault("status", status=500), Fault("status", status=503))
        generation = self.model(server).complete("hi")
        assert generation.text == "echo: hi" and generation.usage.attempts == 3
        assert len(chat_requests(server)) == 3

    def test_retries_are_bounded_and_the_sdk_does_not_add_its_own(self, server: FakeProviderServer) -> None:
        server.script.add(Fault("status", status=500), times=None)
        with pytest.raises(ServerError) as caught:
            self.model(server, max_retries=2).generate("hi")
        assert caught.value.status_code == 500 and caught.value.details["attempts"] == 3
        assert len(chat_requests(server)) == 3
        server.clear_requests()
        with pytest.raises(ServerError):
            self.model(server, max_retries=0).generate("hi")
        assert len(chat_requests(server)) == 1

    @pytest.mark.parametrize("where", ["config", "per_call", "stream"])
    @pytest.mark.usefixtures("warm_sdk")
    async def test_hang_is_a_timeout(self, server: FakeProviderServer, where: str) -> None:
        server.script.add(Fault("hang", seconds=10), times=None)
        # the hang ends after 10 s with an answer: a 0.3 s timeout not applied means no error
        model = self.model(server, max_retries=0, timeout_s=0.3 if where == "config" else 120)
        with pytest.raises(ModelTimeoutError) as caught:
            if where == "stream":
                await collect(model.astream("hi", timeout_s=0.3))
            else:
                await model.agenerate("hi", **({"timeout_s": 0.3} if where == "per_call" else {}))
        # under load the server may record the request after the client already gave up
        deadline = time.perf_counter() + 15
        while not chat_requests(server) and time.perf_counter() < deadline:
            await asyncio.sleep(0.02)
        assert caught.value.retryable and len(chat_requests(server)) == 1

    @pytest.mark.usefixtures("warm_sdk")
    def test_hang_once_is_retried(self, server: FakeProviderServer) -> None:
        server.script.add(Fault("hang", seconds=10))
        assert self.model(server, timeout_s=0.3).complete("hi").usage.attempts == 2

    @pytest.mark.parametrize("stream", [False, True])
    async def test_malformed_json_is_invalid_response_and_retried(self, server: FakeProviderServer,
                                                                  stream: bool) -> None:
        server.script.add(Fault("malformed_json"))
        model = self.model(server, max_retries=3)
        if stream:
            deltas, final = await collect(model.astream("hi"))
            assert "".join(d.text for d in deltas) == final.text
        else:
            final = await model.acomplete("hi")
        assert final.text == "echo: hi" and final.usage.attempts == 2
        server.script.add(Fault("malformed_json"), times=None)
        with pytest.raises(InvalidResponseError) as caught:
            await (collect(model.astream("hi")) if stream else model.agenerate("hi"))
        assert caught.value.retryable and caught.value.details["attempts"] == 4
        assert len(chat_requests(server)) == 2 + 4

    async def test_cut_stream_after_deltas_is_raised_not_retried(self, server: FakeProviderServer) -> None:
        server.script.add(Fault("cut_stream", after_chunks=3))
        seen: list[StreamDelta] = []
        with pytest.raises(ModelConnectionError) as caught:
            async for item in self.model(server).astream("a question long enough to stream in pieces"):
                seen.append(item)
        assert seen and all(isinstance(item, StreamDelta) for item in seen)
        assert "".join(d.text for d in seen) and caught.value.retryable
        assert caught.value.details["attempts"] == 1
        assert len(chat_requests(server)) == 1  # what the caller saw cannot be taken back

    async def test_cut_stream_before_the_first_delta_is_retried(self, server: FakeProviderServer) -> None:
        server.script.add(Fault("cut_stream", after_chunks=1))  # the role chunk only: no delta yet
        deltas, final = await collect(self.model(server).astream("hello there"))
        assert "".join(d.text for d in deltas) == final.text == "echo: hello there"
        assert final.usage.attempts == 2 and len(chat_requests(server)) == 2

    def test_cut_body_is_a_connection_error_and_retried(self, server: FakeProviderServer) -> None:
        server.script.add(Fault("cut_stream"))
        assert self.model(server).complete("hello").usage.attempts == 2
        server.script.add(Fault("cut_stream"), times=None)
        with pytest.raises(ModelConnectionError):
            self.model(server, max_retries=0).generate("hello")

    def test_connection_refused_is_a_connection_error(self) -> None:
        with FakeProviderServer() as gone:
            url = gone.openai_base_url
        with pytest.raises(ModelConnectionError) as caught:
            make_model(self.provider, None, base_url=url, max_retries=0).generate("hi")
        assert isinstance(caught.value.__cause__, openai.APIConnectionError)

    # ---- keys, traces, concurrency ------------------------------------------------------------

    def test_key_from_the_environment(self, server: FakeProviderServer, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in self.provider.key_envs:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv(self.provider.key_envs[0], KEY)
        assert self.model(server, api_key=None).generate("hi") == "echo: hi"
        assert chat_requests(server)[-1].headers["authorization"] == f"Bearer {KEY}"

    def test_missing_key_is_a_config_error_naming_the_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in self.provider.key_envs:
            monkeypatch.delenv(name, raising=False)
        with pytest.raises(ModelConfigError, match=" or ".join(self.provider.key_envs)):
            make_model(self.provider, None, api_key=None)

    async def test_save_llm_trace_one_file_per_call_without_the_key(self, server: FakeProviderServer,
                                                                    tmp_path: Path) -> None:
        secret = "sk-proj-SECRET-do-not-log-9f8e7d6c5b4a"
        server.api_key = secret
        model = self.model(server, api_key=secret, save_llm_trace=True, trace_dir=str(tmp_path), max_retries=0)
        server.script.add(Reply(text="first"), match="one")
        server.script.add(Reply(text="second"), match="two")
        server.script.add(Fault("status", status=400, message="bad"), match="four")
        await asyncio.gather(model.agenerate("one"), model.agenerate("two"))
        await collect(model.astream("three"))
        with pytest.raises(BadRequestError):
            await model.agenerate("four")
        server.api_key = KEY  # now the key is wrong: the 401 body quotes part of it
        with pytest.raises(AuthenticationError):
            await model.agenerate("five")
        files = sorted((tmp_path / self.provider.name).glob("*.json"))
        assert len(files) == 5
        texts = [f.read_text(encoding="utf-8") for f in files]
        assert not any(secret in text or secret[-12:] in text for text in texts)
        records = [json.loads(text) for text in texts]
        assert {r.get("text") for r in records} >= {"first", "second", "echo: three"}
        assert sorted(r["error"]["type"] for r in records if "error" in r) == ["AuthenticationError",
                                                                               "BadRequestError"]
        assert all(r["provider"] == self.provider.name and r["model"] == self.provider.model for r in records)
        assert {r["messages"][0]["content"] for r in records} == {"one", "two", "three", "four", "five"}

    async def test_one_model_object_serves_200_concurrent_calls(self, server: FakeProviderServer) -> None:
        model = self.model(server, timeout_s=120)
        server.hold()  # no answer until all 200 are in: calls made one after another would stall here
        with track_usage() as calls:
            pending = asyncio.gather(*(model.agenerate(f"question {i}") for i in range(200)))
            deadline = time.perf_counter() + 60  # only so that a broken model fails instead of hanging
            while server.in_flight < 200 and time.perf_counter() < deadline and not pending.done():
                await asyncio.sleep(0.02)
            assert server.in_flight == 200, f"{server.in_flight} of 200 calls in flight at once"
            server.release()
            answers = await pending
        assert answers == [f"echo: question {i}" for i in range(200)]
        assert len(calls) == 200 and all(usage.attempts == 1 for usage in calls)
        assert len(chat_requests(server)) == 200
