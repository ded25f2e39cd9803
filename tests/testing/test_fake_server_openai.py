"""The fake server as the official `openai` SDK sees it: real HTTP, real SSE, real errors."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from email.utils import formatdate
from typing import Any

import httpx
import openai
import pytest

from datus.models.scripted import Fault, Reply, ScriptedRequest, ScriptedToolCall
from datus.testing.fake_server import FakeProviderServer, answer_to_json

USER = [{"role": "user", "content": "hello there"}]
# A connection cut mid-body: openai>=2 raises APIConnectionError; openai 1.x (Datus-agent's pin)
# lets httpx's error escape while it reads the body.
CUT = (openai.APIConnectionError, httpx.RemoteProtocolError)
CALLS = (
    ScriptedToolCall("run_sql", {"sql": "SELECT 1", "limit": 10}, id="call_1"),
    ScriptedToolCall("list_tables", {"schema": "public"}),
)


def client(server: FakeProviderServer, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_base_url, api_key="sk-test", max_retries=0, **options)


@pytest.fixture
def api(fake_server: FakeProviderServer) -> Iterator[openai.OpenAI]:
    with client(fake_server) as sync_client:
        yield sync_client


def aclient(server: FakeProviderServer, **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="sk-test", max_retries=0, **options)


def collect_stream(chunks: Any) -> dict[str, Any]:
    """Reassemble a chunk stream the way an adapter would."""
    out: dict[str, Any] = {"text": "", "reasoning": "", "calls": {}, "finish": None, "usage": None, "chunks": []}
    for chunk in chunks:
        out["chunks"].append(chunk)
        if chunk.usage is not None:
            out["usage"] = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            out["text"] += delta.content or ""
            out["reasoning"] += (delta.model_extra or {}).get("reasoning_content") or ""
            for call in delta.tool_calls or []:
                slot = out["calls"].setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = call.id or slot["id"]
                if call.function is not None:
                    slot["name"] += call.function.name or ""
                    slot["arguments"] += call.function.arguments or ""
            out["finish"] = choice.finish_reason or out["finish"]
    return out


def ask(api: openai.OpenAI, text: str) -> str | None:
    messages = [{"role": "user", "content": text}]
    return api.chat.completions.create(model="gpt-4o", messages=messages).choices[0].message.content


async def ask_async(api: openai.AsyncOpenAI, text: str) -> str | None:
    messages = [{"role": "user", "content": text}]
    return (await api.chat.completions.create(model="gpt-4o", messages=messages)).choices[0].message.content


# -- answers --------------------------------------------------------------------------------


def test_plain_completion_echoes_and_counts_usage(fake_server: FakeProviderServer, api: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "x" * 40}]
    result = api.chat.completions.create(model="gpt-4o", messages=messages)
    assert result.object == "chat.completion"
    assert result.model == "gpt-4o"
    assert result.choices[0].message.content == "echo: " + "x" * 40
    assert result.choices[0].finish_reason == "stop"
    assert result.usage is not None
    assert result.usage.prompt_tokens == 10  # 40 characters / 4
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert result.usage.prompt_tokens_details.cached_tokens == 0


def test_reply_overrides_usage(fake_server: FakeProviderServer, api: openai.OpenAI) -> None:
    reply = Reply(text="ok", input_tokens=1200, output_tokens=40, cached_tokens=1000, reasoning_tokens=7)
    fake_server.script.add(reply)
    usage = api.chat.completions.create(model="gpt-4o", messages=USER).usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (1200, 40, 1240)
    assert usage.prompt_tokens_details.cached_tokens == 1000
    assert usage.completion_tokens_details.reasoning_tokens == 7


def test_stream_with_usage_matches_spec(fake_server: FakeProviderServer, api: openai.OpenAI) -> None:
    fake_server.script.add(Reply(text="The answer is forty-two, of course."))
    stream = api.chat.completions.create(
        model="gpt-4o", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    out = collect_stream(stream)
    chunks = out["chunks"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert out["text"] == "The answer is forty-two, of course."
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # really split
    assert len({c.id for c in chunks}) == 1
    assert out["finish"] == "stop"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and last.usage.total_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage_chunk(fake_server: FakeProviderServer, api: openai.OpenAI) -> None:
    out = collect_stream(api.chat.completions.create(model="gpt-4o", messages=USER, stream=True))
    assert out["usage"] is None
    assert all(chunk.choices for chunk in out["chunks"])
    assert out["text"] == "echo: hello there"


def test_tool_calls_non_stream(fake_server: FakeProviderServer, api: openai.OpenAI) -> None:
    fake_server.script.add(Reply(tool_calls=CALLS))
    choice = api.chat.completions.create(model="gpt-4o", messages=USER).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["run_sql", "list_tables"]
    assert [json.loads(c.function.arguments) for c in calls] == [CALLS[0].arguments, CALLS[1].arguments]
    assert calls[0].id == "call_1" and calls[1].id.startswith("call_")


@pytest.mark.asyncio
async def test_tool_calls_stream_reassemble(fake_server: FakeProviderServer) -> None:
    fake_server.script.add(Reply(text="Let me look.", tool_calls=CALLS))
    async with aclient(fake_server) as api:
        stream = await api.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
        out = collect_stream([chunk async for chunk in stream])
    assert out["text"] == "Let me look."
    assert out["finish"] == "tool_calls"
    assert [out["calls"][i]["name"] for i in (0, 1)] == ["run_sql", "list_tables"]
    assert [json.loads(out["calls"][i]["arguments"]) for i in (0, 1)] == [CALLS[0].arguments, CALLS[1].arguments]
    assert out["calls"][0]["id"] == "call_1"
    pieces = [c for c in out["chunks"] if c.choices and c.choices[0].delta.tool_calls]
    assert len(pieces) > 2 * 2  # name chunk plus several argument pieces per call


def test_reasoning_non_stream(fake_server: FakeProviderServer, api: openai.OpenAI) -> None:
    fake_server.script.add(Reply(text="42", reasoning="Six times seven."))
    result = api.chat.completions.create(model="deepseek-reasoner", messages=USER)
    message = result.choices[0].message
    assert message.model_extra["reasoning_content"] == "Six times seven."
    assert message.content == "42"
    assert result.usage.completion_tokens_details.reasoning_tokens > 0


@pytest.mark.asyncio
async def test_reasoning_stream_comes_before_content(fake_server: FakeProviderServer) -> None:
    fake_server.script.add(Reply(text="42", reasoning="Six times seven is forty-two."))
    async with aclient(fake_server) as api:
        stream = await api.chat.completions.create(model="deepseek-reasoner", messages=USER, stream=True)
        out = collect_stream([chunk async for chunk in stream])
    assert out["reasoning"] == "Six times seven is forty-two."
    assert out["text"] == "42"
    order = []
    for chunk in out["chunks"]:
        delta = chunk.choices[0].delta if chunk.choices else None
        if delta is not None and (delta.model_extra or {}).get("reasoning_content"):
            order.append("reasoning")
        elif delta is not None and delta.content:
            order.append("content")
    assert set(order) == {"reasoning", "content"}
    assert order == sorted(order, key=lambda kind: kind == "content")  # all reasoning first


def test_stream_and_non_stream_carry_the_same_answer(fake_server: FakeProviderServer, api: openai.OpenAI) -> None:
    reply = Reply(text="Here.", reasoning="Think.", tool_calls=CALLS, cached_tokens=1)
    fake_server.script.add(reply, times=2)
    whole = api.chat.completions.create(model="gpt-4o", messages=USER)
    streamed = collect_stream(
        api.chat.completions.create(
            model="gpt-4o", messages=USER, stream=True, stream_options={"include_usage": True}
        )
    )
    message = whole.choices[0].message
    assert streamed["text"] == message.content
    assert streamed["reasoning"] == message.model_extra["reasoning_content"]
    assert [(c["name"], c["arguments"]) for c in streamed["calls"].values()] == [
        (c.function.name, c.function.arguments) for c in message.tool_calls
    ]
    assert streamed["finish"] == whole.choices[0].finish_reason
    assert streamed["usage"].model_dump() == whole.usage.model_dump()


# -- faults ---------------------------------------------------------------------------------

HTTP_DATE = formatdate(time.time() + 30, usegmt=True)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("fault", "error", "status", "code"),
    [
        (Fault("rate_limit", retry_after=7), openai.RateLimitError, 429, "rate_limit_exceeded"),
        (Fault("rate_limit", retry_after=HTTP_DATE), openai.RateLimitError, 429, "rate_limit_exceeded"),
        (Fault("quota"), openai.RateLimitError, 429, "insufficient_quota"),
        (Fault("overloaded", retry_after=2), openai.InternalServerError, 503, None),
        (Fault("status", status=500), openai.InternalServerError, 500, None),
        (Fault("status", status=404), openai.NotFoundError, 404, "model_not_found"),
        (Fault("status", status=403, message="no"), openai.PermissionDeniedError, 403, None),
        (Fault("context_length"), openai.BadRequestError, 400, "context_length_exceeded"),
        (Fault("content_filter"), openai.BadRequestError, 400, "content_filter"),
    ],
)
def test_error_faults_raise_the_sdk_error(
    fake_server: FakeProviderServer,
    api: openai.OpenAI,
    fault: Fault,
    error: type[openai.APIStatusError],
    status: int,
    code: str | None,
    stream: bool,
) -> None:
    fake_server.script.add(fault)
    with pytest.raises(error) as caught:
        api.chat.completions.create(model="gpt-4o", messages=USER, stream=stream)
    exc = caught.value
    assert exc.status_code == status
    if code is not None:
        assert exc.code == code
    if fault.message:  # openai 1.x prefixes "Error code: 403 - " and the whole body to the message
        assert exc.body["message"] == fault.message  # type: ignore[index]
    assert exc.response.headers.get("retry-after") == (None if fault.retry_after is None else str(fault.retry_after))
    assert exc.request_id and exc.request_id.startswith("req_")


def test_quota_error_type_is_insufficient_quota(fake_server: FakeProviderServer, api: openai.OpenAI) -> None:
    fake_server.script.add(Fault("quota"))
    with pytest.raises(openai.RateLimitError) as caught:
        api.chat.completions.create(model="gpt-4o", messages=USER)
    assert caught.value.type == "insufficient_quota"


def test_hang_times_out_the_client(fake_server: FakeProviderServer) -> None:
    # a hang that answered at once, or shorter than the client's timeout, would return the echo
    fake_server.script.add(Fault("hang", seconds=30))
    with client(fake_server, timeout=0.3) as impatient, pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model="gpt-4o", messages=USER)
    assert len(fake_server.requests) == 1


def test_short_hang_then_answers(fake_server: FakeProviderServer, api: openai.OpenAI) -> None:
    fake_server.script.add(Fault("hang", seconds=0.3))
    started = time.monotonic()
    result = api.chat.completions.create(model="gpt-4o", messages=USER)
    assert time.monotonic() - started >= 0.3
    assert result.choices[0].message.content == "echo: hello there"


def test_malformed_json_escapes_the_sdk_as_a_decode_error(fake_server: FakeProviderServer, api: openai.OpenAI) -> None:
    fake_server.script.add(Fault("malformed_json"), times=2)
    with pytest.raises(json.JSONDecodeError):  # the SDK does not wrap it in an APIError
        api.chat.completions.create(model="gpt-4o", messages=USER)
    with pytest.raises(json.JSONDecodeError):
        list(api.chat.completions.create(model="gpt-4o", messages=USER, stream=True))


def test_cut_stream_breaks_after_the_given_chunks(
    fake_server: FakeProviderServer, api: openai.OpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    fake_server.script.add(Fault("cut_stream", after_chunks=2))
    received = []
    with caplog.at_level(logging.INFO), pytest.raises(CUT):
        for chunk in api.chat.completions.create(model="gpt-4o", messages=USER, stream=True):
            received.append(chunk)
    assert len(received) == 2
    assert received[0].choices[0].delta.role == "assistant"
    assert not [r for r in caplog.records if r.name.startswith("uvicorn") and r.levelno >= logging.ERROR]


@pytest.mark.asyncio
async def test_cut_stream_async_and_non_stream(fake_server: FakeProviderServer) -> None:
    fake_server.script.add(Fault("cut_stream", after_chunks=1), times=2)
    async with aclient(fake_server) as api:
        stream = await api.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
        with pytest.raises(CUT):
            async for _ in stream:
                pass
        with pytest.raises(CUT):  # body shorter than its content-length
            await api.chat.completions.create(model="gpt-4o", messages=USER)


def test_authentication(fake_server: FakeProviderServer) -> None:
    with FakeProviderServer(api_key="sk-right") as strict:
        with openai.OpenAI(base_url=strict.openai_base_url, api_key="sk-right", max_retries=0) as good:
            assert ask(good, "let me in") == "echo: let me in"
        with (
            openai.OpenAI(base_url=strict.openai_base_url, api_key="sk-wrong-key-123", max_retries=0) as bad,
            pytest.raises(openai.AuthenticationError) as caught,
        ):
            ask(bad, "let me in")
        assert caught.value.code == "invalid_api_key"
        assert "sk-wrong-key-123" not in caught.value.message  # the key is masked, as upstream
    missing = httpx.post(fake_server.openai_base_url + "/chat/completions", json={"model": "m", "messages": USER})
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "invalid_request_error"


# -- script ---------------------------------------------------------------------------------




def test_match_and_times(fake_server: FakeProviderServer, api: openai.OpenAI) -> None:
    fake_server.script.add(Reply(text="A"), match="alpha", times=2)
    fake_server.script.add(Reply(text="B"))
    fake_server.script.add(Reply(text="forever"), match="gamma", times=None)
    assert ask(api, "beta") == "B"
    assert [ask(api, "alpha one"), ask(api, "alpha two"), ask(api, "alpha three")] == ["A", "A", "echo: alpha three"]
    assert [ask(api, "gamma") for _ in range(3)] == ["forever"] * 3
    assert ask(api, "beta") == "echo: beta"


def test_fallback_handler_sees_the_request(fake_server: FakeProviderServer, api: openai.OpenAI) -> None:
    seen: list[ScriptedRequest] = []
    fake_server.script.fallback = lambda request: seen.append(request) or Reply(text=request.model)
    assert ask(api, "hi") == "gpt-4o"
    assert seen[0].protocol == "openai" and seen[0].last_user_text == "hi" and not seen[0].stream


def test_requests_record_what_the_sdk_sent(fake_server: FakeProviderServer, api: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "run_sql", "parameters": {"type": "object", "properties": {}}}}]
    api.chat.completions.create(model="gpt-4o", messages=USER, temperature=0.2, max_tokens=99, tools=tools)
    (recorded,) = fake_server.requests
    assert recorded.path == "/v1/chat/completions" and recorded.method == "POST" and recorded.protocol == "openai"
    assert recorded.headers["authorization"] == "Bearer sk-test"
    assert recorded.body["temperature"] == 0.2 and recorded.body["max_tokens"] == 99
    assert recorded.body["tools"] == tools and recorded.body["messages"] == USER
    fake_server.clear_requests()
    assert fake_server.requests == []


def test_route_without_v1_prefix_and_models(fake_server: FakeProviderServer, api: openai.OpenAI) -> None:
    with openai.OpenAI(base_url=fake_server.url, api_key="k", max_retries=0) as bare:
        assert ask(bare, "bare") == "echo: bare"
    assert fake_server.requests[0].path == "/chat/completions"
    assert "gpt-4o" in [model.id for model in api.models.list()]


def test_latency_applies_and_changes_at_runtime(fake_server: FakeProviderServer, api: openai.OpenAI) -> None:
    fake_server.latency_s = 0.3
    started = time.monotonic()
    ask(api, "slow")
    assert time.monotonic() - started >= 0.3
    fake_server.latency_s = 600.0  # far past the impatient client's timeout
    with client(fake_server, timeout=0.5) as impatient, pytest.raises(openai.APITimeoutError):
        ask(impatient, "stuck")
    fake_server.latency_s = 0.0  # if this were not read per request, "fast" would wait 600 s too
    with client(fake_server, timeout=60) as patient:
        assert ask(patient, "fast") == "echo: fast"


# -- other processes --------------------------------------------------------------------------


def test_admin_endpoints(fake_server: FakeProviderServer, api: openai.OpenAI) -> None:
    admin = httpx.Client(base_url=fake_server.url)
    entries = [
        {"reply": {"text": "scripted", "tool_calls": [{"name": "f", "arguments": {"a": 1}}]}, "match": "one"},
        {"fault": {"kind": "rate_limit", "retry_after": 3}, "times": 1},
        answer_to_json(Reply(text="round trip", reasoning="r"), match="three"),
    ]
    with admin:
        assert admin.post("/_fake/script", json=entries).json() == {"pending": 3, "fallback": "echo"}
        first = api.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "one"}])
        message = first.choices[0].message
        assert message.content == "scripted" and json.loads(message.tool_calls[0].function.arguments) == {"a": 1}
        with pytest.raises(openai.RateLimitError) as caught:
            ask(api, "two")
        assert caught.value.response.headers["retry-after"] == "3"
        assert ask(api, "three") == "round trip"

        recorded = admin.get("/_fake/requests").json()["requests"]
        assert [r["body"]["messages"][0]["content"] for r in recorded] == ["one", "two", "three"]
        assert recorded[0]["headers"]["authorization"] == "Bearer sk-test"
        assert admin.post("/_fake/latency", json={"latency_ms": 250}).json() == {"latency_s": 0.25}
        assert fake_server.latency_s == 0.25
        health = admin.get("/_fake/health").json()
        assert health["status"] == "ok" and "openai" in health["protocols"] and health["requests"] == 3
        assert admin.post("/_fake/script", json=[{"nonsense": 1}]).status_code == 400
        assert admin.post("/_fake/script", json=[{"fault": {"kind": "hang", "bogus": 1}}]).status_code == 400
        assert admin.post("/_fake/script", json=[{"fault": {"kind": "rate_limited"}}]).status_code == 400
        admin.post("/_fake/script", json={"entries": [{"reply": {"text": "later"}, "times": None}]})
        assert fake_server.script.pending() == 1
        assert admin.post("/_fake/reset").status_code == 200
    assert fake_server.latency_s == 0.0 and fake_server.requests == [] and fake_server.script.pending() == 0


def test_bad_request_bodies_get_provider_errors(fake_server: FakeProviderServer) -> None:
    url = fake_server.openai_base_url + "/chat/completions"
    headers = {"authorization": "Bearer k"}
    not_json = httpx.post(url, content=b"{nope", headers={**headers, "content-type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["error"]["type"] == "invalid_request_error"
    no_messages = httpx.post(url, json={"model": "gpt-4o"}, headers=headers)
    assert no_messages.status_code == 400 and no_messages.json()["error"]["param"] == "messages"
    assert fake_server.requests[0].body == "{nope"  # recorded even when unparseable


def test_standalone_module_serves_until_sigterm() -> None:
    command = [sys.executable, "-m", "datus.testing.fake_server", "--port", "0", "--latency-ms", "10"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            match = re.search(r"http://\S+", line)
            assert match, line
            url = match.group(0)
            with openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0) as remote:
                assert ask(remote, "from afar") == "echo: from afar"
            assert httpx.get(url + "/_fake/health").json()["latency_s"] == 0.01
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()


async def wait_in_flight(server: FakeProviderServer, count: int, timeout_s: float = 60) -> None:
    """Until ``count`` requests are in flight; the deadline only keeps a broken server from hanging the run."""
    deadline = time.monotonic() + timeout_s
    while server.in_flight < count:
        assert time.monotonic() < deadline, f"{server.in_flight} of {count} requests in flight"
        await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_two_hundred_concurrent_slow_requests(fake_server: FakeProviderServer) -> None:
    fake_server.script.add(Fault("hang", seconds=600), match="slow")
    async with aclient(fake_server, timeout=120) as api:
        slow = asyncio.create_task(ask_async(api, "slow"))
        await wait_in_flight(fake_server, 1)
        fake_server.hold()  # nothing more is answered until all 200 are in: a serialising server would stall

        async def one(i: int) -> str | None:
            return await ask_async(api, f"q{i}")

        calls = asyncio.gather(*(one(i) for i in range(200)))
        await wait_in_flight(fake_server, 201)
        assert fake_server.max_in_flight == 201 and len(fake_server.requests) == 201
        fake_server.release()
        answers = await calls
        # all answered while the slow one still sleeps: a sleeping request blocks no other
        assert fake_server.in_flight == 1 and not slow.done()
        slow.cancel()
    assert answers == [f"echo: q{i}" for i in range(200)]


@pytest.mark.asyncio
async def test_in_flight_counts_held_requests_and_reset_lets_them_go(fake_server: FakeProviderServer) -> None:
    assert (fake_server.in_flight, fake_server.max_in_flight) == (0, 0)
    async with aclient(fake_server, timeout=120) as api:
        fake_server.hold()
        held = asyncio.gather(ask_async(api, "a"), ask_async(api, "b"))
        await wait_in_flight(fake_server, 2)
        health = httpx.get(fake_server.url + "/_fake/health").json()  # what other processes see
        assert (health["in_flight"], health["max_in_flight"]) == (2, 2)
        fake_server.reset()  # also lets the held requests go on
        assert await held == ["echo: a", "echo: b"]
        assert fake_server.in_flight == 0
        fake_server.clear_requests()
        assert fake_server.max_in_flight == 0
        assert await ask_async(api, "after") == "echo: after"  # no longer held
        assert fake_server.max_in_flight == 1


def test_session_server_serves_after_reset(fake_server_session: FakeProviderServer) -> None:
    fake_server_session.reset()
    fake_server_session.script.add(Reply(text="shared"))
    with client(fake_server_session) as shared:
        assert ask(shared, "hi") == "shared"
    assert len(fake_server_session.requests) == 1
